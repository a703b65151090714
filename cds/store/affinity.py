"""Claim affinity: each worker prefers one share of the patients, so a patient's messages keep going to
the worker that already holds that conversation's analysis in memory.

Why: a chat message is assessed with the eight before it (cds.nlp: each earlier message alone, the window
of them, the joint safety-net scan). Whatever a worker assessed itself it finds in its caches; a message
another worker assessed it must analyse again. With two workers claiming in plain id order, each message
was analysed about twice (once by each worker): 15.7% more instructions per message in the worker
(callgrind, bench/affinity notes in the CHANGELOG), and more with more workers.

How, with PostgreSQL alone (no membership service of our own):
- A worker takes a slot: a session advisory lock ``(SLOT_LOCK_CLASS, slot)`` for the lowest free slot,
  on a connection of its own that lives as long as the worker. A worker that dies loses its connection,
  and with it the lock, at once.
- Every ``REFRESH_S`` it reads the granted slot locks of this database from ``pg_locks``: ``members`` is
  their number, ``rank`` its own position among them.
- ``claim_pending`` then takes only events whose patient hashes to its rank (``hashtext(patient_ref)``
  modulo ``members``), and any event that has waited ``steal_after_s`` or longer, oldest first, whoever
  its patient belongs to. So an idle, slow, stuck or newly dead worker's patients wait at most that long
  before anyone takes them; in a backlog deeper than that every worker claims in plain id order.
- Alone, without a slot, or when the database cannot say: no preference (``share()`` is None).

Ordering and exactly-once are unchanged: claims still lock rows with SKIP LOCKED, and a patient's events
are still serialised by the patient's row lock, whichever worker claims them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

log = logging.getLogger(__name__)

SLOT_LOCK_CLASS = 0x0CD5_0A0F  # advisory lock (key1, key2) = (this, slot): pg_locks classid / objid, objsubid 2
MAX_SLOTS = 1024
REFRESH_S = 2.0


@dataclass(frozen=True)
class Share:
    """This worker's share: events whose patient hashes to ``rank`` modulo ``members``, and any event that
    has waited ``steal_after_s``."""

    rank: int
    members: int
    steal_after_s: float


class ClaimAffinity:
    """A worker's slot and share. ``share()`` is cheap: it asks PostgreSQL at most every ``refresh_s``."""

    def __init__(self, url: str, steal_after_s: float, *, refresh_s: float = REFRESH_S) -> None:
        self._url = url
        self._steal_after_s = steal_after_s
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._slot: int | None = None
        self._share: Share | None = None
        self._checked = float("-inf")

    @property
    def slot(self) -> int | None:
        return self._slot

    def share(self) -> Share | None:
        with self._lock:
            if time.monotonic() - self._checked >= self._refresh_s:
                self._checked = time.monotonic()
                try:
                    self._share = self._read_share()
                except Exception as exc:  # noqa: BLE001 - a preference only: it must never stop a worker claiming
                    # The slot's connection is gone (PostgreSQL restarted, a network cut): so is its lock.
                    # No preference until a slot is taken again at the next refresh.
                    log.warning("claim affinity off until the database answers again",
                                extra={"error": exc.__class__.__name__})
                    self._drop()
                    self._share = None
            return self._share

    def _read_share(self) -> Share | None:
        if self._conn is None or self._conn.closed:
            self._take_slot()
        assert self._conn is not None
        if self._slot is None:
            return None
        held = [int(r[0]) for r in self._conn.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY objid",
            (SLOT_LOCK_CLASS,))]
        if self._slot not in held or len(held) < 2:
            return None
        return Share(rank=held.index(self._slot), members=len(held), steal_after_s=self._steal_after_s)

    def _take_slot(self) -> None:
        from cds.store.db import connect

        self._drop()
        conn = connect(self._url)
        conn.autocommit = True
        self._conn = conn
        # The lowest free slot, in one statement: the first slot whose lock this session gets.
        row = conn.execute(
            "SELECT s FROM generate_series(0, %s) AS s WHERE pg_try_advisory_lock(%s, s) LIMIT 1",
            (MAX_SLOTS - 1, SLOT_LOCK_CLASS)).fetchone()
        self._slot = int(row[0]) if row else None
        if self._slot is not None:
            log.info("claim affinity slot taken", extra={"slot": self._slot})

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # ends the session, which releases its slot lock
            except psycopg.Error:
                pass
        self._conn = None
        self._slot = None

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._share = None
