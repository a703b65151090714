"""The audit log reaches the EHR as AuditEvents in batches; a retried batch duplicates nothing."""

from __future__ import annotations

import itertools
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


def test_each_export_run_sends_at_most_two_batches_so_the_ehr_is_never_flooded(ehr: Any, service: Any) -> None:
    """A backlog goes out BATCHES_PER_RUN Bundles per run (every EXPORT_INTERVAL_S), oldest first, none
    skipped: 1,000 AuditEvents at once stalled the EHR for the chat it was taking in."""
    from compliance import audit
    from compliance.ehr_export import BATCH, BATCHES_PER_RUN

    with service.pool.connection() as conn:
        audit.record_batch(conn, [{"event_type": "rest.read", "action": "R", "actor": "Practitioner/1", "role": "nurse",
                                   "entity": {"what": f"RiskAssessment/{i}"}} for i in range(130)])
        conn.commit()
        total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    per_run = BATCH * BATCHES_PER_RUN
    assert total > per_run
    sent = []
    while (n := export_audit_to_ehr(service)) > 0:
        sent.append(n)
    assert sent[:-1] == [per_run] * (len(sent) - 1) and 0 < sent[-1] <= per_run and sum(sent) == total
    with service.pool.connection() as conn:
        keys = [r[0] for r in conn.execute("SELECT dedupe_key FROM outbox WHERE kind = 'audit-export' ORDER BY id")]
    ranges = [tuple(int(x) for x in k.removeprefix("audit-export:").split("-")) for k in keys]
    assert ranges[0][0] == 1 and all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)) and ranges[-1][1] == total
    deliver_outbox(service)
    assert len(ehr.search("AuditEvent", _count=1000)) == total
