"""compliance.export: FHIR AuditEvent bundles that validate as R4 and can be verified outside our
database, and CSV carrying the same chain."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from cds.store.db import connect
from compliance import audit
from compliance.audit import EventType
from compliance.export import CHAIN_EXTENSION, export_csv, export_fhir_bundle, iter_csv, write_fhir_bundle


@pytest.fixture
def log_url(db_url: str) -> str:
    with connect(db_url) as conn:
        audit.record(conn, event_type=EventType.LOGIN, action="E", actor="Practitioner/doc1", role="psychiatrist")
        audit.record(conn, event_type=EventType.REST_READ, action="R", actor="Practitioner/doc1",
                     role="psychiatrist", patient_ref="Patient/123", purpose="TREAT",
                     entity={"what": "RiskAssessment/77", "version": "2"})
        audit.record(conn, event_type=EventType.REST_SEARCH, action="E", actor="nurse.li", role="nurse",
                     entity={"what": "Flag", "query_sha256": "ab" * 32}, detail={"count": 3})
        audit.record(conn, event_type="alert.acknowledge", action="U", actor="nurse.li", role="nurse",
                     patient_ref="Patient/456", entity={"what": "alert", "alert_id": "5c1f"},
                     detail={"from": "open", "to": "acknowledged", "sla_left_s": 120.5})
        audit.record(conn, event_type=EventType.ASSESSMENT, action="C", actor="psych-cds",
                     patient_ref="Patient/123", entity={"what": "RiskAssessment/78", "tier": 3})
        audit.record(conn, event_type=EventType.LOGIN_FAILED, action="E", actor="=HYPERLINK(evil)", outcome=4)
        audit.record(conn, event_type=EventType.BREAK_GLASS, action="E", actor="Practitioner/doc2",
                     patient_ref="Patient/456", purpose="ETREAT")
        audit.record(conn, event_type=EventType.ERASURE, action="D", actor="Practitioner/dpo",
                     patient_ref="Patient/999", purpose="PATRQT", entity={"what": "Patient/999", "data_key_ids": [4]})
        conn.commit()
    return db_url


WINDOW = (datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1))


def _ext(event: dict[str, Any], name: str) -> Any:
    chain = next(e for e in event["extension"] if e["url"] == CHAIN_EXTENSION)
    part = next(e for e in chain["extension"] if e["url"] == name)
    return next(v for k, v in part.items() if k.startswith("value"))


def test_bundle_entries_validate_as_fhir_r4_audit_events(log_url: str) -> None:
    with connect(log_url) as conn:
        bundle = export_fhir_bundle(conn, *WINDOW)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection" and len(bundle["entry"]) == 8
    for entry in bundle["entry"]:
        AuditEvent.model_validate(entry["resource"])
    events = [e["resource"] for e in bundle["entry"]]
    read = events[1]
    assert read["type"]["code"] == "rest" and read["subtype"][0] == {
        "system": "http://hl7.org/fhir/restful-interaction", "code": "read", "display": "read"}
    assert read["action"] == "R" and read["outcome"] == "0"
    assert read["agent"][0] == {"who": {"reference": "Practitioner/doc1"}, "requestor": True,
                                "role": [{"text": "psychiatrist"}]}
    assert read["agent"][1]["requestor"] is False and read["source"]["observer"]["display"] == "psych-cds"
    assert read["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    resource, patient = read["entity"]
    assert resource["what"] == {"reference": "RiskAssessment/77"} and resource["role"]["code"] == "4"
    assert patient["what"] == {"reference": "Patient/123"}
    assert (patient["type"]["code"], patient["role"]["code"]) == ("1", "1")
    assert events[0]["type"]["code"] == "110114" and events[0]["subtype"][0]["code"] == "110122"
    assert events[2]["subtype"][0]["code"] == "search-type"
    assert events[3]["type"]["code"] == "110110" and events[3]["subtype"][-1]["code"] == "alert.acknowledge"
    assert events[4]["agent"] == [events[4]["agent"][0]] and events[4]["agent"][0]["requestor"] is True
    assert events[5]["outcome"] == "4"
    assert events[6]["type"]["code"] == "110113" and events[6]["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"


def test_exported_chain_verifies_without_the_database(log_url: str) -> None:
    """What an external auditor does: sha256(canonical) == hash, links, and the readable fields match."""
    with connect(log_url) as conn:
        events = [e["resource"] for e in export_fhir_bundle(conn, *WINDOW)["entry"]]
    prev = audit.GENESIS_HASH
    for i, event in enumerate(events, start=1):
        canonical = base64.b64decode(_ext(event, "canonical"))
        assert hashlib.sha256(canonical).hexdigest() == _ext(event, "hash")
        fields = json.loads(canonical)
        assert fields["seq"] == _ext(event, "seq") == i
        assert fields["prev_hash"] == _ext(event, "prevHash") == prev
        assert fields["recorded_at"] == event["recorded"] and fields["action"] == event["action"]
        prev = _ext(event, "hash")


def test_patient_filter_and_time_window(log_url: str) -> None:
    with connect(log_url) as conn:
        mine = export_fhir_bundle(conn, *WINDOW, patient_ref="Patient/123")
        none = export_fhir_bundle(conn, WINDOW[1], WINDOW[1] + timedelta(days=1))
    assert [e["resource"]["id"] for e in mine["entry"]] == ["cds-audit-2", "cds-audit-5"]
    assert none["entry"] == []


def test_streamed_bundle_equals_the_built_one(log_url: str) -> None:
    out = io.StringIO()
    with connect(log_url) as conn:
        n = write_fhir_bundle(conn, out, *WINDOW)
        built = export_fhir_bundle(conn, *WINDOW)
    streamed = json.loads(out.getvalue())
    Bundle.model_validate(streamed)
    assert n == 8 and [e["resource"] for e in streamed["entry"]] == [e["resource"] for e in built["entry"]]


def test_csv_rows_rehash_to_the_chain(log_url: str) -> None:
    with connect(log_url) as conn:
        text = export_csv(conn, *WINDOW)
        assert "".join(iter_csv(conn, *WINDOW)) == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8
    prev = audit.GENESIS_HASH
    for row in rows:
        def cell(name: str, row: dict[str, str] = row) -> str | None:
            value = row[name]
            if value.startswith("'") and value[1:2] in ("=", "+", "-", "@"):
                value = value[1:]
            return value or None

        fields = {"seq": int(row["seq"]), "recorded_at": row["recorded_at"], "event_type": row["event_type"],
                  "action": row["action"], "outcome": int(row["outcome"]), "actor": cell("actor"),
                  "actor_role": cell("actor_role"), "patient_ref": cell("patient_ref"), "purpose": cell("purpose"),
                  "entity": json.loads(row["entity"]) if row["entity"] else None,
                  "detail": json.loads(row["detail"]) if row["detail"] else None, "prev_hash": row["prev_hash"]}
        assert audit.record_hash(fields) == row["hash"] and row["prev_hash"] == prev
        prev = row["hash"]
    assert rows[5]["actor"] == "'=HYPERLINK(evil)"  # formula neutralised
