"""SMART Backend Services: how psych-cds authenticates to a hospital EHR's FHIR API, with no user.

OAuth 2 ``client_credentials`` with ``private_key_jwt`` client authentication (SMART App Launch 2,
"Backend Services"): psych-cds signs a short client assertion (RS384 or ES384) with its private key,
the EHR checks it against the public JWKS registered for the client (``cds keys jwks`` prints it)
and answers with an access token. ``BackendServicesAuth`` is the FhirClient's ``TokenSource``: one
token is shared by every thread until shortly before it expires, and ``token(force_refresh=True)``
(called by the client after a 401) gets a fresh one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds.errors import AuthError, ConfigError, EhrUnavailable
from cds.settings import Settings

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")
ASSERTION_LIFETIME_S = 300  # SMART: exp no more than five minutes in the future
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# -- keys -------------------------------------------------------------------------------------------


def generate_private_key(alg: str) -> PrivateKey:
    """A new key pair for ``alg``: RSA 3072 for RS384, P-384 for ES384."""
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ConfigError(f"unsupported signing algorithm {alg!r}; use RS384 or ES384")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: Path, alg: str) -> PrivateKey:
    """Read a PEM private key and check it fits ``alg`` (an RSA key cannot sign ES384)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"SMART private key {path} cannot be read: {exc.__class__.__name__}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"SMART private key {path} is not an unencrypted PEM private key") from exc
    if alg == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if alg == "ES384" and isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return key
    raise ConfigError(f"SMART private key {path} does not fit {alg} (RS384 needs RSA, ES384 a P-384 EC key)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: PrivateKey, alg: str, kid: str | None = None) -> dict[str, Any]:
    """The public half as a JWK with ``alg``, ``use`` and ``kid`` (default: RFC 7638 thumbprint)."""
    jwk: dict[str, Any] = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    core = {k: jwk[k] for k in (("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y"))}
    thumbprint = _b64(hashlib.sha256(json.dumps(core, separators=(",", ":"), sort_keys=True).encode()).digest())
    return {**core, "alg": alg, "use": "sig", "kid": kid or thumbprint}


def key_id(key: PrivateKey, alg: str, configured: str | None) -> str:
    return configured or str(public_jwk(key, alg)["kid"])


# -- the token source -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: float  # time.time() seconds
    scope: str


class BackendServicesAuth:
    """A thread-safe ``TokenSource`` for the FhirClient (SMART Backend Services)."""

    def __init__(self, *, client_id: str, private_key: PrivateKey, alg: str, kid: str, scopes: str,
                 fhir_base_url: str, token_url: str | None = None, timeout_s: float = 10.0,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.time) -> None:
        if alg not in ALGORITHMS:
            raise ConfigError(f"CDS_FHIR_JWT_ALG must be RS384 or ES384, got {alg!r}")
        self.client_id = client_id
        self.alg = alg
        self.kid = kid
        self.scopes = scopes
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.clock = clock
        self._key = private_key
        self._token_url = token_url
        self._token: AccessToken | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> BackendServicesAuth:
        if not settings.fhir_client_id:
            raise ConfigError("CDS_FHIR_CLIENT_ID is required for SMART Backend Services")
        if settings.fhir_private_key_file is None:
            raise ConfigError("CDS_FHIR_PRIVATE_KEY_FILE is required when CDS_FHIR_CLIENT_ID is set "
                              "(generate one with `cds keys jwks --generate`)")
        key = load_private_key(settings.fhir_private_key_file, settings.fhir_jwt_alg)
        return cls(client_id=settings.fhir_client_id, private_key=key, alg=settings.fhir_jwt_alg,
                   kid=key_id(key, settings.fhir_jwt_alg, settings.fhir_key_id), scopes=settings.fhir_scopes,
                   fhir_base_url=settings.fhir_base_url, token_url=settings.fhir_token_url)

    # public ---------------------------------------------------------------------------------------

    def token(self, *, force_refresh: bool = False) -> str:
        """A valid access token: the cached one, or a new one when it is about to expire or was refused."""
        with self._lock:
            current = self._token
            if current is not None and not force_refresh and self.clock() < current.expires_at:
                return current.value
            self._token = self._fetch()
            return self._token.value

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            self._token_url = self._discover_token_url()
        return self._token_url

    def client_assertion(self) -> str:
        """The signed JWT that proves we hold the registered key (one per token request)."""
        now = int(self.clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url, "iat": now,
                  "exp": now + ASSERTION_LIFETIME_S, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})

    # internals ------------------------------------------------------------------------------------

    def _discover_token_url(self) -> str:
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        try:
            response = self.session.get(url, headers={"Accept": "application/json"}, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise EhrUnavailable(f"SMART configuration unreachable: {exc.__class__.__name__} for {url}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise EhrUnavailable(f"SMART configuration: EHR answered {response.status_code} for {url}",
                                 status=response.status_code)
        try:
            body = response.json() if response.status_code == 200 else {}
        except ValueError:
            body = {}
        endpoint = body.get("token_endpoint") if isinstance(body, dict) else None
        if not endpoint:
            raise ConfigError(f"{url} names no token_endpoint (HTTP {response.status_code}); "
                              "set CDS_FHIR_TOKEN_URL")
        methods = body.get("token_endpoint_auth_methods_supported") or []
        if methods and "private_key_jwt" not in methods:
            log.warning("EHR does not list private_key_jwt among its token endpoint auth methods")
        return str(endpoint)

    def _fetch(self) -> AccessToken:
        form = {"grant_type": "client_credentials", "scope": self.scopes,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.client_assertion()}
        started = self.clock()
        try:
            response = self.session.post(self.token_url, data=form, headers={"Accept": "application/json"},
                                         timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise EhrUnavailable(f"token endpoint unreachable: {exc.__class__.__name__}") from exc
        body = _json_object(response)
        if response.status_code >= 500 or response.status_code == 429:
            raise EhrUnavailable(f"token endpoint answered {response.status_code}", status=response.status_code)
        if response.status_code != 200 or not body.get("access_token"):
            # invalid_client (wrong key, unknown client, replayed jti), invalid_scope...: not retryable as is
            error = str(body.get("error") or "no access_token")[:80]
            description = str(body.get("error_description") or "")[:200]
            raise AuthError(f"token endpoint refused client {self.client_id!r} "
                            f"(HTTP {response.status_code}): {error}" + (f" - {description}" if description else ""))
        if str(body.get("token_type", "bearer")).lower() != "bearer":
            raise AuthError(f"token endpoint issued a {body.get('token_type')!r} token; only bearer is supported")
        try:
            expires_in = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            expires_in = 300.0
        # Renew shortly before expiry: 10 % of the lifetime, at most 30 s, so a request never carries
        # a token that dies on the way.
        margin = min(30.0, expires_in * 0.1)
        granted = str(body.get("scope") or "")
        log.info("SMART access token issued", extra={"client_id": self.client_id, "expires_in": expires_in,
                                                      "scope": granted})
        return AccessToken(str(body["access_token"]), started + expires_in - margin, granted)


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# -- `cds keys jwks` --------------------------------------------------------------------------------


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a new private key readable by its owner only (0600); never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; refusing to overwrite a private key") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(private_key_pem(key))
    path.chmod(0o600)


@click.command("jwks")
@click.option("--generate", is_flag=True,
              help="create the private key file (mode 0600) first; refuses to overwrite one")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="private key (default: CDS_FHIR_PRIVATE_KEY_FILE, else <data dir>/keys/smart-<alg>.pem)")
@click.option("--alg", type=click.Choice(ALGORITHMS), help="signing algorithm (default: CDS_FHIR_JWT_ALG)")
def jwks_command(generate: bool, key_file: Path | None, alg: str | None) -> None:
    """Print the public JWK Set to register with the EHR for SMART Backend Services."""
    settings = Settings.from_env()
    alg = alg or settings.fhir_jwt_alg
    path = key_file or settings.fhir_private_key_file or settings.data_dir / "keys" / f"smart-{alg.lower()}.pem"
    if generate:
        write_private_key(path, generate_private_key(alg))
        click.echo(f"wrote a new {alg} private key to {path} (0600); set CDS_FHIR_PRIVATE_KEY_FILE={path}",
                   err=True)
    key = load_private_key(path, alg)
    click.echo(json.dumps({"keys": [public_jwk(key, alg, settings.fhir_key_id)]}, indent=2))
