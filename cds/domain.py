"""Value types shared by every part of psych-cds. No I/O here.

Everything that crosses a module boundary (pipeline, instruments, triage, nlp, alerts, web) speaks
in these types, so that one assessment means the same thing wherever it is read.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class RiskTier(enum.IntEnum):
    """Suicide / self-harm risk tier, ordered so that ``max()`` gives the worse one."""

    NONE = 0
    LOW = 1
    MODERATE = 2
    HIGH = 3
    IMMINENT = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> RiskTier:
        try:
            return cls[label.strip().upper()]
        except KeyError as exc:
            raise ValueError(f"unknown risk tier {label!r}; expected one of "
                             f"{', '.join(t.label for t in cls)}") from exc


# Flags carried beside the tier (ARCHITECTURE.md "Risk tiers").
FLAG_HARM_TO_OTHERS = "harm_to_others"
FLAG_VICTIMISATION = "victimisation"
FLAG_INDETERMINATE = "indeterminate"
FLAG_DISCORDANT = "discordant"


@dataclass(frozen=True)
class Evidence:
    """A span of the original text (or a questionnaire answer) that supports a signal.

    ``start``/``end`` are character offsets into the original text of ``ref`` (end exclusive).
    ``kind`` says what the span shows: ideation, plan, means, timing, prior_attempt, self_harm,
    aggression, victimisation, farewell, preparatory_act, answer ...
    ``ref`` names where the text lives (``Communication/123#payload[0]``, ``linkId:/44260-8``).
    ``source`` names what found it (``lexicon:en@<version>``, ``model:<sha256 prefix>``, ``phq9@1.0.0``).
    """

    start: int
    end: int
    kind: str
    ref: str = ""
    source: str = ""
    text: str = ""  # the span's text; PHI - never logged, stored encrypted

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "kind": self.kind, "ref": self.ref,
                "source": self.source, "text": self.text}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evidence:
        return cls(start=int(data["start"]), end=int(data["end"]), kind=str(data["kind"]),
                   ref=str(data.get("ref", "")), source=str(data.get("source", "")),
                   text=str(data.get("text", "")))


@dataclass(frozen=True)
class Signal:
    """One finding that the triage rules reason over.

    Names are dotted: ``phq9.total``, ``phq9.item9``, ``phq9.band``, ``gad7.total``, ``cssrs.risk``,
    ``asq.result``, ``text.tier``, ``text.harm_to_others``, ``text.safety_net`` ...
    ``value`` is a plain JSON value. ``tier`` is the tier this signal alone implies, where it implies
    one. ``missing`` lists what was needed but absent (a signal with missing data is indeterminate,
    never "no risk").
    """

    name: str
    value: Any
    source: str
    tier: RiskTier | None = None
    evidence: tuple[Evidence, ...] = ()
    missing: tuple[str, ...] = ()
    observed_at: datetime | None = None

    @property
    def indeterminate(self) -> bool:
        return bool(self.missing)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "source": self.source,
                "tier": self.tier.label if self.tier is not None else None,
                "evidence": [e.to_json() for e in self.evidence], "missing": list(self.missing),
                "observed_at": self.observed_at.isoformat() if self.observed_at else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signal:
        tier = data.get("tier")
        observed = data.get("observed_at")
        return cls(name=str(data["name"]), value=data.get("value"), source=str(data.get("source", "")),
                   tier=RiskTier.from_label(tier) if tier else None,
                   evidence=tuple(Evidence.from_json(e) for e in data.get("evidence", ())),
                   missing=tuple(data.get("missing", ())),
                   observed_at=datetime.fromisoformat(observed) if observed else None)


@dataclass(frozen=True)
class History:
    """What is known about the patient before this event (read from the store and the EHR)."""

    previous_tier: RiskTier | None = None
    prior_attempt: bool | None = None  # None = unknown, never "no"
    conditions: tuple[str, ...] = ()  # ICD-10 codes, e.g. "F31.1"
    age_years: int | None = None
    recent_signals: tuple[Signal, ...] = ()  # earlier signals in the rules' time windows


@dataclass(frozen=True)
class Action:
    """Something the triage rules ask to be done.

    kind: ``nurse_alert`` | ``referral`` | ``supervisor_escalation`` | ``crisis_resources`` | ``discordance_alert``
    priority: FHIR request priority ``routine`` | ``urgent`` | ``asap`` | ``stat``.
    """

    kind: str
    priority: str = "routine"
    sla_minutes: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "priority": self.priority, "sla_minutes": self.sla_minutes,
                "params": dict(self.params)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Action:
        return cls(kind=str(data["kind"]), priority=str(data.get("priority", "routine")),
                   sla_minutes=data.get("sla_minutes"), params=dict(data.get("params") or {}))


@dataclass(frozen=True)
class FiredRule:
    """A rule that fired, with the plain-words trace of why."""

    id: str
    version: str
    title: str
    source: str = ""  # the clinical source the rule follows
    trace: tuple[str, ...] = ()  # human-readable lines: which inputs, which comparisons

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "title": self.title, "source": self.source,
                "trace": list(self.trace)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FiredRule:
        return cls(id=str(data["id"]), version=str(data["version"]), title=str(data.get("title", "")),
                   source=str(data.get("source", "")), trace=tuple(data.get("trace", ())))


@dataclass(frozen=True)
class TriageOutcome:
    """What the triage rules concluded from the signals (no I/O, reproducible)."""

    tier: RiskTier
    flags: frozenset[str]
    missing: tuple[str, ...]
    fired: tuple[FiredRule, ...]
    actions: tuple[Action, ...]
    ruleset_hash: str
    ruleset_version: str = ""
    shadow: bool = False


@dataclass(frozen=True)
class Event:
    """One input to the pipeline: a FHIR resource version or a screened chat message.

    Idempotency key: (source, resource_type, resource_id, version_id).
    """

    source: str  # "ehr" | "screen-api:<client>" | "cli"
    resource_type: str  # "QuestionnaireResponse" | "Communication"
    resource_id: str
    version_id: str
    patient_ref: str  # "Patient/123"
    resource: Mapping[str, Any]  # FHIR JSON as received (PHI: stored encrypted)
    received_at: datetime | None = None
    conversation_id: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.source, self.resource_type, self.resource_id, self.version_id)


@dataclass(frozen=True)
class Assessment:
    """The explainable, reproducible result of assessing one event in its context."""

    patient_ref: str
    tier: RiskTier
    probability: float | None  # 0..1 where a calibrated model contributed, else None
    flags: frozenset[str]
    missing: tuple[str, ...]
    signals: tuple[Signal, ...]
    fired: tuple[FiredRule, ...]
    actions: tuple[Action, ...]
    ruleset_hash: str
    model_sha256: str | None
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    basis: tuple[str, ...] = ()  # FHIR references of the inputs, e.g. "QuestionnaireResponse/1/_history/2"

    @property
    def indeterminate(self) -> bool:
        return FLAG_INDETERMINATE in self.flags

    @property
    def needs_alert(self) -> bool:
        return any(a.kind in ("nurse_alert", "discordance_alert") for a in self.actions)
