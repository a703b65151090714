"""The local EHR as a FHIR server at hospital load: Subscriptions (rest-hook, Backport IG) and indexed search.

The sandbox delivers notifications to a real HTTP receiver in this process (http.server in a thread),
and psych-cds's own parser (``parse_notification``) reads them, so sender and receiver are checked
against each other. The indexed searches (identifier tokens, ``_lastUpdated`` polling) are checked
against answers computed here from what was created.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from integrations.fhir.subscriptions import Notification, parse_notification, subscription_resource
from tests.samples import chat, patient

pytestmark = pytest.mark.integration

SECRET = "sandbox-channel-secret"
TOPIC = "http://psych-cds.example.org/fhir/SubscriptionTopic/patient-input"
MSG = "http://hospital.example.org/chat-message"


class Receiver:
    """A rest-hook endpoint: records each notification; ``fail_next`` answers that many with 503 first."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], Any]] = []
        self.fail_next = 0
        self.failures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    failing = receiver.fail_next > 0
                    if failing:
                        receiver.fail_next -= 1
                        receiver.failures += 1
                    else:
                        receiver.received.append((dict(self.headers.items()), json.loads(body)))
                self.send_response(503 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir/notify"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def notifications(self, kind: str = "event-notification") -> list[Notification]:
        with self.lock:
            bodies = [body for _, body in self.received]
        parsed = [parse_notification(body) for body in bodies]
        return [n for n in parsed if n.type == kind]

    def events(self) -> list[tuple[str | None, str | None]]:
        """(event number, focus without base) of every event received, in arrival order."""
        return [(e.number, e.focus.split("/fhir/", 1)[-1] if e.focus else None)
                for n in self.notifications() for e in n.events]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def until(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def subscribe(ehr: Any, receiver: Receiver, payload: str = "full-resource", criteria: str = TOPIC,
              filters: tuple[str, ...] = ()) -> str:
    created = ehr.create(subscription_resource(receiver.url, SECRET, criteria, payload=payload, heartbeat_s=60,
                                               filters=filters))
    assert created["status"] == "requested"
    until(lambda: ehr.http.get(f"{ehr.base}/Subscription/{created['id']}").json()["status"] == "active",
          "the Subscription to become active")
    return str(created["id"])


def versioned(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def test_handshake_with_the_channel_header_then_active(ehr: Any, receiver: Receiver) -> None:
    sub_id = subscribe(ehr, receiver)
    headers, _ = receiver.received[0]
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert headers["Content-Type"].startswith("application/fhir+json")
    [handshake] = receiver.notifications("handshake")
    assert handshake.subscription_id == sub_id and handshake.topic == TOPIC
    assert handshake.status == "requested" and handshake.events_since_start == "0" and handshake.events == ()


def test_full_resource_notifications_respect_the_filter(ehr: Any, receiver: Receiver) -> None:
    subscribe(ehr, receiver, filters=("Communication?category=counselling-chat",))
    pat = ehr.create(patient(mrn="MRN-S-1"))
    ref = f"Patient/{pat['id']}"
    first = ehr.create(chat(ref, "first message", session="S-sub-1"))
    ehr.create({**chat(ref, "an alert, not chat"), "category": [{"text": "alert"}]})
    second = ehr.create(chat(ref, "second message", session="S-sub-1"))
    until(lambda: len(receiver.events()) >= 2, "two events")
    time.sleep(0.2)  # nothing else may follow
    assert receiver.events() == [("1", versioned(first)), ("2", versioned(second))]
    bundled = {r["id"]: r for n in receiver.notifications() for _, r in n.resources}
    assert bundled[first["id"]] == first and bundled[second["id"]] == second
    assert all(n.subscription_id and n.status == "active" for n in receiver.notifications())


def test_id_only_notifications_carry_references_only(ehr: Any, receiver: Receiver) -> None:
    subscribe(ehr, receiver, payload="id-only")
    comm = ehr.create(chat("Patient/p-1", "hello"))
    until(lambda: receiver.events(), "an event")
    [notification] = receiver.notifications()
    assert notification.resources == ()
    assert receiver.events() == [("1", versioned(comm))]


def test_classic_criteria_subscription(ehr: Any, receiver: Receiver) -> None:
    subscribe(ehr, receiver, criteria="Communication?category=alert")
    ehr.create(chat("Patient/p-1", "chat, not an alert"))
    alert = ehr.create({**chat("Patient/p-1", "an alert"), "category": [{"text": "alert"}]})
    until(lambda: receiver.events(), "an event")
    time.sleep(0.2)
    assert receiver.events() == [("1", versioned(alert))]
    assert receiver.notifications()[0].topic is None


def test_rolled_back_transaction_notifies_nothing(ehr: Any, receiver: Receiver) -> None:
    subscribe(ehr, receiver)
    failing = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": chat("Patient/p-1", "never committed"), "request": {"method": "POST", "url": "Communication"}},
        {"resource": {"resourceType": "Patient", "birthDate": "not-a-date"},
         "request": {"method": "POST", "url": "Patient"}}]}
    assert ehr.http.post(ehr.base, json=failing, timeout=10).status_code == 400
    committed = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": chat("Patient/p-1", f"committed {i}"), "request": {"method": "POST", "url": "Communication"}}
        for i in range(3)]}
    assert ehr.http.post(ehr.base, json=committed, timeout=10).status_code == 200
    until(lambda: len(receiver.events()) >= 3, "three events")
    time.sleep(0.2)
    texts = [r["payload"][0]["contentString"] for n in receiver.notifications() for _, r in n.resources]
    assert texts == ["committed 0", "committed 1", "committed 2"]
    assert [number for number, _ in receiver.events()] == ["1", "2", "3"]


def test_a_receiver_failing_twice_gets_every_event_once_in_order(ehr: Any, receiver: Receiver) -> None:
    sub_id = subscribe(ehr, receiver)
    receiver.fail_next = 2
    created = [ehr.create(chat("Patient/p-1", f"m{i}")) for i in range(5)]
    until(lambda: len(receiver.events()) >= 5, "five events")
    time.sleep(0.3)
    assert receiver.failures == 2
    assert receiver.events() == [(str(i + 1), versioned(c)) for i, c in enumerate(created)]
    assert ehr.http.get(f"{ehr.base}/Subscription/{sub_id}").json()["status"] == "active"


def test_indexed_searches_answer_as_a_scan_would(ehr: Any) -> None:
    """identifier tokens (conditional create, lookups) and _lastUpdated polling, checked against the
    resources created here; the admin counters show the indexes were used."""
    stats_before = ehr.http.get(f"{ehr.root}/admin/subscriptions").json()["search"]
    entries = [{"resource": {**chat("Patient/p-1", f"m{i}", session=f"S-{i % 7}"),
                             "identifier": [{"system": "http://hospital.example.org/chat-session",
                                             "value": f"S-{i % 7}"}, {"system": MSG, "value": f"M-{i}"}]},
                "request": {"method": "POST", "url": "Communication"}} for i in range(120)]
    out = ehr.http.post(ehr.base, json={"resourceType": "Bundle", "type": "batch", "entry": entries}, timeout=30)
    assert out.status_code == 200
    created = [e["resource"] for e in out.json()["entry"]]

    def ids(**params: Any) -> list[str]:
        return [r["id"] for r in ehr.search("Communication", _count=1000, **params)]

    assert ids(identifier=f"{MSG}|M-17") == [created[17]["id"]]
    assert ids(identifier=f"{MSG.upper()}|m-17") == [created[17]["id"]]  # tokens are case-insensitive
    assert ids(identifier="M-17") == [created[17]["id"]]
    assert ids(identifier=f"{MSG}|M-3,{MSG}|M-5") == [created[3]["id"], created[5]["id"]]
    assert ids(identifier="http://hospital.example.org/chat-session|S-2") == [c["id"] for c in created[2::7]]
    assert ids(identifier=f"{MSG}|M-999") == []

    # conditional create: found (200, unchanged), new (201), several (412)
    url = f"{ehr.base}/Communication"
    found = ehr.http.post(url, json=chat("Patient/p-1", "dup"), headers={"If-None-Exist": f"identifier={MSG}|M-17"})
    assert found.status_code == 200 and found.json()["id"] == created[17]["id"]
    new = ehr.http.post(url, json={**chat("Patient/p-1", "new"), "identifier": [{"system": MSG, "value": "M-new"}]},
                        headers={"If-None-Exist": f"identifier={MSG}|M-new"})
    assert new.status_code == 201
    several = ehr.http.post(url, json=chat("Patient/p-1", "x"),
                            headers={"If-None-Exist": "identifier=http://hospital.example.org/chat-session|S-1"})
    assert several.status_code == 412

    # the poller's query: everything at or after the watermark, oldest first, paged
    everything = sorted(created + [new.json()], key=lambda r: r["meta"]["lastUpdated"])  # stable: creation order
    watermark = created[60]["meta"]["lastUpdated"]
    expected = [r["id"] for r in everything if r["meta"]["lastUpdated"] >= watermark]
    got: list[str] = []
    page_url: str | None = f"{url}?_lastUpdated=ge{watermark}&_sort=_lastUpdated&_count=25"
    while page_url:
        page = ehr.http.get(page_url, timeout=10).json()
        got += [e["resource"]["id"] for e in page.get("entry", [])]
        page_url = next((lk["url"] for lk in page["link"] if lk["relation"] == "next"), None)
    assert got == expected
    later = [r["id"] for r in everything if r["meta"]["lastUpdated"] > watermark]
    assert ids(_lastUpdated=f"gt{watermark}", _sort="_lastUpdated") == later

    stats = ehr.http.get(f"{ehr.root}/admin/subscriptions").json()["search"]
    assert stats["indexedIdentifier"] - stats_before["indexedIdentifier"] >= 9
    assert stats["indexedLastUpdated"] - stats_before["indexedLastUpdated"] >= 2
