"""The served OpenAPI description is valid OpenAPI and matches the routes Flask really has, both ways:
every documented operation is routed, and every machine route is documented."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cds.web.auth import CSRF_EXEMPT_PREFIXES

pytestmark = pytest.mark.integration

METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture
def document(client: Any) -> dict[str, Any]:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def test_the_served_description_is_valid_openapi(document: dict[str, Any], service: Any) -> None:
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # the OpenAPI 3.0 meta-schema; raises with the first error
    assert document["servers"] == [{"url": service.settings.public_base_url}]
    labels = {op.ok().label for op in schema.get_all_operations()}
    assert "POST /api/v1/screen" in labels and "POST /fhir/notify" in labels


def test_every_documented_operation_is_routed(document: dict[str, Any], client: Any) -> None:
    adapter = client.application.url_map.bind("cds.test")
    for path, item in document["paths"].items():
        assert "{" not in path, f"{path}: name concrete paths (the hook ids are fixed)"
        for method in (m for m in METHODS if m in item):
            try:
                adapter.match(path, method=method.upper())
            except (NotFound, MethodNotAllowed) as exc:
                pytest.fail(f"{method.upper()} {path} is documented but not routed ({exc.__class__.__name__})")


def test_every_machine_route_is_documented(document: dict[str, Any], client: Any) -> None:
    """A new endpoint under /api/, /cds-services, /fhir/ or /healthz needs its description."""
    from integrations.cdshooks.web import SERVICES

    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in METHODS if m in item}
    for rule in client.application.url_map.iter_rules():
        if not rule.rule.startswith(CSRF_EXEMPT_PREFIXES):
            continue
        paths = ([rule.rule.replace("<service_id>", s) for s in SERVICES] if "<service_id>" in rule.rule
                 else [rule.rule])
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            for path in paths:
                assert (method, path) in documented, f"{method} {path} ({rule.endpoint}) is not in openapi.yaml"
