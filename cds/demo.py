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


def run_demo(settings: Settings, *, seed: bool = True) -> None:
    os.environ["CDS_DEMO"] = "true"
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    click.echo("starting embedded PostgreSQL ...")
    url = settings.database_url or start_embedded(settings.data_dir / "pg")
    migrate(url)
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
        click.echo("Press Ctrl-C to stop everything.")
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        while not stop["now"]:
            for child in children:
                if child.poll() is not None:
                    raise ConfigError(f"a demo process exited ({child.args[-1]}, status {child.returncode}); "
                                      f"see {logs}")
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
