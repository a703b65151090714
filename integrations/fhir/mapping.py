"""fhir.resources <-> domain: the only place FHIR's camelCase JSON meets psych-cds types.

Inbound: ``to_event`` validates a QuestionnaireResponse or Communication (fhir.resources R4B models,
the R4-compatible ones) and normalises it into an ``Event``; anything else raises ``InputError``
whose message names the fields at fault but never echoes their values (they may be PHI).
Outbound: ``writeback_bundle`` builds the transaction Bundle of supervisor alerts for one assessment,
``task_bundle`` an alert's Task, and ``join_transactions`` sends both as one transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from cds import __version__
from cds.domain import Event, RiskTier
from cds.errors import InputError

ASSESSED_TYPES = ("QuestionnaireResponse", "Communication")
CDS_SYSTEM = "https://psych-cds.example.org"
TIER_SYSTEM = f"{CDS_SYSTEM}/fhir/CodeSystem/risk-tier"
RISK_PROBABILITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/risk-probability"
# imminent has no code of its own in risk-probability: it maps to high, and the alert gets priority stat.
RISK_PROBABILITY = {RiskTier.NONE: ("negligible", "Negligible likelihood"), RiskTier.LOW: ("low", "Low likelihood"),
                    RiskTier.MODERATE: ("moderate", "Moderate likelihood"),
                    RiskTier.HIGH: ("high", "High likelihood"), RiskTier.IMMINENT: ("high", "High likelihood")}
TIER_NAMES = {RiskTier.NONE: ("None", "无"), RiskTier.LOW: ("Low", "低"), RiskTier.MODERATE: ("Moderate", "中"),
              RiskTier.HIGH: ("High", "高"), RiskTier.IMMINENT: ("Imminent", "紧急")}
CHAT_SESSION_SUFFIX = "chat-session"


def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def validation_reason(exc: ValidationError) -> str:
    """Field paths and error kinds only: pydantic's input values could be patient text."""
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__") or "(resource)"
        parts.append(f"{loc}: {err.get('type', 'invalid')}")
    more = len(exc.errors()) - 10
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def reference_id(reference: str | None, resource_type: str) -> str | None:
    """``Patient/123`` from ``Patient/123``, ``http://ehr/fhir/Patient/123`` or ``.../_history/2``."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return f"{resource_type}/{parts[-1]}"
    return None


def parse_instant(value: Any) -> datetime | None:
    """An ISO 8601 instant (naive = UTC); None for anything else, whatever its JSON type."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def content_version(resource: Mapping[str, Any]) -> str:
    """A version for resources that carry no meta.versionId (screening API, CLI)."""
    body = {k: v for k, v in resource.items() if k not in ("meta", "id")}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def communication_text(resource: Mapping[str, Any]) -> str:
    return "\n".join(str(p["contentString"]) for p in resource.get("payload", []) or []
                     if isinstance(p, Mapping) and p.get("contentString"))


def conversation_id(resource: Mapping[str, Any]) -> str | None:
    for ident in resource.get("identifier", []) or []:
        if str(ident.get("system", "")).endswith(CHAT_SESSION_SUFFIX) and ident.get("value"):
            return f"{ident['system']}|{ident['value']}"
    for key in ("partOf", "inResponseTo"):
        for ref in resource.get(key, []) or []:
            if ref.get("reference"):
                return str(ref["reference"])
    encounter = (resource.get("encounter") or {}).get("reference")
    return str(encounter) if encounter else None


def is_own_write(resource: Mapping[str, Any]) -> bool:
    """Resources psych-cds wrote itself (alert Communications...) are not inputs: polling them back
    would assess our own alerts as chat."""
    return any(str(i.get("system", "")).startswith(CDS_SYSTEM) for i in resource.get("identifier", []) or []
               if isinstance(i, Mapping))


def is_patient_authored(resource: Mapping[str, Any], patient_ref: str) -> bool:
    """A Communication's text is the patient's own unless its sender is someone else (bot, counsellor)."""
    sender = (resource.get("sender") or {}).get("reference")
    return sender is None or reference_id(sender, "Patient") == patient_ref


def patient_text(resource: Mapping[str, Any], patient_ref: str) -> str | None:
    """What the patient said in a Communication; None when someone else (bot, counsellor) sent it."""
    return communication_text(resource) if is_patient_authored(resource, patient_ref) else None


def to_event(resource: Any, *, source: str, received_at: datetime | None = None) -> Event:
    """Validate and normalise one inbound resource. Raises InputError saying what is wrong."""
    if not isinstance(resource, Mapping):
        raise InputError("expected a FHIR resource (a JSON object)")
    rtype = resource.get("resourceType")
    if rtype not in ASSESSED_TYPES:
        raise InputError(f"resourceType must be one of {', '.join(ASSESSED_TYPES)}, got {str(rtype)[:40]!r}")
    try:
        _model(str(rtype)).model_validate(dict(resource))
    except ValidationError as exc:
        raise InputError(f"invalid {rtype}: {validation_reason(exc)}") from exc
    subject = (resource.get("subject") or {}).get("reference")
    patient_ref = reference_id(subject, "Patient")
    if patient_ref is None:
        raise InputError(f"{rtype}.subject must reference a Patient (Patient/<id>)")
    if rtype == "QuestionnaireResponse" and not resource.get("item"):
        raise InputError("QuestionnaireResponse has no items to score")
    if rtype == "Communication" and not communication_text(resource) and not resource.get("payload"):
        raise InputError("Communication has no payload")
    meta = resource.get("meta") or {}
    resource_id = str(resource.get("id") or "")
    version = str(meta.get("versionId") or content_version(resource))
    if not resource_id:
        resource_id = "anon-" + content_version(resource)[7:]
    updated = parse_instant(meta.get("lastUpdated")) or parse_instant(
        resource.get("authored") or resource.get("sent"))
    return Event(source=source, resource_type=str(rtype), resource_id=resource_id, version_id=version,
                 patient_ref=patient_ref, resource=dict(resource), received_at=received_at or updated,
                 conversation_id=conversation_id(resource) if rtype == "Communication" else None)


# -- outbound -----------------------------------------------------------------------------------------


def _tier_concept(tier: RiskTier) -> dict[str, Any]:
    code, display = RISK_PROBABILITY[tier]
    en, zh = TIER_NAMES[tier]
    return {"coding": [{"system": TIER_SYSTEM, "code": tier.label, "display": en},
                       {"system": RISK_PROBABILITY_SYSTEM, "code": code, "display": display}],
            "text": f"{en} / {zh}"}


def _ident(kind: str, value: str) -> dict[str, str]:
    return {"system": f"{CDS_SYSTEM}/{kind}", "value": value}


def _alert_communication(ident: dict[str, str], *, priority: str, patient_ref: str, sent: str,
                         about: Sequence[str], recipient: str | None, texts: tuple[str, str]) -> dict[str, Any]:
    """A Communication telling whoever must act (English and Chinese); never patient text."""
    comm: dict[str, Any] = {
        "resourceType": "Communication", "identifier": [ident], "status": "completed",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category",
                                  "code": "alert", "display": "Alert"}]}],
        "priority": priority, "subject": {"reference": patient_ref}, "sent": sent,
        "about": [{"reference": ref} for ref in about],
        "payload": [{"contentString": texts[0]}, {"contentString": texts[1]}],
    }
    if recipient:
        comm["recipient"] = [{"reference": recipient}]
    return comm


def _entry(resource: dict[str, Any], full_url: str, ident: dict[str, str]) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"],
                        "ifNoneExist": f"identifier={ident['system']}|{ident['value']}"}}


def writeback_bundle(*, assessment_id: int, patient_ref: str, tier: RiskTier, probability: float | None,
                     flags: Sequence[str], missing: Sequence[str], reasons: Sequence[str],
                     basis: Sequence[str], ruleset_hash: str, ruleset_version: str,
                     model_sha256: str | None, occurred_at: datetime, alert_id: str | None,
                     priority: str, care_team_ref: str | None, dashboard_url: str,
                     new_alert: bool) -> dict[str, Any]:
    """One transaction Bundle: RiskAssessment (+ Flag + Communication when an alert is new or raised),
    and a Provenance over them. Conditional creates on our identifiers make a retry harmless.

    No transcript text leaves in these resources: the reasons are rule titles, the basis is a reference.
    """
    when = occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    urls = {name: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{CDS_SYSTEM}/{name}/{assessment_id}')}"
            for name in ("ra", "flag", "comm", "prov")}
    en, zh = TIER_NAMES[tier]
    reason_text = "; ".join(reasons) or "no rule fired"
    ra_ident = _ident("assessment", str(assessment_id))
    risk_assessment: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "identifier": [ra_ident],
        "status": "final",
        "subject": {"reference": patient_ref},
        "occurrenceDateTime": when,
        "code": {"text": "Suicide, self-harm and harm-to-others risk / 自杀、自伤及伤人风险"},
        "method": {"text": f"psych-cds {__version__} rules {ruleset_version} ({ruleset_hash[:12]})"
                           + (f", model {model_sha256[:12]}" if model_sha256 else "")},
        "basis": [{"reference": ref} for ref in basis],
        "prediction": [{
            "outcome": {"text": "Suicide or self-harm / 自杀或自伤"},
            "qualitativeRisk": _tier_concept(tier),
            "rationale": reason_text[:1000],
        }],
        "note": [{"text": f"Flags: {', '.join(flags) or 'none'}"
                          + (f". Missing: {', '.join(missing)}" if missing else "")}],
    }
    if probability is not None:
        risk_assessment["prediction"][0]["probabilityDecimal"] = round(probability * 100, 1)
    entries = [_entry(risk_assessment, urls["ra"], ra_ident)]
    targets = [urls["ra"]]
    if new_alert and alert_id:
        flag = alert_flag(alert_id=alert_id, patient_ref=patient_ref, tier=tier, active=True, start=occurred_at)
        comm_ident = _ident("alert-communication", f"{alert_id}/{tier.label}")
        communication = _alert_communication(
            comm_ident, priority=priority, patient_ref=patient_ref, sent=when,
            about=[urls["ra"], urls["flag"]], recipient=care_team_ref,
            texts=(f"psych-cds: suicide risk {en.upper()} - {reason_text[:300]}. "
                   f"Acknowledge in the triage queue: {dashboard_url}",
                   f"psych-cds：自杀风险{zh} - {reason_text[:300]}。请在分诊队列确认：{dashboard_url}"))
        entries.append({"fullUrl": urls["flag"], "resource": flag,
                        "request": {"method": "PUT", "url": f"Flag/{flag['id']}"}})
        entries.append(_entry(communication, urls["comm"], comm_ident))
        targets += [urls["flag"], urls["comm"]]
    # Provenance has no identifier in R4: it gets a deterministic id and a PUT (update as create), so a
    # retried bundle overwrites it instead of adding a second one.
    prov_id = urls["prov"].removeprefix("urn:uuid:")
    provenance = {
        "resourceType": "Provenance", "id": prov_id, "target": [{"reference": t} for t in targets],
        "recorded": when,
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE"}]},
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "assembler"}]},
                   "who": {"identifier": {"system": f"{CDS_SYSTEM}/software", "value": f"psych-cds/{__version__}"},
                           "display": f"psych-cds {__version__}; rules {ruleset_hash[:16]}"
                                      + (f"; model {model_sha256[:16]}" if model_sha256 else "")}}],
        "entity": [{"role": "source", "what": {"reference": ref}} for ref in basis],
    }
    entries.append({"resource": provenance, "request": {"method": "PUT", "url": f"Provenance/{prov_id}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


TASK_STATUS = {"open": "requested", "escalated": "requested", "acknowledged": "accepted",
               "in_progress": "in-progress", "resolved": "completed"}


def alert_flag(*, alert_id: str, patient_ref: str, tier: RiskTier, active: bool, start: datetime,
               end: datetime | None = None) -> dict[str, Any]:
    """One Flag per alert (deterministic id, PUT): raised tiers update it, resolution makes it inactive."""
    en, zh = TIER_NAMES[tier]
    flag: dict[str, Any] = {
        "resourceType": "Flag", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{CDS_SYSTEM}/alert-flag/{alert_id}")),
        "identifier": [_ident("alert-flag", alert_id)], "status": "active" if active else "inactive",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category",
                         "code": "behavioral", "display": "Behavioral"}]},
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category",
                         "code": "safety", "display": "Safety"}]}],
        "code": {"coding": [{"system": TIER_SYSTEM, "code": tier.label, "display": en}],
                 "text": f"Suicide risk {en} / 自杀风险{zh}"},
        "subject": {"reference": patient_ref},
        "period": {"start": _instant(start)},
    }
    if end is not None:
        flag["period"]["end"] = _instant(end)
    return flag


def _instant(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def task_bundle(*, alert_id: str, task_version: int, patient_ref: str, status: str, priority: str, tier: RiskTier,
                reason: str, assessment_id: int | None, created_at: datetime, updated_at: datetime,
                due_at: datetime, escalation: Mapping[str, Any], owner_ref: str | None, care_team_ref: str | None,
                resolution_code: str | None, notify_text: tuple[str, str] | None, dashboard_url: str) -> dict[str, Any]:
    """The alert's Task, PUT with a deterministic id so every transition converges on one Task, and a
    Communication to whoever must act now (new owner after an escalation, a raised priority)."""
    task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{CDS_SYSTEM}/alert-task/{alert_id}"))
    owner = owner_ref or care_team_ref
    en, zh = TIER_NAMES[tier]
    task: dict[str, Any] = {
        "resourceType": "Task", "id": task_id, "identifier": [_ident("alert", alert_id)],
        "status": TASK_STATUS[status], "intent": "order", "priority": priority,
        "code": {"text": "Respond to suicide / self-harm risk alert / 响应自杀自伤风险警报"},
        "description": f"Suicide risk {en} / 自杀风险{zh}: {reason[:500]}",
        "for": {"reference": patient_ref},
        "authoredOn": _instant(created_at), "lastModified": _instant(updated_at),
        "businessStatus": {"coding": [{"system": f"{CDS_SYSTEM}/fhir/CodeSystem/escalation-level",
                                       "code": str(escalation["code"]), "display": str(escalation["display"])}],
                           "text": str(escalation["display"])},
        "restriction": {"period": {"start": _instant(created_at), "end": _instant(due_at)}},
    }
    if assessment_id is not None:
        task["focus"] = {"type": "RiskAssessment", "identifier": _ident("assessment", str(assessment_id))}
    if owner:
        task["owner"] = {"reference": owner}
    if resolution_code:
        task["statusReason"] = {"coding": [{"system": f"{CDS_SYSTEM}/fhir/CodeSystem/alert-resolution",
                                            "code": resolution_code}]}
    entries: list[dict[str, Any]] = [{"resource": task, "request": {"method": "PUT", "url": f"Task/{task_id}"}}]
    if status == "resolved":  # the alert's Flag stops warning when a clinician resolves it
        flag = alert_flag(alert_id=alert_id, patient_ref=patient_ref, tier=tier, active=False, start=created_at,
                          end=updated_at)
        entries.append({"resource": flag, "request": {"method": "PUT", "url": f"Flag/{flag['id']}"}})
    if notify_text is not None:
        ident = _ident("alert-task-communication", f"{alert_id}/{task_version}")
        comm = _alert_communication(ident, priority=priority, patient_ref=patient_ref, sent=_instant(updated_at),
                                    about=[f"Task/{task_id}"], recipient=owner,
                                    texts=(f"{notify_text[0]} {dashboard_url}", f"{notify_text[1]} {dashboard_url}"))
        entries.append(_entry(comm, f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, ident['value'])}", ident))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _entry_targets(entry: Mapping[str, Any]) -> set[str]:
    """What an entry claims inside its transaction: its fullUrl, and the resource a PUT writes."""
    targets = {f"fullUrl {entry['fullUrl']}"} if entry.get("fullUrl") else set()
    request = entry.get("request") or {}
    if request.get("method") == "PUT":
        targets.add(f"PUT {request.get('url')}")
    return targets


def join_transactions(bundle: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any] | None:
    """One transaction Bundle holding the entries of both (one HTTP request, one outbox row instead of
    two); None when they cannot be one: FHIR forbids two entries with one fullUrl, or two writes of one
    resource, inside a transaction. Each entry keeps its own conditional create or deterministic PUT, so
    a retried joined Bundle creates nothing twice, as each alone would not."""
    claimed: set[str] = set()
    for entry in bundle["entry"]:
        claimed |= _entry_targets(entry)
    for entry in other["entry"]:
        targets = _entry_targets(entry)
        if targets & claimed:
            return None
        claimed |= targets
    return {**bundle, "entry": [*bundle["entry"], *other["entry"]]}
