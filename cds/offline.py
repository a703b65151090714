"""``cds assess``: the pipeline's pure assessment over a file, with no database and no EHR.

A Bundle is read as one patient's history in time order: each input is assessed with what came
before it (previous tier, earlier signals, earlier chat messages of the same conversation), exactly
as the worker would, and the result is the patient's standing after the last one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cds.domain import History, RiskTier, Signal
from cds.errors import InputError
from cds.pipeline import Engines, assess
from cds.settings import Settings


def _resources(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise InputError("expected a FHIR resource or Bundle (a JSON object)")
    if doc.get("resourceType") == "Bundle":
        found = [e.get("resource") for e in doc.get("entry", []) if isinstance(e, dict)]
        resources = [r for r in found if isinstance(r, dict)
                     and r.get("resourceType") in ("QuestionnaireResponse", "Communication")]
        if not resources:
            raise InputError("the Bundle holds no QuestionnaireResponse or Communication")
        return resources
    return [doc]


def assess_file(path: Path, settings: Settings, engines: Engines | None = None) -> dict[str, Any]:
    from integrations.fhir.mapping import patient_text, to_event

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from exc
    events = [to_event(r, source="cli") for r in _resources(doc)]
    patients = {e.patient_ref for e in events}
    if len(patients) > 1:
        raise InputError(f"the Bundle mixes {len(patients)} patients; assess one patient at a time")
    events.sort(key=lambda e: e.received_at or datetime.min.replace(tzinfo=UTC))
    engines = engines or Engines.load(settings)
    now = datetime.now(UTC)
    previous: RiskTier | None = None
    recent: list[Signal] = []
    conversations: dict[str | None, list[str]] = {}
    scores: dict[str, Any] = {}
    flags: set[str] = set()
    missing: list[str] = []
    rules: dict[tuple[str, str], dict[str, Any]] = {}
    actions: list[dict[str, Any]] = []
    tier = RiskTier.NONE
    probability: float | None = None
    for event in events:
        context = conversations.setdefault(event.conversation_id, []) if event.conversation_id else []
        result = assess(event, History(previous_tier=previous, recent_signals=tuple(recent)), engines,
                        now=event.received_at or now, context=list(context))
        said = patient_text(event.resource, event.patient_ref) if event.resource_type == "Communication" else None
        if said is not None and event.conversation_id:
            context.append(said)
        if result is None:
            continue
        a = result.assessment
        scores.update(result.scores)
        flags |= set(a.flags)
        missing += [m for m in a.missing if m not in missing]
        for f in a.fired:
            rules[(f.id, f.version)] = {"id": f.id, "version": f.version, "title": f.title, "trace": list(f.trace)}
        actions += [x.to_json() for x in a.actions if x.to_json() not in actions]
        tier = max(tier, a.tier)
        previous = tier
        if a.probability is not None:
            probability = max(probability or 0.0, a.probability)
        recent += [Signal(s.name, s.value, s.source, s.tier, (), s.missing, event.received_at) for s in a.signals]
    return {"tier": tier.label, "probability": probability, "flags": sorted(flags), "missing": missing,
            "scores": scores, "rules": list(rules.values()), "actions": actions,
            "ruleset": engines.ruleset.hash, "ruleset_version": engines.ruleset.version,
            "model_sha256": engines.model_sha256}
