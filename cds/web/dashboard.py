"""The psychiatrist's pages: patients ranked by risk, and one patient's evidence, trend and review.

Everything shown is read from stored assessments (the pages never compute risk). Access is by need:
clinicians see the patients of their wards; anyone else, or a clinician from another ward, first
breaks the glass with a reason (audited, time-limited). Every patient page view, report and review is
audited. An override records the clinician's disagreement and feeds the rule figures on /audit; it
never lowers the patient's tier (only an alert resolution does, see cds.alerts.resolve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from flask import Blueprint, Response, redirect, render_template, request, url_for
from markupsafe import Markup

from cds.domain import Event, RiskTier
from cds.errors import CryptoError, ForbiddenError, InputError, NotFoundError
from cds.store.cipher import Cipher, open_json
from cds.store.events import CONTEXT_MESSAGES, event_aad
from cds.web import auth, page_read, read_detail, service
from cds.web.charts import GAD7_BANDS, PHQ9_BANDS, Point, trend_svg
from cds.web.i18n import MESSAGES, locale, t
from cds.web.report import (
    CJK_FONT_CANDIDATES,
    OVERRIDE_REASONS,
    AssessmentView,
    PdfText,
    assessment_patient,
    find_font,
    load_assessment,
    load_assessments,
    record_review,
    render_pdf,
)

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")

LIST_ROLES = ("psychiatrist", "nurse", "supervisor", "admin")
REVIEW_ROLES = ("psychiatrist",)
MAX_PATIENTS = 500


# -- time in the user's zone ----------------------------------------------------------------------


def user_tz() -> ZoneInfo:
    """The zone pages show times in (Settings.timezone, default Asia/Shanghai)."""
    return ZoneInfo(service().settings.timezone)


@bp.app_template_filter("localtime")
def localtime(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A stored UTC instant as wall-clock time in the user's zone."""
    if value is None:
        return "—"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(user_tz()).strftime(fmt)


@bp.app_context_processor
def _time_zone_context() -> dict[str, Any]:
    return {"user_tz_name": service().settings.timezone}


def local_midnight(now: datetime, tz: ZoneInfo) -> datetime:
    return datetime.combine(now.astimezone(tz).date(), time.min, tzinfo=tz)


def _user() -> auth.User:
    user = auth.current_user()
    assert user is not None  # every view here is behind login_required
    return user


# -- the patient list ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientRow:
    patient_ref: str
    ward: str | None
    tier: RiskTier
    tier_since: datetime
    last_assessed: datetime | None
    updated_at: datetime
    open_alerts: int
    unacknowledged: int
    break_glass: bool


@dataclass(frozen=True)
class PatientFilter:
    ward: str | None = None
    min_tier: RiskTier | None = None
    unacknowledged: bool = False
    changed_since: datetime | None = None


def visible_patients(conn: psycopg.Connection[Any], user: auth.User, now: datetime,
                     flt: PatientFilter) -> list[PatientRow]:
    """Patients this user may see (own wards; anyone with a live break-glass grant), highest tier
    first, then most recently assessed. Same rule as auth.can_see_patient, in one query."""
    clinical = user.role in auth.CLINICAL_ROLES
    where = ["((%(clinical)s AND (%(all)s OR p.ward = ANY(%(wards)s))) OR bg.patient_ref IS NOT NULL)"]
    params: dict[str, Any] = {"clinical": clinical, "all": user.sees_all_wards(), "wards": list(user.wards),
                              "uid": user.id, "now": now, "limit": MAX_PATIENTS}
    if flt.ward:
        where.append("p.ward = %(ward)s")
        params["ward"] = flt.ward
    if flt.min_tier is not None:
        where.append("p.current_tier >= %(tier)s")
        params["tier"] = int(flt.min_tier)
    if flt.unacknowledged:
        where.append("al.unacked > 0")
    if flt.changed_since is not None:
        where.append("(p.updated_at >= %(since)s OR p.tier_since >= %(since)s)")
        params["since"] = flt.changed_since
    rows = conn.execute(
        "SELECT p.patient_ref, p.ward, p.current_tier, p.tier_since, a.created_at, p.updated_at,"
        " COALESCE(al.open, 0), COALESCE(al.unacked, 0), bg.patient_ref IS NOT NULL"
        " FROM patients p LEFT JOIN assessments a ON a.id = p.last_assessment_id"
        " LEFT JOIN (SELECT patient_ref, count(*) AS open,"
        "   count(*) FILTER (WHERE acknowledged_at IS NULL) AS unacked"
        "   FROM alerts WHERE status <> 'resolved' GROUP BY patient_ref) al ON al.patient_ref = p.patient_ref"
        " LEFT JOIN (SELECT DISTINCT patient_ref FROM break_glass WHERE user_id = %(uid)s"
        "   AND expires_at > %(now)s) bg ON bg.patient_ref = p.patient_ref"
        f" WHERE {' AND '.join(where)}"
        " ORDER BY p.current_tier DESC, COALESCE(a.created_at, p.updated_at) DESC, p.patient_ref"
        " LIMIT %(limit)s", params).fetchall()
    return [PatientRow(r[0], r[1], RiskTier(int(r[2])), r[3], r[4], r[5], int(r[6]), int(r[7]), bool(r[8]))
            for r in rows]


def visible_wards(conn: psycopg.Connection[Any], user: auth.User) -> list[str]:
    if user.sees_all_wards() and user.role in auth.CLINICAL_ROLES:
        return [r[0] for r in conn.execute("SELECT DISTINCT ward FROM patients WHERE ward IS NOT NULL ORDER BY 1")]
    return sorted(w for w in user.wards if w != "*")


def _filter_from_request(now: datetime) -> PatientFilter:
    tier = request.args.get("tier", "")
    try:
        min_tier = RiskTier.from_label(tier) if tier else None
    except ValueError:
        raise InputError(f"unknown tier {tier[:20]!r}") from None
    return PatientFilter(ward=request.args.get("ward") or None, min_tier=min_tier,
                         unacknowledged=request.args.get("unack") == "1",
                         changed_since=local_midnight(now, user_tz()) if request.args.get("today") == "1" else None)


@bp.get("")
@auth.login_required(*LIST_ROLES)
def patients() -> Any:
    """The ranked list with filters; audited as a search (patient refs and tiers are shown)."""
    from compliance import audit

    user = _user()
    now = datetime.now(UTC)
    flt = _filter_from_request(now)
    with service().pool.connection() as conn:
        (rows, wards), source = page_read(conn, lambda reads: (visible_patients(reads, user, now, flt),
                                                               visible_wards(reads, user)))
        audit.record(conn, event_type="rest.search", action="E", actor=user.actor, role=user.role, purpose="TREAT",
                     entity={"what": "patients", "count": len(rows)},
                     detail={"page": "/dashboard", "ward": flt.ward, "min_tier": flt.min_tier.label if flt.min_tier
                             is not None else None, "unacknowledged": flt.unacknowledged,
                             "changed_today": flt.changed_since is not None, **read_detail(source)})
        conn.commit()
    return render_template("dashboard.html", rows=rows, wards=wards, flt=flt, tiers=[t_.label for t_ in RiskTier],
                           now=now)


# -- one patient -----------------------------------------------------------------------------------


@dataclass
class Message:
    """One Communication of the patient's chat, split into plain and highlighted segments."""

    event_id: int
    at: datetime | None
    text: str | None  # None: erased (crypto-shredded) or unreadable
    patient_authored: bool
    conversation: str | None
    ref: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)

    def segments(self) -> list[tuple[str, str | None]]:
        """(text, kinds) pieces in order; ``kinds`` None for unhighlighted text. Overlaps are merged."""
        if not self.text:
            return []
        merged: list[list[Any]] = []
        for start, end, kind in sorted(self.spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
                if kind not in merged[-1][2]:
                    merged[-1][2].append(kind)
            else:
                merged.append([start, end, [kind]])
        out: list[tuple[str, str | None]] = []
        pos = 0
        for start, end, kinds in merged:
            if start > pos:
                out.append((self.text[pos:start], None))
            shown = [k for k in kinds if k != "model_cue"] or kinds  # a risk kind outranks a model cue
            out.append((self.text[start:end], " ".join(shown)))
            pos = end
        if pos < len(self.text):
            out.append((self.text[pos:], None))
        return out


def _event_ref(source: str, rtype: str, rid: str, vid: str) -> str:
    from cds.pipeline import event_reference

    return event_reference(Event(source=source, resource_type=rtype, resource_id=rid, version_id=vid,
                                 patient_ref="", resource={}))


def load_transcript(conn: psycopg.Connection[Any], cipher: Cipher, patient_ref: str,
                    assessments: list[AssessmentView], limit: int = 500) -> list[Message]:
    """The patient's chat messages (decrypted), oldest first, with each assessment's evidence spans
    placed on the message they point into (refs ``<event ref>#<index in the model's context>``)."""
    from integrations.fhir.mapping import communication_text, is_patient_authored, parse_instant

    rows = conn.execute(
        "SELECT id, source, resource_type, resource_id, version_id, conversation_id, source_updated, received_at,"
        " resource_enc FROM events WHERE patient_ref = %s AND resource_type = 'Communication'"
        " ORDER BY id LIMIT %s", (patient_ref, limit)).fetchall()
    messages: list[Message] = []
    for eid, source, rtype, rid, vid, conv, updated, received, blob in rows:
        ref = _event_ref(source, rtype, rid, vid)
        try:
            resource = open_json(cipher, conn, blob, event_aad(source, rtype, rid, vid))
        except CryptoError:
            messages.append(Message(eid, updated or received, None, True, conv, ref))
            continue
        sent = parse_instant(resource.get("sent")) if isinstance(resource.get("sent"), str) else None
        messages.append(Message(eid, sent or updated or received, communication_text(resource),
                                is_patient_authored(resource, patient_ref), conv, ref))
    by_event = {m.event_id: m for m in messages}
    for view in assessments:
        target = by_event.get(view.event_id) if view.event_id is not None else None
        if target is None:
            continue
        earlier = [m for m in messages if target.conversation and m.conversation == target.conversation
                   and m.event_id < target.event_id][-CONTEXT_MESSAGES:]  # the slice the pipeline read
        context = [m for m in earlier if m.patient_authored] + [target]
        for e in view.evidence:
            base, _, index = e.ref.partition("#")
            if base != target.ref:
                continue
            msg = context[int(index)] if index.isdigit() and int(index) < len(context) else target
            if msg.text is None or not (0 <= e.start < e.end <= len(msg.text)):
                continue
            if e.text and msg.text[e.start:e.end] != e.text:
                continue  # never highlight a span that does not say what the model saw
            msg.spans.append((e.start, e.end, e.kind))
    return messages


def trend_charts(views: list[AssessmentView]) -> dict[str, Markup]:
    """PHQ-9, GAD-7 and chat-risk trends as inline SVG with the published bands."""
    tz = user_tz()
    phq = [Point(v.when, s, (v.scores.get("phq9") or {}).get("band", "") or "")
           for v in views if (s := v.score("phq9")) is not None]
    gad = [Point(v.when, s, (v.scores.get("gad7") or {}).get("band", "") or "")
           for v in views if (s := v.score("gad7")) is not None]
    chat = [Point(v.when, round(v.probability * 100, 1), t("tier." + v.tier.label))
            for v in views if v.probability is not None]
    empty = t("dash.no_data")
    return {
        "phq9": trend_svg(phq, y_max=27, bands=PHQ9_BANDS, title=t("dash.trend_phq9"), tz=tz, empty_text=empty),
        "gad7": trend_svg(gad, y_max=21, bands=GAD7_BANDS, title=t("dash.trend_gad7"), tz=tz, empty_text=empty),
        "chat": trend_svg(chat, y_max=100, bands=((50, "50%"),), title=t("dash.trend_chat"), tz=tz,
                          empty_text=empty, unit="%"),
    }


def _patient_row(conn: psycopg.Connection[Any], patient_ref: str) -> tuple[Any, ...]:
    row = conn.execute("SELECT ward, current_tier, tier_since, updated_at FROM patients WHERE patient_ref = %s",
                       (patient_ref,)).fetchone()
    if row is None:
        raise NotFoundError(f"no patient {patient_ref[:80]} in psych-cds")
    return tuple(row)


def _ward_access(user: auth.User, ward: str | None) -> bool:
    return user.role in auth.CLINICAL_ROLES and (user.sees_all_wards() or (ward is not None and ward in user.wards))


def _check_access(conn: psycopg.Connection[Any], user: auth.User, patient_ref: str) -> Response | None:
    """None when allowed; else the audited 403 page offering break-glass."""
    try:
        auth.require_patient_access(conn, user, patient_ref, "TREAT")
    except ForbiddenError as exc:
        return Response(render_template("patient_denied.html", patient_ref=patient_ref, message=str(exc)), 403)
    return None


def _patient_page_data(conn: psycopg.Connection[Any], cipher: Cipher, patient_ref: str) -> tuple[Any, ...]:
    """What the patient page shows: (ward, tier, tier since, assessments, transcript, open alerts)."""
    ward, tier, tier_since, _updated = _patient_row(conn, patient_ref)
    views = load_assessments(conn, cipher, patient_ref)
    transcript = load_transcript(conn, cipher, patient_ref, views)
    open_alerts = conn.execute(
        "SELECT id, kind, status, priority, tier, created_at, due_at, reason FROM alerts"
        " WHERE patient_ref = %s AND status <> 'resolved' ORDER BY created_at DESC", (patient_ref,)).fetchall()
    return ward, tier, tier_since, views, transcript, open_alerts


@bp.get("/patient/<path:patient_ref>")
@auth.login_required()
def patient(patient_ref: str) -> Any:
    """Timeline, trends, transcript with evidence, fired rules and the review form; audited (rest.read)."""
    from compliance import audit

    user = _user()
    svc = service()
    with svc.pool.connection() as conn:
        denied = _check_access(conn, user, patient_ref)  # who may see whom: decided on the primary
        if denied is not None:
            return denied
        (ward, tier, tier_since, views, transcript, open_alerts), source = page_read(
            conn, lambda reads: _patient_page_data(reads, svc.cipher, patient_ref))
        audit.record(conn, event_type="rest.read", action="R", actor=user.actor, role=user.role,
                     patient_ref=patient_ref, purpose="TREAT" if _ward_access(user, ward) else "ETREAT", outcome=0,
                     entity={"what": patient_ref, "assessments": len(views),
                             "messages": len(transcript)},
                     detail={"page": "dashboard.patient", **read_detail(source)})
        conn.commit()
    return render_template("patient.html", patient_ref=patient_ref, ward=ward, tier=RiskTier(int(tier)),
                           tier_since=tier_since, views=views, charts=trend_charts(views), transcript=transcript,
                           open_alerts=open_alerts, reasons=OVERRIDE_REASONS,
                           can_review=user.role in REVIEW_ROLES, saved=request.args.get("saved"))


@bp.post("/break-glass")
@auth.login_required()
def break_glass() -> Any:
    """Grant time-limited access to one patient for a stated reason (audited), then open the page."""
    user = _user()
    patient_ref = request.form.get("patient_ref", "").strip()[:200]
    reason = request.form.get("reason", "")
    if not patient_ref:
        raise InputError("which patient?")
    with service().pool.connection() as conn:
        auth.grant_break_glass(conn, user, patient_ref, reason)
        conn.commit()
    return redirect(url_for("dashboard.patient", patient_ref=patient_ref))


@bp.post("/assessment/<int:assessment_id>/review")
@auth.login_required(*REVIEW_ROLES)
def review(assessment_id: int) -> Any:
    """Accept an assessment, or override it with a coded reason and a comment (encrypted); audited."""
    user = _user()
    svc = service()
    with svc.pool.connection() as conn:
        patient_ref = assessment_patient(conn, assessment_id)
        denied = _check_access(conn, user, patient_ref)
        if denied is not None:
            return denied
        view = load_assessment(conn, svc.cipher, assessment_id)
        review_id = record_review(conn, svc.cipher, view, decision=request.form.get("decision", ""),
                                  reason_code=request.form.get("reason_code") or None,
                                  comment=request.form.get("comment", ""), actor=user.actor, role=user.role)
        conn.commit()
    return redirect(url_for("dashboard.patient", patient_ref=patient_ref, saved=review_id) + f"#a{assessment_id}")


# -- the printable report --------------------------------------------------------------------------


def _report_view(assessment_id: int, fmt: str) -> tuple[AssessmentView, str | None] | Response:
    from compliance import audit

    user = _user()
    svc = service()
    with svc.pool.connection() as conn:
        patient_ref = assessment_patient(conn, assessment_id)
        denied = _check_access(conn, user, patient_ref)
        if denied is not None:
            return denied
        ward = _patient_row(conn, patient_ref)[0]
        view = load_assessment(conn, svc.cipher, assessment_id)
        audit.record(conn, event_type="rest.read", action="R", actor=user.actor, role=user.role,
                     patient_ref=patient_ref, purpose="TREAT" if _ward_access(user, ward) else "ETREAT", outcome=0,
                     entity={"what": f"assessment/{assessment_id}", "assessment_id": assessment_id},
                     detail={"page": "dashboard.report", "format": fmt})
        conn.commit()
    return view, ward


@bp.get("/assessment/<int:assessment_id>/report")
@auth.login_required()
def report(assessment_id: int) -> Any:
    """The risk report for the chart: HTML with print CSS (the primary, complete copy)."""
    got = _report_view(assessment_id, "html")
    if isinstance(got, Response):
        return got
    view, ward = got
    return render_template("report.html", view=view, ward=ward, generated_at=datetime.now(UTC),
                           pdf_cjk=find_font(CJK_FONT_CANDIDATES) is not None)


PDF_LABELS = ("report_title", "patient", "ward", "observed_at", "assessed_at", "tier", "probability", "flags", "missing",
              "scores", "fired_rules", "no_rules", "source", "evidence", "erased", "no_evidence", "reviews",
              "no_reviews", "provenance", "ruleset", "model", "basis", "tier_note", "decision_support",
              "generated", "no_cjk_font")


def _label(key: str, loc: str) -> str:
    entry = MESSAGES.get("report." + key) or MESSAGES.get(key) or {}
    return entry.get(loc) or entry.get("en") or key


@bp.get("/assessment/<int:assessment_id>/report.pdf")
@auth.login_required()
def report_pdf(assessment_id: int) -> Any:
    """The same report as PDF (fpdf2). Chinese needs a CJK font on the server; else English + a note."""
    got = _report_view(assessment_id, "pdf")
    if isinstance(got, Response):
        return got
    view, ward = got
    cjk = locale() == "zh-CN" and find_font(CJK_FONT_CANDIDATES) is not None
    loc = "zh-CN" if cjk else "en"
    labels = {k: _label(k, loc) for k in PDF_LABELS}
    user = _user()
    names = {k: v.get(loc) or v["en"] for k, v in MESSAGES.items() if k.startswith(("flag.", "ev."))}
    text = PdfText(labels=labels, tier_name=MESSAGES["tier." + view.tier.label][loc], names=names, ward=ward or "—",
                   generated_by=f"{user.display} ({user.actor})")
    body = render_pdf(view, text, tz=user_tz(), generated_at=datetime.now(UTC))
    name = f"risk-report-{view.id}.pdf"
    return Response(body, mimetype="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "no-store"})
