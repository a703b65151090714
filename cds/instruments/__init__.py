"""Questionnaire scoring: FHIR QuestionnaireResponse -> scores and Signals for the triage rules.

Instrument definitions are data in ``rules/instruments/*.yaml`` (validated against
``rules/schema/instrument.schema.json``); this package is the generic engine. See README.md here.

    >>> result = score_questionnaire_response(qr)
    >>> result.scores          # {"total": 12, "band": "moderate", "item9": 0}
    >>> result.signals         # phq9.total, phq9.band, phq9.item9 (tier MODERATE when >= 1)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds.domain import Signal
from cds.errors import InputError

from .definition import Instrument, load_instruments
from .scoring import flatten_answers, score

__all__ = [
    "DEFAULT_RULES_DIR",
    "Instrument",
    "InstrumentCatalog",
    "InstrumentResult",
    "load_catalog",
    "score_questionnaire_response",
]

DEFAULT_RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


@dataclass(frozen=True)
class InstrumentResult:
    """The scores of one QuestionnaireResponse and the signals they give the triage rules.

    ``scores`` by instrument: phq9 ``{"total", "band", "item9"}``, phq2 ``{"total", "screen"}``, gad7
    ``{"total", "band"}``, cssrs ``{"risk"}``, asq ``{"result", "prior_attempt"}``; a value that could not
    be scored is None. ``missing`` names every unanswered item that matters; ``notes`` says what the
    engine did that a clinician should know (prorating, a recorded total that disagreed, refusals).
    """

    instrument: str
    version: str
    scores: dict[str, Any]
    signals: tuple[Signal, ...]
    missing: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def indeterminate(self) -> bool:
        return bool(self.missing)

    def signal(self, name: str) -> Signal:
        for sig in self.signals:
            if sig.name == name:
                return sig
        raise KeyError(name)


class InstrumentCatalog:
    """Every instrument definition in a rules directory, and how to recognise a response's instrument."""

    def __init__(self, instruments: Mapping[str, Instrument], rules_dir: Path) -> None:
        self.instruments = dict(instruments)
        self.rules_dir = rules_dir

    def __getitem__(self, instrument_id: str) -> Instrument:
        return self.instruments[instrument_id]

    def __iter__(self) -> Any:
        return iter(self.instruments.values())

    def recognise(self, qr: Mapping[str, Any]) -> Instrument:
        """By Questionnaire canonical first; else by the LOINC (or project) linkIds the response uses.

        With linkIds alone, the instrument matching most items wins, then the one more fully matched
        (two PHQ items alone read as a PHQ-2, not an incomplete PHQ-9).
        """
        canonical = qr.get("questionnaire")
        if isinstance(canonical, str) and canonical:
            url = canonical.split("|", 1)[0].rstrip("/")
            tail = url.rsplit("/", 1)[-1]
            for instrument in self.instruments.values():
                if url in instrument.canonicals:
                    return instrument
            by_tail = [i for i in self.instruments.values() if tail in i.panel_codes
                       or (url.endswith(f"/Questionnaire/{tail}") and tail == i.id)]
            if len(by_tail) == 1:
                return by_tail[0]
        links = set(flatten_answers(qr))
        best: tuple[int, float, Instrument] | None = None
        for instrument in self.instruments.values():
            matched = sum(1 for item in instrument.items if links & set(item.link_ids))
            if matched and (best is None or (matched, matched / len(instrument.items)) > best[:2]):
                best = (matched, matched / len(instrument.items), instrument)
        if best is None:
            raise InputError(f"no known instrument recognised (questionnaire {canonical!r}); known: "
                             f"{', '.join(sorted(self.instruments))}")
        return best[2]


@functools.lru_cache(maxsize=8)
def _load_catalog_cached(rules_dir: Path) -> InstrumentCatalog:
    return InstrumentCatalog(load_instruments(rules_dir / "instruments", rules_dir / "schema"), rules_dir)


def load_catalog(rules_dir: Path | None = None) -> InstrumentCatalog:
    """Load (once per directory) every instrument in ``<rules_dir>/instruments``; RulesError if invalid."""
    return _load_catalog_cached(Path(rules_dir or DEFAULT_RULES_DIR).resolve())


def score_questionnaire_response(qr: Mapping[str, Any], catalog: InstrumentCatalog | None = None) -> InstrumentResult:
    """Score a FHIR R4 QuestionnaireResponse (JSON as a mapping).

    Raises InputError when it is not a QuestionnaireResponse, no known instrument is recognised, or an
    answer is impossible (unknown code, out-of-range number, two answers to one item).
    """
    if not isinstance(qr, Mapping) or qr.get("resourceType") != "QuestionnaireResponse":
        kind = qr.get("resourceType") if isinstance(qr, Mapping) else type(qr).__name__
        raise InputError(f"expected a QuestionnaireResponse, got {kind!r}")
    if qr.get("status") == "entered-in-error":
        raise InputError("QuestionnaireResponse is entered-in-error; nothing to score")
    catalog = catalog or load_catalog()
    return score(catalog.recognise(qr), qr)
