"""The compliance console on the real database: search and paging, chain positions and signature
state, verification (also after tampering), exports, change history and alert figures."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import psycopg
import pytest

from cds.jobs import ingest_cycle
from compliance import audit
from compliance.export import CSV_COLUMNS
from tests.samples import chat, patient, phq9, sign_in

pytestmark = pytest.mark.integration

CHAT_TEXT = "I am going to kill myself tonight, I have the rope ready."


def seed_audit(service: Any, n: int = 60) -> None:
    """Records from three users about two patients, through compliance.audit.record."""
    with service.pool.connection() as conn:
        for i in range(n):
            audit.record(conn, event_type="rest.read" if i % 3 else "alert.acknowledge", action="R",
                         actor=("zhou", "li", "wang")[i % 3], role="nurse",
                         patient_ref=("Patient/p1", "Patient/p2")[i % 2], purpose="TREAT",
                         entity={"what": f"alerts/{i}"}, detail={"i": i})
        conn.commit()


def seqs(html: str) -> list[int]:
    return [int(s) for s in re.findall(r'data-seq="(\d+)"', html)]


def test_nurse_gets_403_on_the_audit_pages(service: Any, client: Any) -> None:
    sign_in(client, service, "nurse")
    for url in ("/audit", "/audit/changes", "/audit/figures", "/audit/export.csv"):
        assert client.get(url).status_code == 403, url
    assert client.post("/audit/verify", data={"csrf_token": "test-csrf"}).status_code == 403
    with service.pool.connection() as conn:
        denied = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'access.denied'"
                              " AND actor = 'nurse-1'").fetchone()[0]
    assert denied == 5


def test_search_filters_pages_and_shows_chain_position_and_signature_state(service: Any, client: Any) -> None:
    seed_audit(service)
    with service.pool.connection() as conn:
        signed = audit.sign_checkpoint(conn, audit.Signer.generate())
        conn.commit()
    sign_in(client, service, "compliance")
    first = client.get("/audit?lang=en")
    assert first.status_code == 200
    page1 = seqs(first.text)
    assert len(page1) == 50 and page1 == sorted(page1, reverse=True)
    older = client.get(f"/audit?before={page1[-1]}").text
    page2 = seqs(older)
    assert page2 and max(page2) < min(page1)
    assert set(page1) | set(page2) >= set(range(1, signed + 1))
    assert "unsigned" in first.text and f"✓ #{signed}" in first.text  # the login record came later
    by_patient = seqs(client.get("/audit?patient=Patient/p1").text)
    assert len(by_patient) == 30
    by_actor = client.get("/audit?actor=li&type=alert").text
    assert len(seqs(by_actor)) == 0  # li never acknowledged in the seed (i % 3 == 1 reads)
    acks = seqs(client.get("/audit?actor=zhou&type=alert").text)
    assert len(acks) == 20
    assert seqs(client.get("/audit?from=2999-01-01").text) == []
    assert len(seqs(client.get("/audit?to=2999-01-01&actor=wang").text)) == 20
    assert client.get("/audit?from=yesterday").status_code == 400
    detail = client.get(f"/audit/record/{page1[-1]}?lang=en").text
    with service.pool.connection() as conn:
        prev_hash, hash_ = conn.execute("SELECT prev_hash, hash FROM audit_log WHERE seq = %s",
                                        (page1[-1],)).fetchone()
    assert prev_hash in detail and hash_ in detail and "covered by checkpoint" in detail


def test_verify_says_ok_then_names_the_first_tampered_record(service: Any, client: Any, db_admin_url: str) -> None:
    seed_audit(service, 10)
    sign_in(client, service, "compliance")
    ok = client.post("/audit/verify?lang=en", data={"csrf_token": "test-csrf"})
    assert ok.status_code == 200 and "verify-ok" in ok.text
    with psycopg.connect(db_admin_url) as admin:
        admin.execute("SET session_replication_role = replica")
        admin.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 4")
        admin.commit()
    bad = client.post("/audit/verify?lang=en", data={"csrf_token": "test-csrf"})
    assert bad.status_code == 409
    assert 'id="first-bad"' in bad.text and ">#4<" in bad.text and "record 4 was altered" in bad.text
    with service.pool.connection() as conn:
        runs = conn.execute("SELECT detail FROM audit_log WHERE event_type = 'audit.verify' ORDER BY seq").fetchall()
    assert [r[0]["ok"] for r in runs] == [True, False] and runs[1][0]["first_bad_seq"] == 4


def test_exports_are_downloads_that_parse_and_are_audited(service: Any, client: Any) -> None:
    seed_audit(service, 12)
    sign_in(client, service, "compliance")
    fhir = client.get("/audit/export.json?patient=Patient/p2")
    assert fhir.status_code == 200 and "attachment" in fhir.headers["Content-Disposition"]
    bundle = json.loads(fhir.data)
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 6
    for entry in bundle["entry"]:
        event = entry["resource"]
        assert event["resourceType"] == "AuditEvent"
        assert {"reference": "Patient/p2"} in [e["what"] for e in event["entity"]]
    rows = list(csv.reader(io.StringIO(client.get("/audit/export.csv").text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) - 1 >= 12 + 2  # the seed, the login and the first export
    empty = list(csv.reader(io.StringIO(client.get("/audit/export.csv?from=2999-01-01").text)))
    assert len(empty) == 1
    with service.pool.connection() as conn:
        exports = conn.execute("SELECT entity, patient_ref FROM audit_log WHERE event_type = 'export' ORDER BY seq"
                               ).fetchall()
    assert (exports[0][0]["format"], exports[0][0]["count"]) == ("fhir", 6)
    assert exports[0][1] == "Patient/p2" and len(exports) == 3


def test_change_history_and_alert_figures_show_counts_not_patient_text(ehr: Any, service: Any,
                                                                       client: Any) -> None:
    ref = f"Patient/{ehr.create(patient())['id']}"
    ehr.create(phq9(ref, [3, 3, 3, 3, 3, 3, 3, 3, 3]))
    ehr.create(chat(ref, CHAT_TEXT))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        aid, fired = conn.execute("SELECT id, fired FROM assessments WHERE patient_ref = %s AND NOT shadow"
                                  " AND jsonb_array_length(fired) > 0 ORDER BY id LIMIT 1", (ref,)).fetchone()
        sha, rs_hash = conn.execute("SELECT model_sha256, ruleset_hash FROM assessments WHERE model_sha256"
                                    " IS NOT NULL LIMIT 1").fetchone()
        conn.execute("UPDATE alerts SET acknowledged_at = created_at + interval '4 minutes',"
                     " status = 'acknowledged'")
        audit.record(conn, event_type="rule.change", action="U", actor="admin-1", detail={"ruleset": rs_hash[:12]})
        conn.commit()
    doctor = sign_in(client, service, "psychiatrist", username="dr-wu", wards=("ward5",))
    assert doctor.role == "psychiatrist"
    r = client.post(f"/dashboard/assessment/{aid}/review", data={
        "decision": "override", "reason_code": "known-chronic", "comment": "long-standing, safety plan in place",
        "csrf_token": "test-csrf"})
    assert r.status_code == 302
    client.post("/auth/logout", data={"csrf_token": "test-csrf"})
    sign_in(client, service, "compliance")
    changes = client.get("/audit/changes?lang=en").text
    assert rs_hash[:16] in changes and sha[:16] in changes and "rule.change" in changes
    figures = client.get("/audit/figures?lang=en").text
    rule = f"{fired[0]['id']}@{fired[0]['version']}"
    row = re.search(rf'<tr data-rule="{re.escape(rule)}">.*?</tr>', figures, re.DOTALL).group(0)
    assert 'class="rate">100%' in row and "Known, chronic and managed" in row
    ack = re.search(r'id="ack-times".*?</table>', figures, re.DOTALL).group(0)
    assert "4 min" in ack
    for page in (changes, figures, client.get("/audit").text):
        assert CHAT_TEXT not in page and "rope" not in page and "safety plan in place" not in page
