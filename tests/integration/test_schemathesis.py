"""Schemathesis against the service in-process, from its OpenAPI description (issue #9).

Every documented operation gets the document's examples, the coverage phase (boundary and invalid
values derived from each schema: missing required fields, wrong types, too long, outside enums, bad
patterns, methods it does not have) and random positive and negative fuzzing. Each answer must be no
5xx, a documented status with the documented body, headers and content type, invalid input refused, a
405 naming the allowed methods, and every 4xx an OperationOutcome.

Credentials are real (a screening-API key, an ES384 JWT from a stand-in EHR per call, the Subscription
secret), so generated bodies reach the code behind authentication; a known patient is assessed first and
one card issued by each hook, so hooks answer with cards and feedback reaches the card it names.
Refusing missing or wrong credentials is checked on its own, for each secured operation.
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from cds.web.api import openapi_document
from integrations.fhir.smart import generate_private_key, public_jwk

pytestmark = pytest.mark.integration

BASE = "http://cds.hospital.test"
ISSUER = "https://ehr.fuzz.test"
EHR_KEY = generate_private_key("ES384")
SECRET = "subscription-channel-secret-for-fuzzing"
PATIENT_ID = "1288992"  # the patient of the document's hook examples: assessed before fuzzing
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, unsupported_method]
# A hook reads only what it needs (CDS Hooks clients send more, and other shapes, than any one service
# uses): a wrong type where the service never looks is no reason to refuse the call, so schema-violating
# hook requests may be answered 200 or 412. Everything else still applies to them.
LENIENT = {"/cds-services/psych-risk-patient-view", "/cds-services/psych-risk-encounter-start"}
# Fuzzing examples per operation; CDS_SCHEMATHESIS_EXAMPLES=500 digs deeper locally.
CONFIG = schemathesis.Config.from_dict({
    "generation": {"mode": "all", "max-examples": int(os.environ.get("CDS_SCHEMATHESIS_EXAMPLES", "15"))},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
               "stateful": {"enabled": False}},
})


@pytest.fixture
def settings_env(settings_env: dict[str, str], ehr: Any) -> dict[str, str]:
    issuers = {ISSUER: {"jwks": {"keys": [public_jwk(EHR_KEY, "ES384", "fuzz-ehr")]}, "fhir_servers": [ehr.base]}}
    return {**settings_env, "CDS_PUBLIC_BASE_URL": BASE, "CDS_HOOKS_ISSUERS": json.dumps(issuers),
            "CDS_NOTIFY_SECRET": SECRET, "CDS_SCREEN_RATE_PER_MIN": "1000000"}


def ehr_jwt(path: str) -> str:
    """What the stand-in EHR signs for one call to ``path``."""
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "sub": "ehr-cds-client", "aud": BASE + path, "iat": now, "exp": now + 120,
                       "jti": uuid.uuid4().hex}, EHR_KEY, algorithm="ES384", headers={"kid": "fuzz-ehr"})


def credentials(path: str, api_key: str) -> dict[str, str]:
    if path in ("/api/v1/screen", "/api/v1/events", "/api/v1/quarantine"):
        return {"Authorization": f"Bearer {api_key}"}
    if path.startswith("/cds-services/"):
        return {"Authorization": f"Bearer {ehr_jwt(path)}"}
    if path == "/fhir/notify":
        return {"Authorization": f"Bearer {SECRET}"}
    return {}


@dataclass(frozen=True)
class Seeded:
    cards: dict[str, str]  # hook service id -> the uuid of a card it issued for PATIENT_ID


@pytest.fixture
def seeded(client: Any, api_key: str) -> Seeded:
    screened = client.post("/api/v1/screen", headers={"Authorization": f"Bearer {api_key}"},
                           json={"patient": f"Patient/{PATIENT_ID}", "conversation": "fuzz-seed",
                                 "message": "I have saved up enough sleeping pills to die this weekend",
                                 "lang": "en"})
    assert screened.status_code == 200 and screened.get_json()["tier"] in ("high", "imminent"), screened.data
    cards = {}
    for service_id, hook in (("psych-risk-patient-view", "patient-view"),
                             ("psych-risk-encounter-start", "encounter-start")):
        path = f"/cds-services/{service_id}"
        r = client.post(path, headers=credentials(path, ""), json={
            "hook": hook, "hookInstance": str(uuid.uuid4()), "context": {"patientId": PATIENT_ID},
            "prefetch": {"patient": {"resourceType": "Patient", "id": PATIENT_ID}}})
        assert r.status_code == 200 and len(r.get_json()["cards"]) == 1, r.data
        cards[service_id] = r.get_json()["cards"][0]["uuid"]
    return Seeded(cards)


def aim_at_seeded_card(case: Any, seeded: Seeded) -> None:
    """Feedback naming a random uuid can only be 404: point well-formed card uuids at the issued card, so
    the rest of each item (outcome, timestamp, suggestions, override reason) is what gets fuzzed."""
    items = case.body.get("feedback") if isinstance(case.body, dict) else None
    if not case.path.endswith("/feedback") or not isinstance(items, list):
        return
    service_id = case.path.split("/")[2]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("card"), str):
            try:
                uuid.UUID(item["card"])
            except ValueError:
                continue
            item["card"] = seeded.cards[service_id]


# cds/web/openapi.yaml, as /api/v1/openapi.json serves it (test_openapi.py). Loaded here rather than from
# the running app: schemathesis.pytest.from_fixture breaks on pytest 9.2 (it sets Node._nodeid).
schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document()), config=CONFIG)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_service_conforms_to_its_openapi_description(case: Any, client: Any, api_key: str,
                                                     request: pytest.FixtureRequest) -> None:
    if case.path.startswith("/cds-services/"):  # only hooks and feedback need the assessed patient and cards
        aim_at_seeded_card(case, request.getfixturevalue("seeded"))
    response = case.call(app=client.application, headers=credentials(case.path, api_key))
    case.validate_response(response, checks=[c for c in CHECKS if c is not negative_data_rejection
                                             or case.path not in LENIENT])
    if 400 <= response.status_code < 500:
        assert response.headers["content-type"][0].startswith("application/fhir+json")
        assert response.json()["resourceType"] == "OperationOutcome"


def test_secured_operations_refuse_missing_and_wrong_credentials(client: Any) -> None:
    document = client.get("/api/v1/openapi.json").get_json()
    secured = [(path, method) for path, item in document["paths"].items() for method, op in item.items()
               if op.get("security") != []]
    assert len(secured) == 8  # all but health and the description itself
    for path, method in secured:
        for headers in ({}, {"Authorization": "Bearer cds_not-a-key"}, {"Authorization": "Bearer " + "x" * 40},
                        {"X-API-Key": "cds_' OR '1'='1", "X-Subscription-Secret": "wrong"}):
            r = client.open(path, method=method.upper(), json={}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.data)
            assert r.mimetype == "application/fhir+json" and r.get_json()["resourceType"] == "OperationOutcome"


# -- what schemathesis and its follow-up found, pinned (500s, or wrong types silently taken) ----------


def post(client: Any, path: str, body: Any, api_key: str = "") -> Any:
    return client.post(path, data=json.dumps(body), headers={**credentials(path, api_key),
                                                              "Content-Type": "application/json"})


def assert_refused(r: Any, status: int = 400, says: str = "") -> None:
    assert r.status_code == status, r.data
    assert r.mimetype == "application/fhir+json" and r.get_json()["resourceType"] == "OperationOutcome"
    assert says in r.get_json()["issue"][0]["diagnostics"], r.data


@pytest.mark.parametrize("bad", ["a\u0000b", "\ud800"], ids=["NUL", "lone-surrogate"])
def test_json_strings_no_store_can_keep_are_refused_in_every_body(client: Any, api_key: str, bad: str) -> None:
    """PostgreSQL text refuses NUL, the audit refuses NUL, UTF-8 cannot encode a lone surrogate."""
    hook = {"hook": "patient-view", "hookInstance": bad, "context": {"patientId": PATIENT_ID}}
    for path, body in (("/api/v1/screen", {"patient": "Patient/p1", "conversation": bad, "message": "hello"}),
                       ("/api/v1/screen", {"patient": f"Patient/{bad}", "conversation": "c", "message": "hello"}),
                       ("/api/v1/events", {"resourceType": "Communication", "id": bad}),
                       ("/cds-services/psych-risk-patient-view", hook),
                       ("/cds-services/psych-risk-patient-view/feedback", {"feedback": [{bad: 1}]}),
                       ("/fhir/notify", {"resourceType": "Bundle", "type": "history", "entry": [{"fullUrl": bad}]})):
        assert_refused(post(client, path, body, api_key), says="JSON strings must")


def test_text_that_only_spells_a_nul_escape_is_served(client: Any, api_key: str) -> None:
    """A backslash and "u0000" is text: the audit took it for a NUL and the answer was 500."""
    r = post(client, "/api/v1/screen", {"patient": "Patient/C:\\u0000", "conversation": "c", "message": "hi"},
             api_key)
    assert r.status_code == 200, r.data
    r = post(client, "/cds-services/psych-risk-patient-view", {"hook": "patient-view", "hookInstance": "C:\\u0000",
                                                               "context": {"patientId": "p"},
                                                               "prefetch": {"patient": None}})
    assert r.status_code == 200 and r.get_json() == {"cards": []}, r.data


def test_a_method_an_operation_lacks_is_405_naming_those_it_has(client: Any) -> None:
    for method, path, allowed in (("DELETE", "/api/v1/screen", "POST"), ("TRACE", "/healthz", "GET"),
                                  ("PUT", "/cds-services/psych-risk-patient-view", "POST")):
        r = client.open(path, method=method)
        assert_refused(r, 405)
        assert allowed in r.headers["Allow"], r.headers


def test_an_unknown_cds_service_with_a_nul_in_its_url_is_404(client: Any) -> None:
    for path in ("/cds-services/%00x", "/cds-services/%00x/feedback"):
        r = client.post(path, json={}, headers=credentials("/cds-services/x", ""))
        assert_refused(r, 404, "no CDS service")


@pytest.mark.parametrize("change, says", [
    ({"outcomeTimestamp": 12}, "outcomeTimestamp"),
    ({"acceptedSuggestions": 5}, "acceptedSuggestions must be a list"),
    ({"acceptedSuggestions": False}, "acceptedSuggestions must be a list"),
    ({"overrideReason": "assessed"}, "overrideReason must be an object"),
    ({"overrideReason": {"reason": "assessed"}}, "overrideReason.reason must be a Coding"),
    ({"overrideReason": {"reason": {"code": 5}}}, "overrideReason.reason must be a Coding"),
    ({"overrideReason": {"userComment": {}}}, "userComment must be a string"),
])
def test_feedback_with_wrong_types_on_an_issued_card_is_400(client: Any, seeded: Seeded, change: dict[str, Any],
                                                             says: str) -> None:
    path = "/cds-services/psych-risk-patient-view/feedback"
    item = {"card": seeded.cards["psych-risk-patient-view"], "outcome": "overridden",
            "outcomeTimestamp": "2026-11-20T03:11:00Z", **change}
    assert_refused(post(client, path, {"feedback": [item]}), says=says)


def _status(*parameters: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"resource": {"resourceType": "Parameters", "parameter": list(parameters)}}]}


SUBSCRIPTION = {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}}
EVENT_NOTIFICATION = {"name": "type", "valueCode": "event-notification"}


@pytest.mark.parametrize("bundle, says", [
    (_status({"name": "subscription", "valueString": 5}, {"name": "type", "valueCode": "heartbeat"}),
     "names no subscription"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "SubscriptionStatus", "subscription": 5, "type": "heartbeat"}}]}, "subscription must be"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "SubscriptionStatus", "subscription": {"reference": "Subscription/s1"},
        "type": "event-notification", "notificationEvent": [{"focus": 7}]}}]}, "focus must be a reference"),
    (_status(SUBSCRIPTION, EVENT_NOTIFICATION, {"name": "notification-event", "part": [
        {"name": "focus", "valueReference": {"reference": 7}}]}), "focus must be a reference"),
    (_status(SUBSCRIPTION, EVENT_NOTIFICATION, {"name": "notification-event", "part": 5}), "part must be a list"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",
                                                                           "parameter": 5}}]},
     "parameter must be a list"),
])
def test_notifications_with_wrong_types_are_400(client: Any, bundle: dict[str, Any], says: str) -> None:
    assert_refused(post(client, "/fhir/notify", bundle), says=says)


def test_notification_parts_that_are_no_instant_or_name_are_passed_over(client: Any) -> None:
    bundle = _status(SUBSCRIPTION, EVENT_NOTIFICATION, {"name": "notification-event", "part": [
        {"name": "timestamp", "valueInstant": 5}, {"name": ["focus"], "valueString": "x"},
        {"name": "focus", "valueReference": {"reference": "Communication/gone"}}]})
    r = post(client, "/fhir/notify", bundle)
    assert r.status_code == 200 and "1 skipped" in r.get_json()["issue"][0]["diagnostics"], r.data
