"""Hashed n-gram featuriser: text -> (bucket ids, sublinear term frequencies).

fastText-style: every n-gram is hashed with CRC-32 (stable across processes and machines, unlike
Python's salted ``hash()``) into ``buckets`` slots. Chinese runs give character 1..4-grams; Latin
runs give word uni- and bigrams plus character 3..5-grams of each word (padded with ``<`` ``>``).
Mixed text gets both, so no language decision is needed for the model input. IDF weighting and L2
normalisation happen inside the ONNX graph, so the featuriser only counts.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from cds.nlp.text import CJK_RE, LATIN_WORD_RE, normalise


@dataclass(frozen=True)
class FeatureConfig:
    buckets: int = 1 << 18
    zh_char_min: int = 1
    zh_char_max: int = 4
    en_word_max: int = 2
    en_char_min: int = 3
    en_char_max: int = 5
    max_chars: int = 20_000  # model input per text: first max_chars/2 and last max_chars/2 characters
    max_features: int = 8192  # distinct n-grams per text fed to the graph
    hash: str = "crc32"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        cfg = cls(**known)
        if cfg.hash != "crc32":
            raise ValueError(f"unsupported feature hash {cfg.hash!r}")
        return cfg


def _bucket(key: str, buckets: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % buckets


@lru_cache(maxsize=200_000)
def _word_ids(word: str, cfg: FeatureConfig) -> tuple[int, ...]:
    ids = [_bucket("w:" + word, cfg.buckets)]
    padded = f"<{word}>"
    for n in range(cfg.en_char_min, cfg.en_char_max + 1):
        for i in range(len(padded) - n + 1):
            ids.append(_bucket("c:" + padded[i:i + n], cfg.buckets))
    return tuple(ids)


def clip_text(text: str, max_chars: int) -> str:
    """Head and tail of a long text: the model sees both the opening and the latest part."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "\n" + text[-half:]


def text_counts(text: str, cfg: FeatureConfig) -> Counter[int]:
    norm = normalise(clip_text(text, cfg.max_chars))
    counts: Counter[int] = Counter()
    b = cfg.buckets
    for m in CJK_RE.finditer(norm):
        run = m.group()
        for n in range(cfg.zh_char_min, cfg.zh_char_max + 1):
            for i in range(len(run) - n + 1):
                counts[_bucket("z:" + run[i:i + n], b)] += 1
    words = LATIN_WORD_RE.findall(norm)
    for w in words:
        counts.update(_word_ids(w, cfg))
    for i in range(len(words) - 1):
        counts[_bucket("b:" + words[i] + " " + words[i + 1], b)] += 1
    return counts


def edge_words(text: str) -> tuple[str, str] | None:
    """First and last Latin word of a text as the featuriser sees them (None without any): what a
    word bigram across a newline joining two texts is made of."""
    words = LATIN_WORD_RE.findall(normalise(text))
    return (words[0], words[-1]) if words else None


def prefix_counts(parts: Sequence[str], cfg: FeatureConfig, counts: Callable[[str], Counter[int]],
                  edges: Callable[[str], tuple[str, str] | None], start: int = 0) -> list[Counter[int]]:
    """``text_counts("\\n".join(parts[:k + 1]))`` for every k from ``start``, each built on the one before
    from the parts' own counts (``counts``, usually cached) plus the word bigrams that cross a newline.
    Exact: normalisation is character by character, and a newline ends every Chinese run and every Latin
    word. A joined text the model would clip is counted directly."""
    out: list[Counter[int]] = []
    total: Counter[int] = Counter()
    last: str | None = None
    length = -1
    for k, part in enumerate(parts):
        length += len(part) + 1
        if length > cfg.max_chars:  # the model clips this text: count it as the model reads it
            if k >= start:
                out.append(text_counts("\n".join(parts[:k + 1]), cfg))
            continue
        total = total.copy() if out else total  # a prefix handed out is not added to again
        total.update(counts(part))
        edge = edges(part)
        if edge is not None:
            if last is not None:
                total[_bucket("b:" + last + " " + edge[0], cfg.buckets)] += 1
            last = edge[1]
        if k >= start:
            out.append(total)
    return out


def featurise(texts: Sequence[str], cfg: FeatureConfig) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Batch of texts -> ``ids`` int64 [batch, L] and ``tf`` float32 [batch, L] (1 + ln count; 0 = padding).

    L is the longest row in the batch (at least 1), capped at ``cfg.max_features``; a row with more
    distinct n-grams keeps the most frequent ones (ties: lowest bucket id, so the result is stable).
    """
    return featurise_counts([text_counts(text, cfg) for text in texts], cfg)


def featurise_counts(batch: Sequence[Mapping[int, int]], cfg: FeatureConfig
                     ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """``featurise`` from n-gram counts already made (see ``prefix_counts``)."""
    width = max([1] + [min(len(c), cfg.max_features) for c in batch])
    ids = np.zeros((len(batch), width), dtype=np.int64)
    tf = np.zeros((len(batch), width), dtype=np.float32)
    for r, row_counts in enumerate(batch):
        n = len(row_counts)
        if not n:
            continue
        keys = np.fromiter(row_counts.keys(), dtype=np.int64, count=n)
        counts = np.fromiter(row_counts.values(), dtype=np.float64, count=n)
        if n > cfg.max_features:  # the most frequent, ties by lowest bucket id
            keep = np.lexsort((keys, -counts))[: cfg.max_features]
            keys, counts = keys[keep], counts[keep]
        order = np.argsort(keys)
        ids[r, : len(keys)] = keys[order]
        tf[r, : len(keys)] = 1.0 + np.log(counts[order])
    return ids, tf


def ngram_spans(text: str, cfg: FeatureConfig, wanted: set[int]) -> list[tuple[int, int, int]]:
    """(start, end, bucket id) of every n-gram occurrence whose bucket is in ``wanted``, as offsets into
    ``text`` (the featuriser's normalisation keeps length; a clipped long text is mapped back)."""
    clipped = clip_text(text, cfg.max_chars)
    norm = normalise(clipped)
    half = cfg.max_chars // 2
    shift = len(text) - len(clipped)

    def orig(pos: int) -> int:
        return pos if shift == 0 or pos <= half else pos + shift

    b = cfg.buckets
    out: list[tuple[int, int, int]] = []
    for m in CJK_RE.finditer(norm):
        run, base = m.group(), m.start()
        for n in range(cfg.zh_char_min, cfg.zh_char_max + 1):
            for i in range(len(run) - n + 1):
                k = _bucket("z:" + run[i:i + n], b)
                if k in wanted:
                    out.append((orig(base + i), orig(base + i + n), k))
    words = list(LATIN_WORD_RE.finditer(norm))
    for j, m in enumerate(words):
        ids = _word_ids(m.group(), cfg)
        hit = [k for k in ids if k in wanted]
        if hit:
            out.append((orig(m.start()), orig(m.end()), hit[0]))
        if j + 1 < len(words):
            k = _bucket("b:" + m.group() + " " + words[j + 1].group(), b)
            if k in wanted:
                out.append((orig(m.start()), orig(words[j + 1].end()), k))
    return out
