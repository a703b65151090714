"""Evidence spans made readable: the message text split into plain and highlighted runs.

One function serves the nurse's queue and the psychiatrist's patient page, so a span looks the same
(and means the same) wherever a clinician reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Overlapping spans show the more specific kind: a plan outranks ideation, any risk kind a model cue.
EVIDENCE_ORDER = ("plan", "means", "timing", "preparatory_act", "prior_attempt", "farewell", "self_harm",
                  "aggression", "victimisation", "ideation", "idiom", "model_cue")


@dataclass(frozen=True)
class Segment:
    """A run of message text; ``kind`` is set when the run is highlighted evidence."""

    text: str
    kind: str | None = None


def _kind_class(kind: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in kind.lower())[:40] or "other"


def highlight(text: str, spans: Iterable[tuple[int, int, str]]) -> tuple[Segment, ...]:
    """Split ``text`` into plain and highlighted runs; overlapping spans take the more specific kind."""
    rank = {k: i for i, k in enumerate(EVIDENCE_ORDER)}
    best: list[str | None] = [None] * len(text)
    for start, end, kind in spans:
        for i in range(max(0, start), min(len(text), end)):
            current = best[i]
            if current is None or rank.get(kind, len(rank)) < rank.get(current, len(rank)):
                best[i] = kind
    out: list[Segment] = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and best[j] == best[i]:
            j += 1
        run_kind = best[i]
        out.append(Segment(text[i:j], _kind_class(run_kind) if run_kind else None))
        i = j
    return tuple(out)
