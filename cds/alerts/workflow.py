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


def _audit_entry(alert: alerts.Alert, event: str, actor: str, role: str | None,
                 detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event_type": f"alert.{event}", "action": "U", "actor": actor, "role": role, "purpose": "TREAT",
            "patient_ref": alert.patient_ref, "entity": {"alert_id": str(alert.id)},
            "detail": {"status": alert.status, "priority": alert.priority, **(detail or {})}}


def _audit(conn: psycopg.Connection[Any], alert: alerts.Alert, event: str, actor: str, role: str | None,
           detail: dict[str, Any] | None = None) -> None:
    from compliance import audit

    audit.record(conn, **_audit_entry(alert, event, actor, role, detail))


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
                   actor: str, role: str | None, now: datetime, reason: str,
                   audits: list[dict[str, Any]] | None = None) -> alerts.Alert:
    """One step up, its Task mirror and notice to the on-call, and its audit record (appended now, or
    added to ``audits`` for the caller to append with others before its commit)."""
    from cds.triage import sla_for

    before = alerts.get_alert(conn, alert_id)
    alert = alerts.escalate(conn, alert_id, actor, now, reason=reason, sla_minutes=sla_for(before.priority))
    level = alerts.load_policy().level(alert.escalation_level)["business_status"]["display"]
    tier_en = RiskTier(alert.tier).label
    notify = (f"psych-cds ESCALATION ({level}): suicide risk {tier_en} alert not acknowledged in time - act now.",
              f"psych-cds 升级（{level}）：自杀风险警报未在时限内确认——请立即处理。")
    mirror_alert(conn, cipher, alert, settings, notify=notify)
    detail = {"level": alert.escalation_level, "to_role": alert.assigned_role, "reason": reason}
    if audits is None:
        _audit(conn, alert, "escalate", actor, role, detail)
    else:
        audits.append(_audit_entry(alert, "escalate", actor, role, detail))
    log.warning("alert escalated", extra={"alert_id": str(alert.id), "level": alert.escalation_level})
    return alert


# Overdue alerts escalated per transaction. A ward nobody answers can have hundreds due at once (the bench
# day: 400 a minute from its 5th minute, as every first alert passed its deadline). One at a time, each
# took the audit chain's append lock and a commit of its own, and every other writer (the pipeline's
# batches, the intake of notifications) queued behind them: waits on that lock went from 0.1 to 2.5-3 ms
# a call, and the p99 of 30-s windows from ~1 s to 2.5-4 s. A batch takes it once; it holds its alerts'
# rows for its few milliseconds, and a pipeline batch that wants to raise one of them waits that long.
ESCALATION_BATCH = 20


def escalate_overdue_alerts(conn: psycopg.Connection[Any], cipher: Cipher, settings: Settings,
                            now: datetime, limit: int = 100) -> list[alerts.Alert]:
    """One step up for every alert whose acknowledgement deadline has passed (the scheduled job).

    Up to ``ESCALATION_BATCH`` alerts are escalated and committed together, their audit records appended
    last. Their rows are claimed first with SKIP LOCKED (never awaited), so the audit append lock is
    never held while an alert's row lock is awaited (no deadlock with the pipeline). A batch that fails
    rolls back whole (committed batches stay) and the job tries again at its next run.
    """
    from compliance import audit

    escalated: list[alerts.Alert] = []

    def batch(size: int) -> list[alerts.Alert]:
        audits: list[dict[str, Any]] = []
        with conn.transaction():
            done = [escalate_alert(conn, cipher, settings, str(a.id), actor="psych-cds", role=None, now=now,
                                   reason="acknowledgement deadline passed", audits=audits)
                    for a in alerts.overdue_alerts(conn, now, limit=size)]
            audit.record_batch(conn, audits)
        return done

    while len(escalated) < limit:
        done = batch(min(ESCALATION_BATCH, limit - len(escalated)))
        if not done:
            break
        escalated += done
    return escalated
