"""compliance.retention: expired patient text becomes a tombstone, audited, idempotent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cds.errors import ConfigError, ErasedError
from cds.store.db import connect
from compliance import audit
from compliance.crypto import FieldCipher, Kek
from compliance.retention import apply_retention, load_policy

NOW = datetime(2030, 6, 1, tzinfo=UTC)


def _event(conn: psycopg.Connection[Any], cipher: FieldCipher, rtype: str, rid: str, patient: str,
           age_days: int, status: str = "done") -> tuple[int, bytes]:
    aad = f"events.resource|ehr|{rtype}|{rid}|1".encode()
    blob = cipher.encrypt_json(conn, patient, {"resourceType": rtype, "id": rid, "note": "我很痛苦"}, aad)
    row = conn.execute(
        "INSERT INTO events (source, resource_type, resource_id, version_id, patient_ref, received_at,"
        " resource_enc, status) VALUES ('ehr', %s, %s, '1', %s, %s, %s, %s) RETURNING id",
        (rtype, rid, patient, NOW - timedelta(days=age_days), blob, status)).fetchone()
    assert row is not None
    return int(row[0]), aad


def _blob(conn: psycopg.Connection[Any], event_id: int) -> bytes:
    row = conn.execute("SELECT resource_enc FROM events WHERE id = %s", (event_id,)).fetchone()
    assert row is not None
    return bytes(row[0])


def test_policy_file_is_valid_and_documents_each_kind() -> None:
    policy = load_policy()
    kinds = {r.kind: r for r in policy.rules}
    assert kinds["chat_message"].days == 180 and kinds["questionnaire_response"].days == 3650
    assert kinds["quarantine"].patient_column is None
    assert all(r.description for r in policy.rules)


def test_expired_text_is_tombstoned_audited_and_idempotent(db_url: str) -> None:
    cipher = FieldCipher(Kek.generate())
    with connect(db_url) as conn:
        old_chat, aad_old = _event(conn, cipher, "Communication", "c1", "Patient/1", 200)
        old_chat2, _ = _event(conn, cipher, "Communication", "c2", "Patient/2", 181)
        new_chat, aad_new = _event(conn, cipher, "Communication", "c3", "Patient/1", 10)
        pending, _ = _event(conn, cipher, "Communication", "c4", "Patient/1", 400, status="pending")
        old_q, aad_q = _event(conn, cipher, "QuestionnaireResponse", "q1", "Patient/1", 400)
        ancient_q, _ = _event(conn, cipher, "QuestionnaireResponse", "q2", "Patient/1", 3700)
        conn.commit()

        counts = apply_retention(conn, cipher, NOW)
        conn.commit()
        assert counts["chat_message"] == 2 and counts["questionnaire_response"] == 1
        assert counts["other_event"] == 0
        with pytest.raises(ErasedError, match="retention"):
            cipher.decrypt(conn, _blob(conn, old_chat), aad_old)
        for eid in (old_chat2, ancient_q):
            assert _blob(conn, eid)[0] == 0
        assert cipher.decrypt_json(conn, _blob(conn, new_chat), aad_new)["id"] == "c3"
        assert cipher.decrypt_json(conn, _blob(conn, old_q), aad_q)["id"] == "q1"
        assert _blob(conn, pending)[0] == 1  # never tombstone work still to do
        records = audit.search(conn, event_type=audit.EventType.RETENTION)
        by = {(r.patient_ref, r.entity["kind"]): r for r in records}
        assert set(by) == {("Patient/1", "chat_message"), ("Patient/2", "chat_message"),
                           ("Patient/1", "questionnaire_response")}
        assert by[("Patient/1", "chat_message")].entity["ids"] == [str(old_chat)]
        assert by[("Patient/1", "chat_message")].action == "D"
        seq_before = audit.search(conn, limit=1)[0].seq

        again = apply_retention(conn, cipher, NOW)
        conn.commit()
        assert set(again.values()) == {0}
        assert audit.search(conn, limit=1)[0].seq == seq_before
        assert audit.verify(conn).ok


def test_bad_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("kinds:\n  x: {table: 'events; drop table', column: c, age_from: t, days: 1}\n")
    with pytest.raises(ConfigError, match="identifier"):
        load_policy(path)
    path.write_text("kinds:\n  x: {table: events, column: c, age_from: t, days: 0}\n")
    with pytest.raises(ConfigError, match="days"):
        load_policy(path)
