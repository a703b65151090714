"""Audit-log exports: FHIR R4 AuditEvent bundles (IHE Basic Audit Log Patterns) and CSV.

Each AuditEvent follows the BALP patterns: ``type``/``subtype`` from the coded event table in
compliance.audit (``rest`` + restful-interaction for REST access, DICOM 110110 Patient Record for
assessments and alerts, 110114 User Authentication for sign-in ...), ``action``, ``recorded``,
``outcome``, a requesting agent for the user and one for this application, ``source.observer`` =
this service, the resource as an entity (role 4 Domain Resource) and, when a patient is involved,
the patient as an entity with type 1 Person and role 1 Patient, so a patient-centric audit query
(BALP's "patient" search) finds it.

Every exported record carries its chain position in the extension :data:`CHAIN_EXTENSION`: ``seq``,
``prevHash``, ``hash`` and ``canonical`` (base64 of the exact bytes that were hashed), so an external
verifier can check ``sha256(canonical) == hash`` and the links without access to our database.
The CSV carries the same: ``entity``/``detail`` as canonical JSON and both hashes.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg

from compliance import audit
from compliance.audit import AuditRecord, coding_for

CDS_SYSTEM = "https://psych-cds.example.org"
CHAIN_EXTENSION = f"{CDS_SYSTEM}/fhir/StructureDefinition/audit-chain"
USER_SYSTEM = f"{CDS_SYSTEM}/fhir/NamingSystem/user"
ENTITY_SYSTEM = f"{CDS_SYSTEM}/fhir/NamingSystem/audit-entity"
APPLICATION = "psych-cds"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_REFERENCE = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?$")
_UUID_NS = uuid.UUID("5b1c7c1e-5d0a-4d59-9d2e-6a8f0b6b4c11")
CSV_COLUMNS = ("seq", "recorded_at", "event_type", "action", "outcome", "actor", "actor_role", "patient_ref",
               "purpose", "entity", "detail", "prev_hash", "hash")


def _who(actor: str) -> dict[str, Any]:
    if _REFERENCE.match(actor):
        return {"reference": actor}
    return {"identifier": {"system": USER_SYSTEM, "value": actor}}


def _entity_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def to_fhir(rec: AuditRecord) -> dict[str, Any]:
    """One audit record as a FHIR R4 AuditEvent (BALP patterns, see module docstring)."""
    coding = coding_for(rec.event_type)
    application_is_actor = rec.actor in (APPLICATION, "system")
    agents: list[dict[str, Any]] = []
    if not application_is_actor:
        user: dict[str, Any] = {"who": _who(rec.actor), "requestor": True}
        if rec.actor_role:
            user["role"] = [{"text": rec.actor_role}]
        agents.append(user)
    agents.append({
        "type": {"coding": [{"system": audit.DCM, "code": "110150", "display": "Application"}]},
        "who": {"identifier": {"system": CDS_SYSTEM, "value": APPLICATION}, "display": APPLICATION},
        "requestor": application_is_actor,
    })
    entities: list[dict[str, Any]] = []
    if isinstance(rec.entity, dict) and rec.entity:
        what = rec.entity.get("what")
        resource: dict[str, Any] = {
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            "detail": [{"type": str(k), "valueString": _entity_value(v)}
                       for k, v in sorted(rec.entity.items()) if k != "what" and v is not None],
        }
        if isinstance(what, str) and _REFERENCE.match(what):
            resource["what"] = {"reference": what}
        elif what is not None:
            resource["what"] = {"identifier": {"system": ENTITY_SYSTEM, "value": _entity_value(what)}}
        if not resource["detail"]:
            del resource["detail"]
        entities.append(resource)
    if rec.patient_ref:
        entities.append({
            "what": {"reference": rec.patient_ref} if _REFERENCE.match(rec.patient_ref)
            else {"identifier": {"system": ENTITY_SYSTEM, "value": rec.patient_ref}},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        })
    canonical = audit.canonical_bytes(rec.hash_fields())
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"cds-audit-{rec.seq}",
        "extension": [{"url": CHAIN_EXTENSION, "extension": [
            {"url": "seq", "valueInteger": rec.seq},
            {"url": "algorithm", "valueString": "sha256 over canonical JSON (sorted keys, no whitespace, UTF-8)"},
            {"url": "prevHash", "valueString": rec.prev_hash},
            {"url": "hash", "valueString": rec.hash},
            {"url": "canonical", "valueBase64Binary": base64.b64encode(canonical).decode("ascii")},
        ]}],
        "type": coding.type.to_fhir(),
        "action": rec.action,
        "recorded": audit.format_ts(rec.recorded_at),
        "outcome": str(rec.outcome),
        "agent": agents,
        "source": {"site": APPLICATION, "observer": {"display": APPLICATION},
                   "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}]},
    }
    if coding.subtype:
        event["subtype"] = [s.to_fhir() for s in coding.subtype]
    if rec.purpose:
        event["purposeOfEvent"] = [{"coding": [{"system": ACT_REASON, "code": rec.purpose}]}]
    if entities:
        event["entity"] = entities
    return event


def _entry(rec: AuditRecord) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{uuid.uuid5(_UUID_NS, rec.hash)}", "resource": to_fhir(rec)}


def iter_fhir(conn: psycopg.Connection[Any], from_ts: datetime | None, to_ts: datetime | None,
              patient_ref: str | None = None) -> Iterator[dict[str, Any]]:
    """AuditEvents for records in ``[from_ts, to_ts)``, in chain order, streamed."""
    for rec in audit.iter_records(conn, from_ts, to_ts, patient_ref):
        yield to_fhir(rec)


def _bundle_head() -> dict[str, Any]:
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
            "timestamp": audit.format_ts(datetime.now(UTC))}


def export_fhir_bundle(conn: psycopg.Connection[Any], from_ts: datetime | None, to_ts: datetime | None,
                       patient_ref: str | None = None) -> dict[str, Any]:
    """A FHIR R4 Bundle (type collection) of the AuditEvents in ``[from_ts, to_ts)``."""
    bundle = _bundle_head()
    bundle["entry"] = [_entry(r) for r in audit.iter_records(conn, from_ts, to_ts, patient_ref)]
    return bundle


def write_fhir_bundle(conn: psycopg.Connection[Any], out: TextIO, from_ts: datetime | None,
                      to_ts: datetime | None, patient_ref: str | None = None) -> int:
    """Stream the same Bundle as :func:`export_fhir_bundle` to ``out`` (constant memory); returns the count."""
    head = json.dumps(_bundle_head(), ensure_ascii=False)
    out.write(head[:-1] + ', "entry": [')
    n = 0
    for rec in audit.iter_records(conn, from_ts, to_ts, patient_ref):
        out.write((",\n" if n else "\n") + json.dumps(_entry(rec), ensure_ascii=False))
        n += 1
    out.write("\n]}\n")
    return n


def _cell(value: str | None) -> str:
    """Neutralise spreadsheet formulas in free-form columns: a leading ' is added (strip it to verify)."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value or ""


def _csv_row(rec: AuditRecord) -> list[Any]:
    enc = audit.canonical_json
    return [rec.seq, audit.format_ts(rec.recorded_at), rec.event_type, rec.action, rec.outcome, _cell(rec.actor),
            _cell(rec.actor_role), _cell(rec.patient_ref), _cell(rec.purpose),
            "" if rec.entity is None else enc(rec.entity), "" if rec.detail is None else enc(rec.detail),
            rec.prev_hash, rec.hash]


def iter_csv(conn: psycopg.Connection[Any], from_ts: datetime | None, to_ts: datetime | None,
             patient_ref: str | None = None) -> Iterator[str]:
    """CSV lines (header first): the record fields, entity/detail as canonical JSON, both hashes.
    Empty cells are NULL; a leading ' before = + - @ was added against formula injection."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for rec in audit.iter_records(conn, from_ts, to_ts, patient_ref):
        writer.writerow(_csv_row(rec))
        if buf.tell() > 65536:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def export_csv(conn: psycopg.Connection[Any], from_ts: datetime | None, to_ts: datetime | None,
               patient_ref: str | None = None) -> str:
    return "".join(iter_csv(conn, from_ts, to_ts, patient_ref))
