"""Alert lifecycle: open -> acknowledged -> in_progress -> resolved, or escalated when a deadline passes.

One open alert per patient and kind: new evidence joins it and can raise its priority, never lower
it; a resolved alert is followed by a new one when risk rises again. Every transition is recorded in
alert_transitions and the audit log (by the caller's transaction) and mirrored to the EHR as a FHIR
Task (plus a Communication to whoever must act) through the outbox.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.rows import class_row

from cds.domain import RiskTier
from cds.errors import ConflictError, InputError, NotFoundError
from cds.settings import REPO_ROOT

PRIORITY_RANK = {"routine": 0, "urgent": 1, "asap": 2, "stat": 3}
OPEN_STATES = ("open", "acknowledged", "in_progress", "escalated")
ESCALATION_FILE = REPO_ROOT / "rules" / "alerts" / "escalation.yaml"


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
    assigned_role: str
    assigned_ref: str | None
    started_at: datetime | None
    resolved_at: datetime | None
    resolution_code: str | None
    task_version: int

    @property
    def tier_label(self) -> str:
        return RiskTier(self.tier).label

    def overdue(self, now: datetime) -> bool:
        return self.status in ("open", "escalated") and self.due_at < now


_COLUMNS = ("id, patient_ref, kind, status, tier, priority, reason, assessment_id, created_at, updated_at,"
            " due_at, escalation_level, acknowledged_at, acknowledged_by, assigned_role, assigned_ref,"
            " started_at, resolved_at, resolution_code, task_version")


@dataclass(frozen=True)
class AlertChange:
    alert_id: str
    created: bool  # a new alert (or a new one after a resolved one)
    raised: bool   # an open alert's priority or tier went up


@dataclass(frozen=True)
class EscalationPolicy:
    version: str
    levels: tuple[dict[str, Any], ...]
    renotify_minutes: int
    resolutions: tuple[dict[str, str], ...]

    def level(self, n: int) -> dict[str, Any]:
        return self.levels[min(n, len(self.levels) - 1)]

    def resolution_codes(self) -> set[str]:
        return {r["code"] for r in self.resolutions}


@functools.lru_cache(maxsize=4)
def load_policy(path: Path = ESCALATION_FILE) -> EscalationPolicy:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return EscalationPolicy(version=str(doc["version"]), levels=tuple(doc["levels"]),
                            renotify_minutes=int(doc.get("renotify_minutes", 15)),
                            resolutions=tuple(doc.get("resolutions", ())))


def _transition(conn: psycopg.Connection[Any], alert_id: Any, actor: str, from_status: str | None,
                to_status: str, detail: dict[str, Any] | None = None) -> None:
    conn.execute("INSERT INTO alert_transitions (alert_id, actor, from_status, to_status, detail)"
                 " VALUES (%s, %s, %s, %s, %s)",
                 (alert_id, actor, from_status, to_status, json.dumps(detail or {})))


def get_alert(conn: psycopg.Connection[Any], alert_id: str, *, lock: bool = False) -> Alert:
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        try:
            alert = cur.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id = %s" + (" FOR UPDATE" if lock else ""),
                                (alert_id,)).fetchone()
        except psycopg.errors.InvalidTextRepresentation as exc:
            raise NotFoundError(f"no alert {alert_id[:40]!r}") from exc
    if alert is None:
        raise NotFoundError(f"no alert {alert_id[:40]!r}")
    return alert


def _bump_task(conn: psycopg.Connection[Any], alert_id: Any) -> None:
    conn.execute("UPDATE alerts SET task_version = task_version + 1 WHERE id = %s", (alert_id,))


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
            " updated_at, task_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 1) RETURNING id",
            (patient_ref, kind, int(tier), priority, reason[:2000], assessment_id, due, now, now)).fetchone()
        assert row is not None
        _transition(conn, row[0], "psych-cds", None, "open", {"priority": priority, "tier": tier.label})
        return AlertChange(str(row[0]), created=True, raised=False)
    raised = PRIORITY_RANK[priority] > PRIORITY_RANK[current.priority] or int(tier) > current.tier
    new_priority = max(priority, current.priority, key=PRIORITY_RANK.__getitem__)
    # Higher risk on an acknowledged alert sends it back to the queue: suppression never hides it.
    reopen = raised and current.status in ("acknowledged", "in_progress")
    conn.execute(
        "UPDATE alerts SET priority = %s, tier = GREATEST(tier, %s), reason = %s, assessment_id = %s,"
        " due_at = CASE WHEN %s THEN LEAST(due_at, %s) ELSE due_at END, updated_at = %s,"
        " status = CASE WHEN %s THEN 'open' ELSE status END,"
        " task_version = task_version + CASE WHEN %s THEN 1 ELSE 0 END WHERE id = %s",
        (new_priority, int(tier), reason[:2000] if raised else current.reason, assessment_id,
         raised, due, now, reopen, raised, current.id))
    if raised:
        _transition(conn, current.id, "psych-cds", current.status, "open" if reopen else current.status,
                    {"raised": True, "priority": new_priority, "tier": max(current.tier, int(tier))})
    return AlertChange(str(current.id), created=False, raised=raised)


def _move(conn: psycopg.Connection[Any], alert_id: str, actor: str, now: datetime, *, allowed: tuple[str, ...],
          to_status: str, sets: str, params: tuple[Any, ...], detail: dict[str, Any] | None = None) -> Alert:
    alert = get_alert(conn, alert_id, lock=True)
    if alert.status not in allowed:
        raise ConflictError(f"alert is {alert.status}; it cannot move to {to_status}")
    conn.execute(f"UPDATE alerts SET status = %s, updated_at = %s, task_version = task_version + 1, {sets}"
                 " WHERE id = %s", (to_status, now, *params, alert.id))
    _transition(conn, alert.id, actor, alert.status, to_status, detail)
    return get_alert(conn, alert_id)


def acknowledge(conn: psycopg.Connection[Any], alert_id: str, actor: str, now: datetime) -> Alert:
    return _move(conn, alert_id, actor, now, allowed=("open", "escalated"), to_status="acknowledged",
                 sets="acknowledged_at = %s, acknowledged_by = %s", params=(now, actor))


def start(conn: psycopg.Connection[Any], alert_id: str, actor: str, now: datetime) -> Alert:
    """The nurse is acting (call, 1:1 observation, referral); starting implies acknowledging."""
    return _move(conn, alert_id, actor, now, allowed=("open", "escalated", "acknowledged"), to_status="in_progress",
                 sets="started_at = %s, started_by = %s, acknowledged_at = COALESCE(acknowledged_at, %s),"
                      " acknowledged_by = COALESCE(acknowledged_by, %s)", params=(now, actor, now, actor))


def resolve(conn: psycopg.Connection[Any], alert_id: str, actor: str, now: datetime, *, code: str,
            note_enc: bytes | None = None, new_tier: RiskTier | None = None) -> Alert:
    """Close with a coded resolution. Only here may a clinician lower the patient's standing tier."""
    if code not in load_policy().resolution_codes():
        raise InputError(f"unknown resolution code {code[:40]!r}; expected one of "
                         f"{', '.join(sorted(load_policy().resolution_codes()))}")
    alert = _move(conn, alert_id, actor, now, allowed=OPEN_STATES, to_status="resolved",
                  sets="resolved_at = %s, resolved_by = %s, resolution_code = %s, resolution_note_enc = %s",
                  params=(now, actor, code, note_enc),
                  detail={"code": code, "new_tier": new_tier.label if new_tier is not None else None})
    if new_tier is not None:
        conn.execute("UPDATE patients SET current_tier = %s, tier_since = %s, updated_at = %s"
                     " WHERE patient_ref = %s", (int(new_tier), now, now, alert.patient_ref))
    return alert


def escalate(conn: psycopg.Connection[Any], alert_id: str, actor: str, now: datetime, *,
             reason: str = "manual", sla_minutes: int | None = None) -> Alert:
    """One step up the escalation path, with a new deadline for the next person."""
    alert = get_alert(conn, alert_id, lock=True)
    if alert.status == "resolved":
        raise ConflictError("alert is resolved; it cannot be escalated")
    policy = load_policy()
    last = len(policy.levels) - 1
    level = min(alert.escalation_level + 1, last)
    role = str(policy.level(level)["role"])
    wait = policy.renotify_minutes if alert.escalation_level >= last else (sla_minutes or 15)
    oncall = current_oncall(conn, role, now)
    conn.execute("UPDATE alerts SET status = 'escalated', escalation_level = %s, assigned_role = %s,"
                 " assigned_ref = %s, due_at = %s, updated_at = %s, task_version = task_version + 1"
                 " WHERE id = %s", (level, role, oncall["practitioner_ref"] if oncall else None,
                                   now + timedelta(minutes=wait), now, alert.id))
    _transition(conn, alert.id, actor, alert.status, "escalated",
                {"level": level, "role": role, "reason": reason, "to": oncall["practitioner_ref"] if oncall else None})
    return get_alert(conn, alert_id)


def overdue_alerts(conn: psycopg.Connection[Any], now: datetime, limit: int = 100) -> list[Alert]:
    """Alerts whose acknowledgement deadline has passed; locked so one node escalates each."""
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM alerts WHERE status IN ('open', 'escalated') AND due_at < %s"
                           " ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED", (now, limit)).fetchall()


def list_open(conn: psycopg.Connection[Any], limit: int = 200) -> list[Alert]:
    """The nurse's queue: priority first (stat before routine), then the earliest deadline."""
    with conn.cursor(row_factory=class_row(Alert)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM alerts WHERE status <> 'resolved' ORDER BY"
            " CASE priority WHEN 'stat' THEN 0 WHEN 'asap' THEN 1 WHEN 'urgent' THEN 2 ELSE 3 END, due_at"
            " LIMIT %s", (limit,)).fetchall()


def transitions(conn: psycopg.Connection[Any], alert_id: str) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT at, actor, from_status, to_status, detail FROM alert_transitions"
                        " WHERE alert_id = %s ORDER BY id", (alert_id,)).fetchall()
    return [{"at": r[0], "actor": r[1], "from": r[2], "to": r[3], "detail": r[4]} for r in rows]


# -- on-call roster ---------------------------------------------------------------------------------


def current_oncall(conn: psycopg.Connection[Any], role: str, now: datetime) -> dict[str, Any] | None:
    row = conn.execute("SELECT practitioner_ref, display, phone FROM oncall WHERE role = %s"
                       " AND starts_at <= %s AND ends_at > %s ORDER BY starts_at DESC, id DESC LIMIT 1",
                       (role, now, now)).fetchone()
    return {"practitioner_ref": row[0], "display": row[1], "phone": row[2]} if row else None


def set_oncall(conn: psycopg.Connection[Any], *, role: str, practitioner_ref: str, display: str,
               starts_at: datetime, ends_at: datetime, actor: str, phone: str | None = None) -> int:
    if not practitioner_ref.startswith(("Practitioner/", "PractitionerRole/")):
        raise InputError("practitioner must be a Practitioner/<id> or PractitionerRole/<id> reference")
    try:
        row = conn.execute("INSERT INTO oncall (role, practitioner_ref, display, phone, starts_at, ends_at,"
                           " created_by) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                           (role, practitioner_ref, display, phone, starts_at, ends_at, actor)).fetchone()
    except psycopg.errors.CheckViolation as exc:
        raise InputError(f"invalid on-call entry: {exc.diag.constraint_name}") from exc
    assert row is not None
    return int(row[0])


def roster(conn: psycopg.Connection[Any], now: datetime) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT id, role, practitioner_ref, display, phone, starts_at, ends_at FROM oncall"
                        " WHERE ends_at > %s ORDER BY role, starts_at", (now,)).fetchall()
    keys = ("id", "role", "practitioner_ref", "display", "phone", "starts_at", "ends_at")
    return [dict(zip(keys, r)) for r in rows]
