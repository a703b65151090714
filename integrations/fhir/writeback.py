"""Deliver the outbox to the EHR: one transaction Bundle per row, retried with backoff.

An outage (network error, 5xx, 429, 401 after a token refresh) keeps rows pending and stops the
batch, so nothing is lost and the EHR is not hammered; a rejection (other 4xx) parks the row as
dead, visible on /healthz and in the audit log, because resending the same bundle cannot succeed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from psycopg_pool import ConnectionPool

from cds.errors import AuthError, EhrError, EhrUnavailable
from cds.store import assessments as assessment_store
from cds.store import outbox
from cds.store.cipher import Cipher
from integrations.fhir.client import FhirClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainResult:
    sent: int
    retrying: int
    dead: int


def created_ids(response_bundle: dict[str, Any]) -> dict[str, list[str]]:
    """Resource type -> ids, from a transaction-response's entry.response.location."""
    out: dict[str, list[str]] = {}
    for entry in response_bundle.get("entry", []):
        location = (entry.get("response") or {}).get("location") or ""
        resource = entry.get("resource") or {}
        parts = location.split("/_history/")[0].split("/")
        if len(parts) >= 2:
            out.setdefault(parts[-2], []).append(parts[-1])
        elif resource.get("resourceType") and resource.get("id"):
            out.setdefault(resource["resourceType"], []).append(resource["id"])
    return out


def drain_outbox(pool: ConnectionPool, cipher: Cipher, client: FhirClient, *, limit: int = 20,
                 max_attempts: int = 50) -> DrainResult:
    from compliance import audit

    sent = retrying = dead = 0
    audits: list[dict[str, Any]] = []  # appended last: never hold the audit lock across HTTP calls
    with pool.connection() as conn, conn.transaction():
        for item in outbox.claim_due(conn, cipher, limit):
            try:
                response = client.transaction(item.payload)
            except (EhrUnavailable, AuthError) as exc:
                outbox.mark_failed(conn, item, f"{exc.__class__.__name__}: {exc}", retryable=True,
                                   max_attempts=max_attempts)
                retrying += 1
                log.warning("EHR unavailable; write-back queued for retry",
                            extra={"outbox_id": item.id, "attempts": item.attempts + 1})
                break  # the EHR is down: leave the rest of the batch for the next round
            except EhrError as exc:
                state = outbox.mark_failed(conn, item, f"{exc.__class__.__name__}: {exc}", retryable=False,
                                           max_attempts=max_attempts)
                dead += state == "dead"
                audits.append(dict(event_type="fhir.write", action="C", actor="psych-cds", outcome=8,
                                   patient_ref=item.patient_ref, entity={"outbox_id": item.id, "kind": item.kind},
                                   detail={"error": str(exc)[:300]}))
                log.error("EHR rejected a write-back", extra={"outbox_id": item.id, "error": str(exc)[:300]})
                continue
            ids = created_ids(response)
            outbox.mark_sent(conn, item.id, ids)
            if item.dedupe_key.startswith("assessment:") and ids.get("RiskAssessment"):
                assessment_store.set_fhir_id(conn, int(item.dedupe_key.split(":", 1)[1]),
                                             ids["RiskAssessment"][0])
            if item.kind != "audit-export":  # auditing the export would create a record to export, forever
                audits.append(dict(event_type="fhir.write", action="C", actor="psych-cds", outcome=0,
                                   patient_ref=item.patient_ref, entity={"outbox_id": item.id, "created": dict(ids)},
                                   detail={"kind": item.kind, "attempts": item.attempts + 1}))
            sent += 1
        audit.record_batch(conn, audits)
    return DrainResult(sent, retrying, dead)
