"""What one stored assessment says, for the patient page and the printable risk report (HTML and PDF).

The pages never compute risk: they read the stored assessment (tier, scores, fired rules with their
trace and sources, rule-set hash/version, model sha256) and decrypt its signals for the evidence
spans. Clinicians' reviews (accept / override with a coded reason) live in ``assessment_overrides``
(migration 0005); the free-text comment is encrypted under the patient's data key.

The PDF is written with fpdf2 (pure Python, embeds a TrueType subset). Chinese needs a CJK font on
the server (Debian: ``fonts-wqy-zenhei``); without one the PDF is in English and says that the HTML
report is the primary, complete copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from cds.domain import Evidence, FiredRule, RiskTier
from cds.errors import CryptoError, InputError, NotFoundError
from cds.store.assessments import load_signals
from cds.store.cipher import Cipher

#: Coded reasons a clinician may give for overriding an assessment (0005_overrides.sql checks the same).
OVERRIDE_REASONS = ("clinical-judgement-lower", "clinical-judgement-higher", "known-chronic",
                    "not-patient-statement", "false-positive-idiom", "data-error")
DECISIONS = ("accept", "override")
MAX_COMMENT = 2000

INSTRUMENT_NAMES = {"phq9": "PHQ-9", "gad7": "GAD-7", "phq2": "PHQ-2", "cssrs": "C-SSRS", "asq": "ASQ"}

#: TrueType fonts with Chinese glyphs that fpdf2 can embed, most preferred first.
CJK_FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
    Path("/usr/share/fonts/truetype/arphic/uming.ttc"),
)
LATIN_FONT_CANDIDATES = (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),)


@dataclass(frozen=True)
class Review:
    """A clinician's decision on an assessment. ``comment`` is None when it could not be decrypted."""

    id: int
    assessment_id: int
    decision: str
    reason_code: str | None
    comment: str | None
    actor: str
    at: datetime
    rule_ids: tuple[str, ...]


@dataclass(frozen=True)
class AssessmentView:
    """One stored, live (non-shadow) assessment as the pages show it."""

    id: int
    patient_ref: str
    created_at: datetime
    tier: RiskTier
    probability: float | None
    flags: tuple[str, ...]
    missing: tuple[str, ...]
    scores: dict[str, Any]
    fired: tuple[FiredRule, ...]
    ruleset_hash: str
    ruleset_version: str
    model_sha256: str | None
    basis: tuple[str, ...]
    event_id: int | None
    source_type: str | None
    evidence: tuple[Evidence, ...] = ()
    evidence_erased: bool = False
    reviews: tuple[Review, ...] = field(default=())
    observed_at: datetime | None = None  # when the patient answered or wrote (authored / sent)

    @property
    def when(self) -> datetime:
        """The clinical time of the measurement; the assessment time when the source gave none."""
        return self.observed_at or self.created_at

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(f"{f.id}@{f.version}" for f in self.fired)

    def score_lines(self) -> list[str]:
        """Instrument scores in plain words, e.g. ``PHQ-9: total 12, band moderate, item9 1``."""
        lines = []
        for inst, values in sorted(self.scores.items()):
            if isinstance(values, dict):
                parts = ", ".join(f"{k} {'—' if v is None else v}" for k, v in values.items())
            else:
                parts = str(values)
            lines.append(f"{INSTRUMENT_NAMES.get(inst, inst)}: {parts}")
        return lines

    def score(self, instrument: str, key: str = "total") -> float | None:
        value = (self.scores.get(instrument) or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_COLUMNS = ("a.id, a.patient_ref, a.created_at, a.tier, a.probability, a.flags, a.missing, a.scores, a.fired,"
            " a.ruleset_hash, a.ruleset_version, a.model_sha256, a.basis, a.event_id, e.resource_type")


def _comment_aad(override_id: int) -> bytes:
    return f"assessment_overrides.comment|{override_id}".encode()


def _view(row: Sequence[Any], reviews: Sequence[Review], evidence: tuple[Evidence, ...] = (),
          erased: bool = False, observed: datetime | None = None) -> AssessmentView:
    return AssessmentView(
        id=int(row[0]), patient_ref=str(row[1]), created_at=row[2], tier=RiskTier(int(row[3])),
        probability=row[4], flags=tuple(row[5] or ()), missing=tuple(row[6] or ()), scores=dict(row[7] or {}),
        fired=tuple(FiredRule.from_json(f) for f in row[8] or ()), ruleset_hash=str(row[9]),
        ruleset_version=str(row[10] or ""), model_sha256=row[11], basis=tuple(row[12] or ()),
        event_id=row[13], source_type=row[14], evidence=evidence, evidence_erased=erased,
        reviews=tuple(r for r in reviews if r.assessment_id == int(row[0])), observed_at=observed)


def observed_times(conn: psycopg.Connection[Any], cipher: Cipher, event_ids: Sequence[int]) -> dict[int, datetime]:
    """When each input was authored or sent, read from the (encrypted) resource: several answers
    polled together are still plotted at the times the patient gave them."""
    from cds.store.cipher import open_json
    from cds.store.events import event_aad
    from integrations.fhir.mapping import parse_instant

    if not event_ids:
        return {}
    out: dict[int, datetime] = {}
    rows = conn.execute("SELECT id, source, resource_type, resource_id, version_id, resource_enc FROM events"
                        " WHERE id = ANY(%s)", (list(event_ids),)).fetchall()
    for eid, source, rtype, rid, vid, blob in rows:
        try:
            resource = open_json(cipher, conn, blob, event_aad(source, rtype, rid, vid))
        except CryptoError:
            continue
        when = parse_instant(resource.get("authored") or resource.get("sent") or resource.get("effectiveDateTime"))
        if when is not None:
            out[int(eid)] = when
    return out


def _evidence(conn: psycopg.Connection[Any], cipher: Cipher, assessment_id: int) -> tuple[tuple[Evidence, ...], bool]:
    """The evidence spans behind an assessment (decrypted), deduplicated; (spans, erased?)."""
    try:
        signals = load_signals(conn, cipher, assessment_id)
    except CryptoError:
        return (), True
    seen: dict[tuple[str, int, int, str], Evidence] = {}
    for s in signals:
        for e in s.evidence:
            seen.setdefault((e.ref, e.start, e.end, e.kind), e)
    return tuple(seen.values()), False


def load_reviews(conn: psycopg.Connection[Any], cipher: Cipher, patient_ref: str | None = None,
                 assessment_id: int | None = None) -> list[Review]:
    """Reviews of one patient's or one assessment's assessments, oldest first, comments decrypted."""
    where, params = ("patient_ref = %s", patient_ref) if assessment_id is None else ("assessment_id = %s",
                                                                                     assessment_id)
    rows = conn.execute("SELECT id, assessment_id, decision, reason_code, comment_enc, actor, at, rule_ids"
                        f" FROM assessment_overrides WHERE {where} ORDER BY at, id", (params,)).fetchall()
    out = []
    for rid, aid, decision, code, blob, actor, at, rules in rows:
        comment: str | None = ""
        if blob:
            try:
                comment = cipher.decrypt(conn, bytes(blob), _comment_aad(int(rid))).decode()
            except CryptoError:
                comment = None
        out.append(Review(int(rid), int(aid), decision, code, comment, actor, at, tuple(rules or ())))
    return out


def load_assessments(conn: psycopg.Connection[Any], cipher: Cipher, patient_ref: str, *,
                     limit: int = 200, with_evidence: bool = True) -> list[AssessmentView]:
    """A patient's live assessments, newest first, with reviews and (optionally) decrypted evidence."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM assessments a LEFT JOIN events e ON e.id = a.event_id"
                        " WHERE a.patient_ref = %s AND NOT a.shadow ORDER BY a.created_at DESC, a.id DESC"
                        " LIMIT %s", (patient_ref, limit)).fetchall()
    reviews = load_reviews(conn, cipher, patient_ref=patient_ref)
    observed = observed_times(conn, cipher, [int(r[13]) for r in rows if r[13] is not None])
    views = []
    for row in rows:
        evidence, erased = _evidence(conn, cipher, int(row[0])) if with_evidence else ((), False)
        views.append(_view(row, reviews, evidence, erased, observed.get(row[13]) if row[13] is not None else None))
    views.sort(key=lambda v: (v.when, v.id), reverse=True)
    return views


def load_assessment(conn: psycopg.Connection[Any], cipher: Cipher, assessment_id: int) -> AssessmentView:
    row = conn.execute(f"SELECT {_COLUMNS} FROM assessments a LEFT JOIN events e ON e.id = a.event_id"
                       " WHERE a.id = %s AND NOT a.shadow", (assessment_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"assessment {assessment_id} not found")
    evidence, erased = _evidence(conn, cipher, assessment_id)
    observed = observed_times(conn, cipher, [int(row[13])]) if row[13] is not None else {}
    return _view(row, load_reviews(conn, cipher, assessment_id=assessment_id), evidence, erased,
                 observed.get(row[13]) if row[13] is not None else None)


def assessment_patient(conn: psycopg.Connection[Any], assessment_id: int) -> str:
    """The patient an assessment belongs to (for the access check before anything else is read)."""
    row = conn.execute("SELECT patient_ref FROM assessments WHERE id = %s AND NOT shadow",
                       (assessment_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"assessment {assessment_id} not found")
    return str(row[0])


def record_review(conn: psycopg.Connection[Any], cipher: Cipher, assessment: AssessmentView, *, decision: str,
                  reason_code: str | None, comment: str, actor: str, role: str | None) -> int:
    """Store a clinician's accept/override and audit it, in the caller's transaction.

    The patient's standing tier is left alone on purpose: an override records disagreement and feeds
    the rule-performance figures; only an alert resolution (audited) lowers a tier.
    """
    from compliance import audit

    if decision not in DECISIONS:
        raise InputError("decision must be accept or override")
    if decision == "override":
        if reason_code not in OVERRIDE_REASONS:
            raise InputError(f"an override needs a reason code: one of {', '.join(OVERRIDE_REASONS)}")
    else:
        reason_code = None
    comment = comment.strip()
    if len(comment) > MAX_COMMENT:
        raise InputError(f"the comment is limited to {MAX_COMMENT} characters")
    row = conn.execute(
        "INSERT INTO assessment_overrides (assessment_id, patient_ref, decision, reason_code, actor, rule_ids)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (assessment.id, assessment.patient_ref, decision, reason_code, actor, list(assessment.rule_ids))).fetchone()
    assert row is not None
    override_id = int(row[0])
    if comment:
        blob = cipher.encrypt(conn, assessment.patient_ref, comment.encode(), _comment_aad(override_id))
        conn.execute("UPDATE assessment_overrides SET comment_enc = %s WHERE id = %s", (blob, override_id))
    audit.record(conn, event_type=f"assessment.{decision}", action="U", actor=actor, role=role,
                 patient_ref=assessment.patient_ref, purpose="TREAT", outcome=0,
                 entity={"what": f"assessment/{assessment.id}", "assessment_id": assessment.id,
                         "review_id": override_id},
                 detail={"decision": decision, "reason_code": reason_code, "rules": list(assessment.rule_ids),
                         "tier": assessment.tier.label, "comment_chars": len(comment), "tier_unchanged": True})
    return override_id


# -- PDF ------------------------------------------------------------------------------------------------


def find_font(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


@dataclass(frozen=True)
class PdfText:
    """The report's words in one language (the PDF cannot call t() outside a request's locale)."""

    labels: dict[str, str]
    tier_name: str
    names: dict[str, str]  # "flag.<name>" and "ev.<kind>" in the report's language
    ward: str
    generated_by: str


def render_pdf(view: AssessmentView, text: PdfText, *, tz: ZoneInfo, generated_at: datetime) -> bytes:
    """The risk report as PDF bytes, in the language of ``text``. A CJK font is used when the server
    has one (patients write Chinese whatever the reader's language); without it a note says that
    Chinese cannot be shown and the HTML report is the primary copy."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # subsetting chatter, not our log
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.set_title(f"psych-cds risk report {view.patient_ref} #{view.id}")
    pdf.set_creator("psych-cds")
    cjk_font = find_font(CJK_FONT_CANDIDATES)
    font = cjk_font or find_font(LATIN_FONT_CANDIDATES)
    if font is not None:
        pdf.add_font("body", "", str(font))
        family = "body"
    else:
        family = "helvetica"
    pdf.add_page()
    L = text.labels
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def safe(s: str) -> str:
        return s if font is not None else s.encode("latin-1", "replace").decode("latin-1")

    def line(s: str, size: int = 10, h: float = 5.5) -> None:
        pdf.set_font(family, size=size)
        pdf.multi_cell(width, h, safe(s), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def heading(s: str) -> None:
        pdf.ln(2)
        line(s, size=12, h=7)

    line(L["report_title"], size=16, h=9)
    line(f"{L['patient']}: {view.patient_ref}    {L['ward']}: {text.ward}")
    line(f"{L['observed_at']}: {view.when.astimezone(tz):%Y-%m-%d %H:%M} ({tz.key})    "
         f"{L['assessed_at']}: {view.created_at.astimezone(tz):%Y-%m-%d %H:%M}")
    line(f"{L['tier']}: {text.tier_name}" + (f"    {L['probability']}: {view.probability * 100:.0f}%"
                                              if view.probability is not None else ""), size=12, h=7)
    if view.flags:
        line(f"{L['flags']}: {', '.join(text.names.get('flag.' + f, f) for f in view.flags)}")
    if view.missing:
        line(f"{L['missing']}: {'; '.join(view.missing)}")
    if view.score_lines():
        heading(L["scores"])
        for s in view.score_lines():
            line(s)
    heading(L["fired_rules"])
    if not view.fired:
        line(L["no_rules"])
    for f in view.fired:
        line(f"{f.title}  ({f.id}@{f.version})", size=10)
        for tr in f.trace:
            line(f"  - {tr}", size=9, h=5)
        if f.source:
            line(f"  {L['source']}: {f.source}", size=8, h=4.5)
    heading(L["evidence"])
    if view.evidence_erased:
        line(L["erased"])
    elif not view.evidence:
        line(L["no_evidence"])
    for e in view.evidence:
        line(f"[{text.names.get('ev.' + e.kind, e.kind)}] {e.text or e.ref}", size=9, h=5)
    heading(L["reviews"])
    if not view.reviews:
        line(L["no_reviews"])
    for r in view.reviews:
        when = r.at.astimezone(tz).strftime("%Y-%m-%d %H:%M")
        line(f"{when} {r.actor}: {r.decision}" + (f" ({r.reason_code})" if r.reason_code else "")
             + (f" - {r.comment}" if r.comment else ""), size=9, h=5)
    heading(L["provenance"])
    line(f"{L['ruleset']}: {view.ruleset_version or '-'} / {view.ruleset_hash}", size=8, h=4.5)
    line(f"{L['model']}: {view.model_sha256 or '-'}", size=8, h=4.5)
    line(f"{L['basis']}: {', '.join(view.basis) or '-'}", size=8, h=4.5)
    pdf.ln(3)
    line(L["tier_note"], size=8, h=4.5)
    line(L["decision_support"], size=8, h=4.5)
    if cjk_font is None:
        line(text.labels["no_cjk_font"], size=8, h=4.5)
    line(f"{L['generated']}: {generated_at.astimezone(tz):%Y-%m-%d %H:%M} · {text.generated_by}", size=8, h=4.5)
    return bytes(pdf.output())
