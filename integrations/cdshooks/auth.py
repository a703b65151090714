"""Who is calling: the EHR's signed JWT, verified exactly as CDS Hooks 2.0 "Trusting CDS Clients" says.

Every hook and feedback call carries ``Authorization: Bearer <JWT>`` signed by the CDS Client (the
EHR) with ES384 or RS384. We accept it only when:

* ``alg`` is ES384 or RS384 (``none`` and HMAC are refused before any key is looked at);
* ``iss`` is a configured issuer (CDS_HOOKS_ISSUERS);
* the key comes from that issuer's JWKS: the ``jku`` header is followed only when it is on the
  issuer's own ``jku`` allowlist (a token that names any other jku is refused, never silently
  re-pointed), else the configured ``jwks_url`` or inline ``jwks``; ``kid`` must name the key;
* ``aud`` is the exact URL that was called (public base URL + path);
* ``exp`` has not passed and is at most 5 minutes ahead, ``iat`` is not in the future (60 s skew);
* ``jti`` has not been seen from this issuer before (kept in PostgreSQL until the token expires, so
  every web process and node shares the memory).

Anything else raises ``AuthError`` (401 with an OperationOutcome); the reason names the check, never
the token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
import psycopg
import requests

from cds.errors import AuthError

log = logging.getLogger(__name__)

ALGORITHMS = ("ES384", "RS384")
SKEW_S = 60
MAX_LIFETIME_S = 300  # exp no more than 5 minutes ahead (plus skew)


@dataclass(frozen=True)
class Caller:
    """The authenticated CDS Client (or the explicitly unauthenticated demo caller)."""

    issuer: str
    client_id: str | None
    jti: str | None
    authenticated: bool = True

    @property
    def actor(self) -> str:
        return self.issuer if self.authenticated else "unauthenticated"


UNAUTHENTICATED = Caller(issuer="unauthenticated", client_id=None, jti=None, authenticated=False)


class JwksCache:
    """JWK Sets fetched over HTTPS, kept ``ttl_s``; an unknown ``kid`` refetches at most every
    ``min_refresh_s`` (key rotation works, a flood of bogus kids does not hammer the EHR)."""

    def __init__(self, *, ttl_s: float = 300.0, min_refresh_s: float = 30.0, timeout_s: float = 5.0,
                 session: requests.Session | None = None) -> None:
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self._cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def keys(self, url: str, *, refresh: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            cached = self._cache.get(url)
            now = time.monotonic()
            if cached is not None:
                age = now - cached[0]
                if age < self.ttl_s and not (refresh and age >= self.min_refresh_s):
                    return cached[1]
        keys = self._fetch(url)
        with self._lock:
            self._cache[url] = (time.monotonic(), keys)
        return keys

    def _fetch(self, url: str) -> list[dict[str, Any]]:
        try:
            response = self.session.get(url, headers={"Accept": "application/json"}, timeout=self.timeout_s)
            response.raise_for_status()
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            log.warning("CDS client JWKS unavailable", extra={"jwks_url": url, "error": exc.__class__.__name__})
            raise AuthError("the issuer's JWK Set could not be fetched") from exc
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list):
            raise AuthError("the issuer's JWK Set has no keys")
        return [k for k in keys if isinstance(k, dict)]


def _bearer(header: str | None) -> str:
    if not header:
        raise AuthError("CDS Hooks requires Authorization: Bearer <JWT> signed by the CDS client")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be a Bearer JWT")
    return token.strip()


def _key_set(header: Mapping[str, Any], conf: Mapping[str, Any], cache: JwksCache,
             refresh: bool) -> list[dict[str, Any]]:
    jku = header.get("jku")
    if jku is not None:
        if jku not in (conf.get("jku") or []):
            raise AuthError("jku is not on the allowlist for this issuer")
        return cache.keys(str(jku), refresh=refresh)
    if conf.get("jwks"):
        return [k for k in (conf["jwks"].get("keys") or []) if isinstance(k, dict)]
    return cache.keys(str(conf["jwks_url"]), refresh=refresh)


def _signing_key(header: Mapping[str, Any], conf: Mapping[str, Any], cache: JwksCache) -> Any:
    kid = header.get("kid")
    if not kid:
        raise AuthError("JWT header has no kid")
    alg = str(header["alg"])
    for refresh in (False, True):
        for jwk in _key_set(header, conf, cache, refresh):
            if jwk.get("kid") == kid and jwk.get("use", "sig") == "sig":
                if jwk.get("alg") not in (None, alg):
                    raise AuthError(f"key {kid!r} is for {jwk.get('alg')}, not {alg}")
                try:
                    return jwt.PyJWK(jwk, algorithm=alg).key
                except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError) as exc:
                    raise AuthError(f"key {kid!r} does not fit {alg}") from exc
        if header.get("jku") is None and conf.get("jwks"):
            break  # inline keys: nothing to refetch
    raise AuthError(f"no key {str(kid)[:80]!r} in the issuer's JWK Set")


def verify_bearer(authorization: str | None, *, audiences: Sequence[str],
                  issuers: Mapping[str, Mapping[str, Any]], cache: JwksCache,
                  conn: psycopg.Connection[Any], now: float | None = None) -> Caller:
    """Verify the CDS Client's JWT and remember its jti. Raises AuthError on any failure.

    ``conn`` is committed here: a jti once accepted stays spent even if the hook then fails.
    """
    token = _bearer(authorization)
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AuthError("Authorization bearer is not a well-formed JWT") from exc
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise AuthError(f"JWT alg {str(alg)[:20]!r} is not accepted; CDS clients sign with ES384 or RS384")
    issuer = unverified.get("iss")
    conf = issuers.get(issuer) if isinstance(issuer, str) else None
    if conf is None or not isinstance(issuer, str):
        raise AuthError("JWT iss is not a trusted CDS client")
    key = _signing_key(header, conf, cache)
    now = time.time() if now is None else now
    try:
        claims = jwt.decode(token, key=key, algorithms=[str(alg)], audience=list(audiences), issuer=issuer,
                            leeway=SKEW_S, options={"require": ["iss", "aud", "exp", "iat", "jti"]})
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("JWT has expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise AuthError("JWT aud is not this CDS service's URL") from exc
    except jwt.ImmatureSignatureError as exc:
        raise AuthError("JWT iat or nbf is in the future") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"JWT lacks the {exc.claim} claim") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthError("JWT signature does not verify with the issuer's key") from exc
    except jwt.PyJWTError as exc:
        raise AuthError(f"JWT rejected: {exc.__class__.__name__}") from exc
    exp = int(claims["exp"])
    if int(claims["iat"]) > now + SKEW_S:
        raise AuthError("JWT iat is in the future")
    if exp > now + MAX_LIFETIME_S + SKEW_S:
        raise AuthError("JWT exp is more than 5 minutes ahead")
    client_id = conf.get("client_id")
    if client_id and claims.get("sub") != client_id:
        raise AuthError("JWT sub is not the registered client id of this issuer")
    jti = str(claims["jti"])
    if not jti or len(jti) > 256:
        raise AuthError("JWT jti must be 1-256 characters")
    _spend_jti(conn, issuer, jti, exp)
    return Caller(issuer=issuer, client_id=str(claims.get("sub") or "") or None, jti=jti)


def _spend_jti(conn: psycopg.Connection[Any], issuer: str, jti: str, exp: int) -> None:
    expires_at = datetime.fromtimestamp(exp + SKEW_S, UTC)
    with conn.transaction():
        conn.execute("DELETE FROM cds_jwt_jti WHERE expires_at < now()")
        row = conn.execute("INSERT INTO cds_jwt_jti (issuer, jti, expires_at) VALUES (%s, %s, %s)"
                           " ON CONFLICT DO NOTHING RETURNING jti", (issuer, jti, expires_at)).fetchone()
    conn.commit()
    if row is None:
        raise AuthError("JWT jti has been used before (replay)")


def describe_issuers(issuers: Mapping[str, Mapping[str, Any]]) -> str:
    """Issuer names and how their keys are found, for the start-up log (no key material)."""
    return json.dumps({iss: ("jwks" if c.get("jwks") else c.get("jwks_url")) for iss, c in issuers.items()})
