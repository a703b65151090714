"""The psychiatrist's dashboard on the real pipeline: ranking, filters, access by need, trends,
evidence, overrides and the risk report (real PostgreSQL, real local EHR, Flask test client)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cds.jobs import ingest_cycle
from tests.samples import PHQ9_ANSWERS, chat, patient, phq9, sign_in

pytestmark = pytest.mark.integration

GAD7_ITEMS = ("69725-0", "68509-0", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7")
RISKY_TEXT = "I have decided to kill myself. I bought the pills today."


def gad7(patient_ref: str, answers: list[int], authored: str) -> dict[str, Any]:
    items = [{"linkId": f"/{code}", "answer": [{"valueCoding": {"system": "http://loinc.org",
                                                                "code": PHQ9_ANSWERS[v][0]}}]}
             for code, v in zip(GAD7_ITEMS, answers)]
    return {"resourceType": "QuestionnaireResponse", "status": "completed",
            "questionnaire": "http://loinc.org/q/69737-5", "subject": {"reference": patient_ref},
            "authored": authored, "item": items}


def new_patient(ehr: Any, mrn: str) -> str:
    return f"Patient/{ehr.create(patient(mrn=mrn))['id']}"


def audit_rows(service: Any, event_type: str, patient_ref: str | None = None) -> list[tuple[Any, ...]]:
    with service.pool.connection() as conn:
        return conn.execute("SELECT actor, purpose, outcome, patient_ref, entity, detail FROM audit_log"
                            " WHERE event_type = %s AND (%s::text IS NULL OR patient_ref = %s) ORDER BY seq",
                            (event_type, patient_ref, patient_ref)).fetchall()


@pytest.fixture
def chart_patient(ehr: Any, service: Any) -> str:
    """Two PHQ-9s, a GAD-7 and a risky chat message for one patient, through the real pipeline."""
    ref = new_patient(ehr, "MRN-D-1")
    ehr.create(phq9(ref, [1, 1, 1, 1, 0, 1, 0, 0, 0], authored="2026-11-18T03:00:00Z"))
    ehr.create(phq9(ref, [2, 2, 2, 2, 1, 2, 1, 1, 1], authored="2026-11-20T03:00:00Z"))
    ehr.create(gad7(ref, [2, 2, 2, 1, 1, 1, 1], authored="2026-11-20T04:00:00Z"))
    ehr.create(chat(ref, "Hello, I could not sleep again.", sent="2026-11-21T02:00:00Z"))
    ehr.create(chat(ref, RISKY_TEXT, sent="2026-11-21T02:05:00Z"))
    ingest_cycle(service)
    return ref


def _order(html: str) -> list[str]:
    return re.findall(r'data-patient="([^"]+)"', html)


def test_patients_are_ranked_by_tier_then_recency_and_filters_apply(ehr: Any, service: Any, client: Any) -> None:
    low = new_patient(ehr, "MRN-R-1")
    high_old = new_patient(ehr, "MRN-R-2")
    high_new = new_patient(ehr, "MRN-R-3")
    ehr.create(phq9(low, [1, 1, 0, 0, 0, 0, 0, 0, 0]))
    ehr.create(phq9(high_old, [3, 3, 3, 3, 3, 3, 3, 3, 3]))
    ehr.create(phq9(high_new, [3, 3, 3, 3, 3, 3, 3, 3, 3]))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        conn.execute("UPDATE assessments SET created_at = created_at - interval '2 hours' WHERE patient_ref = %s",
                     (high_old,))
        tiers = dict(conn.execute("SELECT patient_ref, current_tier FROM patients").fetchall())
        conn.execute("UPDATE alerts SET acknowledged_at = now(), status = 'acknowledged' WHERE patient_ref = %s",
                     (high_old,))
        conn.commit()
    assert tiers[high_old] == tiers[high_new] > tiers[low]
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    page = client.get("/dashboard?lang=en")
    assert page.status_code == 200
    assert _order(page.text) == [high_new, high_old, low]
    assert _order(client.get("/dashboard?tier=moderate").text) == [high_new, high_old]
    assert _order(client.get("/dashboard?ward=ward9").text) == []
    assert _order(client.get("/dashboard?ward=ward5&today=1").text) == [high_new, high_old, low]
    unacked = _order(client.get("/dashboard?unack=1").text)
    assert high_new in unacked and high_old not in unacked and low not in unacked
    assert client.get("/dashboard?tier=bogus").status_code == 400
    assert audit_rows(service, "rest.search")[-1][0] == "psychiatrist-1"


def test_another_wards_patient_is_refused_and_audited_until_break_glass(chart_patient: str, service: Any,
                                                                       client: Any) -> None:
    ref = chart_patient
    sign_in(client, service, "psychiatrist", username="dr-other", wards=("ward1",))
    assert _order(client.get("/dashboard").text) == []  # not listed either
    denied = client.get(f"/dashboard/patient/{ref}?lang=en")
    assert denied.status_code == 403
    assert RISKY_TEXT not in denied.text and 'name="reason"' in denied.text
    assert [r[2] for r in audit_rows(service, "access.denied", ref)] == [4]
    short = client.post("/dashboard/break-glass", data={"patient_ref": ref, "reason": "need", "csrf_token": "test-csrf"})
    assert short.status_code == 400
    granted = client.post("/dashboard/break-glass", data={"patient_ref": ref, "csrf_token": "test-csrf",
                                                          "reason": "covering ward 5 overnight, patient in crisis"})
    assert granted.status_code == 302 and granted.headers["Location"].endswith(f"/dashboard/patient/{ref}")
    page = client.get(f"/dashboard/patient/{ref}")
    assert page.status_code == 200
    assert len(audit_rows(service, "break-glass", ref)) == 1
    assert audit_rows(service, "rest.read", ref)[-1][1] == "ETREAT"
    assert _order(client.get("/dashboard").text) == [ref]  # listed while the grant lasts


def test_patient_page_shows_banded_trends_highlighted_evidence_and_is_audited(chart_patient: str, service: Any,
                                                                             client: Any) -> None:
    ref = chart_patient
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    page = client.get(f"/dashboard/patient/{ref}?lang=en")
    assert page.status_code == 200
    html = page.text
    phq_svg = re.search(r'id="chart-phq9".*?</svg>', html, re.DOTALL).group(0)
    gad_svg = re.search(r'id="chart-gad7".*?</svg>', html, re.DOTALL).group(0)
    chat_svg = re.search(r'id="chart-chat".*?</svg>', html, re.DOTALL).group(0)
    assert [b for b in re.findall(r'data-band="(\d+)"', phq_svg)] == ["5", "10", "15", "20"]
    assert [b for b in re.findall(r'data-band="(\d+)"', gad_svg)] == ["5", "10", "15"]
    assert re.findall(r'class="point"[^>]*data-value="([\d.]+)"', phq_svg) == ["5", "14"]
    assert re.findall(r'class="point"[^>]*data-value="([\d.]+)"', gad_svg) == ["10"]
    assert len(re.findall(r'class="point"', chat_svg)) >= 1
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from elsewhere
    marks = re.findall(r'<mark class="ev ([^"]*)"[^>]*>([^<]+)</mark>', html)
    risk_marks = [text for kinds, text in marks if set(kinds.split()) - {"model_cue"}]
    assert "to kill myself" in risk_marks and all(m in RISKY_TEXT for m in risk_marks)
    plain = re.sub(r"<[^>]+>", "", html)
    assert "Hello, I could not sleep again." in plain and RISKY_TEXT in plain  # whole messages, not only spans
    assert "phq9-item9-positive@" in html and "Kroenke" in html  # fired rule with its source
    with service.pool.connection() as conn:
        sha, rs_hash = conn.execute("SELECT model_sha256, ruleset_hash FROM assessments WHERE patient_ref = %s"
                                    " AND model_sha256 IS NOT NULL LIMIT 1", (ref,)).fetchone()
    assert sha[:12] in html and rs_hash[:12] in html
    reads = audit_rows(service, "rest.read", ref)
    assert reads and reads[-1][0] == "psychiatrist-1" and reads[-1][1] == "TREAT"
    assert RISKY_TEXT not in str(reads)  # the audit log holds no patient text
    zh = client.get(f"/dashboard/patient/{ref}?lang=zh-CN").text
    assert "对话记录" in zh and "触发的规则" in zh


def test_evidence_in_a_long_conversation_is_highlighted_on_its_message(ehr: Any, service: Any, client: Any) -> None:
    """Evidence refs index the slice of the conversation the pipeline read (CONTEXT_MESSAGES earlier
    messages): the page must count the same slice, or after a long exchange every span lands on the wrong
    message and is dropped (the page had counted 20 while the pipeline read 8)."""
    ref = new_patient(ehr, "MRN-D-LONG")
    for i in range(12):
        ehr.create(chat(ref, f"We talked about school today, part {i}.", session="S-LONG",
                        sent=f"2026-11-21T01:{i:02d}:00Z"))
    ehr.create(chat(ref, "I keep thinking about the pills", session="S-LONG", sent="2026-11-21T01:30:00Z"))
    ehr.create(chat(ref, "I bought them today", session="S-LONG", sent="2026-11-21T01:31:00Z"))
    ingest_cycle(service)
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    html = client.get(f"/dashboard/patient/{ref}?lang=en").text
    marks = [text for _, text in re.findall(r'<mark class="ev ([^"]*)"[^>]*>([^<]+)</mark>', html)]
    assert any("pills" in m for m in marks), marks  # en 1.19.0 marks the whole "keep thinking about the pills"


def test_override_is_stored_encrypted_audited_and_leaves_the_tier(chart_patient: str, service: Any,
                                                                  client: Any) -> None:
    ref = chart_patient
    with service.pool.connection() as conn:
        tier_before = conn.execute("SELECT current_tier FROM patients WHERE patient_ref = %s", (ref,)).fetchone()[0]
        aid, fired = conn.execute("SELECT id, fired FROM assessments WHERE patient_ref = %s AND NOT shadow"
                                  " AND jsonb_array_length(fired) > 0 ORDER BY id DESC LIMIT 1", (ref,)).fetchone()
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    url = f"/dashboard/assessment/{aid}/review"
    no_reason = client.post(url, data={"decision": "override", "comment": "x", "csrf_token": "test-csrf"})
    assert no_reason.status_code == 400
    comment = "Patient quoting a film line; seen on the ward, calm"
    r = client.post(url, data={"decision": "override", "reason_code": "false-positive-idiom", "comment": comment,
                               "csrf_token": "test-csrf"})
    assert r.status_code == 302
    accept = client.post(url, data={"decision": "accept", "csrf_token": "test-csrf"})
    assert accept.status_code == 302
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT decision, reason_code, comment_enc, actor, rule_ids FROM assessment_overrides"
                            " WHERE assessment_id = %s ORDER BY id", (aid,)).fetchall()
        tier_after = conn.execute("SELECT current_tier FROM patients WHERE patient_ref = %s", (ref,)).fetchone()[0]
    assert [(d, c) for d, c, *_ in rows] == [("override", "false-positive-idiom"), ("accept", None)]
    assert comment.encode() not in bytes(rows[0][2]) and rows[0][3] == "psychiatrist-1"
    assert set(rows[0][4]) == {f"{f['id']}@{f['version']}" for f in fired}
    assert tier_after == tier_before
    logged = audit_rows(service, "assessment.override", ref)
    assert len(logged) == 1 and logged[0][5]["reason_code"] == "false-positive-idiom"
    assert comment not in str(logged)
    assert len(audit_rows(service, "assessment.accept", ref)) == 1
    page = client.get(f"/dashboard/patient/{ref}?lang=en").text
    assert comment in page and "never changes the patient&#39;s risk tier" in page


def test_nurse_may_read_but_not_override(chart_patient: str, service: Any, client: Any) -> None:
    with service.pool.connection() as conn:
        aid = conn.execute("SELECT id FROM assessments WHERE patient_ref = %s LIMIT 1", (chart_patient,)).fetchone()[0]
    sign_in(client, service, "nurse", wards=("ward5",))
    page = client.get(f"/dashboard/patient/{chart_patient}")
    assert page.status_code == 200 and "review-form" not in page.text
    r = client.post(f"/dashboard/assessment/{aid}/review", data={"decision": "accept", "csrf_token": "test-csrf"})
    assert r.status_code == 403


def test_risk_report_html_and_pdf(chart_patient: str, service: Any, client: Any) -> None:
    with service.pool.connection() as conn:
        aid, sha = conn.execute("SELECT id, model_sha256 FROM assessments WHERE patient_ref = %s AND NOT shadow"
                                " ORDER BY tier DESC, id DESC LIMIT 1", (chart_patient,)).fetchone()
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    html = client.get(f"/dashboard/assessment/{aid}/report?lang=en")
    assert html.status_code == 200
    assert "Suicide / self-harm risk report" in html.text and chart_patient in html.text
    assert "window.print()" in html.text and "@media print" in client.get("/static/cds.css").text
    assert sha in html.text  # the full model sha256 for the chart
    assert re.search(r"[a-z0-9-]+@\d+\.\d+\.\d+", html.text)  # fired rule ids with versions
    pytest.importorskip("fpdf")
    for lang in ("en", "zh-CN"):
        pdf = client.get(f"/dashboard/assessment/{aid}/report.pdf?lang={lang}")
        assert pdf.status_code == 200 and pdf.mimetype == "application/pdf"
        assert pdf.data.startswith(b"%PDF-") and len(pdf.data) > 1000
    formats = [r[5]["format"] for r in audit_rows(service, "rest.read", chart_patient)]
    assert formats.count("pdf") == 2 and formats.count("html") == 1


def test_compliance_officer_cannot_open_a_transcript_without_break_glass(chart_patient: str, service: Any,
                                                                        client: Any) -> None:
    sign_in(client, service, "compliance", wards=("*",))
    assert client.get("/dashboard").status_code == 403
    page = client.get(f"/dashboard/patient/{chart_patient}")
    assert page.status_code == 403 and RISKY_TEXT not in page.text
    with service.pool.connection() as conn:
        aid = conn.execute("SELECT id FROM assessments WHERE patient_ref = %s LIMIT 1", (chart_patient,)).fetchone()[0]
    assert client.get(f"/dashboard/assessment/{aid}/report").status_code == 403
    client.post("/dashboard/break-glass", data={"patient_ref": chart_patient, "csrf_token": "test-csrf",
                                                "reason": "investigating complaint #42 at the DPO's request"})
    assert client.get(f"/dashboard/patient/{chart_patient}").status_code == 200
