"""Audit-log benchmark for ``make bench``: append rate and chain-verification time.

Runs in a scratch database created on the given server (the URL needs CREATEDB) and dropped at
the end, so it never writes benchmark records into a real audit log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from cds.store.db import connect, migrate
from compliance import audit


def _with_db(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


def _synthetic_rows(start_seq: int, prev_hash: str, n: int) -> Iterator[tuple[Any, ...]]:
    """Records shaped like the pipeline's, with correct hashes (fast bulk fill for the verify run)."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for seq in range(start_seq, start_seq + n):
        recorded_at = t0 + timedelta(microseconds=seq * 1000)
        entity = {"what": f"Communication/{seq}", "event_id": seq}
        detail = {"duplicate": False, "source": "ehr"}
        fields = audit._hash_fields(seq, audit.format_ts(recorded_at), "event.received", "C", 0, "psych-cds",
                                    None, f"Patient/{seq % 5000}", None, entity, detail, prev_hash)
        digest = audit.record_hash(fields)
        yield (seq, recorded_at, "event.received", "C", 0, "psych-cds", None, f"Patient/{seq % 5000}", None,
               json.dumps(entity), json.dumps(detail), prev_hash, digest)
        prev_hash = digest


def _bulk_fill(conn: psycopg.Connection[Any], n: int) -> None:
    head = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    start, prev = (int(head[0]) + 1, str(head[1])) if head else (1, audit.GENESIS_HASH)
    with conn.cursor() as cur, cur.copy(
            "COPY audit_log (seq, recorded_at, event_type, action, outcome, actor, actor_role,"
            " patient_ref, purpose, entity, detail, prev_hash, hash) FROM STDIN") as copy:
        for row in _synthetic_rows(start, prev, n):
            copy.write_row(row)
    conn.commit()


def bench_audit(db_url: str, n_append: int = 2000, n_verify: int = 200_000) -> dict[str, float]:
    """Measure appends/s (one record per committed transaction, like the pipeline, and 100 per
    transaction) and the time to verify ``n_verify`` records, extrapolated to 1M."""
    name = "cds_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_db(db_url, name)
    try:
        migrate(url)
        with connect(url) as conn:
            t = time.perf_counter()
            for i in range(n_append):
                audit.record(conn, event_type="rest.read", action="R", actor="Practitioner/1", role="nurse",
                             patient_ref=f"Patient/{i % 100}", entity={"what": f"RiskAssessment/{i}"})
                conn.commit()
            single = n_append / (time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n_append):
                audit.record(conn, event_type="rest.read", action="R", actor="Practitioner/1",
                             entity={"what": f"RiskAssessment/{i}"})
                if i % 100 == 99:
                    conn.commit()
            conn.commit()
            batched = n_append / (time.perf_counter() - t)
            fill = max(0, n_verify - 2 * n_append)
            t = time.perf_counter()
            _bulk_fill(conn, fill)
            fill_s = time.perf_counter() - t
            conn.execute("ANALYZE audit_log")
            conn.commit()
            t = time.perf_counter()
            result = audit.verify(conn)
            verify_s = time.perf_counter() - t
            conn.rollback()
        if not result.ok:
            raise RuntimeError(f"benchmark chain does not verify: {result}")
        return {"appends_per_s": round(single, 1), "appends_per_s_batched_100": round(batched, 1),
                "verified": float(result.checked), "verify_s": round(verify_s, 2),
                "verify_per_s": round(result.checked / verify_s, 1),
                "verify_1m_s": round(verify_s * 1_000_000 / result.checked, 1),
                "bulk_fill_s": round(fill_s, 2)}
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":  # python -m compliance.bench [URL] [n_append] [n_verify]
    import sys

    from cds.settings import Settings
    from cds.store.db import database_url

    target = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else database_url(Settings.from_env())
    args = [int(a) for a in sys.argv[2:4]]
    print(json.dumps(bench_audit(target, *args), indent=2))
