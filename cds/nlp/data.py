"""The labelled training data (/work/shared/data, see its README.md) mapped onto the five tiers.

Training-only: the service never reads these files. Columns the README says must not be used do not
exist in the copies we read (SOS-4K ``explain``, SDCNL author/URL), and nothing here reads any column
beyond text and label.
"""

from __future__ import annotations

import ast
import csv
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cds.errors import InputError

SOURCES = ("psysuicide_zh", "sos4k_zh", "cssrs_reddit_en", "sdcnl_en")

# psysuicide 11-dim multi-hot order (data/README.md).
_ATTEMPT, _PREP, _PLAN, _ACTIVE, _PASSIVE, _SH_ACT, _SH_INTENT, _AGGR, _VICTIM = range(9)
_REDDIT_TIER = {"supportive": 0, "indicator": 1, "ideation": 2, "behavior": 3, "attempt": 3}


@dataclass(frozen=True)
class Example:
    text: str
    source: str  # one of SOURCES
    subsource: str  # psysuicide data_source, else the source
    lang: str
    tier: int | None  # 0..4; None where the source has no tier (sdcnl)
    moderate_plus: bool | None  # tier >= moderate, also known for sdcnl
    harm: bool | None  # harm to others (psysuicide only)
    victim: bool | None  # victimisation (psysuicide only)
    split: str = "trainval"  # "trainval" | "test"


def psysuicide_tier(label: Sequence[float]) -> int:
    on = [i for i, v in enumerate(label) if v >= 0.5]
    if _PREP in on:
        return 4
    if _PLAN in on or _ATTEMPT in on:
        return 3
    if _ACTIVE in on or _SH_ACT in on:
        return 2
    if _PASSIVE in on or _SH_INTENT in on:
        return 1
    return 0


def sos4k_tier(level: int) -> int:
    return 0 if level == 0 else 1 if level <= 3 else 2 if level <= 5 else 3 if level <= 8 else 4


def parse_post_list(raw: str) -> list[str]:
    """The Reddit C-SSRS ``Post`` column: a Python-list string, some cut off at 32,759 characters."""
    try:
        value = ast.literal_eval(raw)
        if isinstance(value, list):
            return [str(p) for p in value]
    except (ValueError, SyntaxError):
        pass
    body = raw.strip().removeprefix("[").removesuffix("]")
    parts = re.split(r"""['"],\s+['"]""", body)
    return [p.strip().strip("'\"") for p in parts if p.strip().strip("'\"")]


def _split(items: list[Example], key: list[str], test_frac: float, seed: int) -> list[Example]:
    """Stratified split: within each stratum a seeded shuffle, the first ``test_frac`` goes to test."""
    rng = random.Random(seed)
    by: dict[str, list[int]] = {}
    for i, k in enumerate(key):
        by.setdefault(k, []).append(i)
    test: set[int] = set()
    for k in sorted(by):
        idx = by[k]
        rng.shuffle(idx)
        test.update(idx[: round(len(idx) * test_frac)])
    return [replace(e, split="test" if i in test else "trainval") for i, e in enumerate(items)]


def load_examples(data_dir: Path, seed: int = 13, test_frac: float = 0.2) -> list[Example]:
    """All sources present under ``data_dir`` with a fixed train+validation / test split.

    psysuicide: stratified by tier+harm, ``test_frac`` held out; SOS-4K: its own train / val files
    (val = test); Reddit C-SSRS: users stratified by label; SDCNL: stratified by class.
    """
    data_dir = Path(data_dir)
    out: list[Example] = []
    found = False
    path = data_dir / "psysuicide_zh" / "valid.json"
    if path.exists():
        found = True
        rows = json.loads(path.read_text(encoding="utf-8"))
        items = [Example(text=str(r["text"]), source="psysuicide_zh", subsource=str(r.get("data_source", "")),
                         lang="zh", tier=psysuicide_tier(r["label"]),
                         moderate_plus=psysuicide_tier(r["label"]) >= 2,
                         harm=r["label"][_AGGR] >= 0.5, victim=r["label"][_VICTIM] >= 0.5) for r in rows]
        out += _split(items, [f"{e.tier}{e.harm}" for e in items], test_frac, seed)
    for name, split in (("train", "trainval"), ("val", "test")):
        path = data_dir / "sos4k_zh" / f"{name}.tsv"
        if path.exists():
            found = True
            with path.open(encoding="utf-8", newline="") as fh:
                for r in csv.DictReader(fh, delimiter="\t"):
                    t = sos4k_tier(int(r["level"]))
                    out.append(Example(text=r["comment"], source="sos4k_zh", subsource="sos4k_zh", lang="zh",
                                       tier=t, moderate_plus=t >= 2, harm=None, victim=None, split=split))
    csv.field_size_limit(sys.maxsize)
    path = data_dir / "cssrs_reddit_en" / "users.csv"
    if path.exists():
        found = True
        with path.open(encoding="utf-8", newline="") as fh:
            rows2 = list(csv.DictReader(fh))
        items = []
        for r in rows2:
            t = _REDDIT_TIER[r["Label"].strip().lower()]
            text = "\n".join(parse_post_list(r["Post"]))
            items.append(Example(text=text, source="cssrs_reddit_en", subsource="cssrs_reddit_en", lang="en",
                                 tier=t, moderate_plus=t >= 2, harm=None, victim=None))
        out += _split(items, [str(e.tier) for e in items], test_frac, seed)
    path = data_dir / "sdcnl_en" / "training-set.csv"
    if path.exists():
        found = True
        with path.open(encoding="utf-8", newline="") as fh:
            rows3 = list(csv.DictReader(fh))
        items = [Example(text=f"{r['title']}\n{r['selftext']}".strip(), source="sdcnl_en", subsource="sdcnl_en",
                         lang="en", tier=None, moderate_plus=str(r["is_suicide"]).strip() in ("1", "1.0"),
                         harm=None, victim=None) for r in rows3]
        out += _split(items, [str(e.moderate_plus) for e in items], test_frac, seed)
    if not found:
        raise InputError(f"no training data found under {data_dir} (expected {', '.join(SOURCES)})")
    return out


def sample_examples(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A deterministic sample of ``n`` examples, keeping the source mix and both splits."""
    if n >= len(examples):
        return examples
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    return [examples[i] for i in sorted(idx[:n])]
