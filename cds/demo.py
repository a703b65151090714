"""``cds demo``: the whole system on one machine, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import click
import requests

from cds.errors import ConfigError
from cds.settings import REPO_ROOT, Settings
from cds.store.db import migrate, start_embedded

SANDBOX = REPO_ROOT / "integrations" / "sandbox"


def wait_for(url: str, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"{what} exited with status {proc.returncode} while starting")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise ConfigError(f"{what} did not answer at {url} within {timeout_s:.0f} s")


def start_sandbox(port: int, *, seed: Path | None = None, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    node = shutil.which("node")
    if node is None:
        raise ConfigError("node (Node.js 20) is needed for the local EHR; install it or set CDS_FHIR_BASE_URL")
    if not (SANDBOX / "node_modules").exists():
        raise ConfigError("the local EHR's npm packages are missing: run `make deps` (npm ci in integrations/sandbox)")
    cmd = [node, str(SANDBOX / "server.mjs"), "--port", str(port)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


DEMO_ACCOUNTS = (("zhou.min", "周敏", "nurse", "Practitioner/prac-zhou-min"),
                 ("whitfield", "Dr Sarah Whitfield", "psychiatrist", "Practitioner/prac-whitfield"),
                 ("wang.hua", "王华", "supervisor", None),
                 ("chen.audit", "陈审计", "compliance", None),
                 ("admin", "Administrator", "admin", None))


def create_demo_accounts(url: str, record: Path) -> list[tuple[str, str, str]]:
    """One account per role with a fresh random password each demo run (printed, never reused)."""
    import secrets

    from cds.store.db import connect
    from cds.web.auth import create_user

    created = []
    with connect(url) as conn:
        for username, display, role, practitioner in DEMO_ACCOUNTS:
            password = "-".join(secrets.token_hex(3) for _ in range(3))
            create_user(conn, username=username, display=display, role=role, password=password,
                        wards=("*",) if role in ("psychiatrist", "supervisor") else ("ward5",),
                        practitioner_ref=practitioner)
            created.append((username, role, password))
        conn.commit()
    record.write_text("".join(f"{r}\t{u}\t{p}\n" for u, r, p in created), encoding="utf-8")
    record.chmod(0o600)
    return created


def run_demo(settings: Settings, *, seed: bool = True) -> None:
    os.environ["CDS_DEMO"] = "true"
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    click.echo("starting embedded PostgreSQL ...")
    url = settings.database_url or start_embedded(settings.data_dir / "pg")
    migrate(url)
    accounts = create_demo_accounts(url, settings.data_dir / "demo-accounts.txt")
    env = {**os.environ, "CDS_DATABASE_URL": url, "CDS_DEMO": "true"}
    children: list[subprocess.Popen[bytes]] = []
    fhir = urlparse(settings.fhir_base_url)
    try:
        if fhir.hostname in ("127.0.0.1", "localhost"):
            click.echo(f"starting the local EHR on {settings.fhir_base_url} ...")
            seed_file = SANDBOX / "seed" / "demo-patients.json" if seed else None
            sandbox = start_sandbox(fhir.port or 8090, seed=seed_file, log_path=logs / "sandbox.log")
            children.append(sandbox)
            wait_for(f"{fhir.scheme}://{fhir.netloc}/healthz", 30, "the local EHR", sandbox)
        cds = [sys.executable, "-m", "cds.cli"]
        click.echo("starting the service and its worker ...")
        web = subprocess.Popen([*cds, "serve"], env=env, stdout=open(logs / "web.log", "ab"),
                               stderr=subprocess.STDOUT)
        children.append(web)
        children.append(subprocess.Popen([*cds, "worker"], env=env, stdout=open(logs / "worker.log", "ab"),
                                         stderr=subprocess.STDOUT))
        base = f"http://{settings.host}:{settings.port}"
        wait_for(f"{base}/healthz", 60, "the web service", web)
        click.echo("")
        click.echo("psych-cds demo is running:")
        click.echo(f"  nurse triage queue   {base}/triage")
        click.echo(f"  health               {base}/healthz")
        click.echo(f"  local EHR (FHIR R4)  {settings.fhir_base_url}")
        click.echo(f"  database             {url}")
        click.echo(f"  logs                 {logs}")
        click.echo("Demo sign-in (one account per role; also in var/demo-accounts.txt):")
        for username, role, password in accounts:
            click.echo(f"  {role:<13} {username:<10} {password}")
        click.echo("Press Ctrl-C to stop everything.")
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        while not stop["now"]:
            for child in children:
                if child.poll() is not None:
                    what = " ".join(str(a) for a in child.args) if isinstance(child.args, list) else str(child.args)
                    raise ConfigError(f"a demo process exited ({what}, status {child.returncode}); see {logs}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping ...")
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        click.echo("stopped.")
