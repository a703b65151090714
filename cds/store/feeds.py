"""Feed watermarks and health (the watchdog reads these)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg


@dataclass(frozen=True)
class FeedState:
    name: str
    watermark: datetime | None
    last_poll_at: datetime | None
    last_success_at: datetime | None
    last_event_at: datetime | None
    consecutive_failures: int
    last_error: str | None


_COLUMNS = "name, watermark, last_poll_at, last_success_at, last_event_at, consecutive_failures, last_error"


def lock_feed(conn: psycopg.Connection[Any], name: str,
              reconcile_s: float = 0.0) -> tuple[FeedState, bool] | None:
    """Row-lock the feed for this transaction; None when another node is polling it right now. With the
    state comes whether a full re-read is due: the last one is at least ``reconcile_s`` old (database time)."""
    conn.execute("INSERT INTO feeds (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,))
    row = conn.execute(f"SELECT {_COLUMNS}, reconciled_at IS NULL OR reconciled_at <= now() - make_interval("
                       "secs => %s) FROM feeds WHERE name = %s FOR UPDATE SKIP LOCKED",
                       (reconcile_s, name)).fetchone()
    return (FeedState(*row[:-1]), bool(row[-1])) if row else None


def record_success(conn: psycopg.Connection[Any], name: str, watermark: datetime | None, got_events: bool,
                   reconciled: bool = False) -> None:
    """``reconciled``: this poll re-read the whole overlap window."""
    conn.execute("UPDATE feeds SET watermark = COALESCE(%s, watermark), last_poll_at = now(),"
                 " last_success_at = now(), consecutive_failures = 0, last_error = NULL,"
                 " last_event_at = CASE WHEN %s THEN now() ELSE last_event_at END,"
                 " reconciled_at = CASE WHEN %s THEN now() ELSE reconciled_at END WHERE name = %s",
                 (watermark, got_events, reconciled, name))


def record_failure(conn: psycopg.Connection[Any], name: str, error: str) -> None:
    conn.execute("INSERT INTO feeds (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,))
    conn.execute("UPDATE feeds SET last_poll_at = now(), consecutive_failures = consecutive_failures + 1,"
                 " last_error = %s WHERE name = %s", (error[:500], name))


def all_feeds(conn: psycopg.Connection[Any]) -> list[FeedState]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM feeds ORDER BY name").fetchall()
    return [FeedState(*r) for r in rows]
