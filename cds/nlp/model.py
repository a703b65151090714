"""The text risk model at run time: artefact loading and verification, the ONNX Runtime session,
batched classification, and the combination with the safety net.

Run time needs only numpy, onnxruntime and pyyaml. The artefact (cds/nlp/model/) is model.onnx plus
manifest.json holding the sha256 of model.onnx, the feature config, the output heads, the decision
thresholds (chosen on validation data by ``cds model train``) and the training summary and metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cds.domain import FLAG_HARM_TO_OTHERS, FLAG_VICTIMISATION, Evidence, RiskTier, Signal
from cds.errors import InputError, ModelError
from cds.lru import Lru
from cds.nlp.encoder import Encoder, combine
from cds.nlp.features import (
    FeatureConfig,
    edge_words,
    featurise_counts,
    ngram_spans,
    prefix_counts,
    text_counts,
)
from cds.nlp.safety_net import LEXICON_DIR, SafetyNetResult, conversation_scan, lexicons, safety_net_scan
from cds.nlp.text import detect_lang, traditional_to_simplified

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
TIER_HEADS = ("ge_low", "ge_moderate", "ge_high", "ge_imminent")  # P(tier >= k), k = low..imminent
FLAG_HEADS = ("harm_to_others", "victimisation")
HEADS = TIER_HEADS + FLAG_HEADS
BATCH = 256
MODEL_EVIDENCE_KIND = "model_cue"  # an n-gram that pushed the model towards its tier
MODEL_EVIDENCE_MAX = 3
CONTEXT_MESSAGES = 10  # messages the model reads together in a conversation window
# One intra-op thread: the model is a sparse gather and a small matmul per batch, which a second thread does
# not speed up (measured: 4,330 vs 4,320 messages/s batched), while onnxruntime's default pool (one thread per
# core) spins between runs and burned ~5 ms of CPU per assessed message that PostgreSQL and the EHR needed.
INTRA_OP_THREADS = 1
ENCODER_THREADS = 1  # the encoder's session: see the model card for the measured one- and two-thread rates
CACHE_TEXTS = 65536  # per-message results kept: a conversation's earlier messages are read again with each new one


@dataclass(frozen=True)
class TextResult:
    """The text risk verdict for one message (or one conversation).

    ``probability`` is the model's calibrated P(tier >= low): the chance that the text expresses any
    suicide / self-harm risk (Platt-calibrated on validation data); the safety net does not change it.
    ``tier`` is max(model tier, safety-net tier). Evidence offsets are into the original text; for a
    conversation each Evidence has ``ref="#<message index>"`` and offsets into that message.
    """

    tier: RiskTier
    probability: float
    harm_to_others: bool
    victimisation: bool
    evidence: tuple[Evidence, ...]
    lang: str
    model_tier: RiskTier
    safety_net_tier: RiskTier | None
    model_source: str = ""  # "model:<sha256[:12]>"
    safety_net_kinds: tuple[str, ...] = ()
    safety_net_source: str = ""  # "lexicon:zh@1.0.0" (comma-separated when both lexicons fired)

    def signals(self, source_ref: str) -> tuple[Signal, ...]:
        """Signals for the triage rules; every Evidence gets ``ref=source_ref`` (plus its own
        ``#<message index>`` suffix for a conversation)."""
        ev = tuple(Evidence(start=e.start, end=e.end, kind=e.kind, ref=source_ref + e.ref, source=e.source,
                            text=e.text) for e in self.evidence)
        src = self.model_source
        out = [
            Signal(name="text.tier", value=self.tier.label, source=src, tier=self.tier, evidence=ev),
            Signal(name="text.probability", value=round(self.probability, 4), source=src),
            Signal(name=f"text.{FLAG_HARM_TO_OTHERS}", value=self.harm_to_others, source=src,
                   evidence=tuple(e for e in ev if e.kind == "aggression")),
            Signal(name=f"text.{FLAG_VICTIMISATION}", value=self.victimisation, source=src,
                   evidence=tuple(e for e in ev if e.kind == "victimisation")),
        ]
        if self.safety_net_kinds:
            out.append(Signal(name="text.safety_net", value=list(self.safety_net_kinds),
                              source=self.safety_net_source, tier=self.safety_net_tier,
                              evidence=tuple(e for e in ev if e.source.startswith("lexicon:"))))
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier.label, "probability": round(self.probability, 4),
                "harm_to_others": self.harm_to_others, "victimisation": self.victimisation,
                "lang": self.lang, "model_tier": self.model_tier.label,
                "safety_net_tier": self.safety_net_tier.label if self.safety_net_tier is not None else None,
                "safety_net_kinds": list(self.safety_net_kinds),
                "evidence": [e.to_json() for e in self.evidence]}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_digest(digests: Mapping[str, str]) -> str:
    """The model's identity when it is several files: sha256 over ``name:sha256`` lines in name order."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()


def model_files(ngram_sha256: str, encoder: Mapping[str, Any] | None) -> dict[str, str]:
    """The model's files and their sha256s, as the manifest's ``files`` lists them."""
    files = {"model.onnx": ngram_sha256}
    if encoder is not None:
        files[encoder["file"]] = encoder["sha256"]
        files[encoder["tokenizer"]] = encoder["tokenizer_sha256"]
    return files


def verified_file(model_dir: Path, name: str, sha256: str) -> Path:
    """``model_dir / name``, refused unless present and matching the manifest's sha256."""
    path = model_dir / name
    if not path.is_file():
        raise ModelError(f"text model {path} is missing; run `cds model train`")
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelError(f"text model {path} does not match its manifest: sha256 {actual} "
                         f"!= {sha256} (corrupt or replaced file)")
    return path


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"text model manifest {path} is missing; run `cds model train`") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"text model manifest {path} is corrupt: {exc}") from exc
    for key in ("sha256", "features", "heads", "thresholds", "version"):
        if key not in manifest:
            raise ModelError(f"text model manifest {path} lacks {key!r}")
    return dict(manifest)


ANY_RISK_GATE = 0.5  # no model tier while P(any risk) < 0.5: a higher head alone does not raise it


def tier_from_probs(p: npt.NDArray[np.float32], thresholds: Mapping[str, float]) -> RiskTier:
    """Highest tier k whose P(tier >= k) reaches its threshold (recall first: any head may raise it),
    once the model finds any risk more likely than not (P(tier >= low) >= ANY_RISK_GATE)."""
    tier = RiskTier.NONE
    if p[0] < ANY_RISK_GATE:
        return tier
    for k, head in enumerate(TIER_HEADS, start=1):
        if p[k - 1] >= thresholds[head]:
            tier = RiskTier(k)
    return tier


CAP_MAX_CHARS = 40  # the cap below applies to short single-statement messages only


def post_length_cap(model_tier: RiskTier, longest: int, thresholds: Mapping[str, float],
                    sn: SafetyNetResult | None = None) -> RiskTier:
    """The model alone gives at most LOW where every message is shorter than ``post_min_chars`` of the
    language (the manifest's, from training: set where that language's thresholds were chosen on posts,
    not chat turns) and the text names no means. English learned from Reddit posts only and its
    thresholds were chosen on whole post histories, 95% of them 385 characters or more: on chat its
    higher heads fire on "I'm going to the gym after dinner" as readily as on risk, and in conversations
    of ordinary chat 88% of messages raised an alert.
    A LOW text sets a floor and raises no alert; the safety net still raises one on what it counts.
    A means word the lexicon saw, counted or waiting for an anchor ("I keep thinking about the pills" ...
    "I bought them today", "I have a rope ready and tonight is the night"), lifts the cap: there the
    model's reading of the context is what finds the risk. ``longest``: the longest message of the text
    or window; ``sn``: the safety-net scan of the same text or window."""
    if model_tier <= RiskTier.LOW or longest >= float(thresholds.get("post_min_chars", 0)):
        return model_tier
    return model_tier if sn is not None and names_means(sn) else RiskTier.LOW


def names_means(sn: SafetyNetResult) -> bool:
    """The scan saw a means word, counted or waiting for an anchor (it lifts ``post_length_cap``)."""
    return any(h.kind == "means" and h.status in ("counted", "no_context") for h in sn.hits)


def capped_model_tier(model_tier: RiskTier, sn: SafetyNetResult, length: int) -> RiskTier:
    """The model tier as it enters the final max: capped at LOW when the safety net explains the
    risk words away - every suicidal match it found was negated, idiomatic, third/second person or
    quoted ("我不想死", "笑死我了", "this homework is killing me", "my friend wants to die"), or it
    found only aggression/victimisation ("I want to kill him"). Character n-grams cannot see
    negation or idiom; the lexicon can. A lexicon-counted suicidal match lifts the cap, and so does
    length: in a text longer than CAP_MAX_CHARS one explained-away phrase does not explain the rest."""
    if model_tier <= RiskTier.LOW or sn.tier is not None or length > CAP_MAX_CHARS:
        return model_tier
    explained = any(h.kind in ("aggression", "victimisation") and h.counted for h in sn.hits) or any(
        not h.counted and h.status != "no_context" and h.kind != "timing" for h in sn.hits)
    return RiskTier.LOW if explained else model_tier


def encoder_floor(calibration: Sequence[Sequence[float]]) -> float:
    """The n-gram P(tier >= low) below which the combination stays under ANY_RISK_GATE even if the encoder said
    1.0: calibrated P = sigmoid(a * logit(mean) + b) reaches the gate at mean m* = sigmoid((logit(gate) - b) / a),
    and mean = (ngram + encoder) / 2 <= (ngram + 1) / 2, so ngram < 2 m* - 1 (minus a margin for rounding) can
    never reach it."""
    a, b = calibration[0]
    if a <= 0:
        return 0.0
    gate_logit = math.log(ANY_RISK_GATE / (1 - ANY_RISK_GATE))
    m_star = 1 / (1 + math.exp(-(gate_logit - b) / a))
    return max(0.0, 2 * m_star - 1 - 1e-4)


class TextRiskModel:
    """ONNX text risk model + safety net. Thread-safe for concurrent ``classify`` calls."""

    def __init__(self, session: Any, manifest: Mapping[str, Any], model_dir: Path,
                 lexicon_dir: Path = LEXICON_DIR, encoder: Encoder | None = None) -> None:
        self._session = session
        self.encoder = encoder
        self._calibration: list[list[float]] = list(manifest["encoder"]["calibration"]) if encoder else []
        self.encoder_floor = encoder_floor(self._calibration) if encoder else 0.0
        self.manifest = manifest
        self.model_dir = model_dir
        # The model's identity: model.onnx's sha256, or with an encoder the digest over all its files.
        self.sha256: str = str(manifest.get("bundle_sha256") or manifest["sha256"])
        self.version: str = str(manifest["version"])
        self.features = FeatureConfig.from_json(manifest["features"])
        self.heads: tuple[str, ...] = tuple(manifest["heads"])
        if self.heads != HEADS:
            raise ModelError(f"text model heads {self.heads} do not match this code's {HEADS}")
        self.thresholds: Mapping[str, Any] = manifest["thresholds"]
        self.provider: str = str(session.get_providers()[0])
        self.source = f"model:{self.sha256[:12]}"
        self.lexicon_dir = lexicon_dir
        lexicons(lexicon_dir)  # fail at load, not at the first message
        traditional_to_simplified()  # the script table too (~0.1 s), not on the first message
        self._text_cache = Lru(CACHE_TEXTS)  # text -> (n-gram counts, edge words)
        self._result_cache = Lru(CACHE_TEXTS)  # (text, lang) -> TextResult
        self._window_cache = Lru(CACHE_TEXTS)  # tuple of a window's messages -> head probabilities

    @classmethod
    def load(cls, model_dir: Path | None = None, providers: Sequence[str] | None = None,
             encoder_workers: int = 1) -> TextRiskModel:
        """Load and verify the artefact; ask for CUDA then CPU (only those onnxruntime offers).
        ``encoder_workers``: texts the encoder runs at once in a batch (the service: 1, leaving the other core to
        PostgreSQL and the EHR; `cds classify`: one per core)."""
        model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
        manifest = read_manifest(model_dir)
        onnx_path = verified_file(model_dir, "model.onnx", manifest["sha256"])
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelError("onnxruntime is not installed (pip install 'psych-cds[cpu]' or '[gpu]')") from exc
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or DEFAULT_PROVIDERS) if p in available] or ["CPUExecutionProvider"]

        def session_for(path: Path, threads: int = INTRA_OP_THREADS) -> Any:
            try:
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                opts.intra_op_num_threads = threads
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                return ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise ModelError(f"text model {path} cannot be loaded by onnxruntime: {exc}") from exc

        encoder = None
        if manifest.get("encoder"):
            encoder = Encoder.load(model_dir, manifest["encoder"],
                                   lambda path: session_for(path, ENCODER_THREADS))
            encoder.workers = max(1, encoder_workers)
            files = model_files(manifest["sha256"], manifest["encoder"])
            if manifest.get("files") != files or manifest.get("bundle_sha256") != bundle_digest(files):
                raise ModelError(f"text model manifest {model_dir / 'manifest.json'} lists files or a bundle "
                                 "sha256 that do not match its own entries (edited by hand?)")
        return cls(session_for(onnx_path), manifest, model_dir, encoder=encoder)

    # -- model only -------------------------------------------------------------------------
    def predict_proba(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Head probabilities [n, len(HEADS)], tier heads made monotone (P(>=k+1) <= P(>=k))."""
        probs, _ = self._run(texts, want_contrib=False)
        return probs

    def _run(self, texts: Sequence[str], want_contrib: bool) -> tuple[npt.NDArray[np.float32], list[Any]]:
        probs, contribs = self._run_counts([self._text_features(t)[0] for t in texts], want_contrib)
        enc = self.encoder
        if enc is not None and len(texts):
            probs[:, :4] = self._combine(probs[:, :4], lambda rows: enc.predict([texts[i] for i in rows]))
        return probs, contribs

    def _text_features(self, text: str) -> tuple[Counter[int], tuple[str, str] | None]:
        made: tuple[Counter[int], tuple[str, str] | None] = self._text_cache.get_or_make(
            text, lambda: (text_counts(text, self.features), edge_words(text)))
        return made

    def _combine(self, ngram: npt.NDArray[np.float32],
                 encode: Callable[[list[int]], npt.NDArray[np.float64]]) -> npt.NDArray[np.float32]:
        """The n-gram tier heads combined with the encoder's (``encode(rows)``), which runs only on the rows whose
        n-gram P(tier >= low) reaches ``encoder_floor``: below it no encoder output can bring the combination to
        ANY_RISK_GATE, so the tier is the same without it. There the encoder's place is taken by the n-gram
        heads themselves (the probability is theirs, through the same calibration)."""
        stand_in = ngram.astype(np.float64)
        rows = [int(i) for i in np.flatnonzero(ngram[:, 0] >= self.encoder_floor)]
        if rows:
            stand_in[rows] = encode(rows)
        return combine(ngram, stand_in, self._calibration)

    def _run_counts(self, counts: Sequence[Mapping[int, int]], want_contrib: bool
                    ) -> tuple[npt.NDArray[np.float32], list[Any]]:
        outs: list[npt.NDArray[np.float32]] = []
        contribs: list[Any] = []
        names = ["probs", "contrib"] if want_contrib else ["probs"]
        for i in range(0, len(counts), BATCH):
            chunk = counts[i:i + BATCH]
            ids, tf = featurise_counts(chunk, self.features)
            res = self._session.run(names, {"ids": ids, "tf": tf})
            outs.append(res[0])
            if want_contrib:
                contribs += [(ids[r], res[1][r]) for r in range(len(chunk))]
        probs = np.concatenate(outs, axis=0) if outs else np.zeros((0, len(HEADS)), np.float32)
        probs[:, :4] = np.minimum.accumulate(probs[:, :4], axis=1)
        return probs, contribs

    def _predict_joined(self, windows: Sequence[Sequence[str]]) -> npt.NDArray[np.float32]:
        """``predict_proba`` of each window joined by newlines, from the messages' cached counts."""
        def counts_of(text: str) -> Counter[int]:
            return self._text_features(text)[0]

        def edges_of(text: str) -> tuple[str, str] | None:
            return self._text_features(text)[1]

        # A conversation is assessed again with each new message, so its earlier windows are looked up,
        # not recomputed: only the windows ending at new messages reach the model.
        keys = [tuple(w) for w in windows]
        cached = [self._window_cache.get(k) for k in keys]
        todo = [k for k, c in zip(keys, cached) if c is None]
        # Windows that grow one message at a time (a conversation shorter than CONTEXT_MESSAGES) are
        # counted as prefixes, each from the one before.
        counts: list[Counter[int]] = []
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and todo[j][:-1] == todo[j - 1]:
                j += 1
            run = todo[j - 1]
            first = len(todo[i])
            counts += prefix_counts(run, self.features, counts_of, edges_of, start=first - 1)
            i = j
        made, _ = self._run_counts(counts, want_contrib=False)
        enc = self.encoder
        if enc is not None and todo:
            made[:, :4] = self._combine(made[:, :4], lambda rows: enc.predict_windows([todo[i] for i in rows]))
        fresh = iter(made)
        rows: list[npt.NDArray[np.float32]] = []
        for k, c in zip(keys, cached):
            if c is None:
                c = next(fresh)
                self._window_cache.put(k, c)
            rows.append(c)
        return np.stack(rows) if rows else np.zeros((0, len(HEADS)), np.float32)

    def _model_evidence(self, text: str, ids: npt.NDArray[np.int64], contrib: npt.NDArray[np.float32],
                        head: int) -> list[Evidence]:
        c = contrib[:, head]
        order = [int(j) for j in np.argsort(-c) if c[j] > 0][: MODEL_EVIDENCE_MAX * 4]
        wanted = {int(ids[j]) for j in order}
        if not wanted:
            return []
        rank = {int(ids[j]): r for r, j in enumerate(order)}
        spans = sorted(ngram_spans(text, self.features, wanted), key=lambda s: (rank[s[2]], s[0]))
        chosen: list[tuple[int, int]] = []
        for s, e, _ in spans:
            if any(s < ce and cs < e for cs, ce in chosen):
                continue
            chosen.append((s, e))
            if len(chosen) == MODEL_EVIDENCE_MAX:
                break
        return [Evidence(start=s, end=e, kind=MODEL_EVIDENCE_KIND, source=self.source, text=text[s:e])
                for s, e in sorted(chosen)]

    # -- model + safety net ------------------------------------------------------------------
    def _thresholds_for(self, lang: str) -> Mapping[str, float]:
        th = self.thresholds
        return th.get(lang) or th["default"]  # type: ignore[no-any-return]

    def classify(self, texts: Sequence[str], langs: Sequence[str | None] | None = None) -> list[TextResult]:
        """Classify a batch of messages. Any length works: the model reads the first and last
        ``max_chars/2`` characters, the safety net scans the whole text."""
        if isinstance(texts, str):
            raise InputError("classify() takes a sequence of texts, not one string")
        if langs is not None and len(langs) != len(texts):
            raise InputError(f"classify(): {len(texts)} texts but {len(langs)} langs")
        texts = [t if isinstance(t, str) else "" for t in texts]
        keys = []
        for i, text in enumerate(texts):
            given = langs[i] if langs is not None else None
            keys.append((text, given if given in ("zh", "en") else detect_lang(text)))
        found: dict[tuple[str, str], TextResult] = {}
        for key in keys:
            hit = self._result_cache.get(key)
            if hit is not None:
                found[key] = hit
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            probs, contribs = self._run([t for t, _ in todo], want_contrib=True)
            for j, (text, lang) in enumerate(todo):
                result = self._result(text, lang, probs[j], self._scan(text, lang), contribs[j])
                self._result_cache.put((text, lang), result)
                found[(text, lang)] = result
        return [found[k] for k in keys]

    def _scan(self, text: str, lang: str) -> SafetyNetResult:
        return safety_net_scan(text, lang, self.lexicon_dir)

    def _result(self, text: str, lang: str, p: npt.NDArray[np.float32], sn: SafetyNetResult,
                contrib: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None) -> TextResult:
        th = self._thresholds_for(lang)
        if not text.strip():
            model_tier, prob, harm, victim = RiskTier.NONE, 0.0, False, False
        else:
            model_tier = tier_from_probs(p, th)
            prob = float(p[0])
            harm = bool(p[4] >= th["harm_to_others"])
            victim = bool(p[5] >= th["victimisation"])
        evidence = list(sn.evidence)
        if contrib is not None and text.strip():
            if model_tier > RiskTier.NONE:
                evidence += self._model_evidence(text, contrib[0], contrib[1], int(model_tier) - 1)
            elif harm:
                evidence += self._model_evidence(text, contrib[0], contrib[1], 4)
        evidence.sort(key=lambda e: (e.start, e.end, e.kind))
        capped = capped_model_tier(post_length_cap(model_tier, len(text), th, sn), sn, len(text))
        tier = max(capped, sn.tier) if sn.tier is not None else capped
        return TextResult(tier=tier, probability=prob, harm_to_others=harm or sn.harm_to_others,
                          victimisation=victim or sn.victimisation, evidence=tuple(evidence), lang=lang,
                          model_tier=model_tier, safety_net_tier=sn.tier, model_source=self.source,
                          safety_net_kinds=sn.kinds, safety_net_source=",".join(sn.lexicons))

    def _capped_window(self, tier: RiskTier, window: str, part: Sequence[str], lang: str | None,
                       thresholds: Mapping[str, float], scanned: SafetyNetResult | None = None) -> RiskTier:
        """A window's model tier under the post-length and short-message caps, judged by the safety net
        on that window alone (``scanned``: that scan, when the caller has it already)."""
        longest = max(len(m) for m in part)
        if tier <= RiskTier.LOW or (len(window) > CAP_MAX_CHARS and longest >= thresholds.get("post_min_chars", 0)):
            return tier  # neither cap can apply: no need to scan
        sn = scanned or conversation_scan(part, lang or detect_lang(window), self.lexicon_dir)
        return capped_model_tier(post_length_cap(tier, longest, thresholds, sn), sn, len(window))

    def assess_conversation(self, messages: Sequence[str], lang: str | None = None, *,
                            new: int | None = None) -> TextResult:
        """Consecutive messages of one patient's episode, assessed together.

        tier = max(each message alone, the model on every window of up to CONTEXT_MESSAGES consecutive
        messages ending at each message, the safety net on the whole conversation joined by newlines).
        So context across messages counts ("the pills" ... "I bought them today"), and appending a
        message can only add terms to that max: a later "I was joking" never lowers the tier.
        probability = the highest of the message and window probabilities. Evidence offsets are into
        each message, with ``ref="#<index>"``.

        ``new``: only the last ``new`` messages are new, and only the windows ending at them are read
        by the model. The pipeline passes a sliding slice (the latest message and the few before it);
        a window ending at an earlier message of the slice would be a truncated copy of the window that
        was assessed when that message was the latest, so reading it again only costs model rows (eight
        per message, not one). Each message alone and the joint safety-net scan still cover the slice.
        """
        if isinstance(messages, str):
            raise InputError("assess_conversation() takes a sequence of messages, not one string")
        if new is not None and new < 1:
            raise InputError("assess_conversation(): new must be at least 1")
        messages = [m if isinstance(m, str) else "" for m in messages]
        if not messages:
            return self.classify([""])[0]
        joint = "\n".join(messages)
        given = lang if lang in ("zh", "en") else None
        conv_lang = given or detect_lang(joint)
        # Every message and every window is judged on its own text only (its own language when none is
        # given, its own safety-net scan for the short-message cap), so what a message or a window adds
        # to the max below never changes when a later message arrives: the tier cannot drop (the
        # conversation's detected language can flip as messages come, and with it the thresholds).
        per = self.classify(messages, [given] * len(messages))
        first = 1 if new is None else max(1, len(messages) - new)
        parts = [messages[max(0, i - CONTEXT_MESSAGES + 1):i + 1] for i in range(first, len(messages))]
        windows = ["\n".join(p) for p in parts]
        win_probs = self._predict_joined(parts) if windows else np.zeros((0, len(HEADS)), np.float32)
        win_th = [self._thresholds_for(given or detect_lang(w)) for w in windows]
        sn = conversation_scan(messages, conv_lang, self.lexicon_dir)

        starts: list[int] = []
        pos = 0
        for m in messages:
            starts.append(pos)
            pos += len(m) + 1
        evidence: dict[tuple[int, int, int, str], Evidence] = {}
        for i, r in enumerate(per):
            for e in r.evidence:
                evidence[(i, e.start, e.end, e.kind)] = Evidence(e.start, e.end, e.kind, f"#{i}", e.source, e.text)
        # The joint scan adds what only context shows; its spans are mapped back into their message.
        for e in sn.evidence:
            i = max(j for j, s0 in enumerate(starts) if s0 <= e.start)
            s0, e0 = e.start - starts[i], min(e.end - starts[i], len(messages[i]))
            if e0 > s0:
                evidence.setdefault((i, s0, e0, e.kind),
                                    Evidence(s0, e0, e.kind, f"#{i}", e.source, messages[i][s0:e0]))
        kept = [(w, parts[j], p, th) for j, (w, p, th) in enumerate(zip(windows, win_probs, win_th)) if w.strip()]
        win_tiers = [tier_from_probs(p, th) for _, _, p, th in kept]
        model_tier = max([r.model_tier for r in per] + win_tiers)  # reported uncapped, for transparency
        sn_tiers = [t for t in [r.safety_net_tier for r in per] + [sn.tier] if t is not None]
        sn_tier = max(sn_tiers) if sn_tiers else None
        # The final tier uses each message's final tier and the windows' model tiers under the same
        # caps as a single message (capped_model_tier, with the window's own scan), then the safety net on
        # the whole conversation.
        # A window of the whole slice is the joint text: its scan is ``sn`` (same messages, same language).
        capped_windows = [self._capped_window(t, w, part, given, th, sn if w == joint else None)
                          for t, (w, part, _, th) in zip(win_tiers, kept)]
        tier = max([r.tier for r in per] + capped_windows + ([sn_tier] if sn_tier is not None else []))
        win_max = win_probs.max(axis=0) if len(win_probs) else np.zeros(len(HEADS), np.float32)
        harm_window = any(bool(p[4] >= th["harm_to_others"]) for _, _, p, th in kept)
        victim_window = any(bool(p[5] >= th["victimisation"]) for _, _, p, th in kept)
        kinds = sorted({k for r in per for k in r.safety_net_kinds} | set(sn.kinds))
        sources = sorted({s for r in per for s in r.safety_net_source.split(",") if s} | set(sn.lexicons))
        return TextResult(
            tier=tier, probability=max([r.probability for r in per] + [float(win_max[0])]),
            harm_to_others=any(r.harm_to_others for r in per) or sn.harm_to_others or harm_window,
            victimisation=any(r.victimisation for r in per) or sn.victimisation or victim_window,
            evidence=tuple(sorted(evidence.values(), key=lambda e: (int(e.ref[1:]), e.start, e.end, e.kind))),
            lang=conv_lang, model_tier=model_tier, safety_net_tier=sn_tier, model_source=self.source,
            safety_net_kinds=tuple(kinds), safety_net_source=",".join(sources))
