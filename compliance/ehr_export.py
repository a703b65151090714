"""Send the audit log to the EHR as FHIR AuditEvents (IHE BALP), in batches through the outbox.

Each batch is one transaction Bundle of PUTs with ids derived from the chain position, so a retried
batch overwrites instead of duplicating, and the EHR's copy can be checked against the chain (every
AuditEvent carries its seq and hashes). The position sent so far is kept in audit_export_state.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from cds.settings import AUDIT_EXPORT_BATCHES, AUDIT_EXPORT_MAX_LAG_S
from cds.store import outbox
from cds.store.cipher import Cipher
from compliance.audit import _RECORD_COLUMNS, _to_record
from compliance.export import to_fhir

log = logging.getLogger(__name__)

BATCH = 50  # the sandbox (Medplum) takes at most 50 PUT entries per transaction; real EHRs similar
# Spread out: every EXPORT_INTERVAL_S at most BATCHES_PER_RUN Bundles, i.e. up to 20 AuditEvents/s. Sent a
# minute's worth at a time (20 Bundles, 1,000 PUTs), the EHR stalled for the chat it was also taking in:
# on 2 cores at 220 messages/s every minute's burst put the alerts of the next seconds 1 s late (write-back
# p99 1.26 s -> 0.74 s spread out, same bench). What is not yet sent waits in audit_log, in order.
# CDS_AUDIT_EXPORT_BATCHES sets BATCHES_PER_RUN for an EHR that takes more. Both defaults live in cds.settings.
EXPORT_INTERVAL_S = 5
BATCHES_PER_RUN = AUDIT_EXPORT_BATCHES
# The EHR's copy may trail the chain by this much before an operations alarm says so (CDS_AUDIT_EXPORT_MAX_LAG_S).
MAX_LAG_S = AUDIT_EXPORT_MAX_LAG_S
ALARM = "audit-export:ehr"
NAMESPACE = uuid.UUID("8f6f3c1e-7a55-4f0b-9a56-2d1f0d3c0a11")


def audit_event_id(seq: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"audit/{seq}"))


def queue_audit_export(conn: psycopg.Connection[Any], cipher: Cipher, *, max_batches: int = BATCHES_PER_RUN) -> int:
    """Queue the records not yet sent, ``BATCH`` per Bundle. Returns how many records were queued."""
    conn.execute("INSERT INTO audit_export_state (name) VALUES ('ehr') ON CONFLICT DO NOTHING")
    row = conn.execute("SELECT last_seq FROM audit_export_state WHERE name = 'ehr' FOR UPDATE SKIP LOCKED").fetchone()
    if row is None:
        return 0  # another node is exporting
    last = int(row[0])
    queued = 0
    for _ in range(max_batches):
        rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM audit_log WHERE seq > %s ORDER BY seq LIMIT %s",
                            (last, BATCH)).fetchall()
        if not rows:
            break
        records = [_to_record(r) for r in rows]
        entries = []
        for rec in records:
            resource = {**to_fhir(rec), "id": audit_event_id(rec.seq)}
            entries.append({"resource": resource, "request": {"method": "PUT", "url": f"AuditEvent/{resource['id']}"}})
        first, last = records[0].seq, records[-1].seq
        outbox.enqueue(conn, cipher, dedupe_key=f"audit-export:{first}-{last}", kind="audit-export",
                       patient_ref=None, payload={"resourceType": "Bundle", "type": "transaction", "entry": entries})
        queued += len(records)
    conn.execute("UPDATE audit_export_state SET last_seq = %s, updated_at = now() WHERE name = 'ehr'", (last,))
    return queued


@dataclass(frozen=True)
class ExportStatus:
    """How far the EHR's copy of the audit log trails the chain in PostgreSQL (which is never behind)."""

    head_seq: int  # newest record of the chain (0: none yet)
    in_ehr_through: int  # every record up to this seq has been accepted by the EHR
    queued_bundles: int  # Bundles waiting in the outbox
    dead_bundles: int  # Bundles the EHR refused for good (kept in the outbox, visible, never dropped)
    oldest_unsent_at: datetime | None  # when the first record not yet in the EHR was written

    @property
    def behind(self) -> int:
        """Records not in the EHR yet: not queued, or queued and not delivered."""
        return max(0, self.head_seq - self.in_ehr_through)

    def lag_s(self, now: datetime) -> float:
        return max(0.0, (now - self.oldest_unsent_at).total_seconds()) if self.oldest_unsent_at else 0.0

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {"head_seq": self.head_seq, "in_ehr_through": self.in_ehr_through, "behind": self.behind,
                "queued_bundles": self.queued_bundles, "dead_bundles": self.dead_bundles,
                "oldest_unsent_at": self.oldest_unsent_at.isoformat() if self.oldest_unsent_at else None,
                "lag_s": round(self.lag_s(now), 1)}


def export_status(conn: psycopg.Connection[Any]) -> ExportStatus:
    """Read from the chain's head, the export position and the unsent export rows (index ``outbox_unsent``).

    A Bundle covers seqs ``first-last`` (its dedupe key). The EHR holds everything before the first seq
    of the oldest Bundle not yet delivered; with none, everything queued so far."""
    counts = conn.execute(
        "SELECT (SELECT coalesce(max(seq), 0) FROM audit_log),"
        " (SELECT coalesce(max(last_seq), 0) FROM audit_export_state WHERE name = 'ehr'),"
        " min(split_part(substr(dedupe_key, length('audit-export:') + 1), '-', 1)::bigint),"
        " count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead')"
        " FROM outbox WHERE kind = 'audit-export' AND status <> 'sent'").fetchone()
    assert counts is not None  # an aggregate always answers one row
    head, queued_through, first_unsent, pending, dead = counts
    through = int(first_unsent) - 1 if first_unsent is not None else int(queued_through)
    oldest = None
    if head > through:
        row = conn.execute("SELECT recorded_at FROM audit_log WHERE seq > %s ORDER BY seq LIMIT 1",
                           (through,)).fetchone()
        oldest = row[0] if row else None
    return ExportStatus(int(head), through, int(pending), int(dead), oldest)


def check_export_lag(conn: psycopg.Connection[Any], now: datetime, max_lag_s: float = MAX_LAG_S) -> ExportStatus:
    """Raise the operations alarm ``audit-export:ehr`` (shown by /healthz, audited) while the EHR's copy
    trails by more than ``max_lag_s`` or a Bundle was refused for good; clear it once it is back within."""
    from integrations.fhir.watchdog import FeedAlarm, clear_alarm, raise_alarm

    status = export_status(conn)
    lag = status.lag_s(now)
    if status.dead_bundles or lag > max_lag_s:
        reason = "refused" if status.dead_bundles else "behind"
        alarm = FeedAlarm(ALARM, ALARM, reason, {**status.to_json(now), "allowed_lag_s": max_lag_s})
        if raise_alarm(conn, alarm, now, event_type="ops.audit_export_behind") is not None:
            log.error("the EHR's copy of the audit log is behind",
                      extra={"reason": reason, "behind": status.behind, "lag_s": round(lag)})
    elif clear_alarm(conn, ALARM, now, event_type="ops.audit_export_caught_up"):
        log.warning("the EHR's copy of the audit log caught up")
    return status
