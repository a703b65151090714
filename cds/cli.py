"""The ``cds`` command: serve, worker, demo, db, assess, and the subsystem groups."""

from __future__ import annotations

import json
import os
import signal
import threading
from datetime import UTC
from pathlib import Path
from typing import Any

import click

from cds.errors import CdsError
from cds.settings import Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except CdsError as exc:
        raise click.ClickException(str(exc)) from exc


def _configure_logging() -> None:
    from compliance.logscrub import configure_logging

    configure_logging(json=os.environ.get("CDS_LOG_FORMAT", "json") == "json")


class _Group(click.Group):
    """Turns every CdsError into one clear line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CdsError as exc:
            raise click.ClickException(f"{exc.__class__.__name__}: {exc}") from exc


@click.group(cls=_Group)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """psych-cds: clinical decision support for mental-health risk supervision."""
    settings = _settings()
    from cds.store.db import database_url

    ctx.obj = {"settings": settings, "db_url": lambda: database_url(settings)}


@cli.command()
@click.option("--workers", default=lambda: int(os.environ.get("CDS_WEB_WORKERS", "2")), show_default="2")
@click.option("--dev", is_flag=True, help="Flask's development server instead of gunicorn.")
def serve(workers: int, dev: bool) -> None:
    """Serve the web pages and APIs (gunicorn; stateless, as many processes as you like)."""
    _configure_logging()
    settings = _settings()
    from cds.store.db import database_url, migrate

    url = database_url(settings)
    migrate(url)
    os.environ["CDS_DATABASE_URL"] = url  # every gunicorn worker joins the same database
    if dev:
        from cds.web import create_app

        create_app().run(host=settings.host, port=settings.port, threaded=True)
        return
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", 4)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", None)
            self.cfg.set("graceful_timeout", 10)

        def load(self) -> Any:  # in each gunicorn worker process, after the fork
            from cds import gc_pacing
            from cds.web import create_app

            gc_pacing.start(settings.gc_freeze_s, settings.gc_sweep_s)
            return create_app()

    _App().run()


@cli.command()
def worker() -> None:
    """Run the pipeline worker: poll feeds, assess, deliver write-backs, scheduled jobs."""
    _configure_logging()
    from cds import gc_pacing
    from cds.jobs import build_scheduler, wake_on_notify
    from cds.service import Service

    service = Service.start(_settings())
    if service.settings.claim_affinity_s > 0:
        from cds.store.affinity import ClaimAffinity

        service.pipeline.affinity = ClaimAffinity(service.db_url, service.settings.claim_affinity_s)
    gc_pacing.start(service.settings.gc_freeze_s, service.settings.gc_sweep_s)
    scheduler = build_scheduler(service)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scheduler.start()
    threading.Thread(target=wake_on_notify, args=(service, scheduler, stop), name="wake", daemon=True).start()
    click.echo(f"worker running against {service.settings.fhir_base_url}", err=True)
    stop.wait()
    scheduler.shutdown(wait=True)
    service.close()


@cli.group()
def db() -> None:
    """Database: migrations and connection string."""


@db.command("migrate")
@click.pass_obj
def db_migrate(obj: dict[str, Any]) -> None:
    """Apply pending SQL migrations."""
    from cds.store.db import migrate

    applied = migrate(obj["db_url"]())
    click.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@db.command("url")
@click.pass_obj
def db_url(obj: dict[str, Any]) -> None:
    """Print the connection string of the database in use (starts the embedded one if needed)."""
    click.echo(obj["db_url"]())


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def assess(obj: dict[str, Any], path: Path) -> None:
    """Score one FHIR resource or Bundle offline (no database, no EHR) and print JSON."""
    from cds.offline import assess_file

    settings: Settings = obj["settings"]
    try:
        result = assess_file(path, settings)
    except CdsError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, ensure_ascii=False, indent=2))


@cli.command()
@click.option("--no-seed", is_flag=True, help="Start the local EHR empty.")
def demo(no_seed: bool) -> None:
    """Everything on one machine: embedded PostgreSQL, the local EHR with synthetic patients,
    the web service and the worker. Ctrl-C stops it all."""
    from cds.demo import run_demo

    run_demo(_settings(), seed=not no_seed)


@cli.group()
def clients() -> None:
    """Screening-API clients (chatbots, counsellor consoles)."""


@clients.command("add")
@click.argument("name")
@click.option("--actor", default=lambda: os.environ.get("USER", "admin"), show_default="$USER")
@click.pass_obj
def clients_add(obj: dict[str, Any], name: str, actor: str) -> None:
    """Create a client and print its API key once (only its SHA-256 is stored)."""
    from cds.store import clients as store
    from cds.store.db import connect, migrate
    from compliance import audit

    url = obj["db_url"]()
    migrate(url)
    with connect(url) as conn:
        key = store.add_client(conn, name, actor)
        audit.record(conn, event_type="config.client.add", action="C", actor=actor, entity={"client": name})
        conn.commit()
    click.echo(key)
    click.echo(f"API key for {name!r}: shown once, store it in the client's secret store.", err=True)


@clients.command("revoke")
@click.argument("name")
@click.option("--actor", default=lambda: os.environ.get("USER", "admin"), show_default="$USER")
@click.pass_obj
def clients_revoke(obj: dict[str, Any], name: str, actor: str) -> None:
    """Revoke a client's key."""
    from cds.store import clients as store
    from cds.store.db import connect
    from compliance import audit

    with connect(obj["db_url"]()) as conn:
        if not store.revoke_client(conn, name):
            raise click.ClickException(f"no active client named {name!r}")
        audit.record(conn, event_type="config.client.revoke", action="U", actor=actor, entity={"client": name})
        conn.commit()
    click.echo(f"revoked {name}")


@cli.group()
def oncall() -> None:
    """The on-call roster that escalations go to."""


@oncall.command("set")
@click.argument("role", type=click.Choice(["nurse", "charge_nurse", "supervisor", "psychiatrist"]))
@click.argument("practitioner")
@click.option("--name", "display", required=True, help="Name shown to staff.")
@click.option("--phone")
@click.option("--hours", default=12.0, show_default=True, help="Shift length from now.")
@click.option("--actor", default=lambda: os.environ.get("USER", "admin"), show_default="$USER")
@click.pass_obj
def oncall_set(obj: dict[str, Any], role: str, practitioner: str, display: str, phone: str | None, hours: float,
               actor: str) -> None:
    """Put PRACTITIONER (Practitioner/<id>) on call for ROLE from now for --hours."""
    from datetime import datetime, timedelta

    from cds.alerts import set_oncall
    from cds.store.db import connect
    from compliance import audit

    now = datetime.now(UTC)
    with connect(obj["db_url"]()) as conn:
        entry = set_oncall(conn, role=role, practitioner_ref=practitioner, display=display, phone=phone,
                           starts_at=now, ends_at=now + timedelta(hours=hours), actor=actor)
        audit.record(conn, event_type="config.oncall", action="C", actor=actor,
                     entity={"oncall_id": entry, "role": role, "practitioner": practitioner})
        conn.commit()
    click.echo(f"{display} ({practitioner}) is on call as {role} for {hours:g} h")


@oncall.command("list")
@click.pass_obj
def oncall_list(obj: dict[str, Any]) -> None:
    """Who is on call now and next, by role (staff names, no patient data)."""
    from datetime import datetime

    from cds.alerts import roster
    from cds.store.db import connect

    with connect(obj["db_url"]()) as conn:
        entries = roster(conn, datetime.now(UTC))
    if not entries:
        click.echo("nobody is on call: escalations go to the care team only")
    for e in entries:
        click.echo(f"{e['role']:<13} {e['display']} ({e['practitioner_ref']}) "
                   f"{e['starts_at']:%Y-%m-%d %H:%M} - {e['ends_at']:%Y-%m-%d %H:%M} UTC")


def _register_optional_groups() -> None:
    """Subsystem command groups live beside their code."""
    from cds.nlp.commands import classify_command, model_group
    from cds.triage.commands import rules
    from compliance.commands import audit, keys, patient
    from integrations.fhir.smart import jwks_command

    keys.add_command(jwks_command)  # `cds keys jwks`: the public keys to register with the EHR
    for command in (rules, model_group, classify_command, audit, keys, patient):
        cli.add_command(command)


_register_optional_groups()


def main() -> None:
    cli(prog_name="cds")


if __name__ == "__main__":
    main()
