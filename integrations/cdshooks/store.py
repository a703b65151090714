"""What CDS Hooks reads and writes in PostgreSQL: the stored risk behind a card, issued cards, feedback.

Risk is read, never computed here: the patient's current tier (which only a clinician's resolution
lowers), the assessment that set it, the latest assessment, and open alerts, all written by
``cds.pipeline``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from cds.domain import FiredRule, RiskTier
from cds.errors import CryptoError
from cds.store.cipher import Cipher, seal_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAlert:
    kind: str
    status: str
    priority: str
    due_at: datetime


@dataclass(frozen=True)
class StoredRisk:
    """One patient's risk as psych-cds last concluded it (no patient text in here)."""

    patient_ref: str
    tier: RiskTier
    tier_since: datetime
    assessment_id: int | None  # the assessment that justifies the current tier
    assessed_at: datetime | None  # the latest assessment of any tier
    flags: tuple[str, ...]
    missing: tuple[str, ...]
    fired: tuple[FiredRule, ...]
    ruleset_hash: str
    ruleset_version: str
    model_sha256: str | None
    fhir_id: str | None  # RiskAssessment id in the EHR, once written back
    scores: Mapping[str, Any]
    evidence_kinds: tuple[str, ...]
    open_alerts: tuple[OpenAlert, ...] = field(default=())

    @property
    def rule_ids(self) -> list[str]:
        return [f"{f.id}@{f.version}" for f in self.fired]


_ASSESSMENT_COLUMNS = ("id, created_at, tier, flags, missing, fired, ruleset_hash, ruleset_version,"
                       " model_sha256, fhir_id, scores")


def load_risk(conn: psycopg.Connection[Any], cipher: Cipher, patient_ref: str) -> StoredRisk | None:
    """The stored risk of ``patient_ref``; None when psych-cds has never assessed the patient."""
    state = conn.execute("SELECT current_tier, tier_since, last_assessment_id FROM patients"
                         " WHERE patient_ref = %s", (patient_ref,)).fetchone()
    if state is None or state[2] is None:
        return None
    current_tier, tier_since, last_id = int(state[0]), state[1], int(state[2])
    # The assessment behind the tier: the latest live one at that tier (a later, lower one - a denial -
    # does not lower the tier, so it is not the explanation of it).
    basis = conn.execute(f"SELECT {_ASSESSMENT_COLUMNS} FROM assessments WHERE patient_ref = %s AND NOT shadow"
                         " AND tier >= %s ORDER BY id DESC LIMIT 1", (patient_ref, current_tier)).fetchone()
    latest = conn.execute(f"SELECT {_ASSESSMENT_COLUMNS} FROM assessments WHERE id = %s", (last_id,)).fetchone()
    row = basis or latest
    assert row is not None and latest is not None
    flags = list(dict.fromkeys([*row[3], *latest[3]]))
    missing = list(dict.fromkeys([*row[4], *latest[4]]))
    fired = [FiredRule.from_json(f) for f in row[5] or []]
    if latest[0] != row[0]:
        known = {(f.id, f.version) for f in fired}
        fired += [f for f in (FiredRule.from_json(x) for x in latest[5] or []) if (f.id, f.version) not in known]
    alerts = conn.execute("SELECT kind, status, priority, due_at FROM alerts WHERE patient_ref = %s"
                          " AND status <> 'resolved' ORDER BY due_at", (patient_ref,)).fetchall()
    return StoredRisk(
        patient_ref=patient_ref, tier=RiskTier(current_tier), tier_since=tier_since, assessment_id=int(row[0]),
        assessed_at=latest[1], flags=tuple(flags), missing=tuple(missing), fired=tuple(fired),
        ruleset_hash=str(row[6]), ruleset_version=str(row[7] or ""), model_sha256=row[8], fhir_id=row[9],
        scores=dict(row[10] or {}), evidence_kinds=_evidence_kinds(conn, cipher, int(row[0])),
        open_alerts=tuple(OpenAlert(*a) for a in alerts))


def _evidence_kinds(conn: psycopg.Connection[Any], cipher: Cipher, assessment_id: int) -> tuple[str, ...]:
    """Kinds of evidence (plan, timing, means...) behind an assessment: never the spans' text."""
    from cds.store.assessments import load_signals

    try:
        signals = load_signals(conn, cipher, assessment_id)
    except CryptoError:  # erased patient (crypto-shredded): the kinds went with the text
        return ()
    kinds = [e.kind for s in signals for e in s.evidence if e.kind and e.kind != "answer"]
    return tuple(dict.fromkeys(kinds))


def save_card(conn: psycopg.Connection[Any], *, card_uuid: UUID, service: str, hook_instance: str,
              risk: StoredRisk, indicator: str, suggestion_ids: Sequence[UUID], issuer: str | None) -> None:
    conn.execute("INSERT INTO cds_cards (uuid, service, hook_instance, patient_ref, assessment_id, tier, indicator,"
                 " rule_ids, suggestion_ids, issuer) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                 (card_uuid, service, hook_instance[:200], risk.patient_ref, risk.assessment_id, int(risk.tier),
                  indicator, risk.rule_ids, list(suggestion_ids), issuer))


@dataclass(frozen=True)
class IssuedCard:
    uuid: UUID
    service: str
    patient_ref: str
    rule_ids: tuple[str, ...]
    suggestion_ids: tuple[UUID, ...]


def issued_card(conn: psycopg.Connection[Any], card_uuid: UUID) -> IssuedCard | None:
    row = conn.execute("SELECT uuid, service, patient_ref, rule_ids, suggestion_ids FROM cds_cards"
                       " WHERE uuid = %s", (card_uuid,)).fetchone()
    return IssuedCard(row[0], row[1], row[2], tuple(row[3]), tuple(row[4])) if row else None


def save_feedback(conn: psycopg.Connection[Any], cipher: Cipher, *, card: IssuedCard, outcome: str,
                  accepted: Sequence[UUID], override_reason: Mapping[str, Any] | None,
                  user_comment: str | None, outcome_timestamp: datetime, issuer: str | None) -> bool:
    """Store one feedback item; False when the same item was stored before (a resend)."""
    row = conn.execute(
        "INSERT INTO cds_feedback (card, service, outcome, accepted_suggestions, override_reason,"
        " outcome_timestamp, patient_ref, rule_ids, issuer) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (card, outcome, outcome_timestamp) DO NOTHING RETURNING id",
        (card.uuid, card.service, outcome, list(accepted),
         json.dumps(dict(override_reason)) if override_reason else None, outcome_timestamp, card.patient_ref,
         list(card.rule_ids), issuer)).fetchone()
    if row is None:
        return False
    if user_comment:
        blob = seal_json(cipher, conn, card.patient_ref, user_comment, f"cds_feedback.user_comment|{row[0]}")
        conn.execute("UPDATE cds_feedback SET user_comment_enc = %s WHERE id = %s", (blob, row[0]))
    return True
