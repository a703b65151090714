"""Feed watchdog: notice when the EHR stops talking to us, before a missed alert does.

A silent feed is dangerous precisely because nothing fails: no new questionnaires look like no risk.
``check_feeds`` (scheduled every minute) raises an operations alarm when

* a Subscription feed (``subscription:<id>``) has not been heard from - heartbeat, handshake or event -
  for longer than twice its heartbeat period (CDS_FEED_HEARTBEAT_S), or
* a poll feed (``ehr:<type>``) has failed 3 times in a row, or has not succeeded for 5 poll intervals.

Raising writes an ``ops.feed_silent`` audit record, logs an error and opens a row in ``ops_alarms``
(one open row per feed: several nodes running the check raise it once); the row is cleared when the
feed recovers (``ops.feed_recovered``). ``active_alarms`` is what /healthz shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from cds.service import Service
from cds.store import feeds

log = logging.getLogger(__name__)

SUBSCRIPTION_PREFIX = "subscription:"
POLL_PREFIX = "ehr:"
MAX_CONSECUTIVE_FAILURES = 3
SILENT_POLL_INTERVALS = 5
SILENT_HEARTBEATS = 2


@dataclass(frozen=True)
class FeedAlarm:
    name: str  # "feed:<feed name>"
    feed: str
    reason: str  # silent | failing | stale
    detail: dict[str, Any]
    raised_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "feed": self.feed, "reason": self.reason, "detail": self.detail,
                "raised_at": self.raised_at.isoformat() if self.raised_at else None}


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def feed_alarm(feed: feeds.FeedState, now: datetime, *, heartbeat_s: float, poll_interval_s: float) -> FeedAlarm | None:
    """The alarm this feed deserves now, or None when it is healthy. Pure."""
    name = f"feed:{feed.name}"
    if feed.name.startswith(SUBSCRIPTION_PREFIX):
        heard = feed.last_success_at or feed.last_poll_at
        limit = timedelta(seconds=SILENT_HEARTBEATS * heartbeat_s)
        if heard is None or now - heard > limit:
            return FeedAlarm(name, feed.name, "silent", {
                "last_heard_at": _iso(heard), "allowed_silence_s": int(limit.total_seconds()),
                "consecutive_failures": feed.consecutive_failures})
        return None
    if feed.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
        return FeedAlarm(name, feed.name, "failing", {
            "consecutive_failures": feed.consecutive_failures, "last_success_at": _iso(feed.last_success_at),
            "last_error": (feed.last_error or "")[:300]})
    limit = timedelta(seconds=SILENT_POLL_INTERVALS * poll_interval_s)
    if feed.last_success_at is not None and now - feed.last_success_at > limit:
        return FeedAlarm(name, feed.name, "stale", {
            "last_success_at": _iso(feed.last_success_at), "allowed_gap_s": limit.total_seconds()})
    return None


def check_feeds(service: Service, now: datetime) -> list[FeedAlarm]:
    """Raise alarms for silent or failing feeds, clear those that recovered; returns the active alarms."""
    s = service.settings
    with service.pool.connection() as conn:
        states = feeds.all_feeds(conn)
        wanted = {a.name: a for a in (feed_alarm(f, now, heartbeat_s=s.feed_heartbeat_s,
                                                 poll_interval_s=s.poll_interval_s) for f in states) if a}
        open_rows = {r[0]: r[1] for r in conn.execute(
            "SELECT name, raised_at FROM ops_alarms WHERE cleared_at IS NULL AND name LIKE 'feed:%'")}
        for name, alarm in wanted.items():
            if name in open_rows:
                continue
            raised = raise_alarm(conn, alarm, now, event_type="ops.feed_silent")
            if raised is not None:
                open_rows[name] = raised
                log.error("EHR feed alarm raised", extra={"feed": alarm.feed, "reason": alarm.reason})
        for name in [n for n in open_rows if n not in wanted]:
            del open_rows[name]
            if clear_alarm(conn, name, now, event_type="ops.feed_recovered"):
                log.warning("EHR feed alarm cleared", extra={"feed": name})
        conn.commit()
    return [FeedAlarm(a.name, a.feed, a.reason, a.detail, open_rows.get(a.name)) for a in wanted.values()]


def raise_alarm(conn: psycopg.Connection[Any], alarm: FeedAlarm, now: datetime, *, event_type: str
                ) -> datetime | None:
    """Open ``alarm`` (one open row per name, so several nodes raise it once) and audit it; returns when it
    was raised, or None when it was open already."""
    from compliance import audit

    row = conn.execute("INSERT INTO ops_alarms (name, raised_at, detail) VALUES (%s, %s, %s)"
                       " ON CONFLICT (name) WHERE cleared_at IS NULL DO NOTHING RETURNING raised_at",
                       (alarm.name, now, Jsonb(alarm.to_json()))).fetchone()
    if row is None:
        return None
    audit.record(conn, event_type=event_type, action="E", actor="psych-cds", outcome=8,
                 entity={"feed": alarm.feed}, detail={"reason": alarm.reason, **alarm.detail})
    return row[0]  # type: ignore[no-any-return]


def clear_alarm(conn: psycopg.Connection[Any], name: str, now: datetime, *, event_type: str) -> bool:
    """Close the open alarm ``name`` and audit it; False when none was open."""
    from compliance import audit

    cleared = conn.execute("UPDATE ops_alarms SET cleared_at = %s WHERE name = %s AND cleared_at IS NULL"
                           " RETURNING id, detail", (now, name)).fetchone()
    if cleared is None:
        return False
    feed = (cleared[1] or {}).get("feed") or name.removeprefix("feed:")
    audit.record(conn, event_type=event_type, action="E", actor="psych-cds", outcome=0,
                 entity={"feed": feed}, detail={"alarm_id": cleared[0]})
    return True


def active_alarms(conn: psycopg.Connection[Any]) -> list[FeedAlarm]:
    """Open operations alarms, for /healthz (any node can answer; the state is in PostgreSQL)."""
    rows = conn.execute("SELECT name, raised_at, detail FROM ops_alarms WHERE cleared_at IS NULL"
                        " ORDER BY raised_at").fetchall()
    out = []
    for name, raised_at, detail in rows:
        detail = detail or {}
        out.append(FeedAlarm(name, str(detail.get("feed") or name.removeprefix("feed:")),
                             str(detail.get("reason") or "alarm"), dict(detail.get("detail") or {}), raised_at))
    return out
