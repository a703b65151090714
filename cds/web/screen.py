"""Real-time screening for counselling chatbots and counsellor consoles: POST /api/v1/screen.

The message runs through the same pipeline as a Communication from the EHR (stored encrypted,
assessed, alerted, audited), synchronously, and the answer tells the bot what to do next.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, request

from cds.domain import FLAG_HARM_TO_OTHERS, FLAG_INDETERMINATE, Assessment, RiskTier
from cds.errors import InputError, NotAssessed
from cds.store import clients
from cds.web import service
from cds.web.api import request_api_key

bp = Blueprint("screen", __name__, url_prefix="/api/v1")

MAX_MESSAGE_CHARS = 100_000


def directive(a: Assessment) -> str:
    """high/imminent or harm to others -> a human takes over; moderate, low or unknown -> show resources."""
    if a.tier >= RiskTier.HIGH or FLAG_HARM_TO_OTHERS in a.flags:
        return "handover_to_human"
    if a.tier >= RiskTier.LOW or FLAG_INDETERMINATE in a.flags:
        return "show_resources"
    return "continue"


def _field(body: dict[str, Any], name: str, *, required: bool = True, limit: int = 200) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise InputError(f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise InputError(f"'{name}' must be a string")
    if len(value) > limit:
        raise InputError(f"'{name}' is longer than {limit} characters")
    return value


def to_communication(body: Any, client: str, now: datetime) -> dict[str, Any]:
    """The request as the FHIR Communication the pipeline assesses (one id per message: same message, same id)."""
    if not isinstance(body, dict):
        raise InputError("body must be a JSON object with patient, conversation, message")
    patient = _field(body, "patient")
    conversation = _field(body, "conversation")
    message = _field(body, "message", limit=MAX_MESSAGE_CHARS)
    lang = _field(body, "lang", required=False, limit=10)
    message_id = _field(body, "message_id", required=False)
    assert patient and conversation and message is not None
    if not patient.startswith("Patient/") or "/" in patient[8:] or len(patient) <= 8:
        raise InputError("'patient' must be a reference like Patient/123")
    if lang not in (None, "zh", "en", "zh-CN", "en-US", "en-GB"):
        raise InputError("'lang' must be zh or en")
    # Without a message_id, the same text in the same conversation is the same message (a resend).
    key = message_id or hashlib.sha256(message.encode()).hexdigest()[:24]
    rid = hashlib.sha256(f"{client}|{patient}|{conversation}|{key}".encode()).hexdigest()[:40]
    resource: dict[str, Any] = {
        "resourceType": "Communication", "id": rid, "meta": {"versionId": "1"}, "status": "completed",
        "identifier": [{"system": f"urn:psych-cds:screen:{client}:chat-session", "value": conversation}],
        "category": [{"text": "counselling-chat"}], "subject": {"reference": patient},
        "sender": {"reference": patient}, "sent": now.isoformat().replace("+00:00", "Z"),
        "payload": [{"contentString": message}],
    }
    if lang:
        resource["language"] = "zh-CN" if lang.startswith("zh") else "en"
    return resource


def _stored_result(svc: Any, event_id: int) -> tuple[Assessment | None, list[str]]:
    """The assessment and alerts of an already-processed event (a resend)."""
    from cds.domain import Action, FiredRule
    from cds.store import assessments as store

    with svc.pool.connection() as conn:
        row = conn.execute("SELECT id, patient_ref, tier, probability, flags, missing, fired, actions, ruleset_hash,"
                           " model_sha256 FROM assessments WHERE event_id = %s AND NOT shadow", (event_id,)).fetchone()
        if row is None:
            return None, []
        signals = store.load_signals(conn, svc.cipher, row[0])
        alert_rows = conn.execute("SELECT id FROM alerts WHERE assessment_id = %s", (row[0],)).fetchall()
    a = Assessment(patient_ref=row[1], tier=RiskTier(row[2]), probability=row[3], flags=frozenset(row[4]),
                   missing=tuple(row[5]), signals=tuple(signals), fired=tuple(FiredRule.from_json(f) for f in row[6]),
                   actions=tuple(Action.from_json(x) for x in row[7]), ruleset_hash=row[8], model_sha256=row[9])
    return a, [str(r[0]) for r in alert_rows]


@bp.post("/screen")
def screen() -> Any:
    from cds.triage import load_crisis_resources

    svc = service()
    now = datetime.now(UTC)
    with svc.pool.connection() as conn:  # one statement: the key checked and the request counted
        client = clients.authenticate_and_charge(conn, request_api_key(), now, svc.settings.screen_rate_per_min)
    body = request.get_json(silent=True)
    if body is None:
        raise InputError("body must be JSON (Content-Type: application/json)")
    resource = to_communication(body, client.name, now)
    result, processed = svc.pipeline.ingest_and_process(resource, source=f"screen-api:{client.name}",
                                                        actor=f"client:{client.name}")
    if result.event_id is None:
        raise InputError(f"{result.reason} (kept in quarantine as #{result.quarantine_id})")
    assessment: Assessment | None
    if processed is not None and processed.assessment is not None:
        assessment, alert_ids = processed.assessment, list(processed.alert_ids)
    else:  # a resend, or another process is assessing it right now: answer from the store
        assessment, alert_ids = _stored_result(svc, result.event_id)
        deadline = time.monotonic() + 2.0
        while assessment is None and time.monotonic() < deadline:
            time.sleep(0.02)
            assessment, alert_ids = _stored_result(svc, result.event_id)
    if assessment is None:
        raise NotAssessed("the message is stored but could not be assessed now; it will be assessed again, "
                          "and an alert raised if it carries risk: until then, treat it as not yet screened")
    locale = "zh-CN" if (body.get("lang") or "").startswith("zh") else svc.settings.default_locale
    verdict = directive(assessment)
    last = f"#{_last_index(assessment)}"  # the request's own message
    evidence = [{"start": e.start, "end": e.end, "kind": e.kind}
                for s in assessment.signals if s.name in ("text.tier", "text.safety_net") for e in s.evidence
                if not e.ref.rpartition("#")[2].isdigit() or e.ref.endswith(last)]
    return jsonify({
        "tier": assessment.tier.label, "directive": verdict,
        "flags": sorted(assessment.flags), "missing": list(assessment.missing),
        "resources": load_crisis_resources(locale) if verdict != "continue" else [],
        "alert": alert_ids[0] if alert_ids else None, "alerts": alert_ids,
        "evidence": _dedupe(evidence), "event": result.event_id, "duplicate": result.duplicate,
        "ruleset": assessment.ruleset_hash, "model_sha256": assessment.model_sha256,
    })


def _last_index(a: Assessment) -> int:
    """Evidence of a conversation is referenced per message (#i); the request's message is the last."""
    indices = [int(e.ref.rpartition("#")[2]) for s in a.signals for e in s.evidence
               if e.ref.rpartition("#")[2].isdigit()]
    return max(indices, default=0)


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for item in items:
        key = (item["start"], item["end"], item["kind"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
