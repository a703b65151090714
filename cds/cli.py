"""The ``cds`` command: serve, worker, demo, db, assess, and the subsystem groups."""

from __future__ import annotations

import json
import os
import signal
import threading
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

        def load(self) -> Any:
            from cds.web import create_app

            return create_app()

    _App().run()


@cli.command()
def worker() -> None:
    """Run the pipeline worker: poll feeds, assess, deliver write-backs, scheduled jobs."""
    _configure_logging()
    from cds.jobs import build_scheduler
    from cds.service import Service

    service = Service.start(_settings())
    scheduler = build_scheduler(service)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scheduler.start()
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


def _register_optional_groups() -> None:
    """Subsystem command groups live beside their code."""
    from cds.nlp.commands import classify_command, model_group
    from cds.triage.commands import rules
    from compliance.commands import audit, keys, patient

    for command in (rules, model_group, classify_command, audit, keys, patient):
        cli.add_command(command)


_register_optional_groups()


def main() -> None:
    cli(prog_name="cds")


if __name__ == "__main__":
    main()
