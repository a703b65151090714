"""Mirror an alert's state to the EHR: its Task (and a Communication to whoever must act) via the outbox."""

from __future__ import annotations

from typing import Any

import psycopg

from cds.alerts import Alert, load_policy
from cds.domain import RiskTier
from cds.settings import Settings
from cds.store import outbox
from cds.store.cipher import Cipher


def mirror_alert(conn: psycopg.Connection[Any], cipher: Cipher, alert: Alert, settings: Settings, *,
                 notify: tuple[str, str] | None = None) -> bool:
    """Queue the Task at the alert's current version (once per version)."""
    from integrations.fhir.mapping import task_bundle

    level = load_policy().level(alert.escalation_level)
    bundle = task_bundle(
        alert_id=str(alert.id), task_version=alert.task_version, patient_ref=alert.patient_ref, status=alert.status,
        priority=alert.priority, tier=RiskTier(alert.tier), reason=alert.reason, assessment_id=alert.assessment_id,
        created_at=alert.created_at, updated_at=alert.updated_at, due_at=alert.due_at,
        escalation=level["business_status"], owner_ref=alert.assigned_ref, care_team_ref=settings.care_team_ref,
        resolution_code=alert.resolution_code, notify_text=notify,
        dashboard_url=f"{settings.public_base_url}/triage")
    return outbox.enqueue(conn, cipher, dedupe_key=f"alert:{alert.id}:task:{alert.task_version}", kind="alert-task",
                          patient_ref=alert.patient_ref, payload=bundle)
