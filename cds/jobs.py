"""Scheduled work (APScheduler): poll the EHR, assess, deliver write-backs, sign audit checkpoints.

Every node may run every job: polling row-locks its feed, event processing and outbox delivery
claim rows with SKIP LOCKED, and singleton jobs take a PostgreSQL advisory lock, so adding workers
adds throughput and never doubles work.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import psycopg
from apscheduler.schedulers.background import BackgroundScheduler

from cds.service import Service
from compliance.ehr_export import EXPORT_INTERVAL_S
from integrations.fhir.poller import PollResult, poll_all
from integrations.fhir.writeback import drain_outbox

log = logging.getLogger(__name__)

CHECKPOINT_LOCK = 0x0C_D5_00_02


def process_pending_events(service: Service, max_batches: int = 100) -> int:
    """Assess pending events until none are left (or ``max_batches`` batches)."""
    total = 0
    for _ in range(max_batches):
        results = service.pipeline.process_pending()
        total += len(results)
        if not results:
            break
    return total


def deliver_outbox(service: Service, max_batches: int = 50) -> int:
    sent = 0
    for _ in range(max_batches):
        result = drain_outbox(service.pool, service.cipher, service.fhir,
                              max_attempts=service.settings.outbox_max_attempts)
        sent += result.sent
        if result.sent == 0 or result.retrying:
            break
    return sent


class OneAtATime:
    """Run a job in one thread of this process at a time. A caller that finds it running does not wait
    and does not run it beside it (two threads would only share one GIL and the same rows): it asks the
    running one to go round once more, so work that arrived meanwhile is not left for the next tick."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._running = False
        self._again = False

    def run(self, fn: Any) -> Any:
        with self._guard:
            if self._running:
                self._again = True
                return None
            self._running = True
        try:
            while True:
                with self._guard:
                    self._again = False
                result = fn()
                with self._guard:
                    if not self._again:
                        self._running = False
                        return result
        except BaseException:
            with self._guard:
                self._running = False
            raise


def assess_pending(service: Service) -> int:
    """The scheduled form of ``process_pending_events``: one thread per process (see OneAtATime)."""
    gate: OneAtATime = service.extras.setdefault("assess_gate", OneAtATime())
    done = gate.run(lambda: process_pending_events(service))
    return int(done or 0)


def poll_and_assess(service: Service) -> int:
    """The worker's latency-critical job: read new input from the EHR and assess it at once.
    Delivery runs as its own job, so a slow EHR write never delays the next poll."""
    poll_feeds(service)
    return assess_pending(service)


def poll_feeds(service: Service) -> list[PollResult]:
    """One poll of every EHR feed, as the settings say (page size, overlap, full re-read interval)."""
    s = service.settings
    return poll_all(service.pool, service.fhir, service.pipeline, page_size=s.poll_page_size,
                    overlap_s=s.poll_overlap_s, recent_overlap_s=s.poll_recent_overlap_s,
                    reconcile_s=s.poll_reconcile_s)


def ingest_cycle(service: Service) -> dict[str, int]:
    """Poll every feed, assess what arrived, deliver the write-backs: one synchronous round (tests, CLI)."""
    polled = poll_feeds(service)
    processed = process_pending_events(service)
    sent = deliver_outbox(service)
    return {"ingested": sum(p.ingested for p in polled), "processed": processed, "sent": sent}


def escalate_overdue(service: Service) -> int:
    """Move every alert past its acknowledgement deadline one step up the escalation path."""
    from cds.alerts.workflow import escalate_overdue_alerts

    with service.pool.connection() as conn:
        conn.autocommit = True  # each batch of escalations commits on its own (see escalate_overdue_alerts)
        try:
            escalated = escalate_overdue_alerts(conn, service.cipher, service.settings, service.pipeline.clock())
        finally:
            conn.autocommit = False
    if escalated:
        deliver_outbox(service)
    return len(escalated)


def export_audit_to_ehr(service: Service) -> int:
    """Queue new audit records as AuditEvent batches for the EHR (delivered by the outbox), then raise or
    clear the alarm that says the EHR's copy is behind."""
    from compliance.ehr_export import check_export_lag, queue_audit_export

    s = service.settings
    with service.pool.connection() as conn, conn.transaction():
        queued = queue_audit_export(conn, service.cipher, max_batches=s.audit_export_batches)
        check_export_lag(conn, service.pipeline.clock(), s.audit_export_max_lag_s)
        return queued


def apply_retention(service: Service) -> dict[str, int]:
    """Erase what is past its retention period (audited, idempotent)."""
    from compliance.retention import apply_retention as apply

    with service.pool.connection() as conn, conn.transaction():
        return apply(conn, service.cipher, service.pipeline.clock())


def watch_feeds(service: Service) -> int:
    """A silent feed is a safety incident: raise (and clear) operations alarms for EHR feeds."""
    from integrations.fhir.watchdog import check_feeds

    return len(check_feeds(service, service.pipeline.clock()))


def sign_audit_checkpoint(service: Service) -> None:
    from compliance import audit

    with service.pool.connection() as conn:
        got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (CHECKPOINT_LOCK,)).fetchone()
        if got and got[0]:
            signer = service.extras.get("signer")
            if signer is None:
                signer = service.extras["signer"] = audit.load_signer(service.settings,
                                                                      create=service.settings.demo)
            audit.sign_checkpoint(conn, signer)
        conn.commit()


def _safely(fn: Any, service: Service) -> Any:
    def run() -> None:
        try:
            fn(service)
        except Exception:  # a job must never die silently: log and let the next run retry
            log.exception("job failed", extra={"job": fn.__name__})
    run.__name__ = fn.__name__
    return run


def build_scheduler(service: Service) -> BackgroundScheduler:
    s = service.settings
    scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
    scheduler.add_job(_safely(poll_and_assess, service), "interval", seconds=s.poll_interval_s, id="poll_and_assess")
    scheduler.add_job(_safely(assess_pending, service), "interval", seconds=0.5, id="process_events")
    # Up to three deliveries at once (rows are claimed with SKIP LOCKED, one patient's rows stay in order):
    # a write-back waits for the EHR's answer, and others need not wait behind it.
    scheduler.add_job(_safely(deliver_outbox, service), "interval", seconds=s.outbox_interval_s, id="outbox",
                      max_instances=3)
    scheduler.add_job(_safely(escalate_overdue, service), "interval", seconds=15, id="escalate_overdue")
    scheduler.add_job(_safely(sign_audit_checkpoint, service), "interval", minutes=5, id="audit_checkpoint")
    scheduler.add_job(_safely(export_audit_to_ehr, service), "interval", seconds=EXPORT_INTERVAL_S, id="audit_export")
    scheduler.add_job(_safely(watch_feeds, service), "interval", minutes=1, id="feed_watchdog")
    scheduler.add_job(_safely(apply_retention, service), "interval", hours=6, id="retention")
    return scheduler


WAKE_JOBS = {"cds_events": "process_events", "cds_outbox": "outbox"}  # channel -> job (migration 0007)


def wake_on_notify(service: Service, scheduler: BackgroundScheduler, stop: threading.Event,
                   listening: threading.Event | None = None) -> None:
    """LISTEN for new events and outbox rows and run their job at once, instead of at its next tick.

    Only a shortcut: the jobs still run on their intervals, so a lost connection or notification delays
    work by at most one interval. Reconnects after a database restart.
    """
    while not stop.is_set():
        try:
            with psycopg.connect(service.db_url, autocommit=True) as conn:
                for channel in WAKE_JOBS:
                    conn.execute(f"LISTEN {channel}")
                if listening is not None:
                    listening.set()
                while not stop.is_set():
                    for note in conn.notifies(timeout=1.0):
                        job = scheduler.get_job(WAKE_JOBS.get(note.channel, ""))
                        if job is not None:
                            job.modify(next_run_time=datetime.now(UTC))
        except psycopg.Error as exc:
            log.warning("wake-up listener reconnecting", extra={"error": exc.__class__.__name__})
            stop.wait(1.0)
