"""POST /api/v1/screen: the chatbot's real-time path through the same pipeline (real DB, real EHR)."""

from __future__ import annotations

from typing import Any

import pytest


pytestmark = pytest.mark.integration


def _screen(client: Any, key: str | None, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/api/v1/screen", json=body, headers=headers)


def test_explicit_plan_hands_over_to_a_human_with_crisis_resources(client: Any, api_key: str, service: Any) -> None:
    r = _screen(client, api_key, {"patient": "Patient/p-1", "conversation": "c-1",
                                  "message": "我已经攒够了安眠药，打算这周末吃掉", "lang": "zh"})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["tier"] in ("high", "imminent")
    assert body["directive"] == "handover_to_human"
    assert any(res["phone"] == "12356" for res in body["resources"])
    assert body["alert"] and body["evidence"]
    assert all(0 <= e["start"] < e["end"] for e in body["evidence"])
    with service.pool.connection() as conn:
        stored = conn.execute("SELECT count(*) FROM events WHERE source = 'screen-api:test-client'").fetchone()[0]
        audited = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'assessment'"
                               " AND patient_ref = 'Patient/p-1'").fetchone()[0]
    assert stored == 1 and audited == 1


def test_the_same_message_sent_twice_is_one_event(client: Any, api_key: str, service: Any) -> None:
    msg = {"patient": "Patient/p-2", "conversation": "c-2", "message": "I want to end my life", "lang": "en"}
    first = _screen(client, api_key, msg).get_json()
    second = _screen(client, api_key, msg).get_json()
    assert first["event"] == second["event"] and second["duplicate"] is True
    assert first["tier"] == second["tier"] and first["alert"] == second["alert"]
    with service.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM alerts WHERE patient_ref = 'Patient/p-2'").fetchone()[0] == 1


def test_everyday_chat_continues(client: Any, api_key: str) -> None:
    body = _screen(client, api_key, {"patient": "Patient/p-3", "conversation": "c-3",
                                     "message": "今天考试压力好大，不过还好", "lang": "zh"}).get_json()
    assert body["directive"] in ("continue", "show_resources") and body["tier"] in ("none", "low")


def test_context_from_earlier_messages_of_the_conversation(client: Any, api_key: str) -> None:
    _screen(client, api_key, {"patient": "Patient/p-4", "conversation": "c-4",
                              "message": "I have been stockpiling my sleeping pills", "lang": "en"})
    later = _screen(client, api_key, {"patient": "Patient/p-4", "conversation": "c-4",
                                      "message": "I bought more today", "lang": "en"}).get_json()
    assert later["tier"] in ("high", "imminent")


@pytest.mark.parametrize("body, fragment", [
    ({"conversation": "c", "message": "hi"}, "patient"),
    ({"patient": "Patient/x", "conversation": "c"}, "message"),
    ({"patient": "Observation/x", "conversation": "c", "message": "hi"}, "Patient/"),
    ({"patient": "Patient/x", "conversation": "c", "message": 5}, "string"),
    ([1, 2], "JSON object"),
])
def test_malformed_requests_get_400_operation_outcome(client: Any, api_key: str, body: Any, fragment: str) -> None:
    r = _screen(client, api_key, body)
    assert r.status_code == 400
    outcome = r.get_json()
    assert outcome["resourceType"] == "OperationOutcome" and fragment in outcome["issue"][0]["diagnostics"]


def test_missing_or_wrong_key_is_401_and_the_rate_limit_is_429(client: Any, api_key: str, service: Any) -> None:
    msg = {"patient": "Patient/p-5", "conversation": "c-5", "message": "hello"}
    assert _screen(client, None, msg).status_code == 401
    assert _screen(client, "cds_wrong", msg).status_code == 401
    from dataclasses import replace

    service.settings = replace(service.settings, screen_rate_per_min=3)
    statuses = [_screen(client, api_key, {**msg, "message_id": str(i)}).status_code for i in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429


def test_a_full_rate_window_counts_no_more_and_a_revoked_key_is_refused_at_once(
        client: Any, api_key: str, service: Any) -> None:
    import time
    from dataclasses import replace
    from datetime import datetime

    from cds.store import clients

    def window_counts() -> list[int]:
        with service.pool.connection() as conn:
            return [r[0] for r in conn.execute("SELECT count FROM rate_windows ORDER BY window_start")]

    if datetime.now().second >= 50:  # all of it in one minute's window
        time.sleep(61 - datetime.now().second)
    service.settings = replace(service.settings, screen_rate_per_min=2)
    msg = {"patient": "Patient/p-6", "conversation": "c-6", "message": "hello"}
    statuses = [_screen(client, api_key, {**msg, "message_id": str(i)}) for i in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 429, 429]
    assert statuses[2].get_json() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "throttled", "diagnostics": "rate limit of 2 requests per minute exceeded"}]}
    assert window_counts() == [2]  # refused requests are not counted (the window does not keep growing)
    with service.pool.connection() as conn:
        assert clients.revoke_client(conn, "test-client")
        conn.commit()
    service.settings = replace(service.settings, screen_rate_per_min=100)
    revoked = _screen(client, api_key, {**msg, "message_id": "after-revocation"})
    assert revoked.status_code == 401  # the very next request: nothing cached
    assert revoked.get_json()["issue"][0]["diagnostics"] == "unknown or revoked API key"
    assert window_counts() == [2]  # a refused key charges nothing
    assert _screen(client, "cds_" + "x" * 43, msg).status_code == 401 and window_counts() == [2]


def test_a_failed_assessment_is_a_503_the_message_is_kept_and_the_workers_assess_it(
        client: Any, api_key: str, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection (the only stand-in in this file): the rule engine fails once, as a bug or a bad
    # rule deployment would. Nothing real fails on demand here.
    from cds.errors import RulesError

    ruleset = service.engines.ruleset
    real = ruleset.evaluate

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RulesError("rule engine failure (injected)")

    monkeypatch.setattr(ruleset, "evaluate", broken)
    body = {"patient": "Patient/p-fail", "conversation": "c-fail", "message": "我已经攒够了安眠药，打算这周末全部吃掉"}
    r = client.post("/api/v1/screen", json=body, headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert "not yet screened" in r.get_json()["issue"][0]["diagnostics"]
    with service.pool.connection() as conn:
        status, attempts = conn.execute("SELECT status, attempts FROM events WHERE patient_ref = 'Patient/p-fail'"
                                        ).fetchone()
    assert (status, attempts) == ("pending", 1)  # stored once, the failure counted
    monkeypatch.setattr(ruleset, "evaluate", real)
    with service.pool.connection() as conn:
        conn.execute("UPDATE events SET retry_at = NULL WHERE patient_ref = 'Patient/p-fail'")
        conn.commit()
    service.pipeline.process_pending()
    with service.pool.connection() as conn:
        tier, status = conn.execute(
            "SELECT a.tier, e.status FROM assessments a JOIN events e ON e.id = a.event_id"
            " WHERE e.patient_ref = 'Patient/p-fail' AND NOT a.shadow").fetchone()
    assert status == "done" and tier >= 3
    again = client.post("/api/v1/screen", json=body, headers={"Authorization": f"Bearer {api_key}"})
    assert again.status_code == 200 and again.get_json()["duplicate"] and again.get_json()["tier"] in ("high", "imminent")
