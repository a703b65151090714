"""Chat messages from the EHR through the text model and safety net to alerts (real EHR, real DB)."""

from __future__ import annotations

from typing import Any

import pytest

from cds.jobs import ingest_cycle
from tests.samples import chat, patient, phq9

pytestmark = pytest.mark.integration


def _alerts(service: Any, ref: str) -> list[tuple[Any, ...]]:
    with service.pool.connection() as conn:
        return conn.execute("SELECT kind, priority, tier, status FROM alerts WHERE patient_ref = %s ORDER BY kind",
                            (ref,)).fetchall()


def test_explicit_plan_in_chat_raises_a_stat_alert_and_writes_back(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-C-1"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "我已经攒够了安眠药，打算这周末全部吃掉"))
    ingest_cycle(service)
    alerts = _alerts(service, ref)
    assert alerts and alerts[0][1] == "stat" and alerts[0][2] >= 3  # high or imminent
    ra = ehr.search("RiskAssessment", subject=ref)
    assert len(ra) == 1
    assert ra[0]["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] in ("high", "imminent")
    assert 0 <= ra[0]["prediction"][0]["probabilityDecimal"] <= 100
    with service.pool.connection() as conn:
        row = conn.execute("SELECT model_sha256, ruleset_hash, fired FROM assessments WHERE patient_ref = %s",
                           (ref,)).fetchone()
    assert row[0] == service.engines.model_sha256 and len(row[1]) == 64
    assert any(f["id"] == "text-safety-net" for f in row[2])


def test_context_across_messages_and_a_later_denial_does_not_lower_the_tier(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-C-2"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "I have been collecting my sleeping pills for weeks", sent="2026-11-20T03:00:00Z"))
    ingest_cycle(service)
    ehr.create(chat(ref, "I will take them all tonight. goodbye", sent="2026-11-20T03:01:00Z"))
    ingest_cycle(service)
    ehr.create(chat(ref, "haha I was just joking, I'm fine", sent="2026-11-20T03:02:00Z"))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        tiers = [r[0] for r in conn.execute("SELECT tier FROM assessments WHERE patient_ref = %s ORDER BY id",
                                            (ref,))]
        current = conn.execute("SELECT current_tier FROM patients WHERE patient_ref = %s", (ref,)).fetchone()[0]
    assert len(tiers) == 3
    assert tiers[1] >= 3 and tiers[2] >= tiers[1]  # the denial does not lower it
    assert current >= 3
    assert len([a for a in _alerts(service, ref) if a[0] == "risk"]) == 1  # one open alert per episode


def test_negative_questionnaire_with_risky_chat_gets_a_discordance_alert(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-C-3"))
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [1, 1, 1, 0, 0, 0, 0, 0, 0]))
    ingest_cycle(service)
    ehr.create(chat(ref, "I keep thinking about killing myself, every single day"))
    ingest_cycle(service)
    kinds = {a[0] for a in _alerts(service, ref)}
    assert "discordance" in kinds


def test_idioms_and_third_person_reports_do_not_alert(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-C-4"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "这作业要累死我了，笑死", session="S-a"))
    ehr.create(chat(ref, "this homework is killing me lol", session="S-b"))
    ingest_cycle(service)
    assert [a for a in _alerts(service, ref) if a[1] == "stat"] == []


def test_a_recorded_prior_attempt_in_the_ehr_reaches_the_rules(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-C-5"))
    ref = f"Patient/{pat['id']}"
    ehr.create({"resourceType": "Condition", "subject": {"reference": ref},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "T14.91",
                                     "display": "Suicide attempt"}]}})
    ehr.create(phq9(ref, [1, 1, 1, 1, 1, 1, 1, 1, 1]))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        prior, fired = conn.execute(
            "SELECT p.prior_attempt, a.fired FROM patients p JOIN assessments a USING (patient_ref)"
            " WHERE patient_ref = %s", (ref,)).fetchone()
    assert prior is True
    assert any(f["id"] == "prior-attempt-with-ideation" for f in fired)


def test_a_batch_asks_the_ehr_about_its_new_patients_in_two_searches(ehr: Any, service: Any) -> None:
    """Diagnoses, prior attempt and age of every patient new to a batch: one Condition and one Patient
    search for all of them (was two requests per patient, in series, while the batch held its locks)."""
    refs = []
    for i, born in enumerate(["1990-04-01", "2011-02-03", "1975-12-30"]):
        pat = ehr.create({**patient(mrn=f"MRN-C-H{i}"), "birthDate": born})
        refs.append(f"Patient/{pat['id']}")
    ehr.create({"resourceType": "Condition", "subject": {"reference": refs[0]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "T14.91"}]}})
    ehr.create({"resourceType": "Condition", "subject": {"reference": refs[1]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "F32.1"}]}})
    ehr.create({"resourceType": "Condition", "subject": {"reference": refs[1]},  # refuted: not counted
                "verificationStatus": {"coding": [{"code": "refuted"}]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "Z91.5"}]}})
    for ref in refs:
        ehr.create(chat(ref, "I keep thinking about killing myself"))
    since = ehr.http.get(f"{ehr.root}/admin/requests").json()["last"]
    by_id = ehr.http.get(f"{ehr.root}/admin/subscriptions").json()["search"]["indexedId"]
    ingest_cycle(service)
    # the sandbox answers `_id=a,b,c` from its ids (a real server's primary key), not a scan of every Patient
    assert ehr.http.get(f"{ehr.root}/admin/subscriptions").json()["search"]["indexedId"] == by_id + 1
    asked = [r["path"].rstrip("/").rsplit("/", 1)[-1] for r in
             ehr.http.get(f"{ehr.root}/admin/requests", params={"since": since}).json()["requests"]
             if r["method"] == "GET" and ("/Condition" in r["path"] or "/Patient" in r["path"])]
    assert sorted(asked) == ["Condition", "Patient"], asked
    with service.pool.connection() as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT patient_ref, prior_attempt, conditions, birth_date::text FROM patients"
            " WHERE patient_ref = ANY(%s)", (refs,))}
    assert rows[refs[0]] == (True, ["T14.91"], "1990-04-01")
    assert rows[refs[1]] == (False, ["F32.1"], "2011-02-03")
    assert rows[refs[2]] == (False, [], "1975-12-30")


def test_when_the_ehr_cannot_answer_history_stays_unknown_and_is_asked_again_later(ehr: Any,
                                                                                   service: Any) -> None:
    """One failed search for the whole batch, not one per patient; no patient is recorded as having no
    prior attempt; the next try is due in 10 minutes (history_checked_at 23 h 50 min back)."""
    from cds.jobs import process_pending_events
    from integrations.fhir.poller import poll_all

    refs = [f"Patient/{ehr.create(patient(mrn=f'MRN-C-U{i}'))['id']}" for i in range(3)]
    for ref in refs:
        ehr.create(chat(ref, "I keep thinking about killing myself"))
    poll_all(service.pool, service.fhir, service.pipeline, page_size=100, overlap_s=0)
    since = ehr.http.get(f"{ehr.root}/admin/requests").json()["last"]
    ehr.fault(mode="error", status=503, methods=["GET"])
    try:
        assert process_pending_events(service) == 3
    finally:
        ehr.clear_fault()
    asked = [r["path"] for r in ehr.http.get(f"{ehr.root}/admin/requests", params={"since": since}).json()["requests"]
             if r["method"] == "GET"]
    assert len(asked) == 1 and asked[0].endswith("/Condition"), asked
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT prior_attempt, extract(epoch FROM now() - history_checked_at) / 3600"
                            " FROM patients WHERE patient_ref = ANY(%s)", (refs,)).fetchall()
        assessed = conn.execute("SELECT count(*) FROM assessments WHERE patient_ref = ANY(%s)", (refs,)).fetchone()
    assert len(rows) == 3 and all(prior is None and 23.7 < hours < 23.9 for prior, hours in rows), rows
    assert assessed[0] == 3  # assessed all the same: unknown history does not hold back the text


def test_a_patient_the_ehr_does_not_know_has_unknown_history_not_none(ehr: Any, service: Any) -> None:
    from integrations.fhir.history import fetch_histories

    pat = ehr.create(patient(mrn="MRN-C-H9"))
    got = fetch_histories(service.fhir, [f"Patient/{pat['id']}", "Patient/no-such-patient"])
    assert got["Patient/no-such-patient"] is None
    assert got[f"Patient/{pat['id']}"] is not None and got[f"Patient/{pat['id']}"].prior_attempt is False


def test_history_reads_back_only_the_signals_rules_count(ehr: Any, service: Any) -> None:
    from datetime import UTC, datetime, timedelta

    from cds.store.assessments import recent_signals

    pat = ehr.create(patient(mrn="MRN-C-9"))
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [1, 1, 1, 0, 0, 0, 0, 0, 1]))
    ehr.create(chat(ref, "I keep thinking about killing myself"))
    ingest_cycle(service)
    since = datetime.now(UTC) - timedelta(days=1)
    with service.pool.connection() as conn:
        everything = recent_signals(conn, ref, since)
        counted = recent_signals(conn, ref, since, service.engines.lookback_signals)
    assert {"phq9.total", "text.probability"} <= {s.name for s in everything}
    assert {s.name for s in counted} == {"phq9.item9", "text.tier"}
    # same signals, same order, as the unfiltered read
    assert [(s.name, s.value, s.tier) for s in counted] == \
        [(s.name, s.value, s.tier) for s in everything if s.name in service.engines.lookback_signals]


def _transactions_since(ehr: Any, since: int) -> list[dict[str, Any]]:
    """Transaction Bundles the EHR received since request ``since`` (its request log: methods and types)."""
    requests = ehr.http.get(f"{ehr.root}/admin/requests", params={"since": since}).json()["requests"]
    return [r for r in requests if r["method"] == "POST" and r["path"].rstrip("/") == "/fhir"
            and r.get("bundleType") == "transaction"]


def test_an_alert_opened_by_one_message_reaches_the_ehr_in_one_transaction(ehr: Any, service: Any) -> None:
    from datetime import UTC, datetime

    from cds.alerts.workflow import acknowledge_alert

    pat = ehr.create(patient(mrn="MRN-C-10"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "我已经攒够了安眠药，打算这周末全部吃掉"))
    since = ehr.http.get(f"{ehr.root}/admin/requests").json()["last"]
    ingest_cycle(service)
    sent = _transactions_since(ehr, since)
    assert len(sent) == 1, sent  # write-back and Task: one request, not two
    assert sorted(sent[0]["entries"]) == ["POST Communication", "POST RiskAssessment", "PUT Flag",
                                          "PUT Provenance", "PUT Task"]
    with service.pool.connection() as conn:
        alert_id, assessment_id = conn.execute("SELECT id::text, assessment_id FROM alerts WHERE patient_ref = %s",
                                               (ref,)).fetchone()
        rows = conn.execute("SELECT dedupe_key, kind, status FROM outbox WHERE patient_ref = %s ORDER BY id",
                            (ref,)).fetchall()
    assert rows == [(f"assessment:{assessment_id}", "assessment-writeback", "sent")]
    (task,) = ehr.search("Task", patient=ref)
    assert task["identifier"][0]["value"] == alert_id and task["status"] == "requested"
    assert task["priority"] == "stat" and task["focus"]["identifier"]["value"] == str(assessment_id)
    (ra,) = ehr.search("RiskAssessment", subject=ref)
    assert len(ehr.search("Flag", subject=ref)) == 1 and len(ehr.search("Communication", subject=ref)) == 2
    assert any(t["reference"] == f"RiskAssessment/{ra['id']}" for p in ehr.search("Provenance")
               for t in p["target"])

    # A later transition still queues the Task's next version on its own, after the write-back.
    with service.pool.connection() as conn:
        acknowledge_alert(conn, service.cipher, service.settings, alert_id, actor="nurse.li", role="nurse",
                          now=datetime.now(UTC))
        conn.commit()
    ingest_cycle(service)
    with service.pool.connection() as conn:
        keys = [r[0] for r in conn.execute("SELECT dedupe_key FROM outbox WHERE patient_ref = %s ORDER BY id",
                                           (ref,))]
    assert keys == [f"assessment:{assessment_id}", f"alert:{alert_id}:task:2"]
    (task,) = ehr.search("Task", patient=ref)
    assert task["status"] == "accepted"


def test_a_raised_alert_sends_its_task_with_the_write_back(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-C-11"))
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [1, 1, 1, 1, 1, 1, 1, 1, 1]))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        opened = conn.execute("SELECT priority, task_version FROM alerts WHERE patient_ref = %s AND kind = 'risk'",
                              (ref,)).fetchone()
    ehr.create(chat(ref, "我已经攒够了安眠药，打算今晚全部吃掉"))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        raised = conn.execute("SELECT priority, task_version FROM alerts WHERE patient_ref = %s AND kind = 'risk'",
                              (ref,)).fetchone()
        kinds = [r[0] for r in conn.execute("SELECT kind FROM outbox WHERE patient_ref = %s", (ref,))]
    assert opened is not None and opened[0] != "stat" and raised == ("stat", opened[1] + 1)
    assert kinds == ["assessment-writeback", "assessment-writeback"]  # no alert-task row of its own
    (task,) = ehr.search("Task", patient=ref)
    assert task["priority"] == "stat"


def test_a_task_that_cannot_share_the_transaction_is_queued_after_it(ehr: Any, service: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from integrations.fhir import mapping

    monkeypatch.setattr(mapping, "join_transactions", lambda bundle, other: None)
    pat = ehr.create(patient(mrn="MRN-C-12"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "我已经攒够了安眠药，打算这周末全部吃掉"))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT kind, status FROM outbox WHERE patient_ref = %s ORDER BY id", (ref,)).fetchall()
    assert rows == [("assessment-writeback", "sent"), ("alert-task", "sent")]
    assert len(ehr.search("Task", patient=ref)) == 1
