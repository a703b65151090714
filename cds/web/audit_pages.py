"""The compliance officer's console: search, verify and export the audit log; rule/model change
history; alert figures (the alert-fatigue signal).

These pages show audit data, never patient text: records hold references, codes and hashes by
construction (compliance.audit.record refuses text), and the figures are counts and durations.
Verifying and exporting are themselves audited (``audit.verify``, ``export``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from flask import Blueprint, Response, render_template, request

from cds.errors import InputError, NotFoundError
from cds.web import auth, page_read, read_detail, service
from cds.web.dashboard import user_tz
from compliance.ehr_export import export_status

bp = Blueprint("audit", __name__, url_prefix="/audit")

ROLES = ("compliance", "admin")
PAGE_SIZE = 50
EVENT_TYPES = ("rest.read", "rest.search", "login", "login.failed", "logout", "access.denied", "break-glass",
               "assessment", "assessment.accept", "assessment.override", "alert", "event", "fhir.write",
               "cdshooks.call", "config.change", "rule.change", "model.change", "erasure", "retention",
               "export", "key.rotate", "audit.verify")
CHANGE_TYPES = ("config.change", "rule.change", "model.change", "key.rotate")


def _user() -> auth.User:
    user = auth.current_user()
    assert user is not None
    return user


# -- filters ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    """What the officer asked for; dates are whole days in the user's zone (``to`` inclusive)."""

    patient: str = ""
    actor: str = ""
    event_type: str = ""
    from_date: date | None = None
    to_date: date | None = None

    def range(self, tz: ZoneInfo) -> tuple[datetime | None, datetime | None]:
        start = datetime.combine(self.from_date, time.min, tzinfo=tz) if self.from_date else None
        end = datetime.combine(self.to_date + timedelta(days=1), time.min, tzinfo=tz) if self.to_date else None
        return start, end

    def query(self) -> dict[str, str]:
        """The filter as query arguments (for paging and export links)."""
        q = {"patient": self.patient, "actor": self.actor, "type": self.event_type,
             "from": self.from_date.isoformat() if self.from_date else "",
             "to": self.to_date.isoformat() if self.to_date else ""}
        return {k: v for k, v in q.items() if v}


def _date(name: str) -> date | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InputError(f"{name} must be a date (YYYY-MM-DD)") from None


def filter_from_request() -> AuditFilter:
    return AuditFilter(patient=request.args.get("patient", "").strip()[:200],
                       actor=request.args.get("actor", "").strip()[:100],
                       event_type=request.args.get("type", "").strip()[:60],
                       from_date=_date("from"), to_date=_date("to"))


def checkpoint_cover(conn: psycopg.Connection[Any], seqs: list[int]) -> dict[int, tuple[int, datetime] | None]:
    """For each seq, the first signed checkpoint at or after it (which vouches for it through the
    chain), or None when no checkpoint has been signed since it was written."""
    if not seqs:
        return {}
    rows = conn.execute(
        "SELECT r.seq, c.seq, c.signed_at FROM unnest(%s::bigint[]) AS r(seq)"
        " LEFT JOIN LATERAL (SELECT seq, signed_at FROM audit_checkpoints WHERE seq >= r.seq ORDER BY seq"
        " LIMIT 1) c ON true", (seqs,)).fetchall()
    return {int(r[0]): (int(r[1]), r[2]) if r[1] is not None else None for r in rows}


# -- search -------------------------------------------------------------------------------------------


@bp.get("")
@auth.login_required(*ROLES)
def search() -> Any:
    """Newest first, PAGE_SIZE at a time (``before`` = the last seq of the previous page)."""
    from compliance import audit

    flt = filter_from_request()
    before = request.args.get("before", type=int)
    start, end = flt.range(user_tz())
    user = _user()
    def reads_of(reads: psycopg.Connection[Any]) -> tuple[Any, ...]:
        records = audit.search(reads, from_ts=start, to_ts=end, patient_ref=flt.patient or None,
                               actor=flt.actor or None, event_type=flt.event_type or None, before_seq=before,
                               limit=PAGE_SIZE + 1)
        cover = checkpoint_cover(reads, [r.seq for r in records[:PAGE_SIZE]])
        last_cp = reads.execute("SELECT seq, signed_at FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return records, cover, last_cp, export_status(reads)  # its head_seq is the chain's head (0: none yet)

    with service().pool.connection() as conn:
        (records, cover, last_cp, export), source = page_read(conn, reads_of)
        more = len(records) > PAGE_SIZE
        records = records[:PAGE_SIZE]
        audit.record(conn, event_type="rest.search", action="E", actor=user.actor, role=user.role,
                     purpose="HOPERAT", entity={"what": "audit_log", "count": len(records)},
                     detail={"page": "/audit", "patient_filter": bool(flt.patient), "actor": flt.actor or None,
                             "type": flt.event_type or None, "before": before, **read_detail(source)})
        conn.commit()
    return render_template("audit.html", records=records, cover=cover, flt=flt, before=before, more=more,
                           head=export.head_seq or None, last_cp=last_cp, export=export,
                           export_lag_s=export.lag_s(datetime.now(UTC)), event_types=EVENT_TYPES,
                           page_size=PAGE_SIZE)


@bp.get("/record/<int:seq>")
@auth.login_required(*ROLES)
def record_detail(seq: int) -> Any:
    """One record's chain position (seq, prev hash, hash), its content and its signature state."""
    from compliance import audit

    with service().pool.connection() as conn:
        found = audit.search(conn, before_seq=seq + 1, limit=1)
        if not found or found[0].seq != seq:
            raise NotFoundError(f"no audit record {seq}")
        rec = found[0]
        cover = checkpoint_cover(conn, [seq])[seq]
        cp = None
        if cover is not None:
            cp = conn.execute("SELECT seq, hash, signed_at, public_key_id FROM audit_checkpoints WHERE seq = %s",
                              (cover[0],)).fetchone()
    return render_template("audit_record.html", rec=rec, cp=cp,
                           canonical=audit.canonical_bytes(rec.hash_fields()).decode("utf-8"))


# -- verify -------------------------------------------------------------------------------------------


@bp.post("/verify")
@auth.login_required(*ROLES)
def verify() -> Any:
    """Re-walk the whole chain and its signed checkpoints; show ok or the first bad record. Audited."""
    from compliance import audit

    user = _user()
    with service().pool.connection() as conn:
        # On a replica it is the same chain, byte for byte, replayed at least up to this request.
        result, source = page_read(conn, audit.verify)
        audit.record(conn, event_type="audit.verify", action="E", actor=user.actor, role=user.role,
                     purpose="HOPERAT", outcome=0 if result.ok else 8,
                     detail={"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
                             "checkpoints_ok": result.checkpoints_ok, "trusted_keys": "database",
                             **read_detail(source)})
        conn.commit()
    return render_template("audit_verify.html", result=result, verified_at=datetime.now(UTC)), \
        (200 if result.ok else 409)


# -- export -------------------------------------------------------------------------------------------


def _export(fmt: str) -> Response:
    from compliance import audit, export

    flt = filter_from_request()
    start, end = flt.range(user_tz())
    user = _user()
    def reads_of(reads: psycopg.Connection[Any]) -> tuple[str, int]:
        if fmt == "fhir":
            import json

            bundle = export.export_fhir_bundle(reads, start, end, flt.patient or None)
            return json.dumps(bundle, ensure_ascii=False), len(bundle["entry"])
        body = export.export_csv(reads, start, end, flt.patient or None)
        return body, max(0, body.count("\r\n") - 1)

    mimetype, ext = ("application/fhir+json", "json") if fmt == "fhir" else ("text/csv", "csv")
    with service().pool.connection() as conn:
        (body, count), source = page_read(conn, reads_of)
        conn.commit()  # end the export's read (when it was on the primary) before the audit append takes its lock
        audit.record(conn, event_type="export", action="R", actor=user.actor, role=user.role, purpose="HOPERAT",
                     patient_ref=flt.patient or None,
                     entity={"what": "audit_log", "count": count, "format": fmt},
                     detail={"from": start.isoformat() if start else None, "to": end.isoformat() if end else None,
                             **read_detail(source)})
        conn.commit()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(body, mimetype=mimetype, headers={
        "Content-Disposition": f'attachment; filename="audit-{stamp}.{ext}"', "Cache-Control": "no-store"})


@bp.get("/export.json")
@auth.login_required(*ROLES)
def export_fhir() -> Any:
    """FHIR R4 Bundle of AuditEvents (IHE BALP) for the date range and patient filter."""
    return _export("fhir")


@bp.get("/export.csv")
@auth.login_required(*ROLES)
def export_csv() -> Any:
    """CSV of the same records (canonical entity/detail and both hashes per row)."""
    return _export("csv")


# -- rule and model change history ---------------------------------------------------------------------


@bp.get("/changes")
@auth.login_required(*ROLES)
def changes() -> Any:
    """Rule-set hashes/versions and model sha256 values seen in assessments over time, plus the
    audit records of configuration, rule, model and key changes."""
    from compliance import audit

    with service().pool.connection() as conn:
        rulesets = conn.execute(
            "SELECT ruleset_version, ruleset_hash, shadow, min(created_at), max(created_at), count(*)"
            " FROM assessments GROUP BY 1, 2, 3 ORDER BY min(created_at)").fetchall()
        models = conn.execute(
            "SELECT model_sha256, min(created_at), max(created_at), count(*) FROM assessments WHERE NOT shadow"
            " GROUP BY 1 ORDER BY min(created_at)").fetchall()
        records = sorted((r for kind in CHANGE_TYPES for r in audit.search(conn, event_type=kind, limit=100)),
                         key=lambda r: r.seq, reverse=True)[:100]
    return render_template("audit_changes.html", rulesets=rulesets, models=models, records=records)


# -- alert figures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleFigures:
    rule: str
    fired: int
    alerts: int
    accepted: int
    overridden: int
    reasons: dict[str, int]

    @property
    def override_rate(self) -> float | None:
        reviewed = self.accepted + self.overridden
        return self.overridden / reviewed if reviewed else None


def alert_figures(conn: psycopg.Connection[Any], start: datetime, end: datetime, tz: ZoneInfo) -> dict[str, Any]:
    """Alerts per day and per rule, time to acknowledge (median/p90), escalations, and per rule how
    often clinicians accepted or overrode and why. Counts and durations only: no patient text."""
    per_day = conn.execute(
        "SELECT (created_at AT TIME ZONE %s)::date AS d, count(*),"
        " count(*) FILTER (WHERE priority = 'stat'), count(*) FILTER (WHERE escalation_level > 0)"
        " FROM alerts WHERE created_at >= %s AND created_at < %s GROUP BY d ORDER BY d",
        (tz.key, start, end)).fetchall()
    ack = conn.execute(
        "SELECT priority, count(*), count(acknowledged_at),"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM acknowledged_at - created_at)),"
        " percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM acknowledged_at - created_at))"
        " FROM alerts WHERE created_at >= %s AND created_at < %s"
        " GROUP BY ROLLUP (priority)"
        " ORDER BY priority IS NULL, CASE priority WHEN 'stat' THEN 0 WHEN 'asap' THEN 1 WHEN 'urgent' THEN 2"
        " ELSE 3 END", (start, end)).fetchall()
    esc = conn.execute(
        "SELECT count(*), count(DISTINCT alert_id) FROM alert_transitions WHERE to_status = 'escalated'"
        " AND at >= %s AND at < %s", (start, end)).fetchone()
    fired = dict(conn.execute(
        "SELECT (f->>'id') || '@' || (f->>'version'), count(*) FROM assessments a,"
        " jsonb_array_elements(a.fired) f WHERE NOT a.shadow AND a.created_at >= %s AND a.created_at < %s"
        " GROUP BY 1", (start, end)).fetchall())
    alerts = dict(conn.execute(
        "SELECT (f->>'id') || '@' || (f->>'version'), count(DISTINCT al.id) FROM alerts al"
        " JOIN assessments a ON a.id = al.assessment_id, jsonb_array_elements(a.fired) f"
        " WHERE al.created_at >= %s AND al.created_at < %s GROUP BY 1", (start, end)).fetchall())
    reviews: dict[str, list[int]] = {}
    reasons: dict[str, dict[str, int]] = {}
    for rule, decision, code, n in conn.execute(
            "SELECT r, decision, reason_code, count(*) FROM assessment_overrides o, unnest(o.rule_ids) r"
            " WHERE o.at >= %s AND o.at < %s GROUP BY 1, 2, 3", (start, end)).fetchall():
        counts = reviews.setdefault(rule, [0, 0])
        counts[0 if decision == "accept" else 1] += int(n)
        if code:
            reasons.setdefault(rule, {})[code] = int(n)
    rules = sorted(set(fired) | set(alerts) | set(reviews))
    per_rule = [RuleFigures(r, int(fired.get(r, 0)), int(alerts.get(r, 0)), reviews.get(r, [0, 0])[0],
                            reviews.get(r, [0, 0])[1], reasons.get(r, {})) for r in rules]
    per_rule.sort(key=lambda f: (-f.alerts, -f.fired, f.rule))
    unreviewed = conn.execute(
        "SELECT count(*) FROM assessment_overrides WHERE at >= %s AND at < %s AND cardinality(rule_ids) = 0",
        (start, end)).fetchone()
    return {"per_day": per_day, "ack": ack, "escalations": esc[0] if esc else 0,
            "escalated_alerts": esc[1] if esc else 0, "per_rule": per_rule,
            "reviews_without_rules": unreviewed[0] if unreviewed else 0}


@bp.get("/figures")
@auth.login_required(*ROLES)
def figures() -> Any:
    """Alert figures for a date range (default: the last 30 days in the user's zone)."""
    tz = user_tz()
    flt = filter_from_request()
    today = datetime.now(tz).date()
    flt = AuditFilter(from_date=flt.from_date or today - timedelta(days=29), to_date=flt.to_date or today)
    start, end = flt.range(tz)
    assert start is not None and end is not None
    with service().pool.connection() as conn:
        figs = alert_figures(conn, start, end, tz)
    return render_template("audit_figures.html", figs=figs, flt=flt)
