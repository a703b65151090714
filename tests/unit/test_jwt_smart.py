"""SMART client assertions and `cds keys jwks`: what the EHR will check, checked here first."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner

from cds.errors import ConfigError
from integrations.fhir.smart import (
    BackendServicesAuth,
    generate_private_key,
    jwks_command,
    load_private_key,
    private_key_pem,
    public_jwk,
)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_client_assertion_carries_the_smart_claims(alg: str) -> None:
    key = generate_private_key(alg)
    jwk = public_jwk(key, alg)
    auth = BackendServicesAuth(client_id="psych-cds", private_key=key, alg=alg, kid=jwk["kid"],
                               scopes="system/*.read", fhir_base_url="https://ehr.test/fhir",
                               token_url="https://ehr.test/oauth/token")
    first, second = auth.client_assertion(), auth.client_assertion()
    header = jwt.get_unverified_header(first)
    assert header["alg"] == alg and header["kid"] == jwk["kid"]
    claims = jwt.decode(first, jwt.PyJWK(jwk).key, algorithms=[alg], audience="https://ehr.test/oauth/token")
    assert claims["iss"] == claims["sub"] == "psych-cds"
    issued = int(time.time())
    lifetime = claims["exp"] - issued  # SMART Backend Services: an assertion lives at most five minutes
    assert 0 < lifetime <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_public_jwk_has_no_private_parts_and_a_stable_thumbprint_kid() -> None:
    key = generate_private_key("RS384")
    jwk = public_jwk(key, "RS384")
    assert jwk["kty"] == "RSA" and jwk["alg"] == "RS384" and jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    assert public_jwk(key, "RS384")["kid"] == jwk["kid"]
    assert public_jwk(key, "RS384", "mine")["kid"] == "mine"


def test_a_key_that_does_not_fit_the_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rsa.pem"
    path.write_bytes(private_key_pem(generate_private_key("RS384")))
    with pytest.raises(ConfigError, match="ES384"):
        load_private_key(path, "ES384")


def test_jwks_command_generates_a_0600_key_and_prints_its_public_jwks(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path))
    key_file = tmp_path / "keys" / "smart.pem"
    result = CliRunner().invoke(jwks_command, ["--generate", "--alg", "ES384", "--key-file", str(key_file)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    jwks = json.loads(result.stdout)
    assert jwks["keys"][0]["crv"] == "P-384" and "d" not in jwks["keys"][0]
    assert jwks["keys"][0] == public_jwk(load_private_key(key_file, "ES384"), "ES384")
    again = CliRunner().invoke(jwks_command, ["--generate", "--alg", "ES384", "--key-file", str(key_file)])
    assert again.exit_code != 0  # never overwrites a private key
    printed = CliRunner().invoke(jwks_command, ["--alg", "ES384", "--key-file", str(key_file)])
    assert json.loads(printed.stdout) == jwks
