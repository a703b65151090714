"""A CDS client registered with fhir_servers may name only those servers (or paths below them) as
fhirServer; a look-alike host must not pass a plain prefix match."""

from __future__ import annotations

import pytest

from integrations.cdshooks.web import _under


@pytest.mark.parametrize(("url", "base", "ok"), [
    ("https://ehr.example.org/fhir", "https://ehr.example.org/fhir", True),
    ("https://ehr.example.org/fhir/", "https://ehr.example.org/fhir", True),
    ("https://ehr.example.org/fhir/R4", "https://ehr.example.org/fhir/", True),
    ("https://ehr.example.org", "https://ehr.example.org/", True),
    ("https://ehr.example.org.evil.com/fhir", "https://ehr.example.org", False),
    ("https://ehr.example.org/fhir-other", "https://ehr.example.org/fhir", False),
    ("https://ehr.example.org:8443/fhir", "https://ehr.example.org", False),
    ("http://ehr.example.org/fhir", "https://ehr.example.org", False),
])
def test_fhir_server_must_be_a_registered_base_or_below_it(url: str, base: str, ok: bool) -> None:
    assert _under(url, base) is ok
