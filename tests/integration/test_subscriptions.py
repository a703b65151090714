"""FHIR Subscription rest-hook notifications into the one pipeline (real PostgreSQL, real local EHR).

Medplum's MemoryRepository stores Subscriptions but never delivers notifications, and no other local
FHIR server does: the SENDER side has no local counterpart, so these tests POST the notification
Bundles an EHR would send (Subscriptions Backport IG, R4) to /fhir/notify themselves. Everything from
the endpoint on (secret check, parsing, id-only reads from the EHR, ingest, feed health) is real.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cds.jobs import ingest_cycle, process_pending_events
from integrations.fhir.client import FhirClient
from integrations.fhir.subscriptions import ensure_subscription
from tests.samples import chat, patient, phq9

pytestmark = pytest.mark.integration

SECRET = "s3cret-channel-token-for-tests"
TOPIC = "http://hospital.example.org/SubscriptionTopic/questionnaire-completed"


@pytest.fixture
def settings_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {**settings_env, "CDS_NOTIFY_SECRET": SECRET}


def notification(kind: str, *, subscription: str = "sub-1", events: list[str] | None = None,
                 resources: list[dict[str, Any]] | None = None, base: str = "") -> dict[str, Any]:
    """A notification Bundle as an R4 EHR with the Subscriptions Backport IG sends it."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}Subscription/{subscription}"}},
        {"name": "topic", "valueCanonical": TOPIC},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(len(events or []))},
    ]
    for number, focus in enumerate(events or [], start=1):
        params.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(number)},
            {"name": "timestamp", "valueInstant": "2026-11-20T03:00:00Z"},
            {"name": "focus", "valueReference": {"reference": focus}}]})
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {"resourceType": "Parameters", "meta": {"profile": [
            "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
            "parameter": params},
        "request": {"method": "GET", "url": f"Subscription/{subscription}/$status"},
        "response": {"status": "200"}}]
    for resource in resources or []:
        entries.append({"fullUrl": f"{base}{resource['resourceType']}/{resource['id']}", "resource": resource,
                        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
                        "response": {"status": "201"}})
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-11-20T03:00:01Z", "entry": entries}


def post(client: Any, bundle: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post("/fhir/notify", json=bundle,
                       headers={"Authorization": f"Bearer {SECRET}"} if headers is None else headers)


def feed_row(service: Any, name: str) -> Any:
    with service.pool.connection() as conn:
        return conn.execute("SELECT last_success_at, last_event_at, consecutive_failures FROM feeds"
                            " WHERE name = %s", (name,)).fetchone()


def ehr_events(service: Any) -> list[tuple[Any, ...]]:
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT resource_type, resource_id, version_id FROM events WHERE source = 'ehr'"
                            " ORDER BY id").fetchall()
    return [tuple(r) for r in rows]


def test_handshake_and_heartbeat_mark_the_feed_alive(client: Any, service: Any) -> None:
    assert post(client, notification("handshake")).status_code == 200
    first = feed_row(service, "subscription:sub-1")
    assert first is not None and first[0] is not None and first[1] is None
    response = post(client, notification("heartbeat"))
    assert response.status_code == 200 and response.get_json()["resourceType"] == "OperationOutcome"
    assert feed_row(service, "subscription:sub-1")[0] >= first[0]
    assert ehr_events(service) == []


def test_id_only_notification_reads_the_resource_and_ingests_it_once(ehr: Any, service: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-N-1"))
    ref = f"Patient/{pat['id']}"
    qr = ehr.create(phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 2]))
    response = post(client, notification("event-notification", events=[f"{ehr.base}/QuestionnaireResponse/{qr['id']}"],
                                         base=f"{ehr.base}/"))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert ehr_events(service) == [("QuestionnaireResponse", qr["id"], qr["meta"]["versionId"])]
    assert feed_row(service, "subscription:sub-1")[1] is not None  # last_event_at
    # The normal workers assess it; the reconciliation poll finds nothing new.
    process_pending_events(service)
    ingest_cycle(service)
    assert len(ehr_events(service)) == 1
    with service.pool.connection() as conn:
        alerts = conn.execute("SELECT count(*) FROM alerts WHERE patient_ref = %s", (ref,)).fetchone()[0]
    assert alerts == 1


def test_full_resource_notification_needs_no_read(ehr: Any, service: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-N-2"))
    qr = ehr.create(phq9(f"Patient/{pat['id']}", [1, 1, 1, 1, 1, 1, 1, 1, 1]))
    since = ehr.http.get(f"{ehr.root}/admin/requests").json()["last"]
    response = post(client, notification("event-notification", events=[f"QuestionnaireResponse/{qr['id']}"],
                                         resources=[qr]))
    assert response.status_code == 200
    assert ehr_events(service) == [("QuestionnaireResponse", qr["id"], qr["meta"]["versionId"])]
    requests_made = ehr.http.get(f"{ehr.root}/admin/requests", params={"since": since}).json()["requests"]
    assert not any(qr["id"] in r["path"] for r in requests_made)


def test_created_and_updated_in_one_notification_gives_each_version(ehr: Any, service: Any, client: Any) -> None:
    """A Bundle may carry two versions of one resource: each event gets the version its focus names."""
    pat = ehr.create(patient(mrn="MRN-N-V"))
    v1 = ehr.create(chat(f"Patient/{pat['id']}", "first words", session="S-V"))
    v2 = ehr.http.put(f"{ehr.base}/Communication/{v1['id']}", json={**v1, "payload": [{"contentString": "then"}]},
                      timeout=10).json()
    focus = [f"Communication/{v1['id']}/_history/{v['meta']['versionId']}" for v in (v1, v2)]
    response = post(client, notification("event-notification", events=focus, resources=[v1, v2]))
    assert response.status_code == 200
    assert sorted(ehr_events(service)) == sorted(("Communication", v1["id"], v["meta"]["versionId"]) for v in (v1, v2))


def test_the_same_notification_nineteen_times_is_one_event(ehr: Any, service: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-N-3"))
    ref = f"Patient/{pat['id']}"
    qr = ehr.create(phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 3]))
    bundle = notification("event-notification", events=[f"QuestionnaireResponse/{qr['id']}"], resources=[qr])
    for _ in range(19):
        assert post(client, bundle).status_code == 200
    assert len(ehr_events(service)) == 1
    process_pending_events(service)
    with service.pool.connection() as conn:
        assessments = conn.execute("SELECT count(*) FROM assessments WHERE patient_ref = %s AND NOT shadow",
                                   (ref,)).fetchone()[0]
        alerts = conn.execute("SELECT count(*) FROM alerts WHERE patient_ref = %s", (ref,)).fetchone()[0]
    assert assessments == 1 and alerts == 1


def test_polled_then_notified_is_one_event(ehr: Any, service: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-N-4"))
    qr = ehr.create(phq9(f"Patient/{pat['id']}", [0, 0, 0, 0, 0, 0, 0, 0, 1]))
    ingest_cycle(service)
    response = post(client, notification("event-notification", events=[f"QuestionnaireResponse/{qr['id']}"]))
    assert response.status_code == 200 and "1 already known" in response.get_json()["issue"][0]["diagnostics"]
    assert len(ehr_events(service)) == 1


def test_secret_header_alternatives_and_bad_secret(client: Any, service: Any) -> None:
    bundle = notification("heartbeat")
    assert post(client, bundle, {"X-Subscription-Secret": SECRET}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Subscription-Secret": SECRET[:-1]},
                    {"Authorization": SECRET + "x"}):
        response = post(client, bundle, headers)
        assert response.status_code == 401, headers
        assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("bundle", [
    {"resourceType": "Patient"},
    {"resourceType": "Bundle", "type": "history", "entry": []},
    {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {"resourceType": "Parameters"}}]},
    {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",
                                                                          "parameter": [{"name": "type",
                                                                                         "valueCode": "bogus"}]}}]},
    {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",
                                                                          "parameter": [{"name": "type",
                                                                                         "valueCode": "heartbeat"}]}}]},
    "not json at all",
], ids=["not-a-bundle", "no-status", "wrong-bundle-type", "bad-type", "no-subscription", "not-json"])
def test_malformed_notification_is_400(bundle: Any, client: Any) -> None:
    headers = {"Authorization": f"Bearer {SECRET}"}
    if isinstance(bundle, str):
        response = client.post("/fhir/notify", data=bundle, headers={**headers, "Content-Type": "application/json"})
    else:
        response = post(client, bundle)
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_ehr_outage_during_id_only_read_is_recorded_on_the_feed(ehr: Any, service: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-N-5"))
    qr = ehr.create(phq9(f"Patient/{pat['id']}", [0] * 9))
    ehr.fault(mode="error", status=503)
    try:
        response = post(client, notification("event-notification", events=[f"QuestionnaireResponse/{qr['id']}"]))
    finally:
        ehr.clear_fault()
    assert response.status_code == 502  # the sender retries; polling reconciles meanwhile
    assert feed_row(service, "subscription:sub-1")[2] == 1


@pytest.fixture
def receiver() -> Any:
    """A real rest-hook endpoint that accepts every handshake, so the EHR's Subscription goes active
    (an endpoint that never answers ends in status error, which ensure_subscription rightly does not reuse)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Accept(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Accept)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir/notify"
    server.shutdown()


def test_ensure_subscription_registers_once(ehr: Any, receiver: str) -> None:
    client = FhirClient(ehr.base)
    endpoint = receiver
    first = ensure_subscription(client, endpoint, SECRET, TOPIC, payload="id-only", heartbeat_s=120)
    again = ensure_subscription(client, endpoint, SECRET, TOPIC)
    assert first["id"] == again["id"]
    assert first["channel"]["type"] == "rest-hook" and first["channel"]["endpoint"] == endpoint
    assert first["channel"]["header"] == [f"Authorization: Bearer {SECRET}"]
    assert first["channel"]["_payload"]["extension"][0]["valueCode"] == "id-only"
    classic = ensure_subscription(client, endpoint, SECRET, "QuestionnaireResponse?status=completed")
    assert classic["id"] != first["id"] and "meta" not in classic or "profile" not in classic.get("meta", {})
    assert len(ehr.search("Subscription")) == 2
