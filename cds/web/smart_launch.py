"""Signing in from the EHR: SMART App Launch (EHR launch) and OpenID Connect single sign-on.

SMART App Launch 2.x, EHR launch, authorization code with PKCE S256:

* ``GET /smart/launch?iss=&launch=`` - the EHR opens psych-cds with its FHIR base (``iss``) and an
  opaque launch id. ``iss`` must be on ``Settings.smart_issuers`` (an open launch endpoint would let
  anyone point psych-cds at an authorization server of their choosing). The endpoints come from
  ``{iss}/.well-known/smart-configuration``, or from CDS_SMART_AUTHORIZE_URL / CDS_SMART_TOKEN_URL when
  the EHR publishes none. State, nonce and the PKCE verifier stay in the (signed) session; the browser
  goes to the EHR's authorize endpoint with ``aud=iss`` and ``launch``.
* ``GET /smart/callback?code=&state=`` - the state is checked in constant time, the code exchanged
  with the verifier (public client, or client_secret_basic when a secret is set), the id_token
  verified (signature via the issuer's JWKS, iss, aud, exp, nonce) and its ``fhirUser``
  (``Practitioner/<id>``) matched to ``users.practitioner_ref`` - or its ``sub`` to a username. Nobody
  gets an account created: an unknown clinician gets a 403. Then the browser lands on the launched
  patient's page (``patient`` from the token response). The EHR's access token is not kept: psych-cds
  reads FHIR with its own Backend Services client, and access inside psych-cds stays by ward.

OpenID Connect single sign-on with the hospital's identity provider (``GET /auth/sso`` and
``/auth/sso/callback``): the same code + PKCE flow against ``Settings.oidc_issuer`` (discovered via
``/.well-known/openid-configuration``), the id_token verified the same way, and
``Settings.oidc_username_claim`` (default ``preferred_username``, else ``sub``) matched to a username.

Every sign-in and every refusal is audited (``login`` / ``login.failed``, detail ``method``). Failures
render a page with a clear reason and status 400 (bad request, state), 401 (the EHR or IdP refused),
403 (no psych-cds account), 502 (EHR or IdP unreachable or answering nonsense); never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import jwt
import psycopg
import requests
from flask import Blueprint, Response, redirect, render_template, request, session, url_for

from cds.web import auth

bp = Blueprint("smart_launch", __name__)

PENDING_KEY = "oauth_pending"  # session: state -> what the callback needs
PENDING_MAX = 3  # a few launches may be in flight (two EHR tabs); older ones are dropped
PENDING_TTL_S = 600  # a sign-in not finished within 10 minutes starts again
HTTP_TIMEOUT_S = 10
ID_TOKEN_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384")  # never HS*/none
CLOCK_LEEWAY_S = 60
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR id
_PRACTITIONER = re.compile(r"^Practitioner/[A-Za-z0-9\-.]{1,64}$")
SMART = "smart-launch"
SSO = "oidc-sso"


class LaunchError(Exception):
    """A sign-in that cannot go on: ``status`` and ``message`` for the page, ``reason`` for the audit."""

    def __init__(self, status: int, reason: str, message: str, *, actor: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.actor = actor


@dataclass(frozen=True)
class Endpoints:
    """Where to send the browser and the code, and who signs id_tokens (None when unknown)."""

    authorize_url: str
    token_url: str
    issuer: str | None = None
    jwks_uri: str | None = None


# -- helpers (pure or plain HTTP; no Flask) --------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A fresh PKCE code_verifier (64 URL-safe chars) and its S256 code_challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _norm(url: str) -> str:
    return url.strip().rstrip("/")


def _get_json(url: str, what: str) -> dict[str, Any]:
    """GET a JSON object, or LaunchError 502 naming ``what`` could not be read."""
    try:
        r = requests.get(url, headers={"Accept": "application/json"}, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        raise LaunchError(502, f"{what}-unreachable", f"The {what} could not be reached ({exc.__class__.__name__}).")
    if r.status_code != 200:
        raise LaunchError(502, f"{what}-http-{r.status_code}", f"The {what} answered HTTP {r.status_code}.")
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise LaunchError(502, f"{what}-not-json", f"The {what} did not answer with a JSON object.")
    return body


def discover_smart(iss: str, *, authorize_url: str | None, token_url: str | None,
                   oidc_issuer: str | None) -> Endpoints:
    """The EHR's SMART endpoints: its smart-configuration, else the configured URLs.

    The id_token issuer and JWKS come from the smart-configuration (``issuer``, ``jwks_uri``), else
    from ``oidc_issuer``'s OpenID configuration when that is set.
    """
    config: dict[str, Any] = {}
    try:
        r = requests.get(f"{_norm(iss)}/.well-known/smart-configuration", headers={"Accept": "application/json"},
                         timeout=HTTP_TIMEOUT_S)
        if r.status_code == 200 and isinstance(r.json(), dict):
            config = r.json()
    except (requests.RequestException, ValueError):
        config = {}
    authorize = config.get("authorization_endpoint") or authorize_url
    token = config.get("token_endpoint") or token_url
    if not (isinstance(authorize, str) and isinstance(token, str)):
        raise LaunchError(502, "smart-configuration-missing",
                          "The EHR publishes no SMART configuration; set CDS_SMART_AUTHORIZE_URL and"
                          " CDS_SMART_TOKEN_URL.")
    issuer, jwks_uri = config.get("issuer"), config.get("jwks_uri")
    if not (isinstance(issuer, str) and isinstance(jwks_uri, str)):
        issuer = jwks_uri = None
        if oidc_issuer:
            oidc = discover_oidc(oidc_issuer)
            issuer, jwks_uri = oidc["issuer"], oidc["jwks_uri"]
    return Endpoints(authorize, token, issuer, jwks_uri)


def discover_oidc(issuer: str) -> dict[str, Any]:
    """``{issuer}/.well-known/openid-configuration``, checked: its issuer must be ``issuer`` (OIDC Discovery 4.3)."""
    config = _get_json(f"{_norm(issuer)}/.well-known/openid-configuration", "identity provider")
    if _norm(str(config.get("issuer", ""))) != _norm(issuer):
        raise LaunchError(502, "issuer-mismatch", "The identity provider's configuration names another issuer.")
    for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(config.get(key), str):
            raise LaunchError(502, "discovery-incomplete", f"The identity provider's configuration lacks {key}.")
    return config


def exchange_code(token_url: str, *, code: str, redirect_uri: str, verifier: str, client_id: str,
                  client_secret: str | None, what: str) -> dict[str, Any]:
    """Redeem the authorization code (RFC 6749 4.1.3 + PKCE). 401 when refused, 502 when unreachable."""
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier}
    basic: tuple[str, str] | None = None
    if client_secret:
        basic = (client_id, client_secret)  # client_secret_basic
    else:
        data["client_id"] = client_id  # public client
    try:
        r = requests.post(token_url, data=data, auth=basic, headers={"Accept": "application/json"},
                          timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        raise LaunchError(502, "token-unreachable",
                          f"The {what}'s token endpoint could not be reached ({exc.__class__.__name__}).")
    try:
        body = r.json()
    except ValueError:
        body = None
    if 400 <= r.status_code < 500 and isinstance(body, dict) and body.get("error"):
        error = re.sub(r"[^a-z_]", "", str(body["error"]).lower())[:40] or "error"
        raise LaunchError(401, f"token-{error}", f"The {what} refused the sign-in ({error}). Start again from"
                          f" the {what}.")
    if r.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
        raise LaunchError(502, f"token-http-{r.status_code}",
                          f"The {what}'s token endpoint answered HTTP {r.status_code} without a token.")
    return body


def fetch_jwks(jwks_uri: str) -> dict[str, Any]:
    return _get_json(jwks_uri, "identity provider key set")


def validate_id_token(id_token: str, *, jwks: Mapping[str, Any], issuer: str, client_id: str,
                      nonce: str, now: float | None = None) -> dict[str, Any]:
    """The verified claims of ``id_token`` (OIDC Core 3.1.3.7), or LaunchError 401.

    Checks the signature with the key of ``jwks`` named by the header's ``kid`` (asymmetric algorithms
    only), ``iss``, ``aud`` containing ``client_id`` (and ``azp`` when several audiences), ``exp``,
    ``iat`` and ``nonce``.
    """
    def refuse(reason: str, message: str) -> LaunchError:
        return LaunchError(401, f"id-token-{reason}", f"The sign-in token was not accepted: {message}.")

    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.PyJWTError:
        raise refuse("malformed", "it is not a JWT") from None
    alg = header.get("alg")
    if alg not in ID_TOKEN_ALGS:
        raise refuse("alg", f"algorithm {str(alg)[:10]!r} is not allowed")
    try:
        keyset = jwt.PyJWKSet.from_dict(dict(jwks))
    except jwt.PyJWTError:
        raise refuse("jwks", "the issuer's key set is unusable") from None
    candidates = [k for k in keyset.keys if header.get("kid") is None or k.key_id == header.get("kid")]
    if not candidates:
        raise refuse("kid", "it is signed with a key the issuer does not publish")
    try:
        claims: dict[str, Any] = jwt.decode(
            id_token, candidates[0].key, algorithms=[alg], audience=client_id, issuer=issuer,
            leeway=CLOCK_LEEWAY_S, options={"require": ["iss", "aud", "exp", "iat", "sub"]})
    except jwt.InvalidAudienceError:
        raise refuse("aud", "it was issued to another application") from None
    except jwt.InvalidIssuerError:
        raise refuse("iss", "it comes from another issuer") from None
    except jwt.ExpiredSignatureError:
        raise refuse("exp", "it has expired") from None
    except jwt.InvalidSignatureError:
        raise refuse("signature", "its signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise refuse("invalid", exc.__class__.__name__) from None
    aud = claims.get("aud")
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != client_id:
        raise refuse("azp", "it was issued to another application")
    if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], nonce):
        raise refuse("nonce", "it does not belong to this sign-in (nonce)")
    return claims


def practitioner_ref(fhir_user: Any, iss: str | None) -> str | None:
    """``Practitioner/<id>`` from a fhirUser claim (relative, or absolute under ``iss``); else None."""
    if not isinstance(fhir_user, str):
        return None
    ref = fhir_user
    if iss and ref.startswith(_norm(iss) + "/"):
        ref = ref[len(_norm(iss)) + 1:]
    return ref if _PRACTITIONER.match(ref) else None


def find_user(conn: psycopg.Connection[Any], *, practitioner: str | None, username: str | None) -> auth.User | None:
    """The enabled psych-cds account of this clinician: by practitioner_ref, else by username.

    Several accounts sharing one practitioner_ref is a configuration error: nobody is signed in.
    """
    cols = "id, username, display, role, wards, practitioner_ref"
    if practitioner:
        rows = conn.execute(f"SELECT {cols} FROM users WHERE practitioner_ref = %s AND NOT disabled",
                            (practitioner,)).fetchall()
        if len(rows) > 1:
            raise LaunchError(403, "practitioner-ambiguous", "More than one psych-cds account is linked to your"
                              " EHR identity; ask the psych-cds administrator to fix it.", actor=practitioner)
        if rows:
            return auth._user(rows[0])
    if username:
        row = conn.execute(f"SELECT {cols} FROM users WHERE username = %s AND NOT disabled",
                           (username,)).fetchone()
        if row:
            return auth._user(row)
    return None


# -- the session's pending sign-ins ----------------------------------------------------------------


def _remember(state: str, pending: dict[str, Any]) -> None:
    waiting = {k: v for k, v in dict(session.get(PENDING_KEY) or {}).items()
               if time.time() - float(v.get("at", 0)) < PENDING_TTL_S}
    waiting[state] = {**pending, "at": time.time()}
    session[PENDING_KEY] = dict(sorted(waiting.items(), key=lambda kv: kv[1]["at"])[-PENDING_MAX:])


def _take(state: str, method: str) -> dict[str, Any]:
    """The pending sign-in this ``state`` belongs to (constant-time compare), removed; else 400."""
    waiting = dict(session.get(PENDING_KEY) or {})
    found = None
    for key in waiting:
        if hmac.compare_digest(key.encode(), state.encode()):
            found = key
    if found is None or waiting[found].get("method") != method:
        raise LaunchError(400, "bad-state", "This sign-in does not match one started in this browser (state)."
                          " Start again from the EHR.")
    pending = dict(waiting.pop(found))
    session[PENDING_KEY] = waiting
    if time.time() - float(pending.get("at", 0)) >= PENDING_TTL_S:
        raise LaunchError(400, "expired", "The sign-in took too long. Start again.")
    return pending


# -- pages -----------------------------------------------------------------------------------------


def _audit_failure(method: str, error: LaunchError) -> None:
    from cds.web import service
    from compliance import audit

    with service().pool.connection() as conn:
        audit.record(conn, event_type="login.failed", action="E", actor=error.actor or f"({method})",
                     outcome=8 if error.status >= 500 else 4, detail={"method": method, "reason": error.reason})
        conn.commit()


def _error_page(method: str, error: LaunchError) -> Response:
    _audit_failure(method, error)
    title = "SMART launch failed" if method == SMART else "Single sign-on failed"
    html = render_template("launch_error.html", status=error.status, title=title, message=error.message,
                           method=method)
    return Response(html, status=error.status)


def _sign_in(user: auth.User, method: str, patient_ref: str | None = None) -> None:
    """Audit and start a fresh session for ``user`` (no fixation: the old session is dropped)."""
    from cds.web import service
    from compliance import audit

    with service().pool.connection() as conn:
        audit.record(conn, event_type="login", action="E", actor=user.actor, role=user.role,
                     patient_ref=patient_ref, outcome=0, detail={"method": method})
        conn.commit()
    session.clear()
    session["uid"] = user.id
    session["seen"] = datetime.now(UTC).timestamp()
    session.permanent = False


def _redirect_uri(endpoint: str) -> str:
    from cds.web import service

    return service().settings.public_base_url + url_for(endpoint)


@bp.get("/smart/launch")
def launch() -> Any:
    """EHR launch: check ``iss`` against the allowlist, then send the browser to the EHR's authorize endpoint."""
    from cds.web import service

    settings = service().settings
    try:
        iss = request.args.get("iss", "")[:500]
        launch_id = request.args.get("launch", "")[:1000]
        if not settings.smart_client_id:
            raise LaunchError(400, "not-configured", "SMART launch is not set up here (CDS_SMART_CLIENT_ID).")
        if not iss or not launch_id:
            raise LaunchError(400, "missing-params", "An EHR launch needs both iss and launch; open psych-cds"
                              " from the EHR.")
        if _norm(iss) not in {_norm(u) for u in settings.smart_issuers}:
            raise LaunchError(400, "iss-not-allowed", "This EHR is not one psych-cds is registered with"
                              " (CDS_SMART_ISSUERS).", actor=None)
        endpoints = discover_smart(iss, authorize_url=settings.smart_authorize_url,
                                   token_url=settings.smart_token_url, oidc_issuer=settings.smart_oidc_issuer)
    except LaunchError as exc:
        return _error_page(SMART, exc)
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    verifier, challenge = pkce_pair()
    _remember(state, {"method": SMART, "verifier": verifier, "nonce": nonce, "iss": _norm(iss),
                      "token_url": endpoints.token_url, "issuer": endpoints.issuer,
                      "jwks_uri": endpoints.jwks_uri})
    query = urlencode({"response_type": "code", "client_id": settings.smart_client_id,
                       "redirect_uri": _redirect_uri("smart_launch.callback"), "scope": settings.smart_scopes,
                       "state": state, "nonce": nonce, "aud": iss, "launch": launch_id,
                       "code_challenge": challenge, "code_challenge_method": "S256"})
    sep = "&" if "?" in endpoints.authorize_url else "?"
    return redirect(f"{endpoints.authorize_url}{sep}{query}", code=302)


def _authorize_error(pending: dict[str, Any]) -> LaunchError | None:
    """The authorization server's ``error`` redirect (RFC 6749 4.1.2.1), or an RFC 9207 ``iss`` mix-up."""
    error = request.args.get("error")
    if error:
        code = re.sub(r"[^a-z_]", "", error.lower())[:40] or "error"
        return LaunchError(401 if code in ("access_denied", "login_required", "consent_required") else 400,
                           f"authorize-{code}", f"The sign-in was refused ({code}).")
    iss = request.args.get("iss")
    if iss and pending.get("issuer") and _norm(iss) != _norm(str(pending["issuer"])):
        return LaunchError(400, "iss-mismatch", "The answer came from another authorization server.")
    if not request.args.get("code"):
        return LaunchError(400, "missing-code", "The sign-in answer carries no code.")
    return None


def _verified_claims(tokens: Mapping[str, Any], pending: Mapping[str, Any], client_id: str) -> dict[str, Any]:
    id_token = tokens.get("id_token")
    if not isinstance(id_token, str):
        raise LaunchError(401, "no-id-token", "The sign-in did not say who you are (no id_token; the scope needs"
                          " openid and fhirUser).")
    if not (pending.get("issuer") and pending.get("jwks_uri")):
        raise LaunchError(502, "no-issuer", "The id_token cannot be verified: the EHR names no issuer; set"
                          " CDS_SMART_OIDC_ISSUER.")
    return validate_id_token(id_token, jwks=fetch_jwks(str(pending["jwks_uri"])), issuer=str(pending["issuer"]),
                             client_id=client_id, nonce=str(pending["nonce"]))


def _redeem(method: str, endpoint: str, client_id: str | None, client_secret: str | None, *, what: str,
            unset: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The callback half both flows share: the one-time state, an error the authorization server sent
    back, the code (with the PKCE verifier) for tokens, and the verified id_token claims."""
    pending = _take(request.args.get("state", "")[:200], method)
    failure = _authorize_error(pending)
    if failure:
        raise failure
    if not client_id:
        raise LaunchError(400, "not-configured", unset)
    tokens = exchange_code(str(pending["token_url"]), code=request.args["code"][:2000],
                           redirect_uri=_redirect_uri(endpoint), verifier=str(pending["verifier"]),
                           client_id=client_id, client_secret=client_secret, what=what)
    return pending, tokens, _verified_claims(tokens, pending, client_id)


@bp.get("/smart/callback")
def callback() -> Any:
    """Code for tokens, id_token to a psych-cds user, then the launched patient's page."""
    from cds.web import service

    settings = service().settings
    try:
        pending, tokens, claims = _redeem(SMART, "smart_launch.callback", settings.smart_client_id,
                                          settings.smart_client_secret, what="EHR",
                                          unset="SMART launch is not set up here (CDS_SMART_CLIENT_ID).")
        practitioner = practitioner_ref(claims.get("fhirUser"), str(pending["iss"]))
        patient = tokens.get("patient")
        if patient is not None and not (isinstance(patient, str) and _PATIENT_ID.match(patient)):
            raise LaunchError(502, "bad-patient", "The EHR sent a launch patient that is not a FHIR id.")
        with service().pool.connection() as conn:
            user = find_user(conn, practitioner=practitioner, username=None if practitioner else str(claims["sub"]))
        if user is None:
            who = practitioner or f"sub:{str(claims['sub'])[:80]}"
            raise LaunchError(403, "unknown-user", f"Your EHR identity ({who}) has no psych-cds account. Ask the"
                              " psych-cds administrator to link it.", actor=who)
    except LaunchError as exc:
        return _error_page(SMART, exc)
    patient_ref = f"Patient/{patient}" if patient else None
    _sign_in(user, SMART, patient_ref)
    if patient_ref:
        return redirect(url_for("dashboard.patient", patient_ref=patient_ref))
    return redirect(url_for("index"))


@bp.get("/auth/sso")
def sso() -> Any:
    """Start single sign-on with the hospital identity provider (code + PKCE + nonce)."""
    from cds.web import service

    settings = service().settings
    try:
        if not (settings.oidc_issuer and settings.oidc_client_id):
            raise LaunchError(400, "not-configured", "Single sign-on is not set up here (CDS_OIDC_ISSUER,"
                              " CDS_OIDC_CLIENT_ID).")
        config = discover_oidc(settings.oidc_issuer)
    except LaunchError as exc:
        return _error_page(SSO, exc)
    target = request.args.get("next") or ""
    if not target.startswith("/") or target.startswith("//"):
        target = ""
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    verifier, challenge = pkce_pair()
    _remember(state, {"method": SSO, "verifier": verifier, "nonce": nonce, "next": target[:500],
                      "token_url": config["token_endpoint"], "issuer": config["issuer"],
                      "jwks_uri": config["jwks_uri"]})
    query = urlencode({"response_type": "code", "client_id": settings.oidc_client_id,
                       "redirect_uri": _redirect_uri("smart_launch.sso_callback"), "scope": settings.oidc_scopes,
                       "state": state, "nonce": nonce, "code_challenge": challenge,
                       "code_challenge_method": "S256"})
    endpoint = str(config["authorization_endpoint"])
    return redirect(f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", code=302)


@bp.get("/auth/sso/callback")
def sso_callback() -> Any:
    """Code for tokens, verified id_token to an existing psych-cds user, then where the user was going."""
    from cds.web import service

    settings = service().settings
    try:
        pending, tokens, claims = _redeem(SSO, "smart_launch.sso_callback", settings.oidc_client_id,
                                          settings.oidc_client_secret, what="identity provider",
                                          unset="Single sign-on is not set up here (CDS_OIDC_CLIENT_ID).")
        name = claims.get(settings.oidc_username_claim)
        username = name if isinstance(name, str) and name else str(claims["sub"])
        with service().pool.connection() as conn:
            user = find_user(conn, practitioner=None, username=username[:100])
        if user is None:
            raise LaunchError(403, "unknown-user", f"Your hospital account ({username[:100]}) has no psych-cds"
                              " account. Ask the psych-cds administrator to create one.", actor=username[:100])
    except LaunchError as exc:
        return _error_page(SSO, exc)
    _sign_in(user, SSO)
    return redirect(pending.get("next") or url_for("index"))
