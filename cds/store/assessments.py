"""Stored assessments and each patient's current tier (which only a clinician's resolution lowers)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import psycopg

from cds.domain import Assessment, RiskTier, Signal
from cds.store.cipher import Cipher, open_json, seal_json


def _signals_aad(assessment_id: int) -> str:
    return f"assessments.signals|{assessment_id}"


def signal_summary(signal: Signal) -> dict[str, Any]:
    """What rules may look back at without decrypting: names, numbers, labels, never text."""
    value = signal.value if isinstance(signal.value, (int, float, bool)) or signal.value is None else str(signal.value)[:64]
    return {"name": signal.name, "value": value, "tier": signal.tier.label if signal.tier is not None else None,
            "missing": list(signal.missing), "source": signal.source}


ID_SEQUENCE = "assessments_id_seq"  # the sequence behind assessments.id (bigserial, migration 0001)


def allocate_ids(conn: psycopg.Connection[Any], n: int) -> list[int]:
    """``n`` new assessment ids, ascending, in one statement. An assessment's id must be known before
    its INSERT because the signals' ciphertext binds it (AAD); an id drawn and never used is a gap in
    the sequence, as after any rolled-back insert."""
    return allocate_ids_deferred(conn, n)()


def allocate_ids_deferred(conn: psycopg.Connection[Any], n: int) -> Callable[[], list[int]]:
    """``allocate_ids``, asked now and read when called (in pipeline mode the statement shares the next
    round trip)."""
    cur = conn.execute(f"SELECT nextval('{ID_SEQUENCE}') FROM generate_series(1, %s)", (n,))
    return lambda: sorted(int(r[0]) for r in cur.fetchall())


class AssessmentIds:
    """Ids drawn ahead for one transaction's assessments (a worker batch: up to ``size``), so the batch
    draws them in one statement and each assessment is then one INSERT. ``ahead``: ask for them at once
    (in pipeline mode with the next round trip, e.g. the patient's lock) instead of at the first take."""

    def __init__(self, conn: psycopg.Connection[Any], size: int, *, ahead: bool = False) -> None:
        self._conn = conn
        self._size = max(1, size)
        self._ids: list[int] = []  # ascending
        self._drawing = allocate_ids_deferred(conn, self._size) if ahead else None

    def take(self, n: int, *, after: int | None = None) -> list[int]:
        """``n`` ids, ascending, each above ``after`` (the patient's last assessment id). Ids drawn
        ahead can be below one another worker has since given this patient; then fresh ones are drawn,
        so one patient's assessments stay in the order they were made (readers take the highest id as
        the latest), and the ids drawn ahead are left for other patients."""
        if self._drawing is not None:
            self._ids += self._drawing()
            self._drawing = None
        if after is not None and self._ids and self._ids[0] <= after:
            return allocate_ids(self._conn, n)
        if len(self._ids) < n:
            self._ids += allocate_ids(self._conn, max(self._size, n - len(self._ids)))
        taken, self._ids = self._ids[:n], self._ids[n:]
        return taken


def insert_assessment(conn: psycopg.Connection[Any], cipher: Cipher, a: Assessment, *, event_id: int | None,
                      scores: dict[str, Any], shadow: bool = False, ruleset_version: str = "",
                      assessment_id: int | None = None) -> int:
    """Store one assessment in one INSERT. Its id comes first (``assessment_id``, from ``AssessmentIds``;
    drawn here when not given) so that the signals are sealed with their AAD before the row is written."""
    if assessment_id is None:
        assessment_id = allocate_ids(conn, 1)[0]
    blob = seal_json(cipher, conn, a.patient_ref, [s.to_json() for s in a.signals], _signals_aad(assessment_id))
    conn.execute(
        "WITH a AS (INSERT INTO assessments (id, event_id, patient_ref, tier, probability, flags, missing, scores,"
        " fired, actions, thresholds, basis, ruleset_hash, ruleset_version, model_sha256, shadow, signals_enc,"
        " signal_summary) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " RETURNING id, patient_ref, created_at, shadow, signal_summary) " + _LOOKBACK_ROWS,
        (assessment_id, event_id, a.patient_ref, int(a.tier), a.probability, sorted(a.flags), list(a.missing),
         json.dumps(scores), json.dumps([f.to_json() for f in a.fired]),
         json.dumps([x.to_json() for x in a.actions]), json.dumps(dict(a.thresholds), default=str),
         list(a.basis), a.ruleset_hash, ruleset_version, a.model_sha256, shadow, blob,
         json.dumps([signal_summary(s) for s in a.signals])))
    return assessment_id


def load_signals(conn: psycopg.Connection[Any], cipher: Cipher, assessment_id: int) -> list[Signal]:
    row = conn.execute("SELECT signals_enc FROM assessments WHERE id = %s", (assessment_id,)).fetchone()
    if row is None:
        return []
    return [Signal.from_json(s) for s in open_json(cipher, conn, row[0], _signals_aad(assessment_id))]


def recent_signals(conn: psycopg.Connection[Any], patient_ref: str, since: datetime,
                   names: Collection[str] | None = None) -> list[Signal]:
    """Earlier live signals of this patient (from the non-PHI summary), oldest first; only those named
    in ``names`` when given (the ones rules count: a chatty patient's history is mostly other signals)."""
    return recent_signals_deferred(conn, patient_ref, since, names)()


# The look-back read: one row per signal of each live assessment, from lookback_signals (migration 0009),
# written with the assessment in the same statement (_LOOKBACK_ROWS). An index-only range scan per wanted
# name: expanding every earlier assessment's signal_summary cost a heap visit and a jsonb expansion per
# earlier chat message. Scalar columns, parsed in C: name and source are strings, tier a label or null,
# missing a JSON list of strings (NULL when empty), value a JSON number, boolean, null or string (sent as
# text with its JSON type, so only non-strings are parsed).
_RECENT_SIGNALS = (
    "SELECT observed_at, name, value_type, value, source, tier, missing FROM lookback_signals"
    " WHERE patient_ref = %s AND observed_at >= %s AND (%s::text[] IS NULL OR name = ANY(%s::text[]))"
    " ORDER BY assessment_id, n")
_LOOKBACK_ROWS = (
    "INSERT INTO lookback_signals (assessment_id, n, patient_ref, observed_at, name, value_type, value, source,"
    " tier, missing) SELECT a.id, x.n, a.patient_ref, a.created_at, x.s->>'name', jsonb_typeof(x.s->'value'),"
    " x.s->>'value', x.s->>'source', x.s->>'tier', NULLIF(x.s->'missing', '[]')::text"
    " FROM a, jsonb_array_elements(a.signal_summary) WITH ORDINALITY AS x(s, n) WHERE NOT a.shadow")


def recent_signals_deferred(conn: psycopg.Connection[Any], patient_ref: str, since: datetime,
                            names: Collection[str] | None = None) -> Callable[[], list[Signal]]:
    """``recent_signals``, asked now and read when called (in pipeline mode the query shares the next
    round trip)."""
    wanted = sorted(names) if names is not None else None
    cur = conn.execute(_RECENT_SIGNALS, (patient_ref, since, wanted, wanted))

    def read() -> list[Signal]:
        tiers: dict[str, RiskTier] = {}
        out = []
        for observed_at, name, kind, text, source, label, missing in cur.fetchall():
            value = text if kind == "string" or text is None else json.loads(text)
            tier = None
            if label:
                tier = tiers.get(label)
                if tier is None:
                    tier = tiers[label] = RiskTier.from_label(label)
            out.append(Signal(name, value, "" if source is None else source, tier, (),
                              tuple(json.loads(missing)) if missing else (), observed_at))
        return out

    return read


@dataclass(frozen=True)
class PatientState:
    patient_ref: str
    current_tier: RiskTier
    tier_since: datetime
    conditions: tuple[str, ...] | None = None
    prior_attempt: bool | None = None
    birth_date: date | None = None
    history_checked_at: datetime | None = None
    last_assessment_id: int | None = None


_LOCK_PATIENT = ("SELECT current_tier, tier_since, conditions, prior_attempt, birth_date, history_checked_at,"
                 " last_assessment_id FROM patients WHERE patient_ref = %s FOR UPDATE")


def lock_patient(conn: psycopg.Connection[Any], patient_ref: str, ward: str | None = None) -> PatientState:
    """Serialise work on one patient across workers (row lock), returning the current state."""
    return lock_patient_deferred(conn, patient_ref, ward)()[0]


def lock_patient_deferred(conn: psycopg.Connection[Any], patient_ref: str, ward: str | None = None
                          ) -> Callable[[], tuple[PatientState, bool]]:
    """``lock_patient`` in two halves: the row lock is asked for now, and calling the result reads the
    state. In pipeline mode, statements sent in between share the lock's round trip and run once the
    lock is granted, as if sent after it. The second value says the row did not exist when they ran (a
    new patient): they then ran without the lock, and what they read must be read again."""
    cur = conn.execute(_LOCK_PATIENT, (patient_ref,))

    def read() -> tuple[PatientState, bool]:
        row = cur.fetchone()
        new = row is None
        if row is None:  # first time this patient is seen (a known patient costs one statement)
            conn.execute("INSERT INTO patients (patient_ref, ward) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (patient_ref, ward))
            row = conn.execute(_LOCK_PATIENT, (patient_ref,)).fetchone()
        assert row is not None
        return PatientState(patient_ref, RiskTier(row[0]), row[1], tuple(row[2]) if row[2] is not None else None,
                            row[3], row[4], row[5], row[6]), new

    return read


def save_history(conn: psycopg.Connection[Any], patient_ref: str, conditions: tuple[str, ...],
                 prior_attempt: bool | None, birth_date: date | None) -> None:
    conn.execute("UPDATE patients SET conditions = %s, prior_attempt = %s, birth_date = %s,"
                 " history_checked_at = now() WHERE patient_ref = %s",
                 (list(conditions), prior_attempt, birth_date, patient_ref))


def history_unavailable(conn: psycopg.Connection[Any], patient_ref: str, checked_at: datetime) -> None:
    """Remember that the EHR could not be asked (history stays unknown) so each message does not ask again."""
    conn.execute("UPDATE patients SET history_checked_at = %s WHERE patient_ref = %s", (checked_at, patient_ref))


def raise_patient_tier(conn: psycopg.Connection[Any], patient_ref: str, tier: RiskTier, assessment_id: int) -> None:
    """Record the assessment; the tier goes up, never down (a denial does not lower it)."""
    conn.execute(
        "UPDATE patients SET last_assessment_id = %s, updated_at = now(),"
        " tier_since = CASE WHEN %s > current_tier THEN now() ELSE tier_since END,"
        " current_tier = GREATEST(current_tier, %s) WHERE patient_ref = %s",
        (assessment_id, int(tier), int(tier), patient_ref))


def set_fhir_id(conn: psycopg.Connection[Any], assessment_id: int, fhir_id: str) -> None:
    conn.execute("UPDATE assessments SET fhir_id = %s WHERE id = %s", (fhir_id, assessment_id))


def iter_backtest_rows(conn: psycopg.Connection[Any], since: datetime | None,
                       lookback: timedelta = timedelta(days=14)) -> Any:
    """Stored live assessments in time order, each with the history the patient had then (previous
    tier, earlier signals in the look-back window), from the non-PHI signal summaries: a backtest
    never decrypts patient text. Prior attempt and diagnoses are today's, not as they were then."""
    from cds.domain import History
    from cds.triage.backtest import BacktestRow

    tiers: dict[str, RiskTier] = {}
    recent: dict[str, list[Signal]] = {}
    facts = {r[0]: (r[1], tuple(r[2] or ())) for r in
             conn.execute("SELECT patient_ref, prior_attempt, conditions FROM patients")}
    with conn.cursor(name="backtest_rows") as cur:
        cur.execute("SELECT patient_ref, created_at, tier, signal_summary FROM assessments WHERE NOT shadow"
                    " AND (%s::timestamptz IS NULL OR created_at >= %s) ORDER BY created_at, id", (since, since))
        for patient_ref, created_at, tier, summary in cur:
            signals = [Signal(name=s["name"], value=s.get("value"), source=s.get("source", ""),
                              tier=RiskTier.from_label(s["tier"]) if s.get("tier") else None,
                              missing=tuple(s.get("missing") or ()), observed_at=created_at)
                       for s in summary or []]
            window = [s for s in recent.get(patient_ref, []) if s.observed_at and created_at - s.observed_at <= lookback]
            prior_attempt, conditions = facts.get(patient_ref, (None, ()))
            history = History(previous_tier=tiers.get(patient_ref), prior_attempt=prior_attempt,
                              conditions=conditions, recent_signals=tuple(window))
            yield BacktestRow(day=created_at.date(), patient_ref=patient_ref, signals=signals, history=history,
                              now=created_at)
            recent[patient_ref] = window + signals
            tiers[patient_ref] = max(tiers.get(patient_ref, RiskTier.NONE), RiskTier(tier))
