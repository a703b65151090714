"""Reads for the pages from a PostgreSQL streaming replica (``CDS_DATABASE_READ_URL``), never staler than
the primary was when the page was asked for.

A page first asks the primary for its current WAL position (one cheap query on the connection it writes
its audit record on anyway), then takes a replica connection and reads there only once the replica has
replayed at least that far. So everything committed before the request, in any process on any host, is
on the page: the alert a worker raised a moment ago, the review the psychiatrist just saved, a
break-glass grant, an erasure. A replica that is behind for longer than ``CDS_READ_REPLICA_WAIT_S``,
down, unreachable or not a replica at all (promoted, or the wrong URL) is not used: the page reads the
primary, and says which it read (``ReadSource``) for its response header and its audit record.

What stays on the primary: the patient page's access check, every write (audit records, reviews,
acknowledgements) and the nurses' triage queue, whose acknowledge and escalate actions need the current
state of the row they change. The patient list's ward and break-glass filter is part of its query and runs
on the replica, which has every grant and revocation committed before the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

POLL_S = 0.01  # how often a page re-asks a replica that is behind


@dataclass(frozen=True)
class ReadSource:
    """Where a page's reads were made: ``"replica"`` or ``"primary"``, and why not the replica (None when
    it was used, or when none is configured)."""

    name: str
    reason: str | None = None
    replica_configured: bool = True


PRIMARY = ReadSource("primary", replica_configured=False)


def open_read_pool(url: str, *, max_size: int = 4) -> ConnectionPool:
    """The replica pool of one process. It connects on demand, in the background: a process that serves
    no pages (a worker) never connects, and a replica that is down at start-up delays nothing (pages
    read the primary until it is back)."""
    from cds.store.db import open_pool

    return open_pool(url, min_size=0, max_size=max_size, name="cds-read", wait=False, connect_timeout=5)


@contextmanager
def read_connection(primary: psycopg.Connection[Any], pool: ConnectionPool | None,
                    wait_s: float) -> Iterator[tuple[psycopg.Connection[Any], ReadSource]]:
    """A connection for a page's reads and where it points: the replica once it has replayed everything
    the primary had written when this was called, else ``primary`` itself.

    ``primary`` is the connection the page also writes on; it is used as it is (its transaction goes on).
    """
    if pool is None:
        yield primary, PRIMARY
        return
    row = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
    assert row is not None
    conn, reason = _caught_up(pool, str(row[0]), wait_s)
    if conn is None:
        log.info("pages read the primary", extra={"reason": reason})
        yield primary, ReadSource("primary", reason)
        return
    try:
        yield conn, ReadSource("replica")
    finally:
        try:
            conn.rollback()  # reads only: nothing to keep, and the snapshot ends here
        except psycopg.Error:
            pass  # a broken connection: the pool discards it
        pool.putconn(conn)


def _caught_up(pool: ConnectionPool, lsn: str, wait_s: float) -> tuple[psycopg.Connection[Any] | None, str | None]:
    """A replica connection whose server has replayed ``lsn``, or (None, why not)."""
    deadline = time.monotonic() + wait_s
    try:
        conn = pool.getconn(timeout=max(wait_s, 0.05))
    except PoolTimeout:
        return None, "replica unreachable"
    try:
        while True:
            row = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() >= %s::pg_lsn",
                               (lsn,)).fetchone()
            conn.rollback()  # the page's first read starts a new snapshot, taken after the replay checked here
            assert row is not None
            if not row[0]:
                reason = "the read URL is not a replica (not in recovery)"
                break
            if row[1]:
                return conn, None
            if time.monotonic() >= deadline:
                reason = f"replica behind the primary for more than {wait_s:g} s"
                break
            time.sleep(POLL_S)
    except psycopg.Error as exc:
        reason = f"replica unavailable ({exc.__class__.__name__})"
    pool.putconn(conn)
    return None, reason
