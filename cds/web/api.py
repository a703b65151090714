"""Machine-facing endpoints: health, ingest of FHIR resources, quarantine review."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, jsonify, request

from cds.errors import InputError
from cds.store import events as event_store
from cds.store import feeds, outbox
from cds.web import service
from compliance.ehr_export import export_status
from integrations.fhir.watchdog import active_alarms

bp = Blueprint("api", __name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The machine API's OpenAPI description (cds/web/openapi.yaml), read once."""
    with OPENAPI_PATH.open(encoding="utf-8") as f:
        document: dict[str, Any] = yaml.safe_load(f)
    return document


@bp.get("/healthz")
def healthz() -> Any:
    """Liveness and what an operator needs at a glance: database, EHR feeds, model, outbox."""
    svc = service()
    body: dict[str, Any] = {"status": "ok"}
    try:
        with svc.pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
            feed_states = feeds.all_feeds(conn)
            queue = outbox.counts(conn)
            pending = conn.execute("SELECT count(*) FROM events WHERE status = 'pending'").fetchone()
            alarms = [a.to_json() for a in active_alarms(conn)]
            export = export_status(conn)
        body["database"] = {"status": "ok"}
        body["audit_export"] = export.to_json(datetime.now(UTC))  # the EHR's copy of the audit log
        body["ehr_feed"] = {f.name: {"last_success_at": f.last_success_at, "last_event_at": f.last_event_at,
                                     "consecutive_failures": f.consecutive_failures, "last_error": f.last_error}
                            for f in feed_states}
        body["outbox"] = queue
        body["events_pending"] = pending[0] if pending else None
        body["alarms"] = alarms
        if any(f.consecutive_failures >= 3 for f in feed_states) or queue.get("dead") or body["alarms"]:
            body["status"] = "degraded"
    except Exception as exc:  # the health endpoint reports failure, it does not fail
        body["status"] = "error"
        body["database"] = {"status": "error", "error": exc.__class__.__name__}
    from cds.storage_health import storage_alarm

    storage = storage_alarm()  # reads still work on a full disk; writes do not
    if storage is not None:
        body["status"] = "error"
        body["database"] = {**body.get("database", {}), "status": "error", "storage": storage}
    model = svc.engines.text_model
    body["model"] = ({"status": "ok", "sha256": model.sha256, "provider": model.provider}
                     if model is not None else {"status": "unavailable", "fallback": "safety net only"})
    body["rules"] = {"version": svc.engines.ruleset.version, "hash": svc.engines.ruleset.hash}
    return jsonify(body), 200 if body["status"] != "error" else 503


def request_api_key() -> str | None:
    """The API key the request presents: Bearer or X-API-Key."""
    header = request.headers.get("Authorization", "")
    return header[7:] if header.lower().startswith("bearer ") else request.headers.get("X-API-Key")


def api_client(conn: Any = None) -> Any:
    """The calling integration, by its API key (``cds clients add``): Bearer or X-API-Key; 401 otherwise."""
    from cds.store import clients

    key = request_api_key()
    if conn is not None:
        return clients.authenticate(conn, key)
    with service().pool.connection() as own:
        return clients.authenticate(own, key)


@bp.post("/api/v1/events")
def post_event() -> Any:
    """Deliver one FHIR QuestionnaireResponse or Communication (push integrations, tests)."""
    caller = api_client()
    resource = request.get_json(silent=True, force=True)
    if resource is None:
        raise InputError("body must be a FHIR resource in JSON")
    result = service().pipeline.ingest(resource, source="api", actor=f"client:{caller.name}")
    if result.quarantine_id is not None:
        raise InputError(f"{result.reason} (kept in quarantine as #{result.quarantine_id})")
    return jsonify({"event": result.event_id, "duplicate": result.duplicate}), 200 if result.duplicate else 202


@bp.get("/api/v1/quarantine")
def quarantine() -> Any:
    api_client()
    with service().pool.connection() as conn:
        rows = event_store.list_quarantine(conn)
    return jsonify([{**r, "received_at": r["received_at"].isoformat(),
                     "reviewed_at": r["reviewed_at"].isoformat() if r["reviewed_at"] else None} for r in rows])


@bp.get("/api/v1/openapi.json")
def openapi() -> Any:
    """The OpenAPI description of the machine API, naming this instance's public address as its server."""
    return jsonify({**openapi_document(), "servers": [{"url": service().settings.public_base_url}]})
