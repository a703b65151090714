"""cds.store.db.pipelined_transaction against the real PostgreSQL: statements whose answers are not
read are sent without waiting, yet an error anywhere rolls the whole transaction back and is raised as
itself (a full disk still reads as one), and nothing aborted is ever taken for a commit."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from cds.storage_health import is_storage_error
from cds.store.db import pipelined_transaction

pytestmark = pytest.mark.integration

IDLE = psycopg.pq.TransactionStatus.IDLE


def _patients(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT patient_ref FROM patients ORDER BY patient_ref").fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def _idle_and_as_before(conn: psycopg.Connection[Any]) -> bool:
    return conn.info.transaction_status == IDLE and not conn.autocommit and conn._pipeline is None


def test_a_pipelined_transaction_commits_what_it_sent(db_conn: psycopg.Connection[Any]) -> None:
    with pipelined_transaction(db_conn):
        db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/a')")  # not waited for
        db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/b')")
        assert db_conn.execute("SELECT count(*) FROM patients").fetchone() == (2,)  # in the same transaction
    assert _idle_and_as_before(db_conn)
    assert _patients(db_conn) == ["Patient/a", "Patient/b"]


def test_an_unread_failing_statement_rolls_everything_back_and_raises_itself(
        db_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        with pipelined_transaction(db_conn):
            db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/a')")
            db_conn.execute("SELECT 1 / 0")  # its error comes back with the next answer read, or at the end
            db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/b')")
    assert _idle_and_as_before(db_conn)
    assert _patients(db_conn) == []
    with pytest.raises(psycopg.errors.DivisionByZero):  # raised at the next read, in later code
        with pipelined_transaction(db_conn):
            db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/a')")
            db_conn.execute("SELECT 1 / 0")
            db_conn.execute("SELECT 1").fetchone()
    assert _idle_and_as_before(db_conn) and _patients(db_conn) == []


def test_an_exception_in_the_block_rolls_back(db_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValueError, match="in Python"):
        with pipelined_transaction(db_conn):
            db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/a')")
            raise ValueError("in Python")
    assert _idle_and_as_before(db_conn) and _patients(db_conn) == []


def test_a_full_disk_is_still_a_storage_error(db_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.Error) as raised:
        with pipelined_transaction(db_conn):
            db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/a')")
            db_conn.execute("DO $$ BEGIN RAISE EXCEPTION 'no space' USING ERRCODE = 'disk_full'; END $$")
    assert isinstance(raised.value, psycopg.errors.DiskFull) and is_storage_error(raised.value)
    assert _idle_and_as_before(db_conn) and _patients(db_conn) == []


def test_an_aborted_transaction_is_never_taken_for_a_commit(db_conn: psycopg.Connection[Any]) -> None:
    # An error read and swallowed, then a Sync (as a nested psycopg transaction() would send): the
    # server would answer COMMIT with ROLLBACK. It must raise, not pass for a commit.
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        with pipelined_transaction(db_conn):
            db_conn.execute("INSERT INTO patients (patient_ref) VALUES ('Patient/a')")
            with pytest.raises(psycopg.errors.DivisionByZero):
                db_conn.execute("SELECT 1 / 0").fetchone()
            assert db_conn._pipeline is not None
            db_conn._pipeline.sync()
    assert _idle_and_as_before(db_conn) and _patients(db_conn) == []


def test_it_needs_an_idle_connection_outside_autocommit(db_conn: psycopg.Connection[Any]) -> None:
    db_conn.execute("SELECT 1")
    with pytest.raises(psycopg.ProgrammingError), pipelined_transaction(db_conn):
        pass
    db_conn.rollback()
