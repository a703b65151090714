"""Flask application factory: no work at import time, one blueprint per audience."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg
from flask import Flask

from cds.service import Service
from cds.settings import Settings
from cds.store.replica import ReadSource, read_connection
from cds.web.json_bodies import StorableJSONProvider

log = logging.getLogger(__name__)


def _secret_key(settings: Settings) -> bytes:
    path = settings.secret_key_file
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    path.write_bytes(key)
    path.chmod(0o600)
    return key


def create_app(service: Service | None = None, test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.json = StorableJSONProvider(app)  # request bodies: JSON whose strings PostgreSQL and the audit can keep
    if service is None:
        service = Service.start(Settings.from_env())
    settings = service.settings
    app.config.update(SECRET_KEY=_secret_key(settings), CDS_LOCALE=settings.default_locale,
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=settings.public_base_url.startswith("https://"),
                      MAX_CONTENT_LENGTH=2 * 1024 * 1024)
    if test_config:
        app.config.update(test_config)
    app.extensions["cds"] = service

    from cds.web import api, auth, i18n, outcomes, screen, triage

    outcomes.init_app(app)
    i18n.init_app(app)
    auth.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(triage.bp)
    from integrations.cdshooks import web as cdshooks
    from integrations.fhir import subscriptions

    app.register_blueprint(cdshooks.bp)
    app.register_blueprint(subscriptions.bp)
    app.register_blueprint(screen.bp)
    from cds.web import audit_pages, dashboard, smart_launch

    app.register_blueprint(dashboard.bp)
    app.register_blueprint(audit_pages.bp)
    app.register_blueprint(smart_launch.bp)

    @app.after_request
    def _say_read_source(response: Any) -> Any:
        from flask import g

        source = g.get("read_source")
        if source is not None:
            response.headers[READ_SOURCE_HEADER] = source.name
        return response

    @app.get("/")
    def index() -> Any:
        """Each role lands on its own page."""
        from flask import redirect, url_for

        user = auth.current_user()
        if user is None:
            return redirect(url_for("auth.login"))
        home = {"compliance": "audit.search", "psychiatrist": "dashboard.patients"}.get(user.role, "triage.queue")
        return redirect(url_for(home) if home in app.view_functions else url_for("triage.queue"))

    return app


def service() -> Service:
    from flask import current_app

    svc: Service = current_app.extensions["cds"]
    return svc


READ_SOURCE_HEADER = "X-CDS-Read-Source"  # "replica" or "primary": where the page's patient data was read


T = TypeVar("T")


def page_read(conn: psycopg.Connection[Any], read: Callable[[psycopg.Connection[Any]], T]) -> tuple[T, ReadSource]:
    """``read`` (a page's reads, nothing else) on the replica when one is configured and has caught up with
    ``conn`` (cds.store.replica), else on ``conn``; with where it ran, remembered for the response header.

    A replica that fails in the middle (replay cancelled the query in a recovery conflict, the connection
    was lost) is left: ``read`` runs again on ``conn``, so the page is served from the primary, not a 500."""
    from flask import g

    svc = service()
    with read_connection(conn, svc.read_pool, svc.settings.read_replica_wait_s) as (reads, source):
        g.read_source = source
        if reads is conn:
            return read(conn), source
        try:
            return read(reads), source
        except psycopg.OperationalError as exc:  # includes query cancelled and serialization failure
            failed = f"replica read failed ({exc.__class__.__name__})"
    log.warning("a page's read on the replica failed; read on the primary", extra={"reason": failed})
    source = ReadSource("primary", failed)
    g.read_source = source
    return read(conn), source


def read_detail(source: ReadSource) -> dict[str, Any]:
    """Where a page's data was read, for its audit record; nothing where no replica is configured."""
    if not source.replica_configured:
        return {}
    return {"read_from": source.name, **({"replica_skipped": source.reason} if source.reason else {})}
