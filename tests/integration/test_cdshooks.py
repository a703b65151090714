"""CDS Hooks 2.0 on the real service, PostgreSQL and local EHR: discovery, cards from stored
assessments for every tier, prefetch / fallback read / 412, feedback, CORS, audit, and every way an
EHR's JWT is refused.

The EHR's side of the JWT (its signing key and JWKS) is generated here: that is the CDS client we
stand in for. JWKS served over HTTP come from a real local HTTP server.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest

from cds.jobs import ingest_cycle
from integrations.fhir.smart import generate_private_key, public_jwk
from tests.integration.conftest import free_port
from tests.samples import chat, patient, phq9

pytestmark = pytest.mark.integration

ISSUER = "https://ehr.hospital.test"
BASE = "http://cds.hospital.test"
PATIENT_VIEW = "psych-risk-patient-view"
EHR_KEY = generate_private_key("ES384")
EHR_JWK = public_jwk(EHR_KEY, "ES384", "ehr-key-1")
OTHER_KEY = generate_private_key("ES384")
RSA_KEY = generate_private_key("RS384")
RSA_JWK = public_jwk(RSA_KEY, "RS384", "ehr-rsa-1")


class _JwksServer:
    """A real HTTP server publishing a JWK Set (what an EHR's jwks_url is)."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def rsa_jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer({"keys": [RSA_JWK]})
    yield server
    server.server.shutdown()


@pytest.fixture
def settings_env(settings_env: dict[str, str], rsa_jwks_server: _JwksServer) -> dict[str, str]:
    issuers = {
        ISSUER: {"jwks": {"keys": [EHR_JWK]}, "jku": [rsa_jwks_server.url]},
        "https://ehr-rsa.hospital.test": {"jwks_url": rsa_jwks_server.url, "client_id": "ehr-rsa"},
    }
    return {**settings_env, "CDS_PUBLIC_BASE_URL": BASE, "CDS_HOOKS_ISSUERS": json.dumps(issuers)}


def ehr_jwt(aud: str, *, key: Any = EHR_KEY, alg: str = "ES384", kid: str = "ehr-key-1", iss: str = ISSUER,
            **overrides: Any) -> str:
    """A CDS client's JWT as CDS Hooks 2.0 describes it; ``overrides`` replace claims."""
    now = int(time.time())
    claims = {"iss": iss, "sub": "ehr-cds-client", "aud": aud, "iat": now, "exp": now + 120,
              "jti": uuid.uuid4().hex, **overrides}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def auth(path: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": "Bearer " + ehr_jwt(BASE + path, **kw)}


def hook_body(patient_id: str, *, prefetch: Any = "auto", fhir_server: str | None = None,
              hook: str = "patient-view") -> dict[str, Any]:
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()),
                            "context": {"userId": "Practitioner/p1", "patientId": patient_id}}
    if prefetch == "auto":
        body["prefetch"] = {"patient": {"resourceType": "Patient", "id": patient_id}}
    elif prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": "ehr-issued-token", "token_type": "Bearer",
                                     "expires_in": 300, "scope": "patient/Patient.read", "subject": "psych-cds"}
    return body


def call(client: Any, body: dict[str, Any], service_id: str = PATIENT_VIEW) -> Any:
    path = f"/cds-services/{service_id}"
    return client.post(path, json=body, headers=auth(path))


def assess_patient(ehr: Any, service: Any, resource_for: Any) -> str:
    pat = ehr.create(patient(mrn=f"MRN-H-{uuid.uuid4().hex[:6]}"))
    ehr.create(resource_for(f"Patient/{pat['id']}"))
    ingest_cycle(service)
    return str(pat["id"])


# -- discovery, CORS -----------------------------------------------------------------------------------


def test_discovery_lists_both_hooks_with_the_patient_prefetch(client: Any) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = {s["hook"]: s for s in response.get_json()["services"]}
    assert set(services) == {"patient-view", "encounter-start"}
    assert services["patient-view"]["prefetch"] == {"patient": "Patient/{{context.patientId}}"}
    assert all(s["id"] and s["description"] for s in services.values())


def test_browser_preflight_is_answered_with_cors_headers(client: Any) -> None:
    response = client.options(f"/cds-services/{PATIENT_VIEW}", headers={
        "Origin": "https://ehr.hospital.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code in (200, 204)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


# -- cards from the stored assessment -------------------------------------------------------------------

TIER_CASES = {
    "none": (lambda ref: phq9(ref, [0] * 9), "none", "info"),
    "low": (lambda ref: chat(ref, "I feel hopeless, sometimes I wish I could just disappear"), "low", "info"),
    "moderate": (lambda ref: phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, 1]), "moderate", "warning"),
    "high": (lambda ref: chat(ref, "I want to kill myself and I have a plan"), "high", "critical"),
    "imminent": (lambda ref: chat(ref, "I keep thinking about suicide and I bought a rope"), "imminent", "critical"),
    "indeterminate": (lambda ref: phq9(ref, [0, 0, 0, 0, 0, 0, 0, 0, None]), "none", "warning"),
}


@pytest.mark.parametrize("case", list(TIER_CASES))
def test_card_shows_the_stored_tier_with_rules_versions_and_no_transcript(
        case: str, ehr: Any, service: Any, client: Any) -> None:
    make, tier, indicator = TIER_CASES[case]
    patient_id = assess_patient(ehr, service, make)
    with service.pool.connection() as conn:
        stored = conn.execute("SELECT a.tier, a.ruleset_hash, a.fired, a.fhir_id FROM patients p JOIN assessments a"
                              " ON a.id = p.last_assessment_id WHERE p.patient_ref = %s",
                              (f"Patient/{patient_id}",)).fetchone()
    response = call(client, hook_body(patient_id))
    assert response.status_code == 200, response.get_data(as_text=True)
    cards = response.get_json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    assert card["indicator"] == indicator
    assert len(card["summary"]) < 140 and tier.upper() in card["summary"]
    assert card["source"]["label"] and card["source"]["topic"]["code"] == "suicide-self-harm-risk"
    assert stored[1][:12] in card["detail"]  # rule-set version
    for rule in stored[2]:
        assert rule["id"] in card["detail"]
    assert card["links"][0]["type"] == "smart"
    assert card["links"][0]["url"] == f"{BASE}/dashboard/patient/Patient/{patient_id}"
    assert card["overrideReasons"] and all(r["code"] and r["system"] for r in card["overrideReasons"])
    text = json.dumps(card)
    for word in ("rope", "kill myself", "disappear", "hopeless"):
        assert word not in text  # evidence kinds only, never transcript text
    if tier in ("moderate", "high", "imminent"):
        action = card["suggestions"][0]["actions"][0]
        request = action["resource"]
        assert action["type"] == "create" and request["resourceType"] == "ServiceRequest"
        assert request["intent"] == "order" and request["subject"]["reference"] == f"Patient/{patient_id}"
        assert stored[3], "the write-back has given the assessment its RiskAssessment id"
        assert request["reasonReference"] == [{"reference": f"RiskAssessment/{stored[3]}"}]
    else:
        assert "suggestions" not in card
    if case == "imminent":
        assert "Evidence (kinds only)" in card["detail"]


def test_encounter_start_answers_from_the_same_store(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["high"][0])
    body = hook_body(patient_id, hook="encounter-start")
    body["context"]["encounterId"] = "enc-1"
    response = call(client, body, "psych-risk-encounter-start")
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["indicator"] == "critical"


def test_patient_never_assessed_gets_no_card(ehr: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-H-none"))
    response = call(client, hook_body(pat["id"]))
    assert response.status_code == 200 and response.get_json() == {"cards": []}


def test_hook_for_the_wrong_service_or_without_patient_is_a_bad_request(client: Any) -> None:
    wrong = call(client, hook_body("p1", hook="order-sign"))
    assert wrong.status_code == 400 and wrong.get_json()["resourceType"] == "OperationOutcome"
    body = hook_body("p1")
    del body["context"]["patientId"]
    assert call(client, body).status_code == 400
    unknown = call(client, hook_body("p1"), "no-such-service")
    assert unknown.status_code == 404
    for instance in (-569660, None, ["x"], ""):  # found by schemathesis: a number was a 500
        body = hook_body("p1")
        body["hookInstance"] = instance
        bad = call(client, body)
        assert bad.status_code == 400 and "hookInstance" in bad.get_json()["issue"][0]["diagnostics"]


# -- prefetch, fallback read, 412 ----------------------------------------------------------------------


def test_missing_prefetch_falls_back_to_a_read_on_the_ehr(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["moderate"][0])
    since = ehr.http.get(f"{ehr.root}/admin/requests").json()["last"]
    response = call(client, hook_body(patient_id, prefetch=None, fhir_server=ehr.base))
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["indicator"] == "warning"
    reads = ehr.http.get(f"{ehr.root}/admin/requests", params={"since": since}).json()["requests"]
    assert any(r["method"] == "GET" and r["path"].endswith(f"/Patient/{patient_id}") for r in reads)


def test_prefetch_present_needs_no_read(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["moderate"][0])
    since = ehr.http.get(f"{ehr.root}/admin/requests").json()["last"]
    response = call(client, hook_body(patient_id, fhir_server=ehr.base))
    assert response.status_code == 200 and response.get_json()["cards"]
    reads = ehr.http.get(f"{ehr.root}/admin/requests", params={"since": since}).json()["requests"]
    assert not any(r["path"].endswith(f"/Patient/{patient_id}") for r in reads)


def test_prefetch_null_means_the_ehr_has_no_such_patient(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["high"][0])
    response = call(client, hook_body(patient_id, prefetch={"patient": None}))
    assert response.status_code == 200 and response.get_json() == {"cards": []}


def test_unreachable_fhir_server_without_prefetch_is_412(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["high"][0])
    dead = f"http://127.0.0.1:{free_port()}/fhir"
    response = call(client, hook_body(patient_id, prefetch=None, fhir_server=dead))
    assert response.status_code == 412
    assert response.get_json()["resourceType"] == "OperationOutcome"
    no_server = call(client, hook_body(patient_id, prefetch=None))
    assert no_server.status_code == 412


def test_ehr_outage_during_fallback_read_is_412(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["high"][0])
    ehr.fault(mode="error", status=503)
    try:
        response = call(client, hook_body(patient_id, prefetch=None, fhir_server=ehr.base))
    finally:
        ehr.clear_fault()
    assert response.status_code == 412


# -- feedback, audit -----------------------------------------------------------------------------------


def test_feedback_is_stored_against_the_cards_rules(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["high"][0])
    card = call(client, hook_body(patient_id)).get_json()["cards"][0]
    second = call(client, hook_body(patient_id)).get_json()["cards"][0]
    path = f"/cds-services/{PATIENT_VIEW}/feedback"
    feedback = {"feedback": [
        {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-20T03:10:00Z",
         "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]},
        {"card": second["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-20T03:11:00Z",
         "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "Seen in clinic by Dr Wu"}}]}
    response = client.post(path, json=feedback, headers=auth(path))
    assert response.status_code == 200, response.get_data(as_text=True)
    resend = client.post(path, json=feedback, headers=auth(path))
    assert resend.status_code == 200
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT outcome, override_reason, rule_ids, patient_ref, accepted_suggestions,"
                            " user_comment_enc FROM cds_feedback ORDER BY outcome_timestamp").fetchall()
        fired = conn.execute("SELECT a.fired FROM patients p JOIN assessments a ON a.id = p.last_assessment_id"
                             " WHERE p.patient_ref = %s", (f"Patient/{patient_id}",)).fetchone()[0]
    assert [r[0] for r in rows] == ["accepted", "overridden"]  # the resend stored nothing twice
    assert rows[1][1]["reason"]["code"] == card["overrideReasons"][0]["code"]
    assert set(rows[0][2]) == {f"{f['id']}@{f['version']}" for f in fired}
    assert rows[0][3] == f"Patient/{patient_id}"
    assert [str(u) for u in rows[0][4]] == [card["suggestions"][0]["uuid"]]
    assert rows[1][5] is not None and b"Dr Wu" not in bytes(rows[1][5])  # free text is encrypted


def test_feedback_on_an_unknown_card_is_refused(client: Any) -> None:
    path = f"/cds-services/{PATIENT_VIEW}/feedback"
    body = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted",
                          "outcomeTimestamp": "2026-11-20T03:10:00Z"}]}
    response = client.post(path, json=body, headers=auth(path))
    assert response.status_code == 404 and response.get_json()["resourceType"] == "OperationOutcome"


def test_every_call_is_audited_with_patient_and_outcome(ehr: Any, service: Any, client: Any) -> None:
    patient_id = assess_patient(ehr, service, TIER_CASES["moderate"][0])
    assert call(client, hook_body(patient_id)).status_code == 200
    path = f"/cds-services/{PATIENT_VIEW}"
    assert client.post(path, json=hook_body(patient_id), headers={}).status_code == 401
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT actor, patient_ref, outcome, detail FROM audit_log"
                            " WHERE event_type = 'cdshooks.call' ORDER BY seq").fetchall()
    ok = [r for r in rows if r[3].get("status") == 200]
    refused = [r for r in rows if r[3].get("status") == 401]
    assert ok and ok[-1][0] == ISSUER and ok[-1][1] == f"Patient/{patient_id}" and ok[-1][2] == 0
    assert ok[-1][3]["cards"] and ok[-1][3]["tier"] == "moderate"
    assert refused and refused[-1][2] == 4 and refused[-1][0] == "unknown"


# -- authentication ------------------------------------------------------------------------------------


def _none_alg_token(aud: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}, "",
                      algorithm="none", headers={"kid": "ehr-key-1"})


def _rejections(aud: str, rsa_url: str) -> dict[str, str | None]:
    now = int(time.time())
    return {
        "alg none": _none_alg_token(aud),
        "HS256": jwt.encode({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 60, "jti": "h"},
                            "a-shared-secret-that-is-long-enough-for-hs256", algorithm="HS256",
                            headers={"kid": "ehr-key-1"}),
        "wrong key": ehr_jwt(aud, key=OTHER_KEY),
        "iss not allowed": ehr_jwt(aud, iss="https://evil.example"),
        "jku not allowed": jwt.encode({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 60, "jti": "j"},
                                      OTHER_KEY, algorithm="ES384",
                                      headers={"kid": "ehr-key-1", "jku": "https://evil.example/jwks.json"}),
        "wrong aud": ehr_jwt(f"{BASE}/cds-services/psych-risk-encounter-start"),
        "expired": ehr_jwt(aud, iat=now - 400, exp=now - 120),
        "iat in future": ehr_jwt(aud, iat=now + 600, exp=now + 700),
        "exp too far ahead": ehr_jwt(aud, exp=now + 3600),
        "no jti": jwt.encode({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 60}, EHR_KEY,
                             algorithm="ES384", headers={"kid": "ehr-key-1"}),
        "unknown kid": ehr_jwt(aud, kid="not-a-key"),
        "sub not the registered client": ehr_jwt(aud, key=RSA_KEY, alg="RS384", kid="ehr-rsa-1",
                                                 iss="https://ehr-rsa.hospital.test", sub="someone-else"),
        "missing bearer": None,
    }


REJECTIONS = list(_rejections("x", "y"))


@pytest.mark.parametrize("case", REJECTIONS)
def test_jwt_rejection_is_401_with_an_operation_outcome(case: str, client: Any, rsa_jwks_server: Any,
                                                        ehr: Any) -> None:
    path = f"/cds-services/{PATIENT_VIEW}"
    token = _rejections(BASE + path, rsa_jwks_server.url)[case]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.post(path, json=hook_body("p1"), headers=headers)
    assert response.status_code == 401, f"{case}: {response.get_data(as_text=True)}"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_replayed_jti_is_refused(ehr: Any, client: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-H-replay"))
    path = f"/cds-services/{PATIENT_VIEW}"
    headers = auth(path)
    first = client.post(path, json=hook_body(pat["id"]), headers=headers)
    again = client.post(path, json=hook_body(pat["id"]), headers=headers)
    assert first.status_code == 200
    assert again.status_code == 401 and "replay" in again.get_json()["issue"][0]["diagnostics"]


def test_keys_from_the_issuers_jwks_url_and_an_allowed_jku_are_accepted(ehr: Any, client: Any,
                                                                         rsa_jwks_server: Any) -> None:
    pat = ehr.create(patient(mrn="MRN-H-jwks"))
    path = f"/cds-services/{PATIENT_VIEW}"
    via_url = ehr_jwt(BASE + path, key=RSA_KEY, alg="RS384", kid="ehr-rsa-1", iss="https://ehr-rsa.hospital.test",
                      sub="ehr-rsa")
    response = client.post(path, json=hook_body(pat["id"]), headers={"Authorization": f"Bearer {via_url}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    now = int(time.time())
    via_jku = jwt.encode({"iss": ISSUER, "sub": "c", "aud": BASE + path, "iat": now, "exp": now + 60,
                          "jti": uuid.uuid4().hex}, RSA_KEY, algorithm="RS384",
                         headers={"kid": "ehr-rsa-1", "jku": rsa_jwks_server.url})
    response = client.post(path, json=hook_body(pat["id"]), headers={"Authorization": f"Bearer {via_jku}"})
    assert response.status_code == 200, response.get_data(as_text=True)


def test_auth_can_be_switched_off_only_explicitly(ehr: Any, service: Any) -> None:
    from cds.web import create_app

    open_service = dataclasses.replace(service, settings=dataclasses.replace(
        service.settings, cds_hooks_allow_unauthenticated=True))
    open_client = create_app(open_service, {"TESTING": True}).test_client()
    pat = ehr.create(patient(mrn="MRN-H-open"))
    response = open_client.post(f"/cds-services/{PATIENT_VIEW}", json=hook_body(pat["id"]))
    assert response.status_code == 200
    assert service.settings.cds_hooks_allow_unauthenticated is False  # the default
