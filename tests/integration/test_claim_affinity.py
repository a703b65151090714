"""Claim affinity (cds.store.affinity) on real PostgreSQL: workers split the patients between them by
slot, an event that has waited long enough is taken by whoever is free, and a worker that goes away
leaves its patients to the others at once."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.samples import stored_chat

pytestmark = pytest.mark.integration


def _ingest(service: Any, n_patients: int, per_patient: int = 2) -> list[str]:
    refs = [f"Patient/aff-{i}" for i in range(n_patients)]
    resources = [stored_chat(ref, f"message {k} of {ref}", session=f"S-{ref}")
                 for k in range(per_patient) for ref in refs]
    results = service.pipeline.ingest_batch(resources, source="ehr")
    assert all(r.event_id is not None and not r.duplicate for r in results)
    return refs


def _rank_of(service: Any, members: int) -> dict[str, int]:
    with service.pool.connection() as conn:
        return dict(conn.execute("SELECT DISTINCT patient_ref, (hashtext(patient_ref) & 2147483647) %% %s"
                                 " FROM events", (members,)).fetchall())


def _shares(*workers: Any) -> list[Any]:
    """Each worker's share once all have taken their slots (a slot is taken at the first ``share()``)."""
    for w in workers:
        w.share()
    return [w.share() for w in workers]


def _claim(service: Any, share: Any, limit: int = 1000) -> list[Any]:
    from cds.store.events import claim_pending

    with service.pool.connection() as conn, conn.transaction():
        return claim_pending(conn, service.cipher, limit, share)


def test_two_workers_each_claim_only_their_own_patients(service: Any) -> None:
    from cds.store.affinity import ClaimAffinity

    refs = _ingest(service, 30)
    a = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    b = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    try:
        sa, sb = _shares(a, b)
        assert sa is not None and sb is not None
        assert (sa.members, sb.members) == (2, 2)
        assert {sa.rank, sb.rank} == {0, 1}
        rank = _rank_of(service, 2)
        assert set(rank.values()) == {0, 1}  # 30 patients fall on both sides
        got_a, got_b = _claim(service, sa), _claim(service, sb)
        assert got_a and got_b
        assert {rank[s.event.patient_ref] for s in got_a} == {sa.rank}
        assert {rank[s.event.patient_ref] for s in got_b} == {sb.rank}
        # Between them every event, each once, in id order within each share.
        assert sorted(s.id for s in got_a + got_b) == sorted({s.id for s in got_a + got_b})
        assert len(got_a) + len(got_b) == 2 * len(refs)
        assert [s.id for s in got_a] == sorted(s.id for s in got_a)
    finally:
        a.close()
        b.close()


def test_an_event_that_waited_longer_than_steal_after_goes_to_whoever_claims(service: Any) -> None:
    from cds.store.affinity import ClaimAffinity

    _ingest(service, 30, per_patient=1)
    a = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    b = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    try:
        sa, sb = _shares(a, b)
        assert sa is not None and sb is not None
        rank = _rank_of(service, 2)
        theirs = min(ref for ref, r in rank.items() if r == sb.rank)
        with service.pool.connection() as conn:
            conn.execute("UPDATE events SET received_at = now() - interval '11 seconds' WHERE patient_ref = %s",
                         (theirs,))
        from cds.store.events import claim_pending

        with service.pool.connection() as conn, conn.transaction():  # a's claim, held while b claims
            refs_a = [s.event.patient_ref for s in claim_pending(conn, service.cipher, 1000, sa)]
            assert theirs in refs_a  # it waited 11 s: a takes it, though it is b's patient
            assert {rank[r] for r in refs_a if r != theirs} == {sa.rank}
            refs_b = [s.event.patient_ref for s in _claim(service, sb)]
            assert refs_b and theirs not in refs_b  # locked by a's claim: skipped, not claimed twice
    finally:
        a.close()
        b.close()


def test_a_worker_that_goes_away_leaves_its_patients_to_the_others(service: Any) -> None:
    from cds.store.affinity import ClaimAffinity

    refs = _ingest(service, 20, per_patient=1)
    a = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    b = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    try:
        assert all(_shares(a, b))
        b.close()  # its session ends: its slot lock is gone, as when a worker is killed
        # The server ends a closed session, and drops its locks, a moment after the client hangs up (a CI run
        # on two busy cores once saw both slots still held on the very next read), so wait for it, briefly.
        deadline = time.monotonic() + 10
        while a.share() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.share() is None  # alone: no preference
        assert len(_claim(service, a.share())) == len(refs)
    finally:
        a.close()


def test_slots_are_the_lowest_free_ones_and_a_new_worker_joins_the_split(service: Any) -> None:
    from cds.store.affinity import ClaimAffinity

    workers = [ClaimAffinity(service.db_url, 10.0, refresh_s=0) for _ in range(3)]
    try:
        shares = _shares(*workers)
        assert [w.slot for w in workers] == [0, 1, 2]
        assert [(s.rank, s.members) for s in shares if s] == [(0, 3), (1, 3), (2, 3)]
        workers[1].close()
        late = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
        workers.append(late)
        assert late.share() is not None and late.slot == 1  # the freed slot
        assert [(s.rank, s.members) for s in _shares(workers[0], late, workers[2]) if s] == [
            (0, 3), (1, 3), (2, 3)]
    finally:
        for w in workers:
            w.close()


def test_a_pipeline_with_a_share_assesses_only_its_patients(service: Any) -> None:
    from cds.store.affinity import ClaimAffinity

    _ingest(service, 16, per_patient=1)
    other = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    service.pipeline.affinity = ClaimAffinity(service.db_url, 10.0, refresh_s=0)
    try:
        share, theirs = _shares(service.pipeline.affinity, other)
        assert share is not None and theirs is not None
        rank = _rank_of(service, 2)
        processed = []
        while batch := service.pipeline.process_pending(5):
            processed += batch
        mine = [ref for ref, r in rank.items() if r == share.rank]
        assert len(processed) == len(mine)
        with service.pool.connection() as conn:
            pending = {r[0] for r in conn.execute("SELECT patient_ref FROM events WHERE status = 'pending'")}
        assert pending == {ref for ref, r in rank.items() if r != share.rank}
    finally:
        service.pipeline.affinity.close()
        service.pipeline.affinity = None
        other.close()


def test_a_database_that_cannot_give_a_slot_means_no_preference_not_no_claims(service: Any) -> None:
    from cds.store.affinity import ClaimAffinity

    refs = _ingest(service, 4, per_patient=1)
    unreachable = ClaimAffinity("postgresql://cds@127.0.0.1:1/cds?connect_timeout=2", 10.0, refresh_s=0)
    service.pipeline.affinity = unreachable
    try:
        assert unreachable.share() is None
        assert len(service.pipeline.process_pending()) == len(refs)  # claimed in plain id order
    finally:
        service.pipeline.affinity = None
        unreachable.close()
