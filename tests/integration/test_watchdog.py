"""Feed watchdog: a silent Subscription or a failing poll raises an operations alarm (audited, shown
by active_alarms) once, and clears it when the feed recovers. Real PostgreSQL and local EHR."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cds.jobs import ingest_cycle
from integrations.fhir.watchdog import active_alarms, check_feeds
from tests.integration.test_subscriptions import SECRET, notification, post

pytestmark = pytest.mark.integration


@pytest.fixture
def settings_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {**settings_env, "CDS_NOTIFY_SECRET": SECRET, "CDS_FEED_HEARTBEAT_S": "60"}


def audit_types(service: Any) -> list[str]:
    with service.pool.connection() as conn:
        return [r[0] for r in conn.execute("SELECT event_type FROM audit_log WHERE event_type LIKE 'ops.%'"
                                           " ORDER BY seq")]


def alarms(service: Any) -> list[Any]:
    with service.pool.connection() as conn:
        return active_alarms(conn)


def test_silent_subscription_raises_an_alarm_once_and_clears_on_heartbeat(client: Any, service: Any) -> None:
    assert post(client, notification("handshake", subscription="sub-w")).status_code == 200
    now = datetime.now(UTC)
    assert check_feeds(service, now) == []
    later = now + timedelta(seconds=2 * 60 + 5)  # two heartbeat periods and a bit
    raised = check_feeds(service, later)
    assert [(a.feed, a.reason) for a in raised] == [("subscription:sub-w", "silent")]
    still_later = later + timedelta(minutes=0.5)  # the controlled clock moves on; the feed stays silent
    assert check_feeds(service, still_later)  # still silent: still alarmed, not raised twice
    assert audit_types(service) == ["ops.feed_silent"]
    shown = alarms(service)
    assert [a.feed for a in shown] == ["subscription:sub-w"] and shown[0].raised_at is not None
    assert post(client, notification("heartbeat", subscription="sub-w")).status_code == 200
    assert check_feeds(service, datetime.now(UTC)) == []
    assert alarms(service) == []
    assert audit_types(service) == ["ops.feed_silent", "ops.feed_recovered"]
    with service.pool.connection() as conn:
        row = conn.execute("SELECT raised_at, cleared_at FROM ops_alarms").fetchone()
    assert row[0] is not None and row[1] is not None


def test_failing_poll_feed_raises_an_alarm_until_polling_recovers(ehr: Any, service: Any) -> None:
    ehr.fault(mode="error", status=503)
    try:
        for _ in range(3):
            ingest_cycle(service)
    finally:
        ehr.clear_fault()
    raised = check_feeds(service, datetime.now(UTC))
    assert {a.feed for a in raised} >= {"ehr:QuestionnaireResponse"}
    assert all(a.reason == "failing" for a in raised)
    assert {a.feed for a in alarms(service)} == {a.feed for a in raised}
    ingest_cycle(service)
    assert check_feeds(service, datetime.now(UTC)) == []
    assert alarms(service) == []


def test_poll_feed_without_success_for_five_intervals_is_stale(ehr: Any, service: Any) -> None:
    ingest_cycle(service)
    now = datetime.now(UTC)
    assert check_feeds(service, now) == []
    stale = check_feeds(service, now + timedelta(seconds=5 * service.settings.poll_interval_s + 1))
    assert stale and {a.reason for a in stale} == {"stale"}
