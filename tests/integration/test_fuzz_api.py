"""Bad input never crashes the service: hypothesis throws malformed JSON, wrong types, deep nesting,
invalid UTF-8, injection strings and huge bodies at the HTTP API. Every answer is a 4xx with an
OperationOutcome (or a normal 200 for what happens to be valid), never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds.store import clients

pytestmark = pytest.mark.integration

HOSTILE = st.sampled_from(["'; DROP TABLE events; --", "<script>alert(1)</script>", "Patient/1 OR 1=1",
                           "\u0000", "\ud800", "../../etc/passwd", "{{7*7}}", "%s%s%s", "Patient/" + "9" * 500])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50) | HOSTILE,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
SCREEN_BODIES = st.fixed_dictionaries({}, optional={
    "patient": JSONISH | HOSTILE, "conversation": JSONISH | HOSTILE, "message": JSONISH | HOSTILE,
    "lang": JSONISH, "message_id": JSONISH})


def _check(r: Any) -> None:
    assert r.status_code < 500, r.data[:300]
    if r.status_code >= 400:
        body = r.get_json(silent=True)
        assert body and body["resourceType"] == "OperationOutcome", r.data[:300]


@pytest.fixture
def key(service: Any) -> str:
    with service.pool.connection() as conn:
        k = clients.add_client(conn, "fuzz-bot", "test")
        conn.commit()
    from dataclasses import replace

    service.settings = replace(service.settings, screen_rate_per_min=100_000)
    return k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=SCREEN_BODIES)
def test_screen_api_answers_every_body_without_crashing(client: Any, key: str, body: dict[str, Any]) -> None:
    _check(client.post("/api/v1/screen", json=body, headers={"Authorization": f"Bearer {key}"}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_raw_bytes_and_invalid_utf8_are_4xx(client: Any, key: str, raw: bytes) -> None:
    for path in ("/api/v1/screen", "/api/v1/events"):
        headers = {"Authorization": f"Bearer {key}"}
        _check(client.post(path, data=raw, headers={**headers, "Content-Type": "application/json"}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(resource=st.fixed_dictionaries({"resourceType": st.sampled_from(["Communication", "QuestionnaireResponse",
                                                                         "Observation", "Bundle", ""])},
                                      optional={"status": JSONISH, "subject": JSONISH, "payload": JSONISH,
                                                "item": JSONISH, "id": JSONISH, "meta": JSONISH}))
def test_wrong_resources_are_quarantined_not_crashed(client: Any, key: str, resource: dict[str, Any]) -> None:
    _check(client.post("/api/v1/events", json=resource, headers={"Authorization": f"Bearer {key}"}))


def test_deep_nesting_huge_bodies_and_forged_keys(client: Any, key: str, service: Any) -> None:
    deep = '{"patient": "Patient/1", "conversation": "c", "message": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    _check(client.post("/api/v1/screen", data=deep,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}))
    _check(client.post("/api/v1/events", data='{"resourceType": "Communication", "x": ' + "[" * 5000 + "]" * 5000 + "}",
                       headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {key}"}))
    huge = client.post("/api/v1/screen", data=b'{"message": "' + b"a" * (3 * 1024 * 1024) + b'"}',
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert huge.status_code == 413 and huge.get_json()["resourceType"] == "OperationOutcome"
    for forged in ("cds_" + "A" * 43, "Bearer", "", "cds_' OR '1'='1"):
        _check(r := client.post("/api/v1/screen", json={"patient": "Patient/1", "conversation": "c", "message": "x"},
                                headers={"Authorization": f"Bearer {forged}"}))
        assert r.status_code == 401


def test_one_patients_words_never_appear_in_anothers_answer(client: Any, key: str) -> None:
    secret = "我叫王小明，我把药藏在床垫下面了"
    client.post("/api/v1/screen", json={"patient": "Patient/a", "conversation": "c1", "message": secret},
                headers={"Authorization": f"Bearer {key}"})
    other = client.post("/api/v1/screen", json={"patient": "Patient/b", "conversation": "c1", "message": "hello"},
                        headers={"Authorization": f"Bearer {key}"})
    assert other.status_code == 200 and "王小明" not in other.get_data(as_text=True)
