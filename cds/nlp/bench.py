"""Text model benchmark: ``python -m cds.nlp.bench [--output FILE]`` (called by ``make bench``).

Writes JSON with batch_messages_per_s (1,000+ chat-length messages, classify() in one call: featurise,
ONNX Runtime, safety net), single_p99_ms (one message per call), provider, sha256 and the machine.
Messages are synthetic chat lines in both languages (no patient data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from cds.nlp.model import TextRiskModel

_ZH = ["我最近总是睡不着，感觉活着好累", "今天和同事吵架了，心情很差", "我不想死，只是想休息一下", "我攒了很多安眠药",
       "考试没考好，笑死我了", "我朋友说她想死，我该怎么帮她", "谢谢你一直陪我聊天", "我真的不想活了，今晚就想结束这一切",
       "最近工作压力很大，头疼", "他又打我了，我好害怕"]
_EN = ["I can't sleep and everything feels pointless", "this homework is killing me", "I would never kill myself",
       "I've been saving my pills for weeks", "my friend said she wants to die, what should I do",
       "thanks for listening today", "I want to end it all tonight", "work has been stressful lately",
       "I could kill for a pizza right now", "I feel so alone since the breakup"]


def messages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = _ZH + _EN
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def run(n_batch: int = 2000, n_single: int = 500, model_dir: Path | None = None) -> dict[str, object]:
    model = TextRiskModel.load(model_dir, encoder_workers=os.cpu_count() or 1)
    batch = messages(n_batch)
    model.classify(batch[:64])  # warm-up
    t0 = time.perf_counter()
    model.classify(batch)
    batch_s = time.perf_counter() - t0
    if model.encoder is not None:
        model.encoder.workers = 1  # one message per call, as the service runs it
    lat = []
    for text in messages(n_single, seed=1):
        t = time.perf_counter()
        model.classify([text])
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    conv = messages(20, seed=2)
    t = time.perf_counter()
    model.assess_conversation(conv)
    conv_ms = (time.perf_counter() - t) * 1000
    return {"batch_messages_per_s": round(n_batch / batch_s, 1),
            "single_p50_ms": round(lat[len(lat) // 2], 3),
            "single_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3),
            "conversation_20_messages_ms": round(conv_ms, 2),
            "provider": model.provider, "model_sha256": model.sha256,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    result = run(n_batch=args.n, model_dir=args.model_dir)
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
