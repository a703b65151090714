"""The psychiatrist's pages reading a real PostgreSQL streaming replica (CDS_DATABASE_READ_URL): never
staler than the primary when the page was asked for, and the primary whenever the replica is behind,
away or not a replica (real primary, real hot standby built with pg_basebackup, real local EHR)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cds.jobs import ingest_cycle
from tests.samples import chat, patient, sign_in

pytestmark = pytest.mark.integration

RISKY = "I have decided to kill myself. I bought the pills today."


def _service(settings_env: dict[str, str], engines: Any, read_url: str, wait_s: str = "5") -> Any:
    from cds.service import Service
    from cds.settings import Settings

    env = {**settings_env, "CDS_DATABASE_READ_URL": read_url, "CDS_READ_REPLICA_WAIT_S": wait_s}
    return Service.start(Settings.from_env(env), migrate=False, engines=engines, pool_size=4)


def _client(service: Any) -> Any:
    from cds.web import create_app

    return create_app(service, {"TESTING": True}).test_client()


@pytest.fixture
def replica_service(settings_env: dict[str, str], engines: Any, pg_replica: Any, db_url: str) -> Iterator[Any]:
    pg_replica.wait_for(db_url)  # this test's database, just created on the primary, exists there too
    svc = _service(settings_env, engines, pg_replica.url_for(db_url))
    yield svc
    svc.close()


def _risky_patient(ehr: Any, service: Any, mrn: str) -> str:
    ref = f"Patient/{ehr.create(patient(mrn=mrn))['id']}"
    ehr.create(chat(ref, RISKY, sent="2026-11-21T02:05:00Z"))
    ingest_cycle(service)  # assessed and alerted on the primary
    return ref


def _visible(html: str) -> str:
    """The page's text as read (evidence highlights split the message into elements)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _read_detail(service: Any, page: str) -> dict[str, Any]:
    with service.pool.connection() as conn:
        row = conn.execute("SELECT detail FROM audit_log WHERE detail->>'page' = %s ORDER BY seq DESC LIMIT 1",
                           (page,)).fetchone()
    assert row is not None
    return dict(row[0])


def _rows_read_on(url: str) -> int:
    """Rows this database has returned to queries on the server ``url`` points at (its own statistics)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute("SELECT tup_returned + tup_fetched FROM pg_stat_database"
                                " WHERE datname = current_database()").fetchall()[0][0])


def test_pages_read_the_replica_and_show_what_was_written_just_before(
        ehr: Any, replica_service: Any, pg_replica: Any, db_url: str) -> None:
    ref = _risky_patient(ehr, replica_service, "MRN-RR-1")
    client = _client(replica_service)
    sign_in(client, replica_service, "psychiatrist", wards=("ward5",))
    replica_url = pg_replica.url_for(db_url)
    before = _rows_read_on(replica_url)
    # No wait here: the page itself waits until the replica has what the primary had when it was asked.
    listing = client.get("/dashboard?lang=en")
    assert listing.status_code == 200
    assert listing.headers["X-CDS-Read-Source"] == "replica"
    assert f'data-patient="{ref}"' in listing.text
    page = client.get(f"/dashboard/patient/{ref}?lang=en")
    assert page.status_code == 200
    assert page.headers["X-CDS-Read-Source"] == "replica"
    assert "I bought the pills today" in _visible(page.text)  # decrypted from the replica's copy
    assert _rows_read_on(replica_url) > before  # the replica itself answered the pages' queries
    # The audit records went to the primary, and say where the patient data was read.
    assert _read_detail(replica_service, "/dashboard")["read_from"] == "replica"
    assert _read_detail(replica_service, "dashboard.patient")["read_from"] == "replica"


def test_a_page_waits_for_a_replica_that_is_catching_up(ehr: Any, replica_service: Any, pg_replica: Any) -> None:
    import threading

    client = _client(replica_service)
    sign_in(client, replica_service, "psychiatrist", wards=("ward5",))
    pg_replica.pause()
    try:
        ref = _risky_patient(ehr, replica_service, "MRN-RR-6")
        threading.Timer(0.5, pg_replica.resume).start()  # replay goes on while the page waits (up to 5 s)
        page = client.get(f"/dashboard/patient/{ref}?lang=en")
    finally:
        pg_replica.resume()
    assert page.status_code == 200
    assert page.headers["X-CDS-Read-Source"] == "replica"
    assert "I bought the pills today" in _visible(page.text)


def test_compliance_reads_search_verify_and_export_on_the_replica(ehr: Any, replica_service: Any,
                                                                 db_admin_url: str) -> None:
    _risky_patient(ehr, replica_service, "MRN-RR-7")  # audit records of an ingest and an alert
    client = _client(replica_service)
    sign_in(client, replica_service, "compliance")
    search = client.get("/audit?lang=en")
    assert search.status_code == 200 and search.headers["X-CDS-Read-Source"] == "replica"
    ok = client.post("/audit/verify?lang=en", data={"csrf_token": "test-csrf"})
    assert ok.status_code == 200 and "verify-ok" in ok.text
    assert ok.headers["X-CDS-Read-Source"] == "replica"
    # Tampered on the primary (triggers bypassed as a superuser can): the replica's walk, asked right
    # after, sees it, because the page reads only a replica that has replayed up to the request.
    with psycopg.connect(db_admin_url) as admin:
        admin.execute("SET session_replication_role = replica")
        admin.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
        admin.commit()
    bad = client.post("/audit/verify?lang=en", data={"csrf_token": "test-csrf"})
    assert bad.status_code == 409 and bad.headers["X-CDS-Read-Source"] == "replica"
    assert "record 2 was altered" in bad.text
    export = client.get("/audit/export.csv")
    assert export.status_code == 200 and export.headers["X-CDS-Read-Source"] == "replica"
    assert "mallory" in export.text
    with replica_service.pool.connection() as conn:
        runs = conn.execute("SELECT detail FROM audit_log WHERE event_type = 'audit.verify' ORDER BY seq").fetchall()
    assert [(r[0]["ok"], r[0]["read_from"]) for r in runs] == [(True, "replica"), (False, "replica")]


def test_a_replica_that_fails_in_the_middle_of_a_page_leaves_it_to_the_primary(
        ehr: Any, replica_service: Any, pg_replica: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica's backend is terminated while the page reads there (as a recovery conflict or a lost
    connection would end it): the page is read again on the primary and served, and the next one is
    back on the replica (the pool replaced the broken connection)."""
    from cds.web import dashboard

    ref = _risky_patient(ehr, replica_service, "MRN-RR-8")
    client = _client(replica_service)
    sign_in(client, replica_service, "psychiatrist", wards=("ward5",))
    original = dashboard.load_transcript
    cut: list[int] = []

    def cut_on_replica(conn: Any, *args: Any, **kwargs: Any) -> Any:
        if not cut and conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            cut.append(conn.info.backend_pid)
            with psycopg.connect(pg_replica.admin_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        return original(conn, *args, **kwargs)

    monkeypatch.setattr(dashboard, "load_transcript", cut_on_replica)
    page = client.get(f"/dashboard/patient/{ref}?lang=en")
    assert cut, "the page never read the replica"
    assert page.status_code == 200 and page.headers["X-CDS-Read-Source"] == "primary"
    assert "I bought the pills today" in _visible(page.text)
    assert "replica read failed" in _read_detail(replica_service, "dashboard.patient")["replica_skipped"]
    again = client.get(f"/dashboard/patient/{ref}?lang=en")
    assert again.status_code == 200 and again.headers["X-CDS-Read-Source"] == "replica"


def test_a_replica_that_is_behind_is_not_read(ehr: Any, settings_env: dict[str, str], engines: Any,
                                              pg_replica: Any, db_url: str) -> None:
    pg_replica.wait_for(db_url)
    service = _service(settings_env, engines, pg_replica.url_for(db_url), wait_s="0.3")
    client = _client(service)
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    pg_replica.pause()
    try:
        ref = _risky_patient(ehr, service, "MRN-RR-2")  # committed on the primary, not replayed
        listing = client.get("/dashboard?lang=en")
        assert listing.headers["X-CDS-Read-Source"] == "primary"
        assert f'data-patient="{ref}"' in listing.text  # never a stale page: the alert is there
        page = client.get(f"/dashboard/patient/{ref}?lang=en")
        assert page.status_code == 200 and "I bought the pills today" in _visible(page.text)
        detail = _read_detail(service, "dashboard.patient")
        assert detail["read_from"] == "primary"
        assert "behind" in detail["replica_skipped"]
    finally:
        pg_replica.resume()
        service.close()
    pg_replica.wait_for(db_url)


def test_a_replica_that_cannot_be_reached_is_not_read(ehr: Any, settings_env: dict[str, str], engines: Any,
                                                      db_url: str, tmp_path: Path) -> None:
    nowhere = psycopg.conninfo.make_conninfo(db_url, host=str(tmp_path))  # no server listens there
    service = _service(settings_env, engines, nowhere, wait_s="0.2")
    try:
        ref = _risky_patient(ehr, service, "MRN-RR-3")
        client = _client(service)
        sign_in(client, service, "psychiatrist", wards=("ward5",))
        listing = client.get("/dashboard?lang=en")
        assert listing.status_code == 200
        assert listing.headers["X-CDS-Read-Source"] == "primary"
        assert f'data-patient="{ref}"' in listing.text
        assert "unreachable" in _read_detail(service, "/dashboard")["replica_skipped"]
    finally:
        service.close()


def test_a_read_url_that_names_no_replica_is_not_read(ehr: Any, settings_env: dict[str, str], engines: Any,
                                                      db_url: str) -> None:
    service = _service(settings_env, engines, db_url)  # the primary itself, e.g. after a failover mix-up
    try:
        ref = _risky_patient(ehr, service, "MRN-RR-4")
        client = _client(service)
        sign_in(client, service, "psychiatrist", wards=("ward5",))
        page = client.get(f"/dashboard/patient/{ref}?lang=en")
        assert page.status_code == 200
        assert page.headers["X-CDS-Read-Source"] == "primary"
        assert "not a replica" in _read_detail(service, "dashboard.patient")["replica_skipped"]
    finally:
        service.close()


def test_without_a_read_url_pages_read_the_primary_and_say_nothing_of_replicas(
        ehr: Any, service: Any, client: Any) -> None:
    ref = _risky_patient(ehr, service, "MRN-RR-5")
    sign_in(client, service, "psychiatrist", wards=("ward5",))
    page = client.get(f"/dashboard/patient/{ref}?lang=en")
    assert page.headers["X-CDS-Read-Source"] == "primary"
    assert "read_from" not in _read_detail(service, "dashboard.patient")
