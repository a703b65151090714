"""Integration fixtures: the real local EHR (Medplum's engine on Node) and the real service."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cds.demo import start_sandbox, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ehr:
    """The local EHR as tests see it: FHIR REST plus the sandbox's admin endpoints."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = f"{root}/fhir"
        self.http = requests.Session()

    def reset(self) -> None:
        self.http.post(f"{self.root}/admin/reset", timeout=10).raise_for_status()
        self.http.delete(f"{self.root}/admin/fault", timeout=10)

    def fault(self, **spec: Any) -> None:
        self.http.post(f"{self.root}/admin/fault", json=spec, timeout=10).raise_for_status()

    def clear_fault(self) -> None:
        self.http.delete(f"{self.root}/admin/fault", timeout=10)

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(f"{self.base}/{resource['resourceType']}", json=resource,
                           headers={"Content-Type": "application/fhir+json"}, timeout=10)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    def search(self, resource_type: str, **params: Any) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.base}/{resource_type}", params=params, timeout=10)
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]


@pytest.fixture(scope="session")
def ehr_server() -> Iterator[str]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="cds-sandbox-")) / "sandbox.log"
    proc: subprocess.Popen[bytes] = start_sandbox(port, log_path=log)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", 30, "the local EHR", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def ehr(ehr_server: str) -> Ehr:
    e = Ehr(ehr_server)
    e.reset()
    return e


@pytest.fixture(scope="session")
def engines() -> Any:
    """Rules, instruments and the text model, loaded once for the session (read-only)."""
    from cds.pipeline import Engines
    from cds.settings import Settings

    return Engines.load(Settings.from_env({}))


@pytest.fixture
def settings_env(db_url: str, ehr: Ehr, tmp_path: Path) -> dict[str, str]:
    return {"CDS_DATABASE_URL": db_url, "CDS_FHIR_BASE_URL": ehr.base, "CDS_DATA_DIR": str(tmp_path),
            "CDS_DEMO": "true", "CDS_POLL_INTERVAL_S": "0.5", "CDS_OUTBOX_INTERVAL_S": "0.5",
            "CDS_POLL_OVERLAP_S": "5"}


@pytest.fixture
def service(settings_env: dict[str, str], engines: Any) -> Iterator[Any]:
    from cds.service import Service
    from cds.settings import Settings

    svc = Service.start(Settings.from_env(settings_env), migrate=False, engines=engines, pool_size=4)
    yield svc
    svc.close()


@pytest.fixture
def client(service: Any) -> Any:
    from cds.web import create_app

    app = create_app(service, {"TESTING": True})
    return app.test_client()


@pytest.fixture
def api_key(service: Any) -> str:
    """A key of a registered API client (``cds clients add``): screening, push ingest, quarantine list."""
    from cds.store import clients

    with service.pool.connection() as conn:
        key = clients.add_client(conn, "test-client", "test")
        conn.commit()
    return key
