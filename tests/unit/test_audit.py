"""compliance.audit against the real PostgreSQL: the hash chain, append-only enforcement, tampering
by a superuser who bypasses it (each kind detected and the first bad record named), checkpoints."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from cds.errors import ConfigError
from cds.settings import Settings
from cds.store.db import connect
from compliance import audit
from compliance.audit import EventType, Signer


def _append(conn: psycopg.Connection[Any], n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        audit.record(conn, event_type=EventType.REST_READ, action="R", actor=f"Practitioner/{i % 3}",
                     role="psychiatrist", patient_ref=f"Patient/{i % 5}", purpose="TREAT",
                     entity={"what": f"RiskAssessment/{i}", "version": 1},
                     detail={"query_sha256": "ab" * 32, "i": i, "ratio": 0.25, "big": 1e20, "whole": 5.0,
                             "label": "高风险"})
    conn.commit()


@pytest.fixture
def chain(db_url: str) -> str:
    """A database with 10 committed audit records."""
    with connect(db_url) as conn:
        _append(conn, 10)
    return db_url


@pytest.fixture
def admin(db_admin_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection that bypasses the append-only triggers, like an attacker with DBA rights."""
    with psycopg.connect(db_admin_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        yield conn


def _verify(url: str, **kw: Any) -> audit.VerifyResult:
    with connect(url) as conn:
        return audit.verify(conn, **kw)


def test_records_form_a_gapless_chain_that_verifies(chain: str) -> None:
    with connect(chain) as conn:
        rows = conn.execute("SELECT seq, prev_hash, hash FROM audit_log ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == list(range(1, 11))
        assert rows[0][1] == audit.GENESIS_HASH
        assert all(rows[i][1] == rows[i - 1][2] for i in range(1, 10))
        result = audit.verify(conn)
    assert result == audit.VerifyResult(True, 10, None, "ok", 0)


def test_hash_is_recomputable_from_the_documented_canonical_json(chain: str) -> None:
    with connect(chain) as conn:
        rec = audit.search(conn, limit=1)[0]
    assert rec.seq == 10 and rec.detail["big"] == 10**20 and rec.detail["label"] == "高风险"
    assert audit.record_hash(rec.hash_fields()) == rec.hash
    text = audit.canonical_bytes(rec.hash_fields()).decode()
    assert text.startswith('{"action":"R","actor":"Practitioner/0","actor_role":"psychiatrist","detail":{"big":')
    assert " " not in text.replace("高风险", "")


def test_rolled_back_record_leaves_no_gap(db_url: str) -> None:
    with connect(db_url) as conn:
        _append(conn, 2)
        audit.record(conn, event_type=EventType.LOGIN, action="E", actor="u")
        conn.rollback()
        _append(conn, 1, start=2)
        assert [r[0] for r in conn.execute("SELECT seq FROM audit_log ORDER BY seq")] == [1, 2, 3]
        assert audit.verify(conn).ok


def test_empty_log_verifies(db_conn: psycopg.Connection[Any]) -> None:
    assert audit.verify(db_conn) == audit.VerifyResult(True, 0, None, "ok", 0)


def test_record_validates_and_refuses_patient_text(db_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValueError, match="patient text"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x", detail={"text": "我想死"})
    with pytest.raises(ValueError, match="patient text"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x",
                     entity={"nested": [{"message_text": "hi"}]})
    with pytest.raises(ValueError, match="action"):
        audit.record(db_conn, event_type="assessment", action="X", actor="x")
    with pytest.raises(ValueError, match="outcome"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x", outcome=3)
    with pytest.raises(ValueError, match="event_type"):
        audit.record(db_conn, event_type="Bad Type", action="C", actor="x")
    with pytest.raises(ValueError, match="Unicode"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x", detail={"k": "\ud800"})
    with pytest.raises(ValueError, match="NUL"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x\x00")
    with pytest.raises(ValueError, match="NUL"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x", detail={"k": "\\\x00"})
    with pytest.raises(ValueError, match="float"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x", detail={"p": float("nan")})


def test_text_that_only_spells_a_nul_escape_is_recorded(db_conn: psycopg.Connection[Any]) -> None:
    """A backslash followed by "u0000" is text (a Windows path, a JSON snippet), not a NUL: found when a
    screening request for Patient/C:\\u0000 was answered 500."""
    for value in ("C:\\u0000", "\\\\u0000", "u0000"):
        audit.record(db_conn, event_type="assessment", action="C", actor="x", patient_ref=f"Patient/{value}",
                     detail={"k": value})
    db_conn.commit()
    assert audit.verify(db_conn).ok


def test_app_role_cannot_update_delete_or_truncate(chain: str) -> None:
    with connect(chain) as conn:
        for statement in ("UPDATE audit_log SET actor = 'x' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 1",
                          "TRUNCATE audit_log", "DELETE FROM audit_checkpoints",
                          "UPDATE audit_signing_keys SET public_key_pem = ''"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()


def test_trigger_rejects_even_the_superuser(chain: str, db_admin_url: str) -> None:
    with psycopg.connect(db_admin_url, autocommit=True) as conn:
        for statement in ("UPDATE audit_log SET actor = 'x' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 1",
                          "TRUNCATE audit_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (10,)


def test_edited_record_is_detected(chain: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute("UPDATE audit_log SET actor = 'Practitioner/innocent' WHERE seq = 4")
    result = _verify(chain)
    assert not result.ok and result.first_bad_seq == 4 and "altered" in result.reason
    assert result.checked == 3


def test_edited_detail_is_detected(chain: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute("""UPDATE audit_log SET detail = jsonb_set(detail, '{i}', '99') WHERE seq = 6""")
    assert _verify(chain).first_bad_seq == 6


def test_edited_and_rehashed_record_breaks_the_link(chain: str, admin: psycopg.Connection[Any]) -> None:
    with connect(chain) as conn:
        rec = audit.search(conn, before_seq=6, limit=1)[0]
    fields = rec.hash_fields() | {"actor": "Practitioner/innocent"}
    admin.execute("UPDATE audit_log SET actor = %s, hash = %s WHERE seq = 5",
                  (fields["actor"], audit.record_hash(fields)))
    result = _verify(chain)
    assert not result.ok and result.first_bad_seq == 6 and "record 5 or 6" in result.reason


def test_deleted_record_is_detected(chain: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute("DELETE FROM audit_log WHERE seq = 7")
    result = _verify(chain)
    assert not result.ok and result.first_bad_seq == 7 and "missing" in result.reason


def test_deleted_first_record_is_detected(chain: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute("DELETE FROM audit_log WHERE seq = 1")
    assert _verify(chain).first_bad_seq == 1


def test_inserted_record_is_detected(chain: str, admin: psycopg.Connection[Any]) -> None:
    """The attacker makes room after record 5 and inserts a well-formed record 6 linked to record 5."""
    with connect(chain) as conn:
        five = audit.search(conn, before_seq=6, limit=1)[0]
    admin.execute("UPDATE audit_log SET seq = seq + 1000 WHERE seq > 5")
    admin.execute("UPDATE audit_log SET seq = seq - 999 WHERE seq > 1000")
    fields = five.hash_fields() | {"seq": 6, "actor": "Practitioner/forged", "prev_hash": five.hash}
    admin.execute(
        "INSERT INTO audit_log (seq, recorded_at, event_type, action, outcome, actor, actor_role, patient_ref,"
        " purpose, entity, detail, prev_hash, hash) VALUES (6, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (five.recorded_at, five.event_type, five.action, five.outcome, fields["actor"], five.actor_role,
         five.patient_ref, five.purpose, json.dumps(five.entity), json.dumps(five.detail), five.hash,
         audit.record_hash(fields)))
    result = _verify(chain)
    assert not result.ok and result.first_bad_seq == 7  # the shifted record no longer matches its seq
    assert result.checked == 6


def test_inserted_record_at_the_end_with_a_copied_link_is_named(chain: str, admin: psycopg.Connection[Any]) -> None:
    """A forged record 10 (old 10 renumbered 11, hashes recomputed by the attacker): the old record
    now links past the forgery, which names it."""
    with connect(chain) as conn:
        recs = {r.seq: r for r in audit.search(conn, limit=20)}
    moved = recs[10].hash_fields() | {"seq": 11}
    admin.execute("UPDATE audit_log SET seq = 11, hash = %s WHERE seq = 10", (audit.record_hash(moved),))
    forged = recs[10].hash_fields() | {"actor": "Practitioner/forged"}
    admin.execute(
        "INSERT INTO audit_log (seq, recorded_at, event_type, action, outcome, actor, actor_role, patient_ref,"
        " purpose, entity, detail, prev_hash, hash) VALUES (10, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (recs[10].recorded_at, recs[10].event_type, recs[10].action, recs[10].outcome, forged["actor"],
         recs[10].actor_role, recs[10].patient_ref, recs[10].purpose, json.dumps(recs[10].entity),
         json.dumps(recs[10].detail), recs[10].prev_hash, audit.record_hash(forged)))
    result = _verify(chain)
    assert not result.ok and result.first_bad_seq == 10 and "inserted" in result.reason


def test_reordered_records_are_detected(chain: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute("UPDATE audit_log SET seq = -3 WHERE seq = 3")
    admin.execute("UPDATE audit_log SET seq = 3 WHERE seq = 4")
    admin.execute("UPDATE audit_log SET seq = 4 WHERE seq = -3")
    result = _verify(chain)
    assert not result.ok and result.first_bad_seq == 3


def test_verify_a_range(chain: str, admin: psycopg.Connection[Any]) -> None:
    assert _verify(chain, from_seq=3, to_seq=6) == audit.VerifyResult(True, 4, None, "ok", 0)
    admin.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 8")
    assert _verify(chain, from_seq=3, to_seq=6).ok
    assert _verify(chain, from_seq=5).first_bad_seq == 8


def test_concurrent_appends_keep_the_chain_valid(db_url: str) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with connect(db_url) as conn:
                for i in range(25):
                    audit.record(conn, event_type="alert.acknowledge", action="U", actor=f"nurse-{worker}",
                                 patient_ref=f"Patient/{i}", entity={"alert_id": f"{worker}-{i}"})
                    if i % 5 == 4:
                        conn.rollback()  # some transactions abort: no gaps may follow
                    else:
                        conn.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = _verify(db_url)
    assert result.ok and result.checked == 6 * 20


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return audit.load_signer(Settings.from_env({"CDS_DATA_DIR": str(tmp_path)}), create=True)


def test_checkpoints_sign_the_head_and_verify(chain: str, signer: Signer) -> None:
    with connect(chain) as conn:
        assert audit.sign_checkpoint(conn, signer) == 10
        assert audit.sign_checkpoint(conn, signer) == 10  # idempotent
        conn.commit()
        _append(conn, 3, start=10)
        assert audit.sign_checkpoint(conn, signer) == 13
        conn.commit()
        stored = conn.execute("SELECT public_key_pem FROM audit_signing_keys").fetchall()
        assert stored == [(signer.public_key_pem(),)]
        result = audit.verify(conn, public_keys=[signer.public_key_pem()])
    assert result == audit.VerifyResult(True, 13, None, "ok", 2)


def test_empty_log_has_nothing_to_sign(db_conn: psycopg.Connection[Any], signer: Signer) -> None:
    assert audit.sign_checkpoint(db_conn, signer) == 0


def test_rewritten_chain_is_caught_by_the_checkpoint(chain: str, signer: Signer,
                                                     admin: psycopg.Connection[Any]) -> None:
    """The attacker edits record 3 and recomputes every later hash: the chain is self-consistent again,
    but no longer matches the hash signed at checkpoint 10."""
    with connect(chain) as conn:
        audit.sign_checkpoint(conn, signer)
        conn.commit()
        recs = sorted(audit.search(conn, limit=20), key=lambda r: r.seq)
    prev = recs[1].hash
    for rec in recs[2:]:
        fields = rec.hash_fields() | {"prev_hash": prev}
        if rec.seq == 3:
            fields["actor"] = "Practitioner/innocent"
        digest = audit.record_hash(fields)
        admin.execute("UPDATE audit_log SET actor = %s, prev_hash = %s, hash = %s WHERE seq = %s",
                      (fields["actor"], prev, digest, rec.seq))
        prev = digest
    result = _verify(chain, public_keys=[signer.public_key_pem()])
    assert not result.ok and result.first_bad_seq == 10 and "checkpoint" in result.reason


def test_truncated_tail_is_caught_by_the_checkpoint(chain: str, signer: Signer,
                                                    admin: psycopg.Connection[Any]) -> None:
    with connect(chain) as conn:
        audit.sign_checkpoint(conn, signer)
        conn.commit()
    admin.execute("DELETE FROM audit_log WHERE seq >= 8")
    result = _verify(chain, public_keys=[signer.public_key_pem()])
    assert not result.ok and result.first_bad_seq == 8 and "deleted" in result.reason


def test_forged_checkpoint_signature_is_detected(chain: str, signer: Signer,
                                                 admin: psycopg.Connection[Any]) -> None:
    with connect(chain) as conn:
        audit.sign_checkpoint(conn, signer)
        conn.commit()
        _append(conn, 2, start=10)
        audit.sign_checkpoint(conn, signer)
        conn.commit()
    admin.execute("UPDATE audit_checkpoints SET signature = %s WHERE seq = 12", (b"\x00" * 64,))
    result = _verify(chain, public_keys=[signer.public_key_pem()])
    assert not result.ok and result.first_bad_seq == 12 and "signature" in result.reason
    assert result.checkpoints_ok == 1


def test_checkpoint_by_an_untrusted_key_is_detected(chain: str, signer: Signer) -> None:
    """A key the attacker added to the database is not among the published keys the verifier trusts."""
    rogue = Signer.generate()
    with connect(chain) as conn:
        audit.sign_checkpoint(conn, rogue)
        conn.commit()
    assert _verify(chain).ok  # trusting the database's own keys, it passes...
    result = _verify(chain, public_keys=[signer.public_key_pem()])  # ...the published key does not
    assert not result.ok and result.first_bad_seq == 10 and "unknown key" in result.reason


def test_load_signer_creates_a_private_key_file_and_reloads_it(tmp_path: Path) -> None:
    settings = Settings.from_env({"CDS_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        audit.load_signer(settings)
    created = audit.load_signer(settings, create=True)
    path = audit.signing_key_path(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert audit.load_signer(settings).key_id == created.key_id
    assert created.public_key_pem().startswith("-----BEGIN PUBLIC KEY-----")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        audit.load_signer(settings)


def test_every_event_type_has_a_fhir_coding() -> None:
    for name, value in vars(EventType).items():
        if name.isupper():
            coding = audit.coding_for(value)
            assert coding.type.code and coding.action in "CRUDE"
    resolve = audit.coding_for("alert.resolve")
    assert resolve.type == audit.PATIENT_RECORD and resolve.subtype[-1].code == "alert.resolve"
    assert audit.coding_for("something.new").type == audit.APPLICATION_ACTIVITY
    assert audit.coding_for(EventType.REST_SEARCH).subtype[0].code == "search-type"


PHI_FOLDED = {k.replace("_", "") for k in audit.PHI_KEYS}
unicode_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | unicode_text,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(unicode_text.filter(lambda k: k.lower().replace("_", "") not in PHI_FOLDED),
                      children, max_size=3),
    max_leaves=8)


@given(detail=st.dictionaries(st.sampled_from(["a", "b", "score", "ids", "名"]), json_values, max_size=4))
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_json_detail_hashes_the_same_after_the_jsonb_round_trip(db_conn: psycopg.Connection[Any],
                                                                   detail: dict[str, Any]) -> None:
    """jsonb normalises numbers and key order; the canonical form must survive that unchanged."""
    audit.record(db_conn, event_type="config.change", action="U", actor="admin", detail=detail)
    db_conn.commit()
    result = audit.verify(db_conn)
    db_conn.rollback()
    assert result.ok, result.reason


def test_autocommit_connection_gets_its_own_transaction(db_url: str) -> None:
    with connect(db_url) as conn:
        conn.autocommit = True
        assert audit.record(conn, event_type=EventType.LOGIN, action="E", actor="u") == 1
        assert audit.record(conn, event_type=EventType.LOGOUT, action="E", actor="u") == 2
    with connect(db_url) as conn:
        assert audit.verify(conn).ok


def test_a_batch_is_chained_in_order_and_refused_whole_when_one_record_is_bad(chain: str) -> None:
    entries = [dict(event_type=EventType.REST_READ, action="R", actor="psych-cds", patient_ref=f"Patient/b{i}",
                    entity={"what": f"Flag/{i}"}, detail={"i": i}) for i in range(5)]
    with connect(chain) as conn:
        with pytest.raises(ValueError):  # checked before anything is appended
            audit.record_batch(conn, [*entries, dict(event_type=EventType.REST_READ, action="R", actor="x",
                                                     detail={"text": "patient words"})])
        conn.rollback()
        audit.record_batch(conn, entries)
        conn.commit()
        rows = conn.execute("SELECT seq, patient_ref FROM audit_log WHERE seq > 10 ORDER BY seq").fetchall()
        result = audit.verify(conn)
    assert rows == [(11 + i, f"Patient/b{i}") for i in range(5)]
    assert result.ok and result.checked == 15


optional_text = st.none() | unicode_text.filter(lambda t: "\\u0000" not in t)
json_objects = st.none() | st.dictionaries(st.sampled_from(["what", "id", "名", "a\"b", "z"]), json_values, max_size=4)


@given(event_type=st.sampled_from(["rest.read", "assessment", "alert.open", "event.received"]),
       action=st.sampled_from(sorted(audit.ACTIONS)), outcome=st.sampled_from(sorted(audit.OUTCOMES)),
       actor=unicode_text.filter(lambda t: bool(t) and "\\u0000" not in t), role=optional_text,
       patient_ref=optional_text, purpose=optional_text, entity=json_objects, detail=json_objects,
       seq=st.integers(min_value=1, max_value=2**62), prev=st.text("0123456789abcdef", min_size=64, max_size=64),
       micros=st.integers(min_value=0, max_value=10**15))
@hypothesis_settings(max_examples=300, deadline=None)
def test_hash_from_fragments_is_the_documented_canonical_hash(
        event_type: str, action: str, outcome: int, actor: str, role: str | None, patient_ref: str | None,
        purpose: str | None, entity: dict[str, Any] | None, detail: dict[str, Any] | None, seq: int, prev: str,
        micros: int) -> None:
    """Appends hash each record from fragments made before the append lock; the result must be the hash
    of the documented canonical JSON of the whole record, whatever the values."""
    from datetime import UTC, datetime, timedelta

    try:
        r = audit._prepare(event_type=event_type, action=action, actor=actor, role=role, patient_ref=patient_ref,
                           purpose=purpose, outcome=outcome, entity=entity, detail=detail)
    except ValueError:
        return  # refused before any hashing (PHI keys, NUL): nothing is chained
    stamp = audit.format_ts(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros))
    expected = audit.record_hash(audit._hash_fields(seq, stamp, event_type, action, outcome, actor, role,
                                                    patient_ref, purpose, audit.normalise_json(entity),
                                                    audit.normalise_json(detail), prev))
    assert audit._chained(r, seq, stamp, prev) == expected
