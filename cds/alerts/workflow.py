"""What people and the escalation job do to alerts: each step is the transition, its Task mirror and
its audit record, committed together."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import psycopg

from cds import alerts
from cds.alerts.mirror import mirror_alert
from cds.domain import RiskTier
from cds.settings import Settings
from cds.store.cipher import Cipher

log = logging.getLogger(__name__)


def _audit(conn: psycopg.Connection[Any], alert: alerts.Alert, event: str, actor: str, role: str | None,
           detail: dict[str, Any] | None = None) -> None:
    from compliance import audit

    audit.record(conn, event_type=f"alert.{event}", action="U", actor=actor, role=role, purpose="TREAT",
                 patient_ref=alert.patient_ref, entity={"alert_id": str(alert.id)},
                 detail={"status": alert.status, "priority": alert.priority, **(detail or {})})


def acknowledge_alert(conn: psycopg.Connection[Any], cipher: Cipher, settings: Settings, alert_id: str, *,
                      actor: str, role: str | None, now: datetime) -> alerts.Alert:
    alert = alerts.acknowledge(conn, alert_id, actor, now)
    mirror_alert(conn, cipher, alert, settings)
    _audit(conn, alert, "acknowledge", actor, role)
    return alert


def start_alert(conn: psycopg.Connection[Any], cipher: Cipher, settings: Settings, alert_id: str, *,
                actor: str, role: str | None, now: datetime, action: str | None = None) -> alerts.Alert:
    alert = alerts.start(conn, alert_id, actor, now)
    mirror_alert(conn, cipher, alert, settings)
    _audit(conn, alert, "start", actor, role, {"action": action})
    return alert


def resolve_alert(conn: psycopg.Connection[Any], cipher: Cipher, settings: Settings, alert_id: str, *,
                  actor: str, role: str | None, now: datetime, code: str, note: str = "",
                  new_tier: RiskTier | None = None) -> alerts.Alert:
    """Resolve with a coded reason; the free-text note is patient data and is stored encrypted."""
    current = alerts.get_alert(conn, alert_id)
    note_enc = cipher.encrypt(conn, current.patient_ref, note.encode(), f"alerts.note|{alert_id}".encode()) \
        if note else None
    alert = alerts.resolve(conn, alert_id, actor, now, code=code, note_enc=note_enc, new_tier=new_tier)
    mirror_alert(conn, cipher, alert, settings)
    _audit(conn, alert, "resolve", actor, role,
           {"code": code, "tier_lowered_to": new_tier.label if new_tier is not None else None})
    return alert


def escalate_alert(conn: psycopg.Connection[Any], cipher: Cipher, settings: Settings, alert_id: str, *,
                   actor: str, role: str | None, now: datetime, reason: str) -> alerts.Alert:
    from cds.triage import sla_for

    before = alerts.get_alert(conn, alert_id)
    alert = alerts.escalate(conn, alert_id, actor, now, reason=reason, sla_minutes=sla_for(before.priority))
    level = alerts.load_policy().level(alert.escalation_level)["business_status"]["display"]
    tier_en = RiskTier(alert.tier).label
    notify = (f"psych-cds ESCALATION ({level}): suicide risk {tier_en} alert not acknowledged in time - act now.",
              f"psych-cds 升级（{level}）：自杀风险警报未在时限内确认——请立即处理。")
    mirror_alert(conn, cipher, alert, settings, notify=notify)
    _audit(conn, alert, "escalate", actor, role,
           {"level": alert.escalation_level, "to_role": alert.assigned_role, "reason": reason})
    log.warning("alert escalated", extra={"alert_id": str(alert.id), "level": alert.escalation_level})
    return alert


def escalate_overdue_alerts(conn: psycopg.Connection[Any], cipher: Cipher, settings: Settings,
                            now: datetime, limit: int = 100) -> list[alerts.Alert]:
    """One step up for every alert whose acknowledgement deadline has passed (the scheduled job).

    Each alert is escalated and committed on its own: the audit append lock is never held while
    another alert's row lock is awaited (no deadlock with the pipeline), and one failure stops nothing.
    """
    escalated = []
    for _ in range(limit):
        with conn.transaction():
            due = alerts.overdue_alerts(conn, now, limit=1)
            if not due:
                break
            escalated.append(escalate_alert(conn, cipher, settings, str(due[0].id), actor="psych-cds", role=None,
                                            now=now, reason="acknowledgement deadline passed"))
    return escalated
