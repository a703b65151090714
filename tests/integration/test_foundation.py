"""The walking skeleton end to end, on the real PostgreSQL and the real local EHR:
PHQ-9 in the EHR -> poll -> assess -> alert on /triage -> RiskAssessment, Flag, Communication in the EHR."""

from __future__ import annotations

from typing import Any

import pytest

from cds.jobs import build_scheduler, ingest_cycle
from tests.samples import chat, patient, phq9, sign_in, wait_until

pytestmark = pytest.mark.integration




def test_positive_phq9_reaches_the_ehr_and_the_triage_queue(ehr: Any, service: Any, client: Any) -> None:
    pat = ehr.create(patient())
    ref = f"Patient/{pat['id']}"
    qr = ehr.create(phq9(ref, [1, 1, 2, 1, 0, 1, 0, 0, 2]))
    scheduler = build_scheduler(service)
    scheduler.start()
    try:
        ras = wait_until(lambda: ehr.search("RiskAssessment", subject=ref))
        flags = wait_until(lambda: ehr.search("Flag", subject=ref))
        comms = wait_until(lambda: [c for c in ehr.search("Communication", subject=ref)
                                    if c.get("category", [{}])[0].get("coding")])
    finally:
        scheduler.shutdown(wait=True)
    assert len(ras) == 1 and len(flags) == 1 and len(comms) == 1
    ra = ras[0]
    assert ra["basis"][0]["reference"].startswith(f"QuestionnaireResponse/{qr['id']}")
    codes = {c["system"].rsplit("/", 1)[-1]: c["code"] for c in ra["prediction"][0]["qualitativeRisk"]["coding"]}
    assert codes["risk-tier"] in ("moderate", "high", "imminent")
    assert {c["coding"][0]["code"] for c in flags[0]["category"]} == {"behavioral", "safety"}
    assert comms[0]["priority"] in ("urgent", "asap", "stat")
    provenance = ehr.search("Provenance")
    assert any(t["reference"] == f"RiskAssessment/{ra['id']}" for p in provenance for t in p["target"])
    assert client.get("/triage").status_code == 302  # sign in first
    sign_in(client, service, "nurse")
    queue = client.get("/triage", headers={"Accept": "application/json"}).get_json()
    assert [a["patient"] for a in queue] == [ref]
    assert "PHQ-9" in queue[0]["reason"] or "item 9" in queue[0]["reason"].lower()
    page = client.get("/triage?lang=en")
    assert page.status_code == 200 and ref.encode() in page.data


def test_same_resource_delivered_twice_gives_one_alert(ehr: Any, service: Any, client: Any,
                                                        api_key: str) -> None:
    pat = ehr.create(patient())
    ref = f"Patient/{pat['id']}"
    qr = ehr.create(phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 3]))
    ingest_cycle(service)
    # The same version again: through the push API and through a full re-poll from the beginning.
    headers = {"Authorization": f"Bearer {api_key}"}
    first = client.post("/api/v1/events", json=qr, headers=headers)
    second = client.post("/api/v1/events", json=qr, headers=headers)
    assert first.status_code == 202 and second.status_code == 200 and second.get_json()["duplicate"]
    with service.pool.connection() as conn:
        conn.execute("UPDATE feeds SET watermark = NULL")
        conn.commit()
    ingest_cycle(service)
    ingest_cycle(service)
    with service.pool.connection() as conn:
        ehr_events = conn.execute("SELECT count(*) FROM events WHERE source = 'ehr'").fetchone()[0]
        alerts = conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
    assert ehr_events == 1
    assert alerts == 1
    assert len(ehr.search("RiskAssessment", subject=ref)) <= 2  # one per assessed delivery path, never per retry
    assert len(ehr.search("Flag", subject=ref)) == 1


def test_invalid_resource_is_quarantined_and_the_next_valid_one_flows(ehr: Any, service: Any, api_key: str,
                                                                       client: Any) -> None:
    pat = ehr.create(patient())
    ref = f"Patient/{pat['id']}"
    orphan = phq9(ref, [3] * 9)
    del orphan["subject"]  # valid FHIR, but nobody to assess it for
    ehr.create(orphan)
    ehr.create(phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 1]))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        quarantined = conn.execute("SELECT resource_type, reason FROM quarantine").fetchall()
        assessed = conn.execute("SELECT count(*) FROM assessments WHERE patient_ref = %s", (ref,)).fetchone()[0]
    assert len(quarantined) == 1 and "subject" in quarantined[0][1]
    assert assessed == 1
    # Bad input over HTTP: a clear OperationOutcome, and it is kept for review too.
    headers = {"Authorization": f"Bearer {api_key}"}
    assert client.post("/api/v1/events", json=phq9(ref, [0] * 9)).status_code == 401  # no key, nothing stored
    assert client.get("/api/v1/quarantine").status_code == 401
    bad = client.post("/api/v1/events", data=b'{"resourceType": "Communication", "status": 42}',
                      content_type="application/fhir+json", headers=headers)
    assert bad.status_code == 400
    body = bad.get_json()
    assert body["resourceType"] == "OperationOutcome" and "quarantine" in body["issue"][0]["diagnostics"]
    listed = client.get("/api/v1/quarantine", headers=headers).get_json()
    assert len(listed) == 2


def test_ehr_outage_queues_the_write_back_and_delivers_it_once(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient())
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [2, 2, 2, 2, 2, 2, 2, 2, 2]))
    ehr.fault(mode="down", methods=["POST"])  # reads work, every write is cut off
    ingest_cycle(service)
    with service.pool.connection() as conn:
        pending = dict(conn.execute("SELECT kind, max(attempts) FROM outbox WHERE status = 'pending'"
                                    " GROUP BY kind").fetchall())
    assert pending["assessment-writeback"] >= 1  # tried, failed, queued for retry
    assert "alert-task" not in pending  # the alert's Task is in that transaction: it arrives with it
    assert ehr.search("RiskAssessment", subject=ref) == []
    ehr.clear_fault()
    with service.pool.connection() as conn:
        conn.execute("UPDATE outbox SET next_attempt_at = now()")  # skip the backoff wait
        conn.commit()
    ingest_cycle(service)
    ingest_cycle(service)
    assert len(ehr.search("RiskAssessment", subject=ref)) == 1
    assert len(ehr.search("Flag", subject=ref)) == 1
    assert len(ehr.search("Task", patient=ref)) == 1


def test_a_retried_bundle_creates_nothing_twice(ehr: Any, service: Any) -> None:
    """The EHR committed but the answer was lost: the retry's conditional creates match what exists."""
    pat = ehr.create(patient())
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 2]))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        items = conn.execute("SELECT id, kind FROM outbox").fetchall()
        assert [kind for _, kind in items] == ["assessment-writeback"]  # the Task is in it too
        conn.execute("UPDATE outbox SET status = 'pending', next_attempt_at = now() WHERE id = %s", (items[0][0],))
        conn.commit()
    provenance = len(ehr.search("Provenance"))
    ingest_cycle(service)
    for rtype in ("RiskAssessment", "Flag", "Communication"):
        assert len(ehr.search(rtype, subject=ref)) == 1, rtype
    assert len(ehr.search("Task", patient=ref)) == 1  # sent in the same transaction, PUT: overwritten
    assert len(ehr.search("Provenance")) == provenance


def test_bot_turns_are_stored_but_not_scored_as_the_patient(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient())
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "If you ever think about killing yourself, call 988.", sender="Device/bot-1"))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        events = conn.execute("SELECT status FROM events").fetchall()
        assessed = conn.execute("SELECT count(*) FROM assessments").fetchone()[0]
    assert events == [("done",)] and assessed == 0

