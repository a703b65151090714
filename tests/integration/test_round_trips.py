"""How many times one screen request waits on PostgreSQL: a guard against round trips creeping back.

Counted per request (this thread only; the service's own threads are left out), from what psycopg is
asked to do, not from timing, so the count is the same on a fast or a loaded machine:

- a statement outside pipeline mode (``Cursor.execute``, ``Connection`` commands such as COMMIT) is one
  round trip, and so is an ``executemany`` outside pipeline mode (psycopg pipelines its rows itself);
- in pipeline mode (``cds.store.db.pipelined_transaction``) statements are only queued; a round trip is
  each point where psycopg must wait for their results (``BasePipeline._fetch_gen``: a cursor read, a
  sync, the pipeline's end) with statements queued since the last such point. Results that happen to
  arrive early change how long it waits, not this count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg._pipeline_base import BasePipeline  # psycopg 3.3; private, hence pinned by this test

pytestmark = pytest.mark.integration

# Today's figure for a known patient with an open alert (commits f04dc83, 08deb61, 56754c1): the key
# checked and the request counted (one CTE), then the pipelined transaction: BEGIN + the event's INSERT;
# ids, the patient's lock and what is read under it (event, duplicates, recent signals); the assessment,
# the patient's tier and the open alert; the alert's update, outbox, event status, the audit chain's
# head; the audit record and COMMIT.
SCREEN_ROUND_TRIPS = 6


class RoundTrips:
    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.count = 0
        self.queued = False  # statements sent in pipeline mode since the last wait for results
        self.log: list[str] = []

    def mine(self) -> bool:
        return threading.get_ident() == self.thread

    def statement(self, conn: psycopg.Connection[Any], what: str) -> None:
        if not self.mine():
            return
        if conn._pipeline:
            self.queued = True
            self.log.append(f"  queued  {what}")
        else:
            self.count += 1
            self.log.append(f"{self.count:2d} alone   {what}")

    def wait(self) -> None:
        if self.mine() and self.queued:
            self.queued = False
            self.count += 1
            self.log.append(f"{self.count:2d} results of the statements queued above")


def _text(conn: psycopg.Connection[Any], query: Any) -> str:
    if isinstance(query, bytes):
        return query.decode()
    return (query if isinstance(query, str) else query.as_string(conn))[:100]


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[RoundTrips]:
    from cds.store import db

    rt = RoundTrips()
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany
    command, fetch = psycopg.Connection._exec_command, BasePipeline._fetch_gen

    def counted_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        rt.statement(self.connection, _text(self.connection, query))
        return execute(self, query, *args, **kwargs)

    def counted_executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if rt.mine():  # outside pipeline mode psycopg runs the rows in a pipeline of its own: one wait
            rt.queued = True
            rt.log.append(f"  queued  MANY {_text(self.connection, query)}")
        return executemany(self, query, *args, **kwargs)

    def counted_command(self: Any, cmd: Any, *args: Any, **kwargs: Any) -> Any:
        rt.statement(self, _text(self, cmd))
        return command(self, cmd, *args, **kwargs)

    def counted_fetch(self: Any, *, flush: bool) -> Any:
        rt.wait()
        return fetch(self, flush=flush)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted_execute)
    monkeypatch.setattr(psycopg.Cursor, "executemany", counted_executemany)
    monkeypatch.setattr(psycopg.Connection, "_exec_command", counted_command)
    monkeypatch.setattr(BasePipeline, "_fetch_gen", counted_fetch)
    # The pool tests a connection that sat idle before lending it (one round trip more); that depends on
    # how long the test took since the last request, not on the request.
    monkeypatch.setattr(db, "CHECK_IDLE_S", float("inf"))
    yield rt


def _screen(client: Any, key: str, message: str) -> Any:
    r = client.post("/api/v1/screen", headers={"Authorization": f"Bearer {key}"},
                    json={"patient": "Patient/rt-1", "conversation": "rt-c1", "message": message, "lang": "en"})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_a_screen_request_for_a_known_patient_with_an_open_alert(client: Any, api_key: str,
                                                                round_trips: RoundTrips) -> None:
    first = _screen(client, api_key, "I have been stockpiling my sleeping pills to end my life")
    assert first["alert"], "the first message must open an alert for the request measured below"
    # The patient's data key, created by the first request, is cached by patient from the next one on
    # (compliance.crypto: a key is reused by subject only once committed), as for any known patient.
    _screen(client, api_key, "I still have them")
    round_trips.count, round_trips.log = 0, []

    later = _screen(client, api_key, "I am going to take them all tonight")

    assert later["alert"] == first["alert"], "the measured request must update the open alert"
    assert round_trips.count <= SCREEN_ROUND_TRIPS, (
        f"one screen request waited on PostgreSQL {round_trips.count} times, more than today's "
        f"{SCREEN_ROUND_TRIPS} (tests/integration/test_round_trips.py says how they are counted). "
        "What it sent:\n" + "\n".join(round_trips.log))
