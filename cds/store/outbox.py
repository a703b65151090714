"""The outbox: FHIR writes committed with the decision that caused them, delivered later with retries.

A row is written in the same transaction as the assessment, so a crash never loses a write-back;
delivery claims rows with SKIP LOCKED, so several workers never send the same row at once; each
bundle uses conditional creates, so a retry after a lost response creates nothing twice.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from cds.store.cipher import Cipher, open_json, seal_json


def _aad(dedupe_key: str) -> str:
    return f"outbox.payload|{dedupe_key}"


@dataclass(frozen=True)
class OutboxItem:
    id: int
    dedupe_key: str
    kind: str
    patient_ref: str | None
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


def enqueue(conn: psycopg.Connection[Any], cipher: Cipher, *, dedupe_key: str, kind: str, patient_ref: str | None,
            payload: dict[str, Any]) -> bool:
    """Queue one FHIR write (once per dedupe key). Returns False when it was already queued."""
    return enqueue_deferred(conn, cipher, dedupe_key=dedupe_key, kind=kind, patient_ref=patient_ref,
                            payload=payload)()


def enqueue_deferred(conn: psycopg.Connection[Any], cipher: Cipher, *, dedupe_key: str, kind: str,
                     patient_ref: str | None, payload: dict[str, Any]) -> Callable[[], bool]:
    """``enqueue``, sent now; calling the result says whether it was queued (in pipeline mode a caller
    that never asks does not wait for the INSERT: it shares the next round trip)."""
    blob = seal_json(cipher, conn, patient_ref or "system", payload, _aad(dedupe_key))
    cur = conn.execute("INSERT INTO outbox (dedupe_key, kind, patient_ref, payload_enc) VALUES (%s, %s, %s, %s)"
                       " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                       (dedupe_key, kind, patient_ref, blob))
    return lambda: cur.fetchone() is not None  # the insert trigger wakes the delivering workers (migration 0007)


def claim_due(conn: psycopg.Connection[Any], cipher: Cipher, limit: int) -> list[OutboxItem]:
    rows = conn.execute(
        "SELECT id, dedupe_key, kind, patient_ref, payload_enc, attempts, created_at FROM outbox"
        " WHERE status = 'pending' AND next_attempt_at <= now()"
        # Per-patient order: a row waits while an earlier row of the same patient is still pending.
        " AND NOT EXISTS (SELECT 1 FROM outbox earlier WHERE earlier.status = 'pending'"
        "   AND earlier.patient_ref = outbox.patient_ref AND earlier.id < outbox.id)"
        # Clinical writes first: an alert must never wait behind a batch of AuditEvents.
        " ORDER BY (kind = 'audit-export'), id LIMIT %s FOR UPDATE SKIP LOCKED",
        (limit,)).fetchall()
    return [OutboxItem(id=r[0], dedupe_key=r[1], kind=r[2], patient_ref=r[3],
                       payload=open_json(cipher, conn, r[4], _aad(r[1])), attempts=r[5], created_at=r[6])
            for r in rows]


def mark_sent(conn: psycopg.Connection[Any], item_id: int, result: dict[str, Any]) -> None:
    # clock_timestamp(): when this row's write reached the EHR, not when the delivering transaction began
    conn.execute("UPDATE outbox SET status = 'sent', sent_at = clock_timestamp(), attempts = attempts + 1,"
                 " result = %s, last_error = NULL WHERE id = %s", (json.dumps(result), item_id))


def backoff_s(attempts: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with jitter: 1, 2, 4 ... seconds, at most ``cap``."""
    delay: float = min(cap, base * (2 ** min(attempts, 16)))
    return delay * (0.5 + random.random() / 2)


def mark_failed(conn: psycopg.Connection[Any], item: OutboxItem, error: str, *, retryable: bool,
                max_attempts: int) -> str:
    """Schedule a retry, or park the row as dead (kept, visible, never silently dropped)."""
    attempts = item.attempts + 1
    dead = not retryable or attempts >= max_attempts
    when = datetime.now(UTC) + timedelta(seconds=backoff_s(attempts))
    conn.execute("UPDATE outbox SET attempts = %s, last_error = %s, next_attempt_at = %s, status = %s"
                 " WHERE id = %s", (attempts, error[:500], when, "dead" if dead else "pending", item.id))
    return "dead" if dead else "pending"


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {str(s): int(n) for s, n in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status")}
