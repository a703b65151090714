"""The nurse's page: open alerts of the user's wards by priority and deadline, with the evidence behind
each one, what to do next, the crisis lines to use, and the buttons to act.

Every action goes through ``cds.alerts.workflow`` (transition + Task mirror to the EHR + audit, one
transaction). Patient text is shown only to clinicians who care for the patient, and each display is
audited as ``rest.read``. New alerts reach an open page by polling ``/triage/feed`` (no PHI text,
ETag-conditional so an unchanged queue costs a 304 and no audit record) and fetching the card of
each new or changed alert (``/triage/<id>/card``, audited like the page).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from flask import Blueprint, Response, current_app, jsonify, redirect, render_template, request, url_for

from cds.alerts import Alert, get_alert, list_open, load_policy, transitions
from cds.domain import Signal
from cds.errors import InputError
from cds.web import service
from cds.web.auth import User, current_user, login_required, require_patient_access
from cds.web.evidence import Segment, highlight
from cds.web.i18n import locale, t

bp = Blueprint("triage", __name__, url_prefix="/triage")

CLINICIANS = ("nurse", "supervisor", "psychiatrist")
# What "start" records as the action taken (audited with the transition; see start_alert).
START_ACTIONS = ("call", "one_to_one", "refer")
# Why a nurse escalates by hand: codes, so that no free text (possibly PHI) lands in the audit log.
ESCALATE_REASONS = ("cannot_reach_patient", "needs_psychiatrist", "patient_unsafe", "no_capacity", "other")
DEFAULT_POLL_SECONDS = 5
# When spans overlap, the more specific warning sign names the highlight.


def _user() -> User:
    user = current_user()
    assert user is not None  # every view here is behind login_required
    return user


def current_actor() -> str:
    return _user().actor


# -- access by need -------------------------------------------------------------------------------


def visible_alerts(conn: psycopg.Connection[Any], user: User, alerts: Sequence[Alert], now: datetime) -> list[Alert]:
    """The alerts whose patient the user may see: the set form of ``auth.can_see_patient`` (patients of
    the user's wards, or a live break-glass grant), in one query instead of one per alert."""
    if user.sees_all_wards() or not alerts:
        return list(alerts)
    refs = sorted({a.patient_ref for a in alerts})
    rows = conn.execute(
        "SELECT patient_ref FROM patients WHERE patient_ref = ANY(%s) AND ward = ANY(%s)"
        " UNION SELECT patient_ref FROM break_glass WHERE user_id = %s AND patient_ref = ANY(%s) AND expires_at > %s",
        (refs, list(user.wards), user.id, refs, now)).fetchall()
    allowed = {str(r[0]) for r in rows}
    return [a for a in alerts if a.patient_ref in allowed]


def _audit_read(conn: psycopg.Connection[Any], user: User, alerts: Iterable[Alert], page: str) -> None:
    """One ``rest.read`` per patient whose message text the page shows (it is PHI)."""
    from compliance import audit

    seen: set[str] = set()
    for a in alerts:
        if a.patient_ref in seen:
            continue
        seen.add(a.patient_ref)
        audit.record(conn, event_type="rest.read", action="R", actor=user.actor, role=user.role,
                     patient_ref=a.patient_ref, purpose="TREAT",
                     entity={"alert_id": str(a.id), "assessment_id": a.assessment_id}, detail={"page": page})


# -- evidence ---------------------------------------------------------------------------------------




@dataclass(frozen=True)
class Message:
    segments: tuple[Segment, ...]
    latest: bool  # the message that raised the alert, as opposed to earlier context


@dataclass(frozen=True)
class Explanation:
    """What the page shows about why an alert exists (decrypted; PHI, never logged)."""

    messages: tuple[Message, ...] = ()
    answers: tuple[tuple[str, str], ...] = ()  # (question linkId, answer) for questionnaires
    kinds: tuple[str, ...] = ()  # evidence kinds present, for the legend
    fired: tuple[dict[str, Any], ...] = ()  # {id, version, title, trace}
    steps: tuple[str, ...] = ()
    model: str | None = None
    ruleset_version: str = ""
    assessed_at: datetime | None = None




def _event_messages(conn: psycopg.Connection[Any], cipher: Any, event_id: int) -> tuple[str, list[str]] | None:
    """(resource type, texts) of the assessed event: for a chat, the patient's earlier messages of the
    conversation and then this one, exactly as the pipeline assessed them (evidence ``#i`` indexes)."""
    from cds.store import events as event_store
    from integrations.fhir.mapping import communication_text

    stored = event_store.load_event(conn, cipher, event_id)
    if stored is None:
        return None
    if stored.event.resource_type != "Communication":
        return stored.event.resource_type, []
    return "Communication", [*event_store.conversation_texts(conn, cipher, stored),
                             communication_text(stored.event.resource)]


def _steps(actions: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """Suggested next steps in the user's language, from the fired rules' action params."""
    lang = "zh" if locale().startswith("zh") else "en"
    steps: list[str] = []
    for action in actions:
        params = action.get("params") or {}
        text = params.get("text")
        if action.get("kind") == "crisis_resources":
            step = t("step.crisis_resources")
        elif isinstance(text, dict) and (text.get(lang) or text.get("en")):
            step = str(text.get(lang) or text.get("en"))
        elif params.get("task"):
            key = f"task.{params['task']}"
            step = t(key) if t(key) != key else str(params["task"]).replace("_", " ")
        else:
            continue
        if step not in steps:
            steps.append(step)
    return tuple(steps)


def explain(conn: psycopg.Connection[Any], cipher: Any, alert: Alert) -> Explanation:
    """Decrypt the alert's assessment: highlighted evidence in the patient's own words, the rules that
    fired (plain-words traces) and the next steps they ask for."""
    if alert.assessment_id is None:
        return Explanation()
    from cds.store.assessments import load_signals

    row = conn.execute("SELECT event_id, fired, actions, model_sha256, ruleset_version, created_at"
                       " FROM assessments WHERE id = %s", (alert.assessment_id,)).fetchone()
    if row is None:
        return Explanation()
    event_id, fired, actions, model_sha, ruleset_version, assessed_at = row
    signals: list[Signal] = load_signals(conn, cipher, alert.assessment_id)
    evidence = {(e.ref, e.start, e.end, e.kind): e for s in signals for e in s.evidence}
    loaded = _event_messages(conn, cipher, int(event_id)) if event_id is not None else None
    texts = loaded[1] if loaded else []
    messages: list[Message] = []
    answers: list[tuple[str, str]] = []
    kinds: list[str] = []
    if texts:
        per_message: dict[int, list[tuple[int, int, str]]] = {}
        joined = any("#" not in e.ref for e in evidence.values() if e.end > e.start)
        if joined:  # degraded path: offsets into the whole conversation joined by newlines
            texts = ["\n".join(texts)]
        for e in evidence.values():
            if e.end <= e.start:
                continue
            index = len(texts) - 1
            if not joined:
                try:
                    index = int(e.ref.rsplit("#", 1)[1])
                except (IndexError, ValueError):
                    continue
            if 0 <= index < len(texts):
                per_message.setdefault(index, []).append((e.start, e.end, e.kind))
        for i, text in enumerate(texts):
            latest = i == len(texts) - 1
            if latest or i in per_message:
                messages.append(Message(highlight(text, per_message.get(i, [])), latest))
    for e in evidence.values():
        if e.kind == "answer" and e.text:
            answers.append((e.ref.removeprefix("linkId:"), e.text))
    for m in messages:
        for seg in m.segments:
            if seg.kind and seg.kind not in kinds:
                kinds.append(seg.kind)
    return Explanation(
        messages=tuple(messages), answers=tuple(dict.fromkeys(answers)), kinds=tuple(kinds),
        fired=tuple({"id": f.get("id"), "version": f.get("version"), "title": f.get("title", ""),
                     "trace": list(f.get("trace") or ())} for f in (fired or [])),
        steps=_steps(actions or []), model=str(model_sha)[:12] if model_sha else None,
        ruleset_version=str(ruleset_version or ""), assessed_at=assessed_at)


# -- what the page shows beside the alerts ---------------------------------------------------------


def crisis_resources() -> list[dict[str, Any]]:
    """The crisis lines of the hospital's country (the numbers must work where the patient is), named in
    the user's language; hours and notes only where the list is written in that language."""
    from cds.triage import load_crisis_resources

    region = service().settings.default_locale
    lang = "zh" if locale().startswith("zh") else "en"
    same_language = region.startswith(lang)
    return [{"name": r["name_zh"] if lang == "zh" else r["name_en"], "phone": r["phone"],
             "hours": r["hours"] if same_language else "", "note": r["note"] if same_language else ""}
            for r in load_crisis_resources(region)]


def resolutions() -> list[tuple[str, str]]:
    """(code, label in the user's language) for the coded resolutions of the escalation policy."""
    lang = "zh" if locale().startswith("zh") else "en"
    return [(r["code"], r.get(lang) or r.get("en") or r["code"]) for r in load_policy().resolutions]


def _poll_seconds() -> int:
    return int(current_app.config.get("TRIAGE_POLL_SECONDS", DEFAULT_POLL_SECONDS))


@dataclass(frozen=True)
class Card:
    alert: Alert
    why: Explanation = field(default_factory=Explanation)


def _feed_item(a: Alert) -> dict[str, Any]:
    """An alert as the queue's JSON: references and codes, never patient text."""
    return {"id": str(a.id), "patient": a.patient_ref, "tier": a.tier_label, "priority": a.priority,
            "status": a.status, "kind": a.kind, "reason": a.reason, "escalation_level": a.escalation_level,
            "created_at": a.created_at.isoformat(), "updated_at": a.updated_at.isoformat(),
            "due_at": a.due_at.isoformat(),
            "labels": {"priority": t(f"priority.{a.priority}"), "tier": t(f"tier.{a.tier_label}"),
                       "status": t(f"status.{a.status}")}}


def feed_etag(alerts: Sequence[Alert]) -> str:
    """Changes whenever an alert appears, leaves, or changes state (updated_at moves on every change)."""
    basis = json.dumps([[str(a.id), a.updated_at.isoformat()] for a in alerts])
    return hashlib.sha256(basis.encode()).hexdigest()[:32]


def _queue(conn: psycopg.Connection[Any], user: User, now: datetime) -> list[Alert]:
    return visible_alerts(conn, user, list_open(conn, limit=1000), now)


# -- pages and endpoints ----------------------------------------------------------------------------


@bp.get("")
@login_required(*CLINICIANS)
def queue() -> Any:
    """The queue, each alert with its evidence; JSON (``Accept: application/json``) lists the alerts."""
    from compliance import audit

    svc = service()
    user = _user()
    now = datetime.now(UTC)
    wants_json = request.accept_mimetypes.best == "application/json"
    with svc.pool.connection() as conn:
        alerts = _queue(conn, user, now)
        audit.record(conn, event_type="rest.search", action="E", actor=user.actor, role=user.role,
                     purpose="TREAT", entity={"what": "alerts", "count": len(alerts)}, detail={"page": "/triage"})
        cards = [] if wants_json else [Card(a, explain(conn, svc.cipher, a)) for a in alerts]
        if not wants_json:
            _audit_read(conn, user, alerts, "/triage")
        conn.commit()
    if wants_json:
        return jsonify([_feed_item(a) for a in alerts])
    return render_template("triage.html", cards=cards, etag=feed_etag(alerts), poll_seconds=_poll_seconds(),
                           resources=crisis_resources(), resolutions=resolutions(), start_actions=START_ACTIONS,
                           escalate_reasons=ESCALATE_REASONS)


@bp.get("/feed")
@login_required(*CLINICIANS)
def feed() -> Any:
    """What the open page polls: the visible alerts in queue order, no patient text. Conditional on
    ``If-None-Match``: an unchanged queue is a 304 (nothing disclosed, nothing audited)."""
    from compliance import audit

    svc = service()
    user = _user()
    with svc.pool.connection() as conn:
        alerts = _queue(conn, user, datetime.now(UTC))
        etag = feed_etag(alerts)
        if request.if_none_match.contains(etag):
            response = Response(status=304)
            response.set_etag(etag)
            return response
        audit.record(conn, event_type="rest.search", action="E", actor=user.actor, role=user.role,
                     purpose="TREAT", entity={"what": "alerts", "count": len(alerts)},
                     detail={"page": "/triage/feed"})
        conn.commit()
    response = jsonify({"etag": etag, "alerts": [_feed_item(a) for a in alerts]})
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-store"
    return response


def _load_for(conn: psycopg.Connection[Any], alert_id: str, purpose: str = "TREAT") -> Alert:
    """The alert, after checking (and on denial auditing) that the user cares for its patient."""
    alert = get_alert(conn, alert_id)
    require_patient_access(conn, _user(), alert.patient_ref, purpose)
    return alert


@bp.get("/<alert_id>/card")
@login_required(*CLINICIANS)
def card(alert_id: str) -> Any:
    """One alert's card (HTML fragment) for the open queue page to insert without reloading."""
    svc = service()
    user = _user()
    with svc.pool.connection() as conn:
        alert = _load_for(conn, alert_id)
        why = explain(conn, svc.cipher, alert)
        _audit_read(conn, user, [alert], "/triage/card")
        conn.commit()
    return render_template("triage_card.html", c=Card(alert, why), resolutions=resolutions(),
                           start_actions=START_ACTIONS, escalate_reasons=ESCALATE_REASONS,
                           next_url=url_for("triage.queue"))


@bp.get("/<alert_id>")
@login_required(*CLINICIANS)
def detail(alert_id: str) -> Any:
    """One alert: evidence, why, next steps, the timeline of every transition, and the actions."""
    svc = service()
    user = _user()
    with svc.pool.connection() as conn:
        alert = _load_for(conn, alert_id)
        why = explain(conn, svc.cipher, alert)
        timeline = _timeline(conn, alert)
        _audit_read(conn, user, [alert], "/triage/detail")
        conn.commit()
    if request.accept_mimetypes.best == "application/json":
        return jsonify({**_feed_item(alert), "timeline": [
            {"at": e["at"].isoformat(), "actor": e["actor"], "from": e["from"], "to": e["to"],
             "detail": e["detail"]} for e in timeline]})
    return render_template("alert.html", c=Card(alert, why), timeline=timeline, resources=crisis_resources(),
                           resolutions=resolutions(), start_actions=START_ACTIONS,
                           escalate_reasons=ESCALATE_REASONS, next_url=url_for("triage.detail", alert_id=alert.id))


def _timeline(conn: psycopg.Connection[Any], alert: Alert) -> list[dict[str, Any]]:
    """The alert's transitions, oldest first, with the action taken on each start (kept in the audit
    log by ``start_alert``)."""
    steps = transitions(conn, str(alert.id))
    started = [r[0] for r in conn.execute(
        "SELECT detail->>'action' FROM audit_log WHERE patient_ref = %s AND event_type = 'alert.start'"
        " AND entity->>'alert_id' = %s ORDER BY seq", (alert.patient_ref, str(alert.id)))]
    for step in steps:
        step["detail"] = dict(step["detail"] or {})
        if step["to"] == "in_progress" and started:
            step["detail"].setdefault("action", started.pop(0))
    return steps


# -- actions ---------------------------------------------------------------------------------------


def _done(alert: Alert) -> Any:
    """JSON for scripts, else back to the page the form came from (only pages of this blueprint)."""
    if request.accept_mimetypes.best == "application/json":
        return jsonify(_feed_item(alert))
    target = request.form.get("next", "")
    if not target.startswith("/triage") or "//" in target:
        target = url_for("triage.queue")
    return redirect(f"{target}#alert-{alert.id}" if target.rstrip("/") == "/triage" else target)


def _act(alert_id: str, do: Any) -> Any:
    svc = service()
    with svc.pool.connection() as conn:
        _load_for(conn, alert_id)
        alert = do(conn, svc)
        conn.commit()
    return _done(alert)


@bp.post("/<alert_id>/ack")
@login_required(*CLINICIANS)
def ack(alert_id: str) -> Any:
    """Acknowledge: the nurse has seen the alert (stops the escalation clock)."""
    from cds.alerts.workflow import acknowledge_alert

    user = _user()
    return _act(alert_id, lambda conn, svc: acknowledge_alert(
        conn, svc.cipher, svc.settings, alert_id, actor=user.actor, role=user.role, now=datetime.now(UTC)))


@bp.post("/<alert_id>/start")
@login_required(*CLINICIANS)
def start(alert_id: str) -> Any:
    """Start acting, saying how: a call, 1:1 observation or a referral."""
    from cds.alerts.workflow import start_alert

    action = request.form.get("action", "")
    if action not in START_ACTIONS:
        raise InputError(f"action must be one of {', '.join(START_ACTIONS)}")
    user = _user()
    return _act(alert_id, lambda conn, svc: start_alert(
        conn, svc.cipher, svc.settings, alert_id, actor=user.actor, role=user.role, now=datetime.now(UTC),
        action=action))


@bp.post("/<alert_id>/resolve")
@login_required(*CLINICIANS)
def resolve(alert_id: str) -> Any:
    """Resolve with a coded reason (the policy's list) and an optional note (stored encrypted)."""
    from cds.alerts.workflow import resolve_alert

    code = request.form.get("code", "")
    note = request.form.get("note", "").strip()[:2000]
    user = _user()
    return _act(alert_id, lambda conn, svc: resolve_alert(
        conn, svc.cipher, svc.settings, alert_id, actor=user.actor, role=user.role, now=datetime.now(UTC),
        code=code, note=note))


@bp.post("/<alert_id>/escalate")
@login_required(*CLINICIANS)
def escalate(alert_id: str) -> Any:
    """Escalate by hand, one step up the policy's path, with a coded reason (never free text)."""
    from cds.alerts.workflow import escalate_alert

    code = request.form.get("reason", "")
    if code not in ESCALATE_REASONS:
        raise InputError(f"reason must be one of {', '.join(ESCALATE_REASONS)}")
    reason = f"manual: {code}"
    user = _user()
    return _act(alert_id, lambda conn, svc: escalate_alert(
        conn, svc.cipher, svc.settings, alert_id, actor=user.actor, role=user.role, now=datetime.now(UTC),
        reason=reason))
