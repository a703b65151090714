"""The nurse's page: open alerts by priority and deadline, acknowledge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, g, jsonify, redirect, render_template, request, url_for

from cds.alerts import acknowledge, list_open
from cds.web import service

bp = Blueprint("triage", __name__, url_prefix="/triage")


def current_actor() -> str:
    # Sign-in and roles arrive with the pages issue; until then every action is recorded as this actor.
    return str(getattr(g, "user", None) or "demo-nurse")


@bp.get("")
def queue() -> Any:
    from compliance import audit

    svc = service()
    with svc.pool.connection() as conn:
        alerts = list_open(conn)
        audit.record(conn, event_type="rest.search", action="E", actor=current_actor(), role="nurse",
                     purpose="TREAT", entity={"what": "alerts", "count": len(alerts)},
                     detail={"page": "/triage"})
        conn.commit()
    now = datetime.now(UTC)
    if request.accept_mimetypes.best == "application/json":
        return jsonify([{"id": str(a.id), "patient": a.patient_ref, "tier": a.tier_label, "priority": a.priority,
                         "status": a.status, "kind": a.kind, "reason": a.reason,
                         "created_at": a.created_at.isoformat(), "due_at": a.due_at.isoformat()} for a in alerts])
    return render_template("triage.html", alerts=alerts, now=now)


@bp.post("/<alert_id>/ack")
def ack(alert_id: str) -> Any:
    from compliance import audit

    svc = service()
    with svc.pool.connection() as conn:
        alert = acknowledge(conn, alert_id, current_actor(), datetime.now(UTC))
        audit.record(conn, event_type="alert.acknowledge", action="U", actor=current_actor(), role="nurse",
                     patient_ref=alert.patient_ref, purpose="TREAT", entity={"alert_id": str(alert.id)})
        conn.commit()
    if request.accept_mimetypes.best == "application/json":
        return jsonify({"id": str(alert.id), "status": alert.status})
    return redirect(url_for("triage.queue"))
