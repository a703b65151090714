"""Mirror an alert's state to the EHR: its Task (and a Communication to whoever must act) via the outbox."""

from __future__ import annotations

from typing import Any

import psycopg

from cds.alerts import Alert, load_policy
from cds.domain import RiskTier
from cds.settings import Settings
from cds.store import outbox
from cds.store.cipher import Cipher


def alert_task_bundle(alert: Alert, settings: Settings, *, notify: tuple[str, str] | None = None) -> dict[str, Any]:
    """The transaction Bundle of the alert's Task at its current version. The pipeline joins it to the
    assessment's write-back when both come from one event; every other transition queues it alone."""
    from integrations.fhir.mapping import task_bundle

    level = load_policy().level(alert.escalation_level)
    return task_bundle(
        alert_id=str(alert.id), task_version=alert.task_version, patient_ref=alert.patient_ref, status=alert.status,
        priority=alert.priority, tier=RiskTier(alert.tier), reason=alert.reason, assessment_id=alert.assessment_id,
        created_at=alert.created_at, updated_at=alert.updated_at, due_at=alert.due_at,
        escalation=level["business_status"], owner_ref=alert.assigned_ref, care_team_ref=settings.care_team_ref,
        resolution_code=alert.resolution_code, notify_text=notify,
        dashboard_url=f"{settings.public_base_url}/triage")


def mirror_alert(conn: psycopg.Connection[Any], cipher: Cipher, alert: Alert, settings: Settings, *,
                 notify: tuple[str, str] | None = None) -> bool:
    """Queue the Task at the alert's current version (once per version)."""
    return outbox.enqueue(conn, cipher, dedupe_key=f"alert:{alert.id}:task:{alert.task_version}", kind="alert-task",
                          patient_ref=alert.patient_ref, payload=alert_task_bundle(alert, settings, notify=notify))
