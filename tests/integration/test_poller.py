"""Polling the real local EHR: a fast poll re-reads only the last moment before its watermark, and every
reconcile interval a poll re-reads the whole overlap, so that a resource which appears late with an older
timestamp is still taken in (real PostgreSQL, real local EHR)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.samples import chat, patient

pytestmark = pytest.mark.integration

FEED = "ehr:Communication"


def _poll(service: Any) -> Any:
    from integrations.fhir.poller import poll_feed

    result = poll_feed(service.pool, service.fhir, service.pipeline, "Communication", page_size=100,
                       overlap_s=60, recent_overlap_s=1.0, reconcile_s=3600)
    assert result is not None and result.error is None
    return result


def _make_reconcile_due(service: Any) -> None:
    with service.pool.connection() as conn:
        conn.execute("UPDATE feeds SET reconciled_at = now() - interval '2 hours' WHERE name = %s", (FEED,))
        conn.commit()


def test_polls_between_full_rereads_fetch_only_the_last_moment(ehr: Any, service: Any) -> None:
    ref = f"Patient/{ehr.create(patient(mrn='MRN-P-1'))['id']}"
    for i in range(20):
        ehr.create(chat(ref, f"hello {i}"))
    first = _poll(service)  # never reconciled: the whole window
    assert first.full and (first.fetched, first.ingested) == (20, 20)
    time.sleep(1.5)  # the next messages come more than the recent overlap (1 s) after the first 20
    for i in range(3):
        ehr.create(chat(ref, f"later {i}"))
    second = _poll(service)  # from the watermark less 1 s: the 20 are still in that second
    assert not second.full and second.ingested == 3
    third = _poll(service)  # from the new watermark less 1 s: only the 3, nothing new
    assert not third.full and (third.fetched, third.ingested) == (3, 0)
    _make_reconcile_due(service)
    full = _poll(service)  # the whole overlap again: all 23, all known
    assert full.full and (full.fetched, full.ingested, full.skipped) == (23, 0, 23)
    assert not _poll(service).full  # and the next one is short again


def test_a_resource_that_appears_behind_the_watermark_is_taken_in_by_the_next_full_reread(
        ehr: Any, service: Any) -> None:
    ref = f"Patient/{ehr.create(patient(mrn='MRN-P-2'))['id']}"
    ehr.create(chat(ref, "hello"))
    assert _poll(service).ingested == 1
    # As if a resource stamped 30 s later had been seen: one stamped now is then 30 s behind the
    # watermark, like one an EHR commits late with the time its transaction started.
    with service.pool.connection() as conn:
        conn.execute("UPDATE feeds SET watermark = watermark + interval '30 seconds' WHERE name = %s", (FEED,))
        conn.commit()
    ehr.create(chat(ref, "I have saved the pills and I will take them all tonight"))
    short = _poll(service)
    assert not short.full and short.fetched == 0  # behind the recent overlap: not seen yet
    _make_reconcile_due(service)
    full = _poll(service)
    assert full.full and full.ingested == 1
    with service.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE patient_ref = %s", (ref,)).fetchone()[0] == 2


def test_the_settings_reach_the_worker_poll(ehr: Any, settings_env: dict[str, str], engines: Any) -> None:
    from cds.jobs import poll_feeds
    from cds.service import Service
    from cds.settings import Settings

    env = {**settings_env, "CDS_POLL_RECONCILE_S": "3600", "CDS_POLL_RECENT_OVERLAP_S": "0.5"}
    svc = Service.start(Settings.from_env(env), migrate=False, engines=engines, pool_size=2)
    try:
        assert (svc.settings.poll_reconcile_s, svc.settings.poll_recent_overlap_s) == (3600.0, 0.5)
        ref = f"Patient/{ehr.create(patient(mrn='MRN-P-3'))['id']}"
        ehr.create(chat(ref, "hello"))
        first = [r for r in poll_feeds(svc) if r.feed == FEED]
        second = [r for r in poll_feeds(svc) if r.feed == FEED]
        assert first[0].full and not second[0].full
    finally:
        svc.close()
