"""Browser tests against the real stack, started once per session in this process:

- the local EHR (Medplum's FHIR engine on Node, a subprocess),
- a migrated PostgreSQL database (embedded, cloned from the session's migrated template),
- the Flask app served on a free localhost port by werkzeug's WSGI server in a thread,
- Debian's Chromium driven by Playwright for Python (never `playwright install`).

Tests share the stack, so each one makes its own patients and users and looks only at those.
On failure, a screenshot and the page HTML go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.integration.conftest import Ehr, free_port
from tests.samples import wait_until  # noqa: F401  (the browser tests import it from here)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("CDS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]
PASSWORD = "correct horse battery"
TABLET = {"width": 1180, "height": 820}  # a ward tablet in landscape




@dataclass
class Stack:
    """What a browser test can reach: the EHR, the service (database, pipeline) and the web address."""

    ehr: Ehr
    service: Any
    app: Any
    base_url: str

    def create_user(self, role: str, *, wards: tuple[str, ...] = ("ward5",)) -> str:
        from cds.web.auth import create_user

        username = f"{role}-{uuid.uuid4().hex[:6]}"
        with self.service.pool.connection() as conn:
            create_user(conn, username=username, display=username.replace("-", " ").title(), role=role,
                        password=PASSWORD, wards=wards)
            conn.commit()
        return username


@pytest.fixture(scope="session")
def e2e_ehr() -> Iterator[Ehr]:
    from cds.demo import start_sandbox, wait_for

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="cds-e2e-sandbox-")) / "sandbox.log"
    proc = start_sandbox(port, log_path=log)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", 30, "the local EHR", proc)
        ehr = Ehr(f"http://127.0.0.1:{port}")
        ehr.reset()
        yield ehr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def e2e_db_url(pg_server_url: str, pg_template: str) -> Iterator[str]:
    """One migrated database for the whole browser session."""
    name = "cds_e2e_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pg_template)))
    info = psycopg.conninfo.conninfo_to_dict(pg_server_url)
    info["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**info)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def stack(e2e_ehr: Ehr, e2e_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The service and its web app on a real WSGI server in a thread, on a free localhost port."""
    from werkzeug.serving import make_server

    from cds.pipeline import Engines
    from cds.service import Service
    from cds.settings import Settings
    from cds.web import create_app

    env = {"CDS_DATABASE_URL": e2e_db_url, "CDS_FHIR_BASE_URL": e2e_ehr.base,
           "CDS_DATA_DIR": str(tmp_path_factory.mktemp("cds-e2e")), "CDS_DEMO": "true", "CDS_POLL_OVERLAP_S": "5"}
    settings = Settings.from_env(env)
    service = Service.start(settings, migrate=False, engines=Engines.load(settings), pool_size=8)
    app = create_app(service, {"TRIAGE_POLL_SECONDS": 1})
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="cds-e2e-wsgi", daemon=True)
    thread.start()
    try:
        yield Stack(ehr=e2e_ehr, service=service, app=app, base_url=f"http://127.0.0.1:{port}")
    finally:
        server.shutdown()
        thread.join(timeout=10)
        service.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright (Playwright gives it a fresh temporary --user-data-dir)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    sync_api.expect.set_options(timeout=15_000)
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the test item, so the page fixture knows whether it failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def page(browser: Any, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (cookies, storage) per test, English-speaking, tablet-sized, touch."""
    context = browser.new_context(base_url=stack.base_url, locale="en-US", viewport=TABLET, has_touch=True)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.errors = errors
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        from playwright.sync_api import Error as PlaywrightError

        ARTIFACTS.mkdir(exist_ok=True)
        stem = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        try:
            pg.screenshot(path=f"{stem}.png", full_page=True)
            Path(f"{stem}.html").write_text(pg.content(), encoding="utf-8")
        except (PlaywrightError, OSError) as exc:  # the test already failed; say why the artefact is missing
            print(f"could not save failure artefacts: {exc}")
    context.close()


def sign_in(page: Any, username: str, password: str = PASSWORD) -> None:
    """Through the real sign-in form, as a person would."""
    page.goto("/auth/login")
    page.get_by_label(re.compile("User name|用户名")).fill(username)
    page.get_by_label(re.compile("Password|密码")).fill(password)
    page.get_by_role("button", name=re.compile("Sign in|登录")).click()
    page.wait_for_url(re.compile(r"/(triage|dashboard|audit)"))

