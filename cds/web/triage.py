"""The nurse's page: open alerts by priority and deadline, acknowledge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, redirect, render_template, request, url_for

from cds.alerts import list_open
from cds.web import service
from cds.web.auth import current_user, login_required

bp = Blueprint("triage", __name__, url_prefix="/triage")


def current_actor() -> str:
    user = current_user()
    assert user is not None  # every view here is behind login_required
    return user.actor


@bp.get("")
@login_required("nurse", "supervisor", "psychiatrist")
def queue() -> Any:
    from compliance import audit

    svc = service()
    with svc.pool.connection() as conn:
        alerts = list_open(conn)
        audit.record(conn, event_type="rest.search", action="E", actor=current_actor(), role=current_user().role,
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
@login_required("nurse", "supervisor", "psychiatrist")
def ack(alert_id: str) -> Any:
    from cds.alerts.workflow import acknowledge_alert

    svc = service()
    user = current_user()
    assert user is not None
    with svc.pool.connection() as conn:
        alert = acknowledge_alert(conn, svc.cipher, svc.settings, alert_id, actor=user.actor, role=user.role,
                                  now=datetime.now(UTC))
        conn.commit()
    if request.accept_mimetypes.best == "application/json":
        return jsonify({"id": str(alert.id), "status": alert.status})
    return redirect(url_for("triage.queue"))
