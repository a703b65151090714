"""Poll the EHR for new and changed QuestionnaireResponse and Communication resources.

A ``_lastUpdated`` watermark per feed, re-read with a safety overlap: a server may commit a resource with
an earlier timestamp than one already seen. Every ``reconcile_s`` a poll re-reads the whole overlap
(``overlap_s``); the polls in between re-read only the last ``recent_overlap_s`` before the watermark. A
fast poll that re-read the whole overlap each time fetched the same resources again and again: at 220
messages/s, a 0.5-s poll and a 5-s overlap, 65,318 resources were fetched and parsed (and served by the
EHR) to take in 8,800. A resource committed up to ``recent_overlap_s`` late is read at once, one up to
``overlap_s - reconcile_s`` late by the next full re-read. Versions already stored are skipped before
any parsing or encryption. Feeds are row-locked while polled, so several worker nodes never poll the
same feed at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg_pool import ConnectionPool

from cds.errors import CdsError
from cds.pipeline import Pipeline
from cds.store import events as event_store
from cds.store import feeds
from integrations.fhir.client import FhirClient
from integrations.fhir.mapping import ASSESSED_TYPES, is_own_write, parse_instant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollResult:
    feed: str
    fetched: int
    ingested: int
    quarantined: int
    skipped: int
    error: str | None = None
    full: bool = True  # re-read the whole overlap window (else only the recent overlap)


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def _pages(client: FhirClient, resource_type: str, since: datetime | None, page_size: int,
           max_pages: int = 200) -> Iterable[list[dict[str, Any]]]:
    """Pages oldest first: follow ``next`` links where the server gives them, else advance a ``ge`` cursor."""
    cursor = since
    for _ in range(max_pages):
        params: dict[str, Any] = {"_sort": "_lastUpdated", "_count": page_size}
        if cursor is not None:
            params["_lastUpdated"] = f"ge{_iso(cursor)}"
        bundle = client.search(resource_type, params)
        while True:
            page = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
            yield page
            next_url = next((lk["url"] for lk in bundle.get("link", []) if lk.get("relation") == "next"), None)
            if not next_url:
                break
            bundle = client.request("GET", next_url).json()
        if len(page) < page_size:
            return
        stamps = [t for t in (parse_instant((r.get("meta") or {}).get("lastUpdated")) for r in page) if t]
        newest = max(stamps) if stamps else None
        if newest is None or (cursor is not None and newest <= cursor):
            log.warning("poll page full of one timestamp; the next poll continues", extra={"feed": resource_type})
            return
        cursor = newest


def poll_feed(pool: ConnectionPool, client: FhirClient, pipeline: Pipeline, resource_type: str, *,
              page_size: int, overlap_s: float, recent_overlap_s: float = 1.0,
              reconcile_s: float = 0.0) -> PollResult | None:
    """One poll of one feed. Returns None when another node holds the feed."""
    name = f"ehr:{resource_type}"
    with pool.connection() as conn, conn.transaction():
        locked = feeds.lock_feed(conn, name, reconcile_s)
        if locked is None:
            return None
        state, full = locked
        overlap = overlap_s if full else min(recent_overlap_s, overlap_s)
        since = state.watermark - timedelta(seconds=overlap) if state.watermark else None
        fetched = ingested = quarantined = skipped = 0
        newest = state.watermark
        try:
            for page in _pages(client, resource_type, since, page_size):
                fetched += len(page)
                keys = [(str(r.get("id")), str((r.get("meta") or {}).get("versionId")))
                        for r in page if isinstance(r, dict)]
                known = event_store.known_versions(conn, "ehr", resource_type, keys)
                fresh = []
                for resource in page:
                    updated = parse_instant((resource.get("meta") or {}).get("lastUpdated"))
                    if updated and (newest is None or updated > newest):
                        newest = updated
                    key = (str(resource.get("id")), str((resource.get("meta") or {}).get("versionId")))
                    if key in known or is_own_write(resource):
                        skipped += 1
                    else:
                        fresh.append(resource)
                # The page is stored in one transaction: one commit, its audit records appended last.
                for result in pipeline.ingest_batch(fresh, source="ehr") if fresh else []:
                    if result.quarantine_id is not None:
                        quarantined += 1
                    elif not result.duplicate:
                        ingested += 1
        except CdsError as exc:
            error = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            feeds.record_failure(conn, name, error)
            log.warning("poll failed", extra={"feed": name, "error": error})
            return PollResult(name, fetched, ingested, quarantined, skipped, error, full)
        feeds.record_success(conn, name, newest, got_events=ingested > 0, reconciled=full)
    if ingested or quarantined:
        log.info("poll", extra={"feed": name, "fetched": fetched, "ingested": ingested,
                                "quarantined": quarantined, "skipped": skipped, "full": full})
    return PollResult(name, fetched, ingested, quarantined, skipped, full=full)


def poll_all(pool: ConnectionPool, client: FhirClient, pipeline: Pipeline, *, page_size: int,
             overlap_s: float, recent_overlap_s: float = 1.0, reconcile_s: float = 0.0) -> list[PollResult]:
    """Poll every feed once. ``reconcile_s`` 0 re-reads the whole overlap each time."""
    results = []
    for resource_type in ASSESSED_TYPES:
        result = poll_feed(pool, client, pipeline, resource_type, page_size=page_size, overlap_s=overlap_s,
                           recent_overlap_s=recent_overlap_s, reconcile_s=reconcile_s)
        if result is not None:
            results.append(result)
    return results
