"""Three-valued evaluation of rule logic over signals and history, with a plain-words trace.

Every test answers True, False or None (unknown). Unknown comes only from missing data: an
indeterminate signal (``Signal.missing``) or an unknown history fact (``History.prior_attempt is None``).
``all``/``any``/``not`` follow Kleene logic, so a missing answer can leave a rule undecided but can never
make a rule quietly not fire when the known answers already make it fire.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cds.domain import History, RiskTier, Signal

Tri = bool | None

SYMBOLS = {"eq": "=", "ne": "≠", "gt": ">", "gte": "≥", "lt": "<", "lte": "≤", "in": "in"}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gte": operator.ge,
    "lt": operator.lt, "lte": operator.le, "in": lambda a, b: a in b,
}
COMPARISONS = tuple(SYMBOLS)
HISTORY_LABELS = {"previous_tier": "previous tier", "prior_attempt": "prior suicide attempt",
                  "age_years": "age (years)", "conditions": "diagnoses (ICD-10)"}


class Verdict:
    """The result of one test: its truth, the trace lines that explain it, and what was missing.

    The lines are written only when read (``make``): a rule set is evaluated in full for every event, and
    the traces of the rules that do not fire are never shown, so their words were most of the cost."""

    __slots__ = ("value", "missing", "_lines", "_make")

    def __init__(self, value: Tri, lines: list[str] | None = None, missing: list[str] | None = None, *,
                 make: Callable[[], list[str]] | None = None) -> None:
        self.value = value
        self.missing = missing if missing is not None else []
        self._lines = lines
        self._make = make

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self._make() if self._make is not None else []
            self._make = None
        return self._lines

    def __repr__(self) -> str:
        return f"Verdict({self.value!r}, {self.lines!r}, {self.missing!r})"


def _joined(parts: Sequence[Verdict]) -> Callable[[], list[str]]:
    return lambda: [line for p in parts for line in p.lines]


@dataclass(frozen=True)
class Context:
    signals: Sequence[Signal]
    history: History
    now: datetime
    labels: Mapping[str, str]

    def label(self, name: str) -> str:
        return self.labels.get(name, name)


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _op_of(test: Mapping[str, Any]) -> str:
    for op in COMPARISONS:
        if op in test:
            return op
    raise KeyError("no comparison")  # the schema makes this unreachable


def _as_tier(value: Any) -> RiskTier | None:
    if isinstance(value, RiskTier):
        return value
    if isinstance(value, str):
        try:
            return RiskTier.from_label(value)
        except ValueError:
            return None
    return None


def _compare(op: str, seen: Any, literal: Any, tiers: bool) -> bool:
    """Compare; with ``tiers`` both sides are risk tiers (ordered none < ... < imminent)."""
    if tiers:
        seen_tier = _as_tier(seen)
        if op == "in":
            return seen_tier is not None and seen_tier in {_as_tier(x) for x in literal}
        lit_tier = _as_tier(literal)
        if seen_tier is None or lit_tier is None:
            return False
        return OPS[op](seen_tier, lit_tier)
    try:
        return OPS[op](seen, literal)
    except TypeError:
        return False  # e.g. "moderate" >= 1: a type mismatch never holds


def _fmt(value: Any) -> str:
    if isinstance(value, RiskTier):
        return value.label
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _signal_value(sig: Signal, use_tier: bool) -> Any:
    return sig.tier if use_tier else sig.value


def test_signal(test: Mapping[str, Any], sig: Signal, ctx: Context) -> Verdict:
    """One signal against one comparison. An indeterminate signal can confirm, never deny."""
    use_tier = test.get("field") == "tier"
    name = ctx.label(sig.name) + (" tier" if use_tier else "")
    if test.get("present"):
        return Verdict(True, make=lambda: [f"{name} present"])
    if test.get("indeterminate"):
        if sig.missing:
            return Verdict(True, missing=list(sig.missing),
                           make=lambda: [f"{name} indeterminate: missing {', '.join(sig.missing)}"])
        return Verdict(False, make=lambda: [f"{name} complete"])
    op = _op_of(test)
    seen = _signal_value(sig, use_tier)
    literal = test[op]
    if seen is None:
        return Verdict(None, missing=list(sig.missing) or [sig.name],
                       make=lambda: [f"{name} unknown: missing {', '.join(sig.missing) or 'value'}"])
    held = _compare(op, seen, literal, use_tier)
    says = test.get("says")
    if held:
        return Verdict(True, make=lambda: [f"{name} = {_fmt(seen)} ({SYMBOLS[op]} {_fmt(literal)})"
                                           + (f": {says}" if says else "")])
    if sig.missing:
        return Verdict(None, missing=list(sig.missing),
                       make=lambda: [(f"{name} = {_fmt(seen)} (not {SYMBOLS[op]} {_fmt(literal)}) but incomplete: "
                                      f"missing {', '.join(sig.missing)}")])
    return Verdict(False, make=lambda: [f"{name} = {_fmt(seen)} (not {SYMBOLS[op]} {_fmt(literal)})"])


def _combine_any(verdicts: list[Verdict], absent_line: Callable[[], str]) -> Verdict:
    """Several signals of one name: holds if any holds; unknown if none holds and one is unknown."""
    if not verdicts:
        return Verdict(False, make=lambda: [absent_line()])
    held = [v for v in verdicts if v.value is True]
    if held:
        return Verdict(True, missing=[m for v in held for m in v.missing], make=_joined(held))
    unknown = [v for v in verdicts if v.value is None]
    if unknown:
        return Verdict(None, missing=[m for v in unknown for m in v.missing], make=_joined(unknown))
    return Verdict(False, make=_joined(verdicts))


def _window(ctx: Context, days: float) -> tuple[datetime, datetime, datetime]:
    """(earliest, latest for a current signal, latest for a recent one) of a ``within_days`` window."""
    now = aware(ctx.now)
    return now - timedelta(days=days), now + timedelta(minutes=5), now


def _in_window(sig: Signal, bounds: tuple[datetime, datetime, datetime], current: bool) -> bool:
    """``bounds`` from ``_window``: worked out once per count test, not once per signal."""
    if sig.observed_at is None:
        return True  # current signals are "now"; recent ones are already in the window by contract
    lo, hi_current, hi_recent = bounds
    return lo <= aware(sig.observed_at) <= (hi_current if current else hi_recent)


def evaluate(logic: Mapping[str, Any], ctx: Context) -> Verdict:
    if "all" in logic or "any" in logic:
        is_all = "all" in logic
        parts = [evaluate(sub, ctx) for sub in logic["all" if is_all else "any"]]
        decisive = not is_all  # any: one True decides; all: one False decides
        deciding = [p for p in parts if p.value is decisive]
        if deciding:
            return Verdict(decisive, make=_joined(deciding if not is_all else deciding[:1]))
        unknown = [p for p in parts if p.value is None]
        if unknown:
            return Verdict(None, missing=[m for p in unknown for m in p.missing], make=_joined(parts))
        return Verdict(not decisive, make=_joined(parts))
    if "not" in logic:
        inner = evaluate(logic["not"], ctx)
        return Verdict(None if inner.value is None else not inner.value, missing=inner.missing,
                       make=lambda: inner.lines)
    if "history" in logic:
        return _test_history(logic, ctx)
    if "count" in logic:
        return _test_count(logic, ctx)
    name = logic["signal"]
    verdicts = [test_signal(logic, s, ctx) for s in ctx.signals if s.name == name]
    return _combine_any(verdicts, lambda: f"{ctx.label(name)}: not in this event")


def _test_history(test: Mapping[str, Any], ctx: Context) -> Verdict:
    key = test["history"]
    label = HISTORY_LABELS[key]
    value = getattr(ctx.history, key)
    says = test.get("says")
    if key == "conditions":
        prefixes = tuple(test.get("has_prefix", ()))
        if prefixes:
            hits = [c for c in value if c.upper().startswith(tuple(p.upper() for p in prefixes))]
            if hits:
                return Verdict(True, make=lambda: [f"{label} include {', '.join(hits)} ({'/'.join(prefixes)})"
                                                   + (f": {says}" if says else "")])
            return Verdict(False, make=lambda: [f"{label}: none of {'/'.join(prefixes)}"])
    if value is None:
        return Verdict(None, missing=[f"history.{key}"], make=lambda: [f"{label}: unknown"])
    op = _op_of(test)
    literal = test[op]
    held = _compare(op, value, literal, key == "previous_tier")
    return Verdict(held, make=lambda: [f"{label} = {_fmt(value)} ({'' if held else 'not '}{SYMBOLS[op]} "
                                       f"{_fmt(literal)})" + (f": {says}" if held and says else "")])


def _test_count(test: Mapping[str, Any], ctx: Context) -> Verdict:
    inner = test["count"]
    days = float(test["within_days"])
    scope = test.get("scope", "all")
    wanted = inner["signal"]
    pool: list[tuple[Signal, bool]] = []
    if scope in ("current", "all"):
        pool += [(s, True) for s in ctx.signals if s.name == wanted]
    if scope in ("recent", "all"):
        pool += [(s, False) for s in ctx.history.recent_signals if s.name == wanted]
    sure = unsure = 0
    missing: list[str] = []
    # A chatty patient's history holds one text.tier per message, mostly alike: the verdict of a signal
    # depends only on its value, tier and missing list (test_signal reads nothing else), so it is
    # worked out once per distinct one. The window is still checked signal by signal.
    verdicts: dict[tuple[str, str, RiskTier | None, tuple[str, ...]], Verdict] = {}
    bounds = _window(ctx, days)
    for sig, current in pool:
        if not _in_window(sig, bounds, current):
            continue
        key = (type(sig.value).__name__, repr(sig.value), sig.tier, tuple(sig.missing))
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = test_signal(inner, sig, ctx)
        if verdict.value is True:
            sure += 1
        elif verdict.value is None:
            unsure += 1
            missing += verdict.missing
    op = _op_of(test)
    literal = test[op]
    outcomes = {OPS[op](n, literal) for n in range(sure, sure + unsure + 1)}
    value: Tri = outcomes.pop() if len(outcomes) == 1 else None

    def words() -> list[str]:
        what = ctx.label(inner["signal"]) + (" tier" if inner.get("field") == "tier" else "")
        inner_op = _op_of(inner) if any(k in inner for k in COMPARISONS) else ""
        cond = f" {SYMBOLS[inner_op]} {_fmt(inner[inner_op])}" if inner_op else ""
        where = {"current": "in this event", "recent": "in history", "all": "including this event"}[scope]
        line = (f"{what}{cond}: {sure} time(s) within {days:g} days {where}"
                + (f" (+{unsure} undecided)" if unsure else "")
                + f" ({'' if value else 'not '}{SYMBOLS[op]} {literal})")
        says = test.get("says")
        return [line + (f": {says}" if value and says else "")]
    return Verdict(value, missing=missing if value is None else [], make=words)
