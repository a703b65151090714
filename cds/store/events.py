"""Inbound events (idempotent on source id + version) and the quarantine for bad input."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from cds.domain import Event
from cds.errors import CryptoError
from cds.lru import Lru
from cds.store.affinity import Share
from cds.store.cipher import Cipher, open_json, seal_json
from compliance.crypto import SEAL_ID_BYTES


def event_aad(source: str, resource_type: str, resource_id: str, version_id: str) -> str:
    return f"events.resource|{source}|{resource_type}|{resource_id}|{version_id}"


@dataclass(frozen=True)
class StoredEvent:
    id: int
    event: Event
    attempts: int
    seal: bytes = b""  # its ciphertext's header and nonce, as read (a ContextCache key); empty when not read


def insert_event(conn: psycopg.Connection[Any], cipher: Cipher, event: Event) -> tuple[int, bool]:
    """Store the event once. Returns (event id, inserted); a duplicate delivery returns the first id."""
    blob = seal_json(cipher, conn, event.patient_ref, event.resource, event_aad(*event.key))
    row = conn.execute(
        "INSERT INTO events (source, resource_type, resource_id, version_id, patient_ref, conversation_id,"
        " source_updated, resource_enc) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (source, resource_type, resource_id, version_id) DO NOTHING RETURNING id",
        (*event.key, event.patient_ref, event.conversation_id, event.received_at, blob)).fetchone()
    if row is not None:
        return int(row[0]), True
    existing = conn.execute(
        "SELECT id FROM events WHERE source = %s AND resource_type = %s AND resource_id = %s AND version_id = %s",
        event.key).fetchone()
    assert existing is not None
    return int(existing[0]), False


_EVENT_COLUMNS = ("id, source, resource_type, resource_id, version_id, patient_ref, conversation_id,"
                  " source_updated, resource_enc, attempts")


def _load(conn: psycopg.Connection[Any], cipher: Cipher, row: Sequence[Any]) -> StoredEvent:
    (eid, source, rtype, rid, vid, patient, conv, updated, blob, attempts) = row
    resource = open_json(cipher, conn, blob, event_aad(source, rtype, rid, vid))
    return StoredEvent(id=eid, attempts=attempts, event=Event(
        source=source, resource_type=rtype, resource_id=rid, version_id=vid, patient_ref=patient,
        resource=resource, received_at=updated, conversation_id=conv), seal=bytes(blob[:SEAL_ID_BYTES]))


def load_event(conn: psycopg.Connection[Any], cipher: Cipher, event_id: int) -> StoredEvent | None:
    """One stored event, decrypted; None when there is none with that id."""
    row = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = %s", (event_id,)).fetchone()
    return _load(conn, cipher, row) if row is not None else None


RETRY_BASE_S = 5.0


def claim_pending(conn: psycopg.Connection[Any], cipher: Cipher, limit: int,
                  share: Share | None = None) -> list[StoredEvent]:
    """Lock up to ``limit`` pending events for this transaction; other workers skip them.

    The row locks last until the caller commits, so a worker that dies mid-batch releases its
    claim at once and another worker processes the events; nothing is claimed twice.

    With a ``share`` (cds.store.affinity), only the events of this worker's patients, and any event that
    has waited ``share.steal_after_s``; in id order (the order they were stored) either way.
    """
    if share is None:
        rows = conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'pending'"
            " AND (retry_at IS NULL OR retry_at <= now()) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,)).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE status = 'pending'"
            " AND (retry_at IS NULL OR retry_at <= now())"
            " AND ((hashtext(patient_ref) & 2147483647) %% %s = %s"
            "      OR received_at <= now() - make_interval(secs => %s))"
            " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (share.members, share.rank, share.steal_after_s, limit)).fetchall()
    claimed: list[StoredEvent] = []
    for row in rows:
        try:
            claimed.append(_load(conn, cipher, row))
        except CryptoError as exc:  # erased or tampered: park it, never block the queue
            mark_event(conn, int(row[0]), "failed", f"{exc.__class__.__name__}: cannot decrypt")
    return claimed


def known_versions(conn: psycopg.Connection[Any], source: str, resource_type: str,
                   keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which (id, versionId) pairs are already stored or quarantined: re-reads skip them cheaply."""
    if not keys:
        return set()
    ids = [k[0] for k in keys]
    versions = [k[1] for k in keys]
    rows = conn.execute(
        "SELECT resource_id, version_id FROM events WHERE source = %s AND resource_type = %s"
        " AND (resource_id, version_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " UNION SELECT resource_id, version_id FROM quarantine WHERE source = %s AND resource_type = %s"
        " AND (resource_id, version_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        (source, resource_type, ids, versions, source, resource_type, ids, versions)).fetchall()
    return {(str(r[0]), str(r[1])) for r in rows}


def newer_version_done(conn: psycopg.Connection[Any], stored: StoredEvent) -> bool:
    """True when a later version of the same resource was already assessed (newest state wins)."""
    return newer_version_done_deferred(conn, stored)()


def newer_version_done_deferred(conn: psycopg.Connection[Any], stored: StoredEvent) -> Callable[[], bool]:
    """``newer_version_done``, asked now and read when called (in pipeline mode the query shares the next
    round trip)."""
    ev = stored.event
    if ev.received_at is None:  # no version time to compare
        return lambda: False
    cur = conn.execute(
        "SELECT 1 FROM events WHERE source = %s AND resource_type = %s AND resource_id = %s AND id <> %s"
        " AND status = 'done' AND source_updated > %s LIMIT 1",
        (ev.source, ev.resource_type, ev.resource_id, stored.id, ev.received_at))
    return lambda: cur.fetchone() is not None


def mark_event(conn: psycopg.Connection[Any], event_id: int, status: str, error: str | None = None) -> None:
    # clock_timestamp(): this event's own time, not the start of the batch's transaction
    conn.execute("UPDATE events SET status = %s, processed_at = clock_timestamp(), last_error = %s,"
                 " attempts = attempts + 1 WHERE id = %s", (status, error, event_id))


def record_failure(conn: psycopg.Connection[Any], event_id: int, error: str, max_attempts: int) -> str:
    """Count a failed attempt; after ``max_attempts`` the event is parked as failed for review. Until then
    it waits RETRY_BASE_S * 2^(attempts - 1) seconds before a worker claims it again."""
    row = conn.execute(
        "UPDATE events SET attempts = attempts + 1, last_error = %s,"
        " retry_at = clock_timestamp() + make_interval(secs => %s * power(2, attempts)),"
        " status = CASE WHEN attempts + 1 >= %s THEN 'failed' ELSE status END WHERE id = %s RETURNING status",
        (error, RETRY_BASE_S, max_attempts, event_id)).fetchone()
    return str(row[0]) if row else "missing"


# Earlier messages of a conversation read with each new one: the slice the model assesses, whose indexes
# (evidence ``#i``) the nurse's and the psychiatrist's pages map back to messages, so all of them read this.
CONTEXT_MESSAGES = 8


class ContextCache:
    """What earlier chat messages of a conversation say (the text of a patient's message, None for anyone
    else's), by event and sealing. A worker reads a conversation's last ``CONTEXT_MESSAGES`` messages with
    each new one; with claim affinity (cds.store.affinity) it assessed them itself, and ``remember`` kept
    what they said then. An entry is served only while the cipher holds the message's data key live
    (``Cipher.sealed_by_live_key``), so an erasure reaches it as it reaches the key cache."""

    def __init__(self, maxsize: int = 32768) -> None:
        self._lru = Lru(maxsize)  # key -> (text,): a 1-tuple, so that a None text is not a miss

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: tuple[int, bytes]) -> tuple[bool, str | None]:
        held: tuple[str | None] | None = self._lru.get(key)
        return (False, None) if held is None else (True, held[0])

    def remember(self, stored: StoredEvent) -> None:
        """Keep what a message just read (claimed) says, for when it is the context of the next ones."""
        from integrations.fhir.mapping import patient_text

        ev = stored.event
        if stored.seal and ev.conversation_id and ev.resource_type == "Communication":
            self.put((stored.id, stored.seal), patient_text(ev.resource, ev.patient_ref))

    def put(self, key: tuple[int, bytes], text: str | None) -> None:
        self._lru.put(key, (text,))


def conversation_texts(conn: psycopg.Connection[Any], cipher: Cipher, stored: StoredEvent,
                       cache: ContextCache | None = None, limit: int = CONTEXT_MESSAGES) -> list[str]:
    """What the patient said in the earlier messages of the same conversation (oldest first), for
    conversation-level context."""
    return conversation_texts_deferred(conn, cipher, stored, cache, limit)()


def conversation_texts_deferred(conn: psycopg.Connection[Any], cipher: Cipher, stored: StoredEvent,
                                cache: ContextCache | None = None,
                                limit: int = CONTEXT_MESSAGES) -> Callable[[], list[str]]:
    """``conversation_texts``, asked now and read (and decrypted, where ``cache`` does not hold it) when
    called (in pipeline mode the query shares the next round trip)."""
    from integrations.fhir.mapping import patient_text

    ev = stored.event
    if not ev.conversation_id:
        return lambda: []
    cur = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE patient_ref = %s AND conversation_id = %s AND id < %s"
        " AND resource_type = 'Communication' ORDER BY id DESC LIMIT %s",
        (ev.patient_ref, ev.conversation_id, stored.id, limit))

    def text_of(row: Sequence[Any]) -> str | None:
        if cache is not None and cipher.sealed_by_live_key(row[8]):
            known, text = cache.get((int(row[0]), bytes(row[8][:SEAL_ID_BYTES])))
            if known:
                return text
        loaded = _load(conn, cipher, row)  # a Communication of this patient's conversation (the query's)
        text = patient_text(loaded.event.resource, ev.patient_ref)
        if cache is not None:
            cache.put((loaded.id, loaded.seal), text)  # what remember() would keep, without working it out again
        return text

    def read() -> list[str]:
        texts = [text_of(row) for row in reversed(cur.fetchall())]
        return [t for t in texts if t is not None]
    return read


def quarantine_input(conn: psycopg.Connection[Any], cipher: Cipher, *, source: str, payload: Any,
                     reason: str, resource_type: str | None = None, resource_id: str | None = None,
                     version_id: str | None = None, patient_ref: str | None = None) -> int:
    """Keep bad input for review, once per (source, type, id, version). Returns the quarantine id."""
    aad = f"quarantine.payload|{source}|{resource_type}|{resource_id}|{version_id}"
    # Keyed to the patient where the input names one, so erasing that patient shreds it too.
    blob = seal_json(cipher, conn, patient_ref or "quarantine", payload, aad)
    row = conn.execute(
        "INSERT INTO quarantine (source, resource_type, resource_id, version_id, reason, payload_enc)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (source, resource_type, resource_id, version_id) DO UPDATE SET reason = EXCLUDED.reason"
        " RETURNING id", (source, resource_type, resource_id, version_id, reason, blob)).fetchone()
    assert row is not None
    return int(row[0])


def list_quarantine(conn: psycopg.Connection[Any], limit: int = 100) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT id, received_at, source, resource_type, resource_id, reason, reviewed_at"
                        " FROM quarantine ORDER BY id DESC LIMIT %s", (limit,)).fetchall()
    keys = ("id", "received_at", "source", "resource_type", "resource_id", "reason", "reviewed_at")
    return [dict(zip(keys, r)) for r in rows]
