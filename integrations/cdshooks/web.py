"""The CDS Hooks 2.0 service, mounted at /cds-services: discovery, patient-view, encounter-start, feedback.

Hooks answer from the stored assessment (``integrations.cdshooks.store``); they never compute risk.
The EHR is asked only whether the Patient exists: from ``prefetch`` when the EHR sent it, else by a
read on ``fhirServer`` with the ``fhirAuthorization`` bearer, else 412. Every call, refused or not, is
audited as ``cdshooks.call``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState

from cds.errors import AuthError, CdsError, EhrError, InputError, NotFoundError
from cds.web import service
from cds.web.outcomes import outcome_response
from integrations.cdshooks import cards as card_builder
from integrations.cdshooks import store
from integrations.cdshooks.auth import UNAUTHENTICATED, Caller, JwksCache, describe_issuers, verify_bearer
from integrations.fhir.client import FhirClient
from integrations.fhir.mapping import parse_instant

log = logging.getLogger(__name__)

bp = Blueprint("cdshooks", __name__, url_prefix="/cds-services")


class PrefetchUnavailable(EhrError):
    """The hook needs data the EHR neither prefetched nor let us read (CDS Hooks: 412)."""

    http_status = 412
    issue_code = "incomplete"


@dataclass(frozen=True)
class HookService:
    id: str
    hook: str
    title: str
    description: str


SERVICES = {s.id: s for s in (
    HookService("psych-risk-patient-view", "patient-view", "psych-cds suicide / self-harm risk",
                "The patient's current suicide, self-harm and harm-to-others risk tier from psych-cds, with the "
                "rules that fired, open alerts, and a psychiatry referral to accept or override."),
    HookService("psych-risk-encounter-start", "encounter-start", "psych-cds risk at the start of an encounter",
                "At encounter start: the patient's current psych-cds risk tier and open alerts, so the care "
                "team sees them before the visit."),
)}
PREFETCH = {"patient": "Patient/{{context.patientId}}"}


@bp.record_once
def _warn_if_open(state: BlueprintSetupState) -> None:
    settings = state.app.extensions["cds"].settings
    if settings.cds_hooks_allow_unauthenticated:
        log.critical("CDS Hooks authentication is DISABLED (CDS_HOOKS_ALLOW_UNAUTHENTICATED=true): any caller "
                     "can read patients' risk tiers. Demo and tests only; never in a hospital.")
    elif not settings.cds_hooks_issuers:
        log.warning("no CDS Hooks issuers configured (CDS_HOOKS_ISSUERS): every hook call will be refused")
    else:
        log.info("CDS Hooks issuers", extra={"issuers": describe_issuers(settings.cds_hooks_issuers)})


# -- cross-cutting: CORS, auth, audit ------------------------------------------------------------------


@bp.after_request
def _cors(response: Response) -> Response:
    """Browser-based EHR clients call from another origin; the JWT bearer (no cookies) is the credential."""
    origins = service().settings.cds_hooks_cors_origins
    origin = request.headers.get("Origin")
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin and origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Accept"
    response.headers["Access-Control-Max-Age"] = "600"
    return response


@bp.errorhandler(AuthError)
def _unauthorised(exc: AuthError) -> Response:
    response = outcome_response(401, exc.issue_code, str(exc))
    response.headers["WWW-Authenticate"] = 'Bearer realm="cds-services"'
    return response


def _jwks() -> JwksCache:
    cache: JwksCache = current_app.extensions.setdefault("cdshooks.jwks", JwksCache())
    return cache


def _authenticate(audiences: list[str]) -> Caller:
    settings = service().settings
    if settings.cds_hooks_allow_unauthenticated:
        log.warning("unauthenticated CDS Hooks call accepted (CDS_HOOKS_ALLOW_UNAUTHENTICATED=true)")
        return UNAUTHENTICATED
    with service().pool.connection() as conn:
        return verify_bearer(request.headers.get("Authorization"), audiences=audiences,
                             issuers=settings.cds_hooks_issuers, cache=_jwks(), conn=conn)


def _audit(*, caller: Caller | None, service_id: str | None, patient_ref: str | None, status: int,
           detail: Mapping[str, Any], conn: Any = None) -> None:
    from compliance import audit

    outcome = 0 if status < 400 else (4 if status < 500 else 8)
    record = {"service": service_id, "status": status, **detail}
    actor = caller.actor if caller is not None else "unknown"
    if conn is not None:
        audit.record(conn, event_type="cdshooks.call", action="E", actor=actor, role="cds-client",
                     patient_ref=patient_ref, outcome=outcome, purpose="TREAT", detail=record)
        return
    with service().pool.connection() as own:
        audit.record(own, event_type="cdshooks.call", action="E", actor=actor, role="cds-client",
                     patient_ref=patient_ref, outcome=outcome, purpose="TREAT", detail=record)
        own.commit()


def _audited_id(service_id: str) -> str:
    """A service id from the URL as audited: an unknown one (any text, NUL included) only as its repr."""
    return service_id if service_id in SERVICES else repr(service_id[:80])


def _json_object() -> dict[str, Any]:
    body = request.get_json(silent=True, force=True)
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    return body


# -- discovery -----------------------------------------------------------------------------------------


@bp.get("")
def discovery() -> Any:
    """CDS Hooks discovery: what we offer and what to prefetch. No patient data, so no JWT needed."""
    services = [{"hook": s.hook, "id": s.id, "title": s.title, "description": s.description,
                 "prefetch": PREFETCH} for s in SERVICES.values()]
    _audit(caller=None, service_id=None, patient_ref=None, status=200, detail={"call": "discovery"})
    return jsonify({"services": services})


# -- hooks ---------------------------------------------------------------------------------------------


def _under(url: str, base: str) -> bool:
    """``url`` is ``base`` or below it, path segment by path segment: a registered
    ``https://ehr.example.org`` does not admit ``https://ehr.example.org.evil.com``."""
    base = base.rstrip("/")
    return url == base or url.startswith(base + "/")


def _patient_exists(body: Mapping[str, Any], patient_id: str, caller: Caller) -> tuple[bool, str]:
    """Whether the EHR knows the Patient, and how we found out (prefetch | fhir-read)."""
    prefetch = body.get("prefetch")
    if isinstance(prefetch, Mapping) and "patient" in prefetch:
        found = prefetch["patient"]
        if found is None:  # CDS Hooks: key present with null = the EHR's query found nothing
            return False, "prefetch"
        if isinstance(found, Mapping) and found.get("resourceType") == "Patient" and str(found.get("id")) == patient_id:
            return True, "prefetch"
        # an OperationOutcome or another patient: read it ourselves
    server = body.get("fhirServer")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise PrefetchUnavailable("the Patient was not prefetched and no fhirServer was given to read it from")
    allowed = service().settings.cds_hooks_issuers.get(caller.issuer, {}).get("fhir_servers")
    if caller.authenticated and allowed and not any(_under(server, str(prefix)) for prefix in allowed):
        raise PrefetchUnavailable("fhirServer is not one this CDS client is registered with")
    auth = body.get("fhirAuthorization")
    token = auth.get("access_token") if isinstance(auth, Mapping) else None
    if isinstance(auth, Mapping) and str(auth.get("token_type", "Bearer")).lower() != "bearer":
        raise PrefetchUnavailable("fhirAuthorization must be a Bearer token")
    client = FhirClient(server, auth=_StaticToken(str(token)) if token else None, timeout_s=5)
    try:
        client.read("Patient", patient_id)
    except NotFoundError:
        return False, "fhir-read"
    except CdsError as exc:  # unreachable, 401/403, 5xx: we cannot get the data
        raise PrefetchUnavailable(f"cannot read the Patient from fhirServer: {exc.__class__.__name__}") from exc
    return True, "fhir-read"


class _StaticToken:
    """The bearer the EHR handed us for this one call (fhirAuthorization); it cannot be refreshed."""

    def __init__(self, value: str) -> None:
        self.value = value

    def token(self, *, force_refresh: bool = False) -> str:
        return self.value


@bp.post("/<service_id>")
def call_hook(service_id: str) -> Any:
    hook = SERVICES.get(service_id)
    caller: Caller | None = None
    patient_ref: str | None = None
    hook_instance: str | None = None
    try:
        if hook is None:
            raise NotFoundError(f"no CDS service {service_id[:80]!r}; see GET /cds-services")
        caller = _authenticate([service().settings.public_base_url + request.path])
        body = _json_object()
        if body.get("hook") != hook.hook:
            raise InputError(f"this service answers the {hook.hook} hook, not {str(body.get('hook'))[:40]!r}")
        given = body.get("hookInstance")
        if not isinstance(given, str) or not given:
            raise InputError("hookInstance is required (a string)")
        hook_instance = given
        context = body.get("context")
        patient_id = context.get("patientId") if isinstance(context, Mapping) else None
        if not isinstance(patient_id, str) or not patient_id or "/" in patient_id:
            raise InputError("context.patientId is required (a Patient id)")
        patient_ref = f"Patient/{patient_id}"
        exists, how = _patient_exists(body, patient_id, caller)
        svc = service()
        cards: list[dict[str, Any]] = []
        with svc.pool.connection() as conn:
            risk = store.load_risk(conn, svc.cipher, patient_ref) if exists else None
            if risk is not None:
                card_uuid, suggestion_uuid = uuid.uuid4(), uuid.uuid4()
                card = card_builder.risk_card(risk, card_uuid=card_uuid, suggestion_uuid=suggestion_uuid,
                                              public_base_url=svc.settings.public_base_url)
                store.save_card(conn, card_uuid=card_uuid, service=hook.id, hook_instance=hook_instance, risk=risk,
                                indicator=card["indicator"],
                                suggestion_ids=[suggestion_uuid] if card.get("suggestions") else [],
                                issuer=caller.issuer if caller.authenticated else None)
                cards.append(card)
            _audit(caller=caller, service_id=hook.id, patient_ref=patient_ref, status=200, conn=conn,
                   detail={"hook_instance": hook_instance[:200], "patient_source": how,
                           "cards": [c["uuid"] for c in cards], "tier": risk.tier.label if risk else None,
                           "rules": risk.rule_ids if risk else []})
            conn.commit()
        log.info("cds hook answered", extra={"service": hook.id, "cards": len(cards), "patient_source": how})
        return jsonify({"cards": cards})
    except CdsError as exc:
        _audit(caller=caller, service_id=_audited_id(service_id), patient_ref=patient_ref, status=exc.http_status,
               detail={"error": exc.__class__.__name__, "reason": str(exc)[:300],
                       "hook_instance": (hook_instance or "")[:200]})
        raise


# -- feedback ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Feedback:
    card: store.IssuedCard
    outcome: str
    accepted: list[uuid.UUID]
    reason: dict[str, Any] | None
    comment: str | None
    timestamp: Any


def _parse_feedback(item: Any, service_id: str, conn: Any) -> _Feedback:
    if not isinstance(item, Mapping):
        raise InputError("each feedback item must be an object")
    try:
        card_uuid = uuid.UUID(str(item.get("card")))
    except ValueError as exc:
        raise InputError("feedback.card must be the uuid of a card") from exc
    card = store.issued_card(conn, card_uuid)
    if card is None or card.service != service_id:
        raise NotFoundError(f"no card {card_uuid} was issued by {service_id}")
    outcome = item.get("outcome")
    if outcome not in ("accepted", "overridden"):
        raise InputError("feedback.outcome must be accepted or overridden")
    timestamp = parse_instant(item.get("outcomeTimestamp"))
    if timestamp is None:
        raise InputError("feedback.outcomeTimestamp must be an instant (ISO 8601)")
    suggestions = item.get("acceptedSuggestions")
    if suggestions is None:
        suggestions = []
    elif not isinstance(suggestions, list):
        raise InputError("acceptedSuggestions must be a list of {\"id\": <suggestion uuid>}")
    accepted: list[uuid.UUID] = []
    for suggestion in suggestions:
        try:
            accepted.append(uuid.UUID(str(suggestion.get("id") if isinstance(suggestion, Mapping) else "")))
        except ValueError as exc:
            raise InputError("acceptedSuggestions[].id must be a suggestion uuid") from exc
    if any(a not in card.suggestion_ids for a in accepted):
        raise InputError("acceptedSuggestions names a suggestion this card did not carry")
    reason: dict[str, Any] | None = None
    comment: str | None = None
    override = item.get("overrideReason")
    if override is not None and not isinstance(override, Mapping):
        raise InputError("overrideReason must be an object {reason: Coding, userComment: string}")
    coding = (override or {}).get("reason")
    if coding is not None and not (isinstance(coding, Mapping) and all(
            isinstance(coding.get(k), str) for k in ("system", "code", "display") if coding.get(k) is not None)):
        raise InputError("overrideReason.reason must be a Coding (system, code, display: strings)")
    user_comment = (override or {}).get("userComment")
    if user_comment is not None and not isinstance(user_comment, str):
        raise InputError("overrideReason.userComment must be a string")
    if outcome == "overridden":
        if coding:
            reason = {"reason": {k: str(coding[k])[:200] for k in ("system", "code", "display") if coding.get(k)}}
        if user_comment:
            comment = user_comment[:2000]
    return _Feedback(card, str(outcome), accepted, reason, comment, timestamp)


@bp.post("/<service_id>/feedback")
def feedback(service_id: str) -> Any:
    """Accepted / overridden outcomes for cards we issued; they count in the rule figures."""
    caller: Caller | None = None
    patient_refs: list[str] = []
    try:
        if service_id not in SERVICES:
            raise NotFoundError(f"no CDS service {service_id[:80]!r}")
        base = service().settings.public_base_url
        # aud is this URL; the service's own URL is accepted too (CDS Hooks names "the CDS Service endpoint")
        caller = _authenticate([base + request.path, f"{base}{bp.url_prefix}/{service_id}"])
        items = _json_object().get("feedback")
        if not isinstance(items, list) or not items:
            raise InputError("body must be {\"feedback\": [ ... ]} with at least one item")
        svc = service()
        stored = 0
        with svc.pool.connection() as conn:
            parsed = [_parse_feedback(item, service_id, conn) for item in items]
            for fb in parsed:
                stored += store.save_feedback(conn, svc.cipher, card=fb.card, outcome=fb.outcome,
                                              accepted=fb.accepted, override_reason=fb.reason, user_comment=fb.comment,
                                              outcome_timestamp=fb.timestamp,
                                              issuer=caller.issuer if caller.authenticated else None)
            patient_refs = sorted({fb.card.patient_ref for fb in parsed})
            _audit(caller=caller, service_id=service_id, conn=conn, status=200,
                   patient_ref=patient_refs[0] if len(patient_refs) == 1 else None,
                   detail={"call": "feedback", "cards": [str(fb.card.uuid) for fb in parsed],
                           "outcomes": [fb.outcome for fb in parsed],
                           "override_codes": [(fb.reason or {}).get("reason", {}).get("code") for fb in parsed],
                           "stored": stored})
            conn.commit()
        return jsonify({}), 200
    except CdsError as exc:
        _audit(caller=caller, service_id=_audited_id(service_id), patient_ref=patient_refs[0] if patient_refs else None,
               status=exc.http_status, detail={"call": "feedback", "error": exc.__class__.__name__,
                                                "reason": str(exc)[:300]})
        raise
