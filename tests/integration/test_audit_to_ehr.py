"""The audit log reaches the EHR as AuditEvents in batches; a retried batch duplicates nothing."""

from __future__ import annotations

from typing import Any

import pytest

from cds.jobs import deliver_outbox, export_audit_to_ehr, ingest_cycle
from tests.samples import patient, phq9

pytestmark = pytest.mark.integration


def test_audit_records_are_sent_as_audit_events_in_batches(ehr: Any, service: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-A-1"))
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 2]))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    assert export_audit_to_ehr(service) == total
    deliver_outbox(service)
    events = ehr.search("AuditEvent", _count=500)
    assert len(events) == total
    by_patient = ehr.search("AuditEvent", patient=ref, _count=500)
    assert by_patient and all(e["resourceType"] == "AuditEvent" for e in by_patient)
    # Nothing new: nothing queued. A re-sent batch overwrites (same ids), it does not duplicate.
    assert export_audit_to_ehr(service) == 0
    with service.pool.connection() as conn:
        conn.execute("UPDATE outbox SET status = 'pending', next_attempt_at = now() WHERE kind = 'audit-export'")
        conn.commit()
    deliver_outbox(service)
    assert len(ehr.search("AuditEvent", _count=500)) == total
