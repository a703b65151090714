"""cds.store.assessments against the real PostgreSQL: an assessment is one INSERT, its id drawn ahead
from the table's sequence, and its signals still sealed with the AAD ``assessments.signals|{id}``."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from cds.domain import Assessment, Evidence, RiskTier, Signal
from cds.errors import CryptoError
from cds.store import assessments as store
from cds.store.cipher import open_json
from compliance.crypto import FieldCipher, Kek

PATIENT = "Patient/p1"


class Recording:
    """A connection that records the SQL run through it (the cipher's data-key queries included)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.statements: list[str] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        self.statements.append(str(query))
        return self._conn.execute(query, params, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture
def cipher() -> FieldCipher:
    return FieldCipher(Kek.generate())


def _assessment(text: str = "我已经攒够了安眠药") -> Assessment:
    evidence = (Evidence(0, len(text), "plan", ref="Communication/c1", source="lexicon", text=text),)
    return Assessment(patient_ref=PATIENT, tier=RiskTier.HIGH, probability=0.8, flags=frozenset(), missing=(),
                      signals=(Signal(name="text.tier", value="high", source="model", tier=RiskTier.HIGH,
                                      evidence=evidence),),
                      fired=(), actions=(), ruleset_hash="ab" * 32, model_sha256=None)


def _assessment_statements(rec: Recording) -> list[str]:
    return [s for s in rec.statements if "data_keys" not in s]


def test_an_assessment_is_one_insert_and_its_signals_decrypt(db_conn: psycopg.Connection[Any],
                                                             cipher: FieldCipher) -> None:
    store.insert_assessment(db_conn, cipher, _assessment("warm the data key"), event_id=None, scores={})
    (assessment_id,) = store.AssessmentIds(db_conn, 4).take(1)
    rec = Recording(db_conn)
    got = store.insert_assessment(rec, cipher, _assessment(), event_id=None, scores={"phq9": {"total": 3}},  # type: ignore[arg-type]
                                  assessment_id=assessment_id)
    assert got == assessment_id
    # one statement (the cipher's own data-key lookup aside): the row and its look-back rows, no UPDATE after
    (statement,) = _assessment_statements(rec)
    assert statement.startswith("WITH a AS (INSERT INTO assessments") and "INSERT INTO lookback_signals" in statement
    db_conn.commit()
    signals = store.load_signals(db_conn, cipher, assessment_id)
    assert [(s.name, s.value, s.evidence[0].text) for s in signals] == [("text.tier", "high", "我已经攒够了安眠药")]
    # the AAD format rows already stored were sealed with, unchanged
    blob = db_conn.execute("SELECT signals_enc FROM assessments WHERE id = %s", (assessment_id,)).fetchone()[0]
    assert open_json(cipher, db_conn, blob, f"assessments.signals|{assessment_id}")[0]["name"] == "text.tier"


def test_the_ciphertext_is_bound_to_its_rows_id(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    first = store.insert_assessment(db_conn, cipher, _assessment(), event_id=None, scores={})
    second = store.insert_assessment(db_conn, cipher, _assessment("other"), event_id=None, scores={})
    db_conn.execute("UPDATE assessments SET signals_enc = (SELECT signals_enc FROM assessments WHERE id = %s)"
                    " WHERE id = %s", (first, second))
    with pytest.raises(CryptoError):
        store.load_signals(db_conn, cipher, second)


def test_without_an_id_one_is_drawn_from_the_sequence(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    store.insert_assessment(db_conn, cipher, _assessment("warm the data key"), event_id=None, scores={})
    rec = Recording(db_conn)
    got = store.insert_assessment(rec, cipher, _assessment(), event_id=None, scores={})  # type: ignore[arg-type]
    drawn, inserted = _assessment_statements(rec)  # no UPDATE after the INSERT
    assert "nextval('assessments_id_seq')" in drawn and inserted.startswith("WITH a AS (INSERT INTO assessments")
    assert store.load_signals(db_conn, cipher, got)[0].name == "text.tier"
    # later rows still get ids from the same sequence, above it
    assert store.insert_assessment(db_conn, cipher, _assessment(), event_id=None, scores={}) > got


def test_ids_drawn_ahead_are_one_statement_per_batch(db_conn: psycopg.Connection[Any]) -> None:
    rec = Recording(db_conn)
    ids = store.AssessmentIds(rec, 6)  # type: ignore[arg-type]
    taken = [ids.take(2), ids.take(2), ids.take(2)]
    assert len(rec.statements) == 1 and "generate_series" in rec.statements[0]
    flat = [i for pair in taken for i in pair]
    assert flat == sorted(flat) and len(set(flat)) == 6
    ids.take(1)  # the batch used them all: one more statement draws more
    assert len(rec.statements) == 2


def test_a_patients_ids_stay_in_processing_order(db_conn: psycopg.Connection[Any]) -> None:
    """Ids drawn ahead by this batch can be below one another worker has since given the patient."""
    ids = store.AssessmentIds(db_conn, 10)
    (first,) = ids.take(1)
    (elsewhere,) = store.allocate_ids(db_conn, 1)  # another worker's batch, drawn later, used first
    fresh = ids.take(2, after=elsewhere)
    assert min(fresh) > elsewhere
    assert ids.take(1, after=first - 1)[0] == first + 1  # the ids drawn ahead still serve other patients


def test_recent_signals_read_the_summaries_as_stored(db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    """The look-back read (scalar columns, not whole jsonb rows) gives back each summary's name, value
    with its JSON type, source, tier, missing and its assessment's time: oldest assessment first, each
    in its signals' order; shadow assessments, other patients and other names left out."""
    from datetime import UTC, datetime, timedelta

    def assess(patient: str, *signals: Signal, shadow: bool = False) -> None:
        a = Assessment(patient_ref=patient, tier=RiskTier.LOW, probability=None, flags=frozenset(), missing=(),
                       signals=signals, fired=(), actions=(), ruleset_hash="ab" * 32, model_sha256=None)
        store.insert_assessment(db_conn, cipher, a, event_id=None, scores={}, shadow=shadow)

    first = (Signal("phq9.item9", None, "phq9", missing=("phq9.item9",)), Signal("phq9.item9", 0, "phq9"),
             Signal("text.probability", 0.25, "model"), Signal("text.harm_to_others", False, "model"),
             Signal("cssrs.risk", "none", "cssrs", RiskTier.NONE))
    second = (Signal("text.tier", "moderate", "model", RiskTier.MODERATE), Signal("asq.result", True, "asq"),
              Signal("phq9.total", 21, "phq9", RiskTier.HIGH, missing=("phq9.item3", "phq9.item7")))
    assess(PATIENT, *first)
    assess(PATIENT, Signal("text.tier", "imminent", "model", RiskTier.IMMINENT), shadow=True)
    assess("Patient/other", Signal("text.tier", "high", "model", RiskTier.HIGH))
    assess(PATIENT, *second)
    times = [r[0] for r in db_conn.execute("SELECT created_at FROM assessments WHERE patient_ref = %s"
                                           " AND NOT shadow ORDER BY id", (PATIENT,))]
    since = datetime.now(UTC) - timedelta(days=14)

    def expected(signals: tuple[Signal, ...], at: datetime) -> list[Signal]:
        return [Signal(s.name, s.value, s.source, s.tier, (), s.missing, at) for s in signals]

    got = store.recent_signals(db_conn, PATIENT, since)
    assert got == expected(first, times[0]) + expected(second, times[1])
    assert [(type(s.value), s.observed_at) for s in got] == [(type(s.value), s.observed_at) for s in
                                                             expected(first, times[0]) + expected(second, times[1])]
    named = store.recent_signals(db_conn, PATIENT, since, {"phq9.item9", "text.tier", "phq9.total"})
    assert named == [s for s in got if s.name in {"phq9.item9", "text.tier", "phq9.total"}]
    # The window's bounds (timestamps, not speed): a row stamped at its start is in it, and one the smallest
    # timestamptz step before its start is not.
    last = max(times)
    timestamptz_step = timedelta(microseconds=1)  # PostgreSQL's timestamp resolution
    assert store.recent_signals(db_conn, PATIENT, last) == [s for s in got if s.observed_at >= last]
    assert store.recent_signals(db_conn, PATIENT, last + timestamptz_step) == []
    assert store.recent_signals(db_conn, "Patient/nobody", since) == []


# The look-back read as it was before lookback_signals (migration 0009): every summary expanded from the
# assessments themselves. The reference the table must reproduce, row for row.
_FROM_SUMMARIES = (
    "SELECT a.created_at, s->>'name', jsonb_typeof(s->'value'), s->>'value', s->>'source', s->>'tier',"
    " NULLIF(s->'missing', '[]')::text"
    " FROM assessments a, jsonb_array_elements(a.signal_summary) WITH ORDINALITY AS x(s, n)"
    " WHERE a.patient_ref = %s AND NOT a.shadow AND a.created_at >= %s"
    " AND (%s::text[] IS NULL OR s->>'name' = ANY(%s::text[])) ORDER BY a.id, x.n")


def test_lookback_rows_match_the_summaries_and_the_migration_backfills_them(
        db_conn: psycopg.Connection[Any], cipher: FieldCipher) -> None:
    """Every live assessment's signals land in lookback_signals with it (shadow ones do not), the read gives
    exactly what expanding the summaries gave, and migration 0009's backfill rebuilds the same rows for
    assessments stored before it."""
    from datetime import UTC, datetime, timedelta

    from cds.store.db import MIGRATIONS_DIR

    tiers = [RiskTier.NONE, RiskTier.LOW, RiskTier.MODERATE, None]
    for i in range(30):
        t = tiers[i % 4]
        signals = (Signal("text.tier", t.label if t else None, "model", t, missing=() if t else ("text",)),
                   Signal("text.probability", i / 30, "model"), Signal("phq9.item9", i % 3, "phq9"))
        a = Assessment(patient_ref=PATIENT if i % 5 else "Patient/p2", tier=RiskTier.LOW, probability=None,
                       flags=frozenset(), missing=(), signals=signals, fired=(), actions=(),
                       ruleset_hash="ab" * 32, model_sha256=None)
        store.insert_assessment(db_conn, cipher, a, event_id=None, scores={}, shadow=i % 7 == 0)
    since = datetime.now(UTC) - timedelta(days=14)

    def both(names: list[str] | None) -> tuple[list[Any], list[Any]]:
        table = db_conn.execute(store._RECENT_SIGNALS, (PATIENT, since, names, names)).fetchall()
        summaries = db_conn.execute(_FROM_SUMMARIES, (PATIENT, since, names, names)).fetchall()
        return table, summaries

    for names in (None, ["text.tier"], ["phq9.item9", "text.tier"]):
        table, summaries = both(names)
        assert table == summaries and table
    assert db_conn.execute("SELECT count(*) FROM lookback_signals l JOIN assessments a ON a.id = l.assessment_id"
                           " WHERE a.shadow").fetchone()[0] == 0
    before = both(None)[0]
    sql = (MIGRATIONS_DIR / "0009_lookback_signals.sql").read_text(encoding="utf-8")
    backfill = sql[sql.index("INSERT INTO lookback_signals"):]
    db_conn.execute("DELETE FROM lookback_signals")
    assert both(None)[0] == []
    db_conn.execute(backfill.encode())
    assert both(None)[0] == before
