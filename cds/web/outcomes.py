"""Every failure becomes a FHIR OperationOutcome in one place (like Medplum's outcomes.ts)."""

from __future__ import annotations

from typing import Any

import psycopg
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from cds.errors import CdsError

_HTTP_ISSUE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               409: "conflict", 412: "conflict", 413: "too-costly", 415: "not-supported", 429: "throttled"}


def operation_outcome(status: int, code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics[:1000]}]}


def outcome_response(status: int, code: str, diagnostics: str) -> Response:
    response = jsonify(operation_outcome(status, code, diagnostics))
    response.status_code = status
    response.mimetype = "application/fhir+json"
    return response


def _wants_html() -> bool:
    if request.path.startswith(("/api/", "/fhir", "/cds-services", "/healthz")):
        return False
    return request.accept_mimetypes.accept_html


def init_app(app: Flask) -> None:
    @app.errorhandler(CdsError)
    def _cds_error(exc: CdsError) -> Any:
        if _wants_html() and exc.http_status in (403, 404, 409):
            from flask import render_template

            return render_template("error.html", status=exc.http_status, message=str(exc)), exc.http_status
        retry_after = getattr(exc, "retry_after_s", None)
        response = outcome_response(exc.http_status, exc.issue_code, str(exc) if exc.http_status < 500
                                    or retry_after is not None else exc.__class__.__name__)
        if retry_after is not None:  # a message of ours, without PHI, that tells the client what to do
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        # Werkzeug's own headers (Allow on a 405, which RFC 9110 requires), not its HTML content type.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        if _wants_html():
            from flask import render_template

            return render_template("error.html", status=status, message=exc.description), status, headers
        response = outcome_response(status, _HTTP_ISSUE.get(status, "exception"), exc.description or exc.name)
        response.headers.extend(headers)
        return response

    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError) -> Any:
        # JSON nested thousands of levels deep exhausts the parser: the request is bad, not the server.
        return outcome_response(400, "invalid", "the JSON body is nested too deeply")

    @app.errorhandler(psycopg.OperationalError)
    def _database_unavailable(exc: psycopg.OperationalError) -> Any:
        # Disk full, database restarting, connections exhausted: the request was not stored and may be
        # sent again (idempotent), which is what 503 + Retry-After tells a client. Never a "no risk".
        from cds.storage_health import is_storage_error, storage_failed

        if is_storage_error(exc):
            storage_failed(exc)
            message = "the database cannot store data (disk full); nothing was stored or assessed: retry later"
        else:
            app.logger.error("database unavailable: %s", exc.__class__.__name__)
            message = "the database is unavailable; nothing was stored or assessed: retry later"
        response = outcome_response(503, "transient", message)
        response.headers["Retry-After"] = "30"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        app.logger.exception("unhandled error")
        return outcome_response(500, "exception", "internal error; see the service log")
