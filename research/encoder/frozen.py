"""The frozen encoder beside the n-grams, through the shipped training recipe: out-of-fold heads, thresholds by
`choose_thresholds` with the safety net, then the test split scored once (model + safety net, the caps included).

    python -m research.encoder.frozen --encoder /tmp/e5/encoder.onnx [--alpha 0 0.35 0.5 1]

alpha 0 is the shipped recipe (this simulation gives SOS-4K 0.537 on test, the served model 0.539). The embedding
(mean-pooled last layer of the first 256 tokens) is centred on train+validation, L2-normalised and multiplied by
alpha before it is stacked beside the TF-IDF rows. Research code: not imported by the service.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import sparse

from cds.nlp import model as M
from cds.nlp import train as T
from cds.nlp.data import load_examples
from cds.nlp.e5_weights import load, tokenizer
from cds.nlp.encoder import sigmoid
from cds.nlp.features import FeatureConfig
from cds.nlp.safety_net import safety_net_scan
from research.encoder.e5_onnx import embed, session


def served_tiers(examples, prob, thresholds, scans) -> np.ndarray:
    """As TextRiskModel._result: model tier, post-length cap, short-message cap, max with the safety net."""
    out = np.zeros(len(examples), np.int64)
    for i, e in enumerate(examples):
        th = thresholds[e.lang]
        mt = M.tier_from_probs(np.nan_to_num(prob[i, :4]), th)
        capped = M.capped_model_tier(M.post_length_cap(mt, len(e.text), th, scans[i]), scans[i], len(e.text))
        out[i] = max(int(capped), int(scans[i].tier)) if scans[i].tier is not None else int(capped)
    return out


def report(name: str, examples, tiers: np.ndarray, mask: np.ndarray) -> None:
    src = np.array([e.source for e in examples])
    sub = np.array([e.subsource for e in examples])
    true = np.array([-1 if e.tier is None else e.tier for e in examples])

    def rp(sel: np.ndarray, k: int) -> str:
        y, p = true[sel] >= k, tiers[sel] >= k
        return f"{(y & p).sum() / max(y.sum(), 1):.3f} / {(y & p).sum() / max(p.sum(), 1):.3f}"

    sos = mask & (src == "sos4k_zh")
    psy = mask & (src == "psysuicide_zh")
    chat = psy & np.isin(sub, ["client_machine", "client_counselor"])
    print(f"{name}: SOS-4K macro-F1 {T.macro_f1(true[sos], tiers[sos]):.3f} | chat any-risk R / P {rp(chat, 1)} | "
          f"psysuicide any-risk {rp(psy, 1)} | zh high/imminent {rp(sos | psy, 3)} | "
          f"Reddit moderate+ {rp(mask & (src == 'cssrs_reddit_en'), 2)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, required=True)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()
    examples = load_examples(args.data)
    rows = np.array([e.split == "trainval" for e in examples])
    m = T.build_matrix([e.text for e in examples], FeatureConfig(), rows, progress=False)
    scans = [safety_net_scan(e.text, e.lang) for e in examples]
    sn_tier = np.array([0 if r.tier is None else int(r.tier) for r in scans])
    sn_harm = np.array([r.harm_to_others for r in scans])
    sn_means = np.array([M.names_means(r) for r in scans])
    emb = None
    if any(args.alpha):
        tok = tokenizer(load())
        emb = embed(session(args.encoder), [tok.encode(e.text, 256) for e in examples])
        emb -= emb[rows].mean(axis=0)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9
    for alpha in args.alpha:
        x = m.x if not alpha else sparse.hstack([m.x, sparse.csr_matrix(emb * alpha)]).tocsr()
        w, b, oof, _ = T.fit_heads(T.Matrix(x=x, idf=m.idf), examples, rows, T.DEFAULT_C, 13, progress=False)
        full = sigmoid(x @ w + b)
        th = T.choose_thresholds(examples, oof, sn_tier, sn_harm, rows, sn_means,
                                 sn_victim=np.array([r.victimisation for r in scans]))
        tiers = served_tiers(examples, np.where(rows[:, None], oof, full), th, scans)
        report(f"alpha {alpha} out of fold", examples, tiers, rows)
        report(f"alpha {alpha} test", examples, tiers, ~rows)


if __name__ == "__main__":
    main()
