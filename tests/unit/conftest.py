"""Fixtures shared by the text-model tests: a tiny synthetic data set in shared/data's layout and a model
trained on it (n-gram heads and a one-layer encoder, one epoch: the training path in seconds, once a session)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from cds.nlp.commands import model_group

ZH_RISK = ["我真的不想活了", "活着好累，想消失", "我想自杀", "我攒了很多安眠药", "我打算今晚跳楼", "好想死啊"]
ZH_SAFE = ["今天天气很好", "工作压力有点大", "谢谢你陪我聊天", "我和朋友去吃饭了", "考试考得还行", "最近睡得不错"]
EN_RISK = ["I want to kill myself", "I can't go on anymore", "I have been cutting myself", "no reason to live"]
EN_SAFE = ["I had a nice walk today", "work was stressful", "thanks for listening", "my exam went fine"]


def _write_tiny_data(root: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "psysuicide_zh").mkdir(parents=True)
    rows = []
    for i in range(120):
        risky = i % 3 == 0
        text = rng.choice(ZH_RISK if risky else ZH_SAFE) + rng.choice(["", "。", "，真的", "啊"])
        label = [0.0] * 11
        label[3 if risky else 10] = 1.0
        if i % 17 == 0:
            text, label = "我想杀了他", [0.0] * 7 + [1.0] + [0.0] * 3
        if i % 19 == 0:
            text, label = "他又打我了", [0.0] * 8 + [1.0] + [0.0] * 2
        rows.append({"idx": i, "text": text, "labels": [], "data_source": "client_machine", "label": label})
    (root / "psysuicide_zh" / "valid.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (root / "sos4k_zh").mkdir()
    for name, n in (("train", 40), ("val", 15)):
        with (root / "sos4k_zh" / f"{name}.tsv").open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(["comment", "level"])
            for i in range(n):
                level = i % 11
                w.writerow([rng.choice(ZH_RISK if level >= 4 else ZH_SAFE) + f"{i}", level])
    (root / "cssrs_reddit_en").mkdir()
    with (root / "cssrs_reddit_en" / "users.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["User", "Post", "Label"])
        labels = ["Supportive", "Indicator", "Ideation", "Behavior", "Attempt"]
        for i in range(20):
            lab = labels[i % 5]
            posts = [rng.choice(EN_RISK if i % 5 >= 2 else EN_SAFE) for _ in range(3)]
            w.writerow([f"user-{i}", repr(posts), lab])
    (root / "sdcnl_en").mkdir()
    with (root / "sdcnl_en" / "training-set.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["title", "selftext", "is_suicide"])
        for i in range(20):
            w.writerow(["post", rng.choice(EN_RISK if i % 2 else EN_SAFE), i % 2])
    return root


TINY_ENCODER = ["--encoder", "--encoder-layers", "1", "--encoder-epochs", "1"]  # the encoder's training path, in seconds


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    res = CliRunner().invoke(model_group, ["train", "--data-dir", str(tiny_data), "--sample", "200",
                                           "--out", str(out), "--seed", "7", *TINY_ENCODER])
    assert res.exit_code == 0, res.output
    return out


