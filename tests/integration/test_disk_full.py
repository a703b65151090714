"""The database's disk fills up: nothing is scored as "no risk", clients are told to retry (503
OperationOutcome), /healthz raises the storage alarm, events wait instead of being parked as failed,
and everything is assessed once space is back.

Real: PostgreSQL on a small tmpfs, really filled to the last byte. Needs permission to mount a tmpfs
(root in the CI container); where that is refused the test says so and skips.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.samples import chat

pytestmark = pytest.mark.integration

RISKY = "I have saved the pills and I will take them all tonight. "


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m,mode=1777", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()[:120]}): disk-full test not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def full_disk_service(small_disk: Path, ehr: Any, engines: Any, tmp_path: Path) -> Iterator[Any]:
    from cds.service import Service
    from cds.settings import Settings
    from cds.store.db import migrate, start_embedded, stop_embedded

    url = start_embedded(small_disk / "pg")
    migrate(url)
    env = {"CDS_DATABASE_URL": url, "CDS_FHIR_BASE_URL": ehr.base, "CDS_DATA_DIR": str(tmp_path / "data"),
           "CDS_DEMO": "true", "CDS_SCREEN_RATE_PER_MIN": "100000"}
    svc = Service.start(Settings.from_env(env), migrate=False, engines=engines, pool_size=4)
    try:
        yield svc
    finally:
        svc.close()
        stop_embedded(small_disk / "pg")


def _fill(disk: Path) -> Path:
    """Write zeros until the file system refuses one more byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_refused_loudly_and_nothing_is_lost(full_disk_service: Any, small_disk: Path,
                                                           ehr: Any) -> None:
    from cds.jobs import ingest_cycle
    from cds.store import clients
    from cds.web import create_app

    svc = full_disk_service
    with svc.pool.connection() as conn:
        key = clients.add_client(conn, "disk-bot", "test")
        conn.commit()
    client = create_app(svc, {"TESTING": True}).test_client()
    headers = {"Authorization": f"Bearer {key}"}
    message = RISKY + "x" * 60_000  # long: storing it must extend the table files
    ref = "Patient/" + ehr.create({"resourceType": "Patient", "name": [{"family": "Disk"}]})["id"]
    ehr.create(chat(ref, RISKY + "y" * 60_000, session="S-disk"))

    filler = _fill(small_disk)
    try:
        r = client.post("/api/v1/screen", json={"patient": "Patient/disk-1", "conversation": "c1",
                                                "message": message}, headers=headers)
        assert r.status_code == 503, r.data[:300]
        body = r.get_json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "transient"
        assert r.headers["Retry-After"]
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.get_json()["database"]["storage"]["code"] == "ops.storage_full"
        with pytest.raises(psycopg.errors.DiskFull):  # the poll cannot store the EHR's message: it stays in the EHR
            ingest_cycle(svc)
    finally:
        os.remove(filler)

    # Space is back: the same request is accepted and scored, the EHR's message is read and assessed.
    r = client.post("/api/v1/screen", json={"patient": "Patient/disk-1", "conversation": "c1", "message": message},
                    headers=headers)
    assert r.status_code == 200, r.data[:300]
    assert r.get_json()["tier"] in ("high", "imminent")
    ingest_cycle(svc)
    with svc.pool.connection() as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM events GROUP BY status").fetchall())
        tier = conn.execute("SELECT current_tier FROM patients WHERE patient_ref = %s", (ref,)).fetchone()
    assert statuses == {"done": 2}  # nothing parked as failed, nothing lost
    assert tier is not None and tier[0] >= 3
    assert client.get("/healthz").get_json()["database"].get("storage") is None
