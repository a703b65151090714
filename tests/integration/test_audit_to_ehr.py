"""The audit log reaches the EHR as AuditEvents in batches; a retried batch duplicates nothing."""

from __future__ import annotations

import itertools
import re
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


def test_how_far_behind_the_ehr_copy_is_shows_and_alarms_until_it_catches_up(ehr: Any, service: Any,
                                                                               client: Any) -> None:
    """The EHR's copy trails the chain while records wait to be queued or delivered: /healthz and the
    compliance console say by how much and since when, and an operations alarm opens when it trails
    longer than allowed (or a Bundle is refused for good) and clears once the EHR holds everything."""
    from datetime import timedelta

    from compliance import audit
    from compliance.ehr_export import ALARM, BATCH, check_export_lag, export_status
    from integrations.fhir.watchdog import active_alarms
    from tests.samples import sign_in

    with service.pool.connection() as conn:
        audit.record_batch(conn, [{"event_type": "rest.read", "action": "R", "actor": "Practitioner/1", "role": "nurse",
                                   "entity": {"what": f"RiskAssessment/{i}"}} for i in range(130)])
        conn.commit()
        first_at, total = conn.execute("SELECT min(recorded_at), max(seq) FROM audit_log").fetchone()
        status = export_status(conn)
    assert (status.head_seq, status.in_ehr_through, status.behind, status.queued_bundles) == (total, 0, total, 0)
    assert status.oldest_unsent_at == first_at

    health = client.get("/healthz").get_json()["audit_export"]
    assert health["behind"] == total and health["in_ehr_through"] == 0 and health["lag_s"] >= 0

    # Queued is not delivered: the EHR still holds none of it.
    export_audit_to_ehr(service)
    with service.pool.connection() as conn:
        status = export_status(conn)
    assert status.in_ehr_through == 0 and status.queued_bundles == 2 and status.behind == total

    # Trailing longer than allowed: one alarm (raised once however often it is checked), audited.
    later = first_at + timedelta(seconds=901)
    with service.pool.connection() as conn:
        check_export_lag(conn, later, 900)
        check_export_lag(conn, later, 900)
        conn.commit()
        alarms = [a for a in active_alarms(conn) if a.name == ALARM]
        raised = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'ops.audit_export_behind'").fetchone()[0]
    assert len(alarms) == 1 and alarms[0].reason == "behind" and alarms[0].detail["behind"] == total and raised == 1
    assert client.get("/healthz").get_json()["status"] == "degraded"

    sign_in(client, service, role="compliance")
    page = client.get("/audit?lang=en").text
    shown = re.search(r'id="ehr-copy" data-behind="(\d+)"', page)
    assert shown and int(shown[1]) > total and "not there yet" in page  # + the alarm's and the login's records
    assert "条记录尚未送达" in client.get("/audit?lang=zh-CN").text

    # Delivered, the first two Bundles count as in the EHR; the rest is queued and delivered too.
    deliver_outbox(service)
    with service.pool.connection() as conn:
        assert export_status(conn).in_ehr_through == 2 * BATCH
    while export_audit_to_ehr(service):
        deliver_outbox(service)
    deliver_outbox(service)
    with service.pool.connection() as conn:
        status = export_status(conn)
        head = status.head_seq
        assert status.in_ehr_through == head and status.behind == 0 and status.oldest_unsent_at is None
        check_export_lag(conn, later, 900)
        conn.commit()
        assert not [a for a in active_alarms(conn) if a.name == ALARM]
        assert conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'ops.audit_export_caught_up'"
                            ).fetchone()[0] == 1
    assert len(ehr.search("AuditEvent", _count=1000)) >= total
    export_audit_to_ehr(service)  # the alarm's clearing is itself a record
    deliver_outbox(service)
    assert 'data-behind="0"' in client.get("/audit?lang=en").text

    # A Bundle the EHR refused for good: the copy stops before it, and the alarm says "refused" at once.
    with service.pool.connection() as conn:
        conn.execute("UPDATE outbox SET status = 'dead' WHERE kind = 'audit-export' AND dedupe_key = %s",
                     (f"audit-export:{BATCH + 1}-{2 * BATCH}",))
        status = check_export_lag(conn, later, 900)
        conn.commit()
        alarms = [a for a in active_alarms(conn) if a.name == ALARM]
    assert status.in_ehr_through == BATCH and status.dead_bundles == 1 and status.behind == status.head_seq - BATCH
    assert len(alarms) == 1 and alarms[0].reason == "refused"
