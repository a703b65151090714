"""SMART Backend Services against a real authorization server (npm oidc-provider@9.13.3 in
integrations/sandbox/oauth) guarding the real local EHR: token fetch (RS384, ES384), caching,
refresh on expiry, one retry after a 401, a wrong key refused, and the bearer on FHIR requests.

The OAuth server's /fhir gateway forwards only requests carrying a token it issued, so a FHIR read
that succeeds proves the client sent a valid bearer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cds.demo import wait_for
from cds.errors import AuthError, ConfigError
from integrations.fhir.client import FhirClient
from integrations.fhir.smart import BackendServicesAuth, generate_private_key, private_key_pem, public_jwk
from tests.integration.conftest import free_port
from tests.samples import patient

pytestmark = pytest.mark.integration

OAUTH_DIR = Path(__file__).resolve().parents[2] / "integrations" / "sandbox" / "oauth"
KEYS = {"RS384": generate_private_key("RS384"), "ES384": generate_private_key("ES384")}


class OAuthServer:
    def __init__(self, root: str) -> None:
        self.root = root
        self.token_url = f"{root}/token"
        self.fhir = f"{root}/fhir"

    def stats(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.root}/admin/stats", timeout=5).json())

    def revoke_all(self) -> None:
        requests.post(f"{self.root}/admin/revoke", timeout=5).raise_for_status()

    def auth(self, alg: str, *, key: Any = None, client_id: str | None = None) -> BackendServicesAuth:
        key = key or KEYS[alg]
        return BackendServicesAuth(client_id=client_id or f"psych-cds-{alg.lower()}", private_key=key, alg=alg,
                                   kid=str(public_jwk(KEYS[alg], alg)["kid"]),
                                   scopes="system/*.read system/RiskAssessment.write", fhir_base_url=self.fhir,
                                   token_url=self.token_url)


@pytest.fixture
def oauth_server(ehr_server: str, tmp_path: Path) -> Iterator[Callable[..., OAuthServer]]:
    """Start oauth.mjs on a free port with our two clients' JWKS; ``ttl`` is the token lifetime."""
    if shutil.which("node") is None or not (OAUTH_DIR / "node_modules").exists():
        pytest.skip("npm ci in integrations/sandbox/oauth first (make deps)")
    clients = [{"client_id": f"psych-cds-{alg.lower()}", "token_endpoint_auth_signing_alg": alg,
                "jwks": {"keys": [public_jwk(key, alg)]}} for alg, key in KEYS.items()]
    clients_file = tmp_path / "clients.json"
    clients_file.write_text(json.dumps(clients))
    procs: list[subprocess.Popen[bytes]] = []

    def start(ttl: int = 300) -> OAuthServer:
        port = free_port()
        with open(tmp_path / f"oauth-{port}.log", "wb") as log:  # the child keeps its own handle
            proc = subprocess.Popen(["node", str(OAUTH_DIR / "oauth.mjs"), "--port", str(port), "--clients",
                                     str(clients_file), "--ttl", str(ttl), "--upstream", f"{ehr_server}/fhir"],
                                    stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_for(f"http://127.0.0.1:{port}/healthz", 30, "the OAuth sandbox", proc)
        return OAuthServer(f"http://127.0.0.1:{port}")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_fetched_with_a_signed_assertion_and_sent_as_bearer(alg: str, oauth_server: Any, ehr: Any) -> None:
    server = oauth_server()
    pat = ehr.create(patient(mrn=f"MRN-S-{alg}"))
    client = FhirClient(server.fhir, auth=server.auth(alg))
    assert client.read("Patient", pat["id"])["id"] == pat["id"]
    stats = server.stats()
    assert stats["token_ok"] == 1 and stats["token_failed"] == 0
    assert stats["resource_authorised"] == 1 and stats["resource_refused"] == 0


def test_without_a_token_the_gateway_refuses(oauth_server: Any, ehr: Any) -> None:
    server = oauth_server()
    with pytest.raises(AuthError):
        FhirClient(server.fhir).read("Patient", "x")


def test_one_token_serves_many_requests(oauth_server: Any, ehr: Any) -> None:
    server = oauth_server()
    pat = ehr.create(patient(mrn="MRN-S-cache"))
    client = FhirClient(server.fhir, auth=server.auth("ES384"))
    for _ in range(20):
        client.read("Patient", pat["id"])
    stats = server.stats()
    assert stats["token_ok"] == 1 and stats["resource_authorised"] == 20


def test_token_is_renewed_when_it_expires(oauth_server: Any, ehr: Any) -> None:
    server = oauth_server(ttl=2)
    pat = ehr.create(patient(mrn="MRN-S-ttl"))
    auth = server.auth("RS384")
    client = FhirClient(server.fhir, auth=auth)
    client.read("Patient", pat["id"])
    first = auth.token()
    time.sleep(2.5)  # past the server's token lifetime
    client.read("Patient", pat["id"])
    stats = server.stats()
    assert auth.token() != first
    assert stats["token_ok"] == 2
    assert stats["resource_refused"] == 0  # renewed before use, not after a refusal


def test_a_refused_token_is_replaced_once_and_the_request_retried(oauth_server: Any, ehr: Any) -> None:
    server = oauth_server()
    pat = ehr.create(patient(mrn="MRN-S-401"))
    client = FhirClient(server.fhir, auth=server.auth("ES384"))
    client.read("Patient", pat["id"])
    server.revoke_all()  # the EHR revokes every token issued so far
    assert client.read("Patient", pat["id"])["id"] == pat["id"]
    stats = server.stats()
    assert stats["resource_refused"] == 1 and stats["token_ok"] == 2


def test_wrong_key_is_refused_as_an_auth_error(oauth_server: Any) -> None:
    server = oauth_server()
    wrong = server.auth("ES384", key=generate_private_key("ES384"))
    with pytest.raises(AuthError, match="invalid_client"):
        wrong.token()
    assert server.stats()["token_failed"] == 1


def test_unreachable_token_endpoint_is_ehr_unavailable() -> None:
    from cds.errors import EhrUnavailable

    auth = BackendServicesAuth(client_id="c", private_key=KEYS["ES384"], alg="ES384", kid="k", scopes="system/*.read",
                               fhir_base_url="http://127.0.0.1:1/fhir",
                               token_url=f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(EhrUnavailable):
        auth.token()


def test_service_built_from_settings_authenticates_to_the_ehr(oauth_server: Any, ehr: Any,
                                                              settings_env: dict[str, str], engines: Any,
                                                              tmp_path: Path) -> None:
    from cds.service import Service
    from cds.settings import Settings

    server = oauth_server()
    key_file = tmp_path / "smart.pem"
    key_file.write_bytes(private_key_pem(KEYS["ES384"]))
    env = {**settings_env, "CDS_FHIR_BASE_URL": server.fhir, "CDS_FHIR_TOKEN_URL": server.token_url,
           "CDS_FHIR_CLIENT_ID": "psych-cds-es384", "CDS_FHIR_PRIVATE_KEY_FILE": str(key_file),
           "CDS_FHIR_JWT_ALG": "ES384"}
    svc = Service.start(Settings.from_env(env), migrate=False, engines=engines, pool_size=2)
    try:
        pat = ehr.create(patient(mrn="MRN-S-svc"))
        assert isinstance(svc.fhir.auth, BackendServicesAuth)
        assert svc.fhir.read("Patient", pat["id"])["id"] == pat["id"]
    finally:
        svc.close()
    assert server.stats()["token_ok"] == 1


def test_token_url_is_discovered_or_the_setting_is_asked_for(ehr: Any) -> None:
    """The local EHR publishes no smart-configuration: the client says which setting to give."""
    auth = BackendServicesAuth(client_id="c", private_key=KEYS["RS384"], alg="RS384", kid="k",
                               scopes="system/*.read", fhir_base_url=ehr.base)
    with pytest.raises(ConfigError, match="CDS_FHIR_TOKEN_URL"):
        auth.token()
