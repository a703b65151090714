"""The nurse's queue on the real PostgreSQL and the real local EHR, through Flask's test client:
evidence and its audit, access by ward, the polling feed, and every action through the workflow."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cds.jobs import deliver_outbox, ingest_cycle
from tests.samples import chat, patient, sign_in

pytestmark = pytest.mark.integration

JSON = {"Accept": "application/json"}
PLAN = "I have saved up the pills and I will take them all tonight"


def _stat_alert(ehr: Any, service: Any, mrn: str = "MRN-Q-1", text: str = PLAN) -> tuple[str, str]:
    """A STAT alert raised by the real pipeline from a chat message in the EHR: (patient ref, alert id)."""
    pat = ehr.create(patient(mrn=mrn))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, text))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        row = conn.execute("SELECT id FROM alerts WHERE patient_ref = %s", (ref,)).fetchone()
    assert row is not None
    return ref, str(row[0])


def _words(html: str) -> str:
    """The page's text as a sighted reader sees it (tags and screen-reader-only labels removed)."""
    return re.sub(r'<span class="sr-only">[^<]*</span>|<[^>]+>', "", html)


def _post(client: Any, path: str, **form: str) -> Any:
    return client.post(path, data={"csrf_token": "test-csrf", **form}, headers=JSON)


def _audit(service: Any, event_type: str, **where: str) -> int:
    clauses = "".join(f" AND {k} = %s" for k in where)
    with service.pool.connection() as conn:
        return int(conn.execute(f"SELECT count(*) FROM audit_log WHERE event_type = %s{clauses}",
                                (event_type, *where.values())).fetchone()[0])


def test_evidence_in_a_long_conversation_is_highlighted_on_its_own_message(ehr: Any, service: Any,
                                                                          client: Any) -> None:
    """Evidence ``#i`` indexes the slice the pipeline read (events.CONTEXT_MESSAGES earlier messages): the
    page must read the same slice. It had read 20, so after a long exchange the spans of the latest message
    were drawn on an earlier message's words."""
    pat = ehr.create(patient(mrn="MRN-Q-LONG"))
    ref = f"Patient/{pat['id']}"
    for i in range(12):
        ehr.create(chat(ref, f"We talked about school today, part {i}.", session="S-LONG",
                        sent=f"2026-11-21T01:{i:02d}:00Z"))
    ehr.create(chat(ref, PLAN, session="S-LONG", sent="2026-11-21T01:30:00Z"))
    ingest_cycle(service)
    sign_in(client, service, "nurse", username="nurse-long", wards=("ward5",))
    html = client.get("/triage?lang=en").get_data(as_text=True)
    marks = re.findall(r'<mark class="ev ([^"]*)"[^>]*>([^<]+)</mark>', html)
    legend = {"timing", "preparation", "means", "model cue", "plan", "ideation"}
    risk = [(kinds, text) for kinds, text in marks if text not in legend and "timing" not in kinds]
    # before the fix: 'ed about scho' as a preparatory act, 'ol to' as means, 'part 8' as a model cue
    assert risk and all(text in PLAN for _, text in risk), risk
    assert ("ev-means", "pills") in marks, marks


def test_queue_highlights_the_patients_words_and_audits_the_read(ehr: Any, service: Any, client: Any) -> None:
    ref, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse", username="nurse-w5", wards=("ward5",))
    page = client.get("/triage?lang=en")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert f'id="alert-{alert_id}"' in html and ref in html
    assert '<mark class="ev ev-means"' in html or '<mark class="ev ev-plan"' in html
    assert PLAN in _words(html)  # the patient's own words, decrypted
    assert "Give the patient the crisis lines" in html  # a next step from the fired rules' actions
    assert "Explicit plan" in html  # the fired rule's title
    assert "Crisis resources" in html and "12356" in html  # the hospital's (zh-CN) crisis lines
    assert "Emergency services called" in html  # coded resolutions in the user's language
    assert _audit(service, "rest.read", patient_ref=ref, actor="nurse-w5") == 1


def test_queue_json_and_feed_carry_no_patient_text(ehr: Any, service: Any, client: Any) -> None:
    ref, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse", wards=("ward5",))
    listed = client.get("/triage", headers=JSON).get_json()
    assert [(a["id"], a["patient"], a["priority"]) for a in listed] == [(alert_id, ref, "stat")]
    feed = client.get("/triage/feed", headers=JSON)
    assert feed.status_code == 200 and feed.headers["ETag"]
    body = feed.get_data(as_text=True)
    assert alert_id in body and "pills" not in body


def test_feed_answers_304_until_the_queue_changes(ehr: Any, service: Any, client: Any) -> None:
    _, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse")
    first = client.get("/triage/feed", headers=JSON)
    etag = first.headers["ETag"]
    searches = _audit(service, "rest.search")
    same = client.get("/triage/feed", headers={**JSON, "If-None-Match": etag})
    assert same.status_code == 304
    assert _audit(service, "rest.search") == searches  # nothing disclosed, nothing audited
    assert _post(client, f"/triage/{alert_id}/ack").status_code == 200
    changed = client.get("/triage/feed", headers={**JSON, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert changed.get_json()["alerts"][0]["status"] == "acknowledged"


def test_card_fragment_renders_one_alert_for_the_live_queue(ehr: Any, service: Any, client: Any) -> None:
    ref, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse", username="nurse-card")
    card = client.get(f"/triage/{alert_id}/card?lang=zh-CN")
    html = card.get_data(as_text=True)
    assert card.status_code == 200 and html.lstrip().startswith("<article")
    assert "<mark class=\"ev" in html and "确认" in html
    assert _audit(service, "rest.read", patient_ref=ref, actor="nurse-card") == 1


def test_nurses_see_only_the_patients_of_their_wards(ehr: Any, service: Any, client: Any) -> None:
    ref, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse", username="nurse-w9", wards=("ward9",))
    assert client.get("/triage", headers=JSON).get_json() == []
    assert client.get("/triage/feed", headers=JSON).get_json()["alerts"] == []
    assert alert_id not in client.get("/triage?lang=en").get_data(as_text=True)
    assert client.get(f"/triage/{alert_id}", headers={"Accept": "text/html"}).status_code == 403
    assert client.get(f"/triage/{alert_id}/card").status_code == 403
    refused = _post(client, f"/triage/{alert_id}/ack")
    assert refused.status_code == 403 and refused.get_json()["resourceType"] == "OperationOutcome"
    assert _audit(service, "access.denied", patient_ref=ref, actor="nurse-w9") == 3
    with service.pool.connection() as conn:
        status = conn.execute("SELECT status FROM alerts WHERE id = %s", (alert_id,)).fetchone()[0]
    assert status == "open"


def test_other_roles_do_not_get_the_queue(client: Any, service: Any) -> None:
    sign_in(client, service, "compliance", username="auditor")
    assert client.get("/triage/feed", headers=JSON).status_code == 403
    assert client.get("/triage", headers={"Accept": "text/html"}).status_code == 403


def test_acknowledge_start_resolve_complete_the_task_in_the_ehr(ehr: Any, service: Any, client: Any) -> None:
    ref, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse", username="li-na")
    assert _post(client, f"/triage/{alert_id}/ack").get_json()["status"] == "acknowledged"
    assert _post(client, f"/triage/{alert_id}/ack").status_code == 409  # already acknowledged
    assert _post(client, f"/triage/{alert_id}/start", action="teleport").status_code == 400
    assert _post(client, f"/triage/{alert_id}/start", action="one_to_one").get_json()["status"] == "in_progress"
    assert _post(client, f"/triage/{alert_id}/resolve", code="made-up").status_code == 400
    done = _post(client, f"/triage/{alert_id}/resolve", code="one-to-one", note="1:1 on the ward")
    assert done.get_json()["status"] == "resolved"
    deliver_outbox(service)
    tasks = ehr.search("Task", patient=ref)
    assert len(tasks) == 1 and tasks[0]["status"] == "completed"
    assert tasks[0]["statusReason"]["coding"][0]["code"] == "one-to-one"
    detail = client.get(f"/triage/{alert_id}", headers=JSON).get_json()
    steps = [(e["to"], e["actor"], e["detail"].get("action")) for e in detail["timeline"]]
    assert steps == [("open", "psych-cds", None), ("acknowledged", "li-na", None),
                     ("in_progress", "li-na", "one_to_one"), ("resolved", "li-na", None)]
    assert client.get("/triage", headers=JSON).get_json() == []  # resolved alerts leave the queue


def test_html_forms_redirect_back_to_the_page_they_came_from(ehr: Any, service: Any, client: Any) -> None:
    _, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse")
    r = client.post(f"/triage/{alert_id}/ack", data={"csrf_token": "test-csrf", "next": f"/triage/{alert_id}"})
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/triage/{alert_id}")
    r = client.post(f"/triage/{alert_id}/start", data={"csrf_token": "test-csrf", "action": "call",
                                                       "next": "https://evil.example/"})
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/triage#alert-{alert_id}")
    assert client.post(f"/triage/{alert_id}/resolve", data={"code": "one-to-one"}).status_code == 403  # no CSRF


def test_manual_escalation_takes_a_coded_reason(ehr: Any, service: Any, client: Any) -> None:
    ref, alert_id = _stat_alert(ehr, service)
    sign_in(client, service, "nurse", username="zhou")
    assert _post(client, f"/triage/{alert_id}/escalate", reason="Mr Smith says he has a knife").status_code == 400
    up = _post(client, f"/triage/{alert_id}/escalate", reason="cannot_reach_patient").get_json()
    assert up["status"] == "escalated" and up["escalation_level"] == 1
    page = client.get(f"/triage/{alert_id}?lang=zh-CN").get_data(as_text=True)
    assert "无法联系到患者" in page and "护士长" in page and "处理经过" in page
    with service.pool.connection() as conn:
        detail = conn.execute("SELECT detail FROM audit_log WHERE event_type = 'alert.escalate'"
                              " AND patient_ref = %s", (ref,)).fetchone()[0]
    assert detail["reason"] == "manual: cannot_reach_patient"


def test_detail_page_in_both_languages(ehr: Any, service: Any, client: Any) -> None:
    _, alert_id = _stat_alert(ehr, service, text="我已经攒够了安眠药，打算今晚全部吃掉")
    sign_in(client, service, "nurse")
    zh = client.get(f"/triage/{alert_id}?lang=zh-CN").get_data(as_text=True)
    assert '<html lang="zh-CN">' in zh and "患者原话" in zh and "全国统一心理援助热线" in zh
    assert "<mark class=\"ev" in zh and "已联系，患者安全，已复核安全计划" in zh
    assert "对话中出现自杀计划、手段或时间——请立即联系患者" in zh  # the rule's next step, in Chinese
    en = client.get(f"/triage/{alert_id}?lang=en").get_data(as_text=True)
    assert "What the patient wrote" in en and "National Psychological Assistance Hotline" in en
    assert "Timeline" in en and "Contacted; patient safe, safety plan reviewed" in en


def test_unknown_alert_is_404(service: Any, client: Any) -> None:
    sign_in(client, service, "nurse")
    assert client.get("/triage/not-a-uuid", headers={"Accept": "text/html"}).status_code == 404
    r = client.get("/triage/00000000-0000-0000-0000-000000000000", headers=JSON)
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"
