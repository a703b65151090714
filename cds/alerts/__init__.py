"""Alert lifecycle: one open alert per patient and kind; new evidence joins it and can raise its
priority, never lower it; every transition is recorded (and audited by the caller's transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row

from cds.domain import RiskTier
from cds.errors import ConflictError, NotFoundError

PRIORITY_RANK = {"routine": 0, "urgent": 1, "asap": 2, "stat": 3}
OPEN_STATES = ("open", "acknowledged", "in_progress", "escalated")


@dataclass(frozen=True)
class Alert:
    id: Any
    patient_ref: str
    kind: str
    status: str
    tier: int
    priority: str
    reason: str
    assessment_id: int | None
    created_at: datetime
    updated_at: datetime
    due_at: datetime
    escalation_level: int
    acknowledged_at: datetime | None
    acknowledged_by: str | None

    @property
    def tier_label(self) -> str:
        return RiskTier(self.tier).label


_COLUMNS = ("id, patient_ref, kind, status, tier, priority, reason, assessment_id, created_at, updated_at,"
            " due_at, escalation_level, acknowledged_at, acknowledged_by")


@dataclass(frozen=True)
class AlertChange:
    alert_id: str
    created: bool  # a new alert (or a resolved one reopened as new)
    raised: bool   # an open alert's priority or tier went up


def _transition(conn: psycopg.Connection[Any], alert_id: Any, actor: str, from_status: str | None,
                to_status: str, detail: str = "{}") -> None:
    conn.execute("INSERT INTO alert_transitions (alert_id, actor, from_status, to_status, detail)"
                 " VALUES (%s, %s, %s, %s, %s)", (alert_id, actor, from_status, to_status, detail))


def raise_alert(conn: psycopg.Connection[Any], *, patient_ref: str, kind: str, tier: RiskTier, priority: str,
                reason: str, assessment_id: int, sla_minutes: int, now: datetime) -> AlertChange:
    """Open an alert, or join the open one (raising, never lowering, its priority and tier)."""
    due = now + timedelta(minutes=sla_minutes)
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        current = cur.execute(f"SELECT {_COLUMNS} FROM alerts WHERE patient_ref = %s AND kind = %s"
                              " AND status <> 'resolved' FOR UPDATE", (patient_ref, kind)).fetchone()
    if current is None:
        row = conn.execute(
            "INSERT INTO alerts (patient_ref, kind, tier, priority, reason, assessment_id, due_at, created_at,"
            " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (patient_ref, kind, int(tier), priority, reason[:2000], assessment_id, due, now, now)).fetchone()
        assert row is not None
        _transition(conn, row[0], "psych-cds", None, "open")
        return AlertChange(str(row[0]), created=True, raised=False)
    raised = PRIORITY_RANK[priority] > PRIORITY_RANK[current.priority] or int(tier) > current.tier
    new_priority = max(priority, current.priority, key=PRIORITY_RANK.__getitem__)
    conn.execute(
        "UPDATE alerts SET priority = %s, tier = GREATEST(tier, %s), reason = %s, assessment_id = %s,"
        " due_at = LEAST(due_at, %s), updated_at = %s,"
        " status = CASE WHEN %s THEN 'open' ELSE status END WHERE id = %s",
        (new_priority, int(tier), reason[:2000] if raised else current.reason, assessment_id, due, now,
         raised and current.status == "acknowledged", current.id))
    if raised:
        _transition(conn, current.id, "psych-cds", current.status,
                    "open" if current.status == "acknowledged" else current.status,
                    '{"raised": true}')
    return AlertChange(str(current.id), created=False, raised=raised)


def get_alert(conn: psycopg.Connection[Any], alert_id: str) -> Alert:
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        try:
            alert = cur.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id = %s", (alert_id,)).fetchone()
        except psycopg.errors.InvalidTextRepresentation as exc:
            raise NotFoundError(f"no alert {alert_id[:40]!r}") from exc
    if alert is None:
        raise NotFoundError(f"no alert {alert_id[:40]!r}")
    return alert


def acknowledge(conn: psycopg.Connection[Any], alert_id: str, actor: str, now: datetime) -> Alert:
    alert = get_alert(conn, alert_id)
    if alert.status not in ("open", "escalated"):
        raise ConflictError(f"alert is {alert.status}, it cannot be acknowledged")
    conn.execute("UPDATE alerts SET status = 'acknowledged', acknowledged_at = %s, acknowledged_by = %s,"
                 " updated_at = %s WHERE id = %s", (now, actor, now, alert.id))
    _transition(conn, alert.id, actor, alert.status, "acknowledged")
    return get_alert(conn, alert_id)


def list_open(conn: psycopg.Connection[Any], limit: int = 200) -> list[Alert]:
    """The nurse's queue: priority first (stat before routine), then the earliest deadline."""
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM alerts WHERE status <> 'resolved' ORDER BY"
            " CASE priority WHEN 'stat' THEN 0 WHEN 'asap' THEN 1 WHEN 'urgent' THEN 2 ELSE 3 END, due_at"
            " LIMIT %s", (limit,)).fetchall()
