"""The generic scoring engine: a QuestionnaireResponse plus an Instrument definition -> InstrumentResult.

Two methods cover every instrument we ship: ``sum`` (PHQ-9, PHQ-2, GAD-7: total, bands, prorating,
recorded-total cross-check) and ``decision`` (C-SSRS, ASQ: ordered outcomes, first that holds wins).
Missing answers are never zero. Conditions use three-valued logic (true / false / unknown) so an
unanswered item can only leave a result undecided, never make it look lower than the answers prove.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cds.domain import Evidence, RiskTier, Signal
from cds.errors import InputError

from .definition import Instrument, Item

if TYPE_CHECKING:
    from . import InstrumentResult

DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
NUMERIC_KEYS = ("valueInteger", "valueDecimal")


@dataclass(frozen=True)
class Answer:
    """One answered item as found in the response."""

    link_id: str  # as written in the response (keeps a leading slash if it had one)
    value: int | str | None  # None: answered with a data-absent-reason code (e.g. asked-declined)
    raw: str  # what was answered, for evidence and notes
    absent_reason: str = ""


class _Skipped:
    """An item not asked because of skip logic (enableWhen): not missing, and not a "yes"."""


SKIPPED = _Skipped()

Tri = bool | None  # three-valued logic: None = unknown (missing data)


def flatten_answers(qr: Mapping[str, Any]) -> dict[str, tuple[str, list[Mapping[str, Any]]]]:
    """Every item in the response, nested groups included: normalised linkId -> (linkId, answers)."""
    found: dict[str, tuple[str, list[Mapping[str, Any]]]] = {}

    def walk(items: Any) -> None:
        if not isinstance(items, list):
            raise InputError("QuestionnaireResponse.item must be a list")
        for item in items:
            if not isinstance(item, Mapping) or not isinstance(item.get("linkId"), str):
                raise InputError("every QuestionnaireResponse item needs a linkId")
            link_id = item["linkId"]
            answers = item.get("answer") or []
            if not isinstance(answers, list):
                raise InputError(f"item {link_id!r}: answer must be a list")
            key = link_id.removeprefix("/")
            if answers and key in found and found[key][1]:
                raise InputError(f"item {link_id!r} is answered more than once")
            if answers or key not in found:
                found[key] = (link_id, answers)
            walk(item.get("item") or [])
            for answer in answers:
                if isinstance(answer, Mapping):
                    walk(answer.get("item") or [])

    walk(qr.get("item") or [])
    return found


def read_answer(item: Item, link_id: str, answers: list[Mapping[str, Any]]) -> Answer | None:
    """Map one item's answer to its value; None when unanswered. Impossible values raise InputError."""
    if not answers:
        return None
    if len(answers) > 1:
        raise InputError(f"{item.label}: expected one answer, got {len(answers)}")
    answer = answers[0]
    spec = item.answers
    if "valueCoding" in answer:
        coding = answer["valueCoding"] or {}
        code = str(coding.get("code", ""))
        if code in spec.options:
            return Answer(link_id, spec.options[code].value, code)
        if coding.get("system") == DATA_ABSENT_REASON:
            return Answer(link_id, None, code, absent_reason=code)
        raise InputError(f"{item.label}: answer code {code!r} is not one of {', '.join(spec.options)}")
    if "valueBoolean" in answer:
        if spec.booleans is None:
            raise InputError(f"{item.label}: a yes/no answer is not possible for this item")
        flag = answer["valueBoolean"]
        if not isinstance(flag, bool):
            raise InputError(f"{item.label}: valueBoolean must be true or false")
        return Answer(link_id, spec.booleans[flag], str(flag).lower())
    for key in NUMERIC_KEYS:
        if key in answer:
            number = answer[key]
            if spec.kind != "ordinal":
                raise InputError(f"{item.label}: a number is not a possible answer; use a coded answer")
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                    or number != int(number):
                raise InputError(f"{item.label}: {number!r} is not a whole number")
            value = int(number)
            assert spec.minimum is not None and spec.maximum is not None
            if not spec.minimum <= value <= spec.maximum:
                raise InputError(f"{item.label}: {value} is outside {spec.minimum}..{spec.maximum}")
            return Answer(link_id, value, str(value))
    raise InputError(f"{item.label}: unsupported answer type {sorted(answer)}; "
                     "expected valueCoding, valueInteger, valueDecimal or valueBoolean")


def _number(answers: list[Mapping[str, Any]]) -> float | None:
    if not answers:
        return None
    answer = answers[0]
    for key in NUMERIC_KEYS:
        if isinstance(answer.get(key), (int, float)) and not isinstance(answer.get(key), bool):
            return float(answer[key])
    quantity = answer.get("valueQuantity")
    if isinstance(quantity, Mapping) and isinstance(quantity.get("value"), (int, float)):
        return float(quantity["value"])
    return None


def _authored(qr: Mapping[str, Any]) -> datetime | None:
    authored = qr.get("authored")
    if not isinstance(authored, str):
        return None
    try:
        return datetime.fromisoformat(authored)
    except ValueError:
        return None


class _Context:
    """The answers of one response as the instrument sees them."""

    def __init__(self, instrument: Instrument, flat: Mapping[str, tuple[str, list[Mapping[str, Any]]]]) -> None:
        self.instrument = instrument
        self.answers: dict[str, Answer | None] = {}
        for item in instrument.items:
            hit = next((flat[k] for k in item.link_ids if k in flat), None)
            self.answers[item.id] = read_answer(item, hit[0], hit[1]) if hit else None
        self.source = instrument.source_tag
        self.notes: list[str] = []
        for item in instrument.items:
            answer = self.answers[item.id]
            if answer is not None and answer.absent_reason:
                self.notes.append(f"{item.label}: not answered ({answer.absent_reason})")

    def value(self, item_id: str) -> int | str | None:
        answer = self.answers[item_id]
        return answer.value if answer is not None else None

    def evidence(self, item_ids: list[str] | tuple[str, ...]) -> tuple[Evidence, ...]:
        out = []
        for item_id in item_ids:
            answer = self.answers[item_id]
            if answer is not None and answer.value is not None:
                out.append(Evidence(start=0, end=0, kind="answer", ref=f"linkId:{answer.link_id}",
                                    source=self.source, text=answer.raw))
        return tuple(out)

    # -- three-valued conditions (decision method and enableWhen) --

    def resolved(self, item_id: str, depth: int = 0) -> int | str | _Skipped | None:
        """The item's value, SKIPPED when skip logic says it was not asked, None when missing."""
        value = self.value(item_id)
        if value is not None:
            return value
        item = self.instrument.item(item_id)
        if item.enable_when is not None and depth < 8:
            enabled, _ = self.check(item.enable_when, depth + 1)
            if enabled is False:
                return SKIPPED
        return None

    def check(self, cond: Mapping[str, Any], depth: int = 0) -> tuple[Tri, set[str]]:
        """Evaluate a condition: (true/false/None, labels of the missing items that left it unknown)."""
        if cond.get("always"):
            return True, set()
        if "not" in cond:
            result, missing = self.check(cond["not"], depth)
            return (None if result is None else not result), missing
        if "all" in cond or "any" in cond:
            is_all = "all" in cond
            results = [self.check(sub, depth) for sub in cond["all" if is_all else "any"]]
            decisive = not is_all
            if any(r is decisive for r, _ in results):
                return decisive, set()
            unknown = [m for r, m in results if r is None]
            if unknown:
                return None, set().union(*unknown)
            return not decisive, set()
        item_id = cond["item"]
        value = self.resolved(item_id, depth)
        if value is None:
            return None, {self.instrument.item(item_id).label}
        if isinstance(value, _Skipped):
            return False, set()
        if "eq" in cond:
            return value == cond["eq"], set()
        if "in" in cond:
            return value in cond["in"], set()
        return isinstance(value, int) and value >= cond["gte"], set()


def _items_in(cond: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("all", "any"):
        for sub in cond.get(key, ()):
            out += _items_in(sub)
    if "not" in cond:
        out += _items_in(cond["not"])
    if "item" in cond:
        out.append(cond["item"])
    return out


def _item_tier(spec_tiers: tuple[Mapping[str, Any], ...], value: int | str | None) -> RiskTier | None:
    if value is None:
        return None
    for entry in spec_tiers:
        if "gte" in entry and isinstance(value, int) and value >= entry["gte"]:
            return RiskTier.from_label(entry["tier"])
        if "eq" in entry and value == entry["eq"]:
            return RiskTier.from_label(entry["tier"])
    return None


def score(instrument: Instrument, qr: Mapping[str, Any]) -> InstrumentResult:
    from . import InstrumentResult

    flat = flatten_answers(qr)
    ctx = _Context(instrument, flat)
    observed = _authored(qr)
    scores: dict[str, Any] = {}
    signals: list[Signal] = []
    missing: list[str] = []

    if instrument.method == "sum":
        summed = instrument.sum_items
        answered = [i for i in summed if ctx.value(i.id) is not None]
        missing = [i.label for i in summed if ctx.value(i.id) is None]
        partial = sum(int(ctx.value(i.id) or 0) for i in answered)
        total: int | None = None
        if not missing:
            total = partial
        elif answered and len(missing) <= instrument.max_prorate_missing:
            total = math.floor(partial * len(summed) / len(answered) + 0.5)
            ctx.notes.append(f"total prorated from {len(answered)} of {len(summed)} items "
                             f"({partial} x {len(summed)}/{len(answered)} = {total})")
        recorded_at = next((flat[k] for k in instrument.total_link_ids if k in flat), None)
        if recorded_at is not None:
            recorded = _number(recorded_at[1])
            if recorded is not None and total is not None and recorded != total:
                ctx.notes.append(f"recorded total {recorded:g} ({recorded_at[0]}) differs from the computed "
                                 f"total {total}; the computed total is used")
            elif recorded is not None and total is None:
                ctx.notes.append(f"recorded total {recorded:g} ({recorded_at[0]}) not used: items are missing")
        band = next((b.label for b in instrument.bands if total is not None and b.minimum <= total <= b.maximum),
                    None)
        scores["total"] = total
        scores[instrument.band_name] = band
        evidence = ctx.evidence([i.id for i in answered])
        signals.append(Signal(f"{instrument.id}.total", total, ctx.source, None, evidence, tuple(missing), observed))
        signals.append(Signal(f"{instrument.id}.{instrument.band_name}", band, ctx.source, None, evidence,
                              tuple(missing), observed))
    else:
        output = str(instrument.scoring["output"])
        result = None
        undecided: set[str] = set()
        chosen_evidence: tuple[Evidence, ...] = ()
        for outcome in instrument.outcomes:
            holds, missing_here = ctx.check(outcome.when)
            if holds is None:
                undecided |= missing_here
            elif holds:
                result = outcome
                items = _items_in(outcome.when) or [i.id for i in instrument.items]
                chosen_evidence = ctx.evidence(items)
                break
        missing = [i.label for i in instrument.items if i.label in undecided]
        scores[output] = result.value if result else None
        signals.append(Signal(f"{instrument.id}.{output}", result.value if result else None, ctx.source,
                              result.tier if result else None, chosen_evidence, tuple(missing), observed))

    for spec in instrument.item_signals:
        item = instrument.item(spec.item)
        value = ctx.value(spec.item)
        item_missing = (item.label,) if value is None else ()
        if value is None and item.label not in missing:
            # Only "missing" when the item was asked (skip logic may have left it out on purpose).
            if not isinstance(ctx.resolved(spec.item), _Skipped):
                missing.append(item.label)
            else:
                item_missing = ()
        signals.append(Signal(spec.name, value, ctx.source, _item_tier(spec.tiers, value),
                              ctx.evidence([spec.item]), item_missing, observed))
        scores[spec.name.split(".", 1)[1]] = value

    return InstrumentResult(instrument=instrument.id, version=instrument.version, scores=scores,
                            signals=tuple(signals), missing=tuple(missing), notes=tuple(ctx.notes))
