"""Workers are woken by PostgreSQL NOTIFY (migration 0007) when events or outbox rows arrive, instead of
waiting for their next scheduled run."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.samples import chat, wait_until

pytestmark = pytest.mark.integration


def test_a_stored_event_wakes_the_worker_and_its_write_back_is_delivered(service: Any, ehr: Any) -> None:
    from cds.jobs import build_scheduler, wake_on_notify

    ref = "Patient/" + ehr.create({"resourceType": "Patient", "name": [{"family": "Wake"}]})["id"]
    scheduler = build_scheduler(service)
    scheduler.start(paused=True)  # nothing runs on its own in this test: only a wake-up can run a job
    for job in scheduler.get_jobs():
        scheduler.reschedule_job(job.id, trigger="interval", hours=1)
    scheduler.resume()
    stop, listening = threading.Event(), threading.Event()
    listener = threading.Thread(target=wake_on_notify, args=(service, scheduler, stop, listening), daemon=True)
    listener.start()
    try:
        assert listening.wait(timeout=20)
        resource = {**chat(ref, "I have saved the pills and I will take them tonight"), "id": "wake-1",
                    "meta": {"versionId": "1", "lastUpdated": "2026-11-20T03:00:00Z"}}
        service.pipeline.ingest(resource, source="api")

        def delivered() -> bool:
            with service.pool.connection() as conn:
                row = conn.execute("SELECT count(*) FILTER (WHERE status = 'done'), (SELECT count(*) FROM outbox"
                                   " WHERE status = 'sent' AND kind = 'assessment-writeback') FROM events").fetchone()
            return bool(row and row[0] == 1 and row[1] >= 1)

        wait_until(delivered, timeout_s=30)  # hourly jobs: only the NOTIFY wake-ups got it this far
        assert ehr.search("RiskAssessment", subject=ref)
    finally:
        stop.set()
        listener.join(timeout=10)
        scheduler.shutdown(wait=True)

