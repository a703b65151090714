"""integrations.fhir.mapping, outbound: the write-back and an alert's Task joined into one transaction
Bundle that validates as FHIR, keeps every entry's idempotent request, and is refused when two entries
would write the same resource."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from cds.domain import RiskTier
from integrations.fhir.mapping import CDS_SYSTEM, join_transactions, task_bundle, writeback_bundle

T0 = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)
ALERT = "5c1f0e6a-0000-4000-8000-000000000001"
LEVEL_0 = {"code": "level-0", "display": "Ward nurse"}


def _writeback(new_alert: bool = True) -> dict[str, Any]:
    return writeback_bundle(
        assessment_id=42, patient_ref="Patient/p1", tier=RiskTier.HIGH, probability=0.8, flags=[], missing=(),
        reasons=["Explicit plan"], basis=["Communication/c1/_history/1"], ruleset_hash="ab" * 32,
        ruleset_version="2026.1.0", model_sha256="cd" * 32, occurred_at=T0, alert_id=ALERT, priority="stat",
        care_team_ref="CareTeam/ward5", dashboard_url="https://cds.example.org/triage", new_alert=new_alert)


def _task(status: str = "open", notify: tuple[str, str] | None = None, alert_id: str = ALERT) -> dict[str, Any]:
    return task_bundle(
        alert_id=alert_id, task_version=1, patient_ref="Patient/p1", status=status, priority="stat",
        tier=RiskTier.HIGH, reason="Explicit plan", assessment_id=42, created_at=T0, updated_at=T0,
        due_at=T0 + timedelta(minutes=5), escalation=LEVEL_0, owner_ref=None, care_team_ref="CareTeam/ward5",
        resolution_code=None, notify_text=notify, dashboard_url="https://cds.example.org/triage")


def _requests(bundle: dict[str, Any]) -> list[str]:
    return [f"{e['request']['method']} {e['request']['url'].split('/')[0]}" for e in bundle["entry"]]


def test_the_write_back_and_the_alerts_task_are_one_valid_transaction() -> None:
    writeback, task = _writeback(), _task()
    joined = join_transactions(writeback, task)
    assert joined is not None
    Bundle.model_validate(joined)  # R4(B): a transaction whose entries all carry a request
    assert joined["type"] == "transaction"
    assert _requests(joined) == ["POST RiskAssessment", "PUT Flag", "POST Communication", "PUT Provenance",
                                 "PUT Task"]
    assert joined["entry"][:4] == writeback["entry"] and joined["entry"][4:] == task["entry"]
    task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{CDS_SYSTEM}/alert-task/{ALERT}"))
    assert joined["entry"][4]["request"] == {"method": "PUT", "url": f"Task/{task_id}"}  # deterministic: a retry overwrites
    full_urls = [e["fullUrl"] for e in joined["entry"] if "fullUrl" in e]
    assert len(full_urls) == len(set(full_urls)) and all(u.startswith("urn:uuid:") for u in full_urls)
    # every urn:uuid a resource points at is an entry of the same Bundle
    provenance = joined["entry"][3]["resource"]
    assert {t["reference"] for t in provenance["target"]} <= set(full_urls)


def test_joining_leaves_both_bundles_as_they_were() -> None:
    writeback, task = _writeback(), _task(notify=("act now", "请立即处理"))
    before = copy.deepcopy((writeback, task))
    joined = join_transactions(writeback, task)
    assert joined is not None and len(joined["entry"]) == len(writeback["entry"]) + len(task["entry"])
    Bundle.model_validate(joined)
    assert (writeback, task) == before


def test_two_writes_of_one_resource_are_never_joined() -> None:
    # A resolved alert's Task bundle makes its Flag inactive; the write-back makes the same Flag active.
    assert join_transactions(_writeback(), _task(status="resolved")) is None
    assert join_transactions(_task(), _task()) is None  # one Task twice
    assert join_transactions(_writeback(), _writeback()) is None  # the same fullUrls twice
    # Two different alerts' Tasks can share the write-back's transaction.
    two = join_transactions(_writeback(), _task())
    assert two is not None
    other = _task(alert_id="5c1f0e6a-0000-4000-8000-000000000002")
    three = join_transactions(two, other)
    assert three is not None and _requests(three)[-2:] == ["PUT Task", "PUT Task"]
