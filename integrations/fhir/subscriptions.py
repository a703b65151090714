"""FHIR Subscriptions (R4 + the topic-based Subscriptions Backport IG): the rest-hook receiver.

The EHR POSTs a notification Bundle (``history`` in R4 backport, ``subscription-notification`` in
R4B/R5) to ``/fhir/notify``; its first entry is the SubscriptionStatus (a ``Parameters`` in R4: the
parameters ``subscription``, ``topic``, ``status``, ``type`` = handshake | heartbeat |
event-notification, ``events-since-subscription-start`` and one ``notification-event`` per event
with ``event-number``, ``timestamp`` and ``focus``). With ``full-resource`` payloads the focus is in
the Bundle; with ``id-only`` we read it from the EHR.

Each focus goes through ``Pipeline.ingest(resource, source="ehr")``: the same source as polling, so
a notification delivered 19 times, or notified and also polled, is stored once; the normal workers
assess it. Polling keeps running as reconciliation: a notification we never got is still found.
Each subscription is a feed (``subscription:<id>``) whose heartbeats the watchdog checks.

Sender side: ``ensure_subscription`` registers the Subscription with the EHR.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flask import Blueprint, jsonify, request

from cds.errors import AuthError, CdsError, InputError, NotFoundError
from cds.store import feeds
from cds.web import service
from integrations.fhir.client import FhirClient
from integrations.fhir.mapping import ASSESSED_TYPES, is_own_write, parse_instant

log = logging.getLogger(__name__)

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
NOTIFICATION_TYPES = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")

bp = Blueprint("fhir_notify", __name__)


# -- parsing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotificationEvent:
    number: str | None
    timestamp: datetime | None
    focus: str | None  # reference: relative, absolute, or with _history/<version>


@dataclass(frozen=True)
class Notification:
    subscription_id: str
    topic: str | None
    status: str | None
    type: str
    events_since_start: str | None
    events: tuple[NotificationEvent, ...]
    resources: tuple[tuple[str | None, Mapping[str, Any]], ...] = field(default=())  # (fullUrl, resource)

    @property
    def feed(self) -> str:
        return f"subscription:{self.subscription_id}"


def _value(param: Mapping[str, Any]) -> Any:
    for key, value in param.items():
        if key.startswith("value"):
            if isinstance(value, Mapping) and "reference" in value:
                return value.get("reference")
            return value
    return None


def _last_id(reference: Any, resource_type: str) -> str | None:
    """``Subscription/123`` or ``https://ehr/fhir/Subscription/123`` -> ``123``."""
    if not isinstance(reference, str) or not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == resource_type and parts[-1] else None


def _reference(value: Any, what: str) -> str | None:
    """A reference's string (from a Reference object or the string itself); None when absent."""
    if isinstance(value, Mapping):
        value = value.get("reference")
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{what} must be a reference (Type/id)")


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{what} must be a list")
    return value


def _from_parameters(status: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"events": []}
    for param in _list(status.get("parameter"), "SubscriptionStatus parameter"):
        if not isinstance(param, Mapping):
            raise InputError("SubscriptionStatus parameter must be an object")
        name = param.get("name")
        if name == "notification-event":
            parts = {p["name"]: _value(p) for p in _list(param.get("part"), "notification-event part")
                     if isinstance(p, Mapping) and isinstance(p.get("name"), str)}
            out["events"].append(NotificationEvent(
                str(parts["event-number"]) if parts.get("event-number") is not None else None,
                parse_instant(parts.get("timestamp")), _reference(parts.get("focus"), "notification-event focus")))
        elif name in ("subscription", "topic", "status", "type", "events-since-subscription-start"):
            out[str(name)] = _value(param)
    return out


def _from_status_resource(status: Mapping[str, Any]) -> dict[str, Any]:
    """R4B / R5 ``SubscriptionStatus`` resource, same fields in camelCase."""
    events = [NotificationEvent(str(e.get("eventNumber")) if e.get("eventNumber") is not None else None,
                                parse_instant(e.get("timestamp")), _reference(e.get("focus"), "notificationEvent.focus"))
              for e in _list(status.get("notificationEvent"), "notificationEvent") if isinstance(e, Mapping)]
    return {"subscription": _reference(status.get("subscription"), "subscription"), "topic": status.get("topic"),
            "status": status.get("status"), "type": status.get("type"),
            "events-since-subscription-start": status.get("eventsSinceSubscriptionStart"), "events": events}


def parse_notification(bundle: Any) -> Notification:
    """The SubscriptionStatus and resources of a notification Bundle; InputError when malformed."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise InputError("a Subscription notification must be a FHIR Bundle")
    if bundle.get("type") not in ("history", "subscription-notification"):
        raise InputError("notification Bundle.type must be history (R4 backport) or subscription-notification")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], Mapping):
        raise InputError("notification Bundle has no SubscriptionStatus entry")
    status = entries[0].get("resource")
    if isinstance(status, Mapping) and status.get("resourceType") == "Parameters":
        fields = _from_parameters(status)
    elif isinstance(status, Mapping) and status.get("resourceType") == "SubscriptionStatus":
        fields = _from_status_resource(status)
    else:
        raise InputError("the first entry of a notification must be a SubscriptionStatus (Parameters in R4)")
    kind = fields.get("type")
    if kind not in NOTIFICATION_TYPES:
        raise InputError(f"SubscriptionStatus type must be one of {', '.join(NOTIFICATION_TYPES)}")
    subscription_id = _last_id(fields.get("subscription"), "Subscription")
    if subscription_id is None:
        raise InputError("SubscriptionStatus names no subscription (Subscription/<id>)")
    resources = []
    for entry in entries[1:]:
        if not isinstance(entry, Mapping):
            raise InputError("notification Bundle entries must be objects")
        resource, full_url = entry.get("resource"), entry.get("fullUrl")
        if isinstance(resource, Mapping):
            resources.append((full_url if isinstance(full_url, str) else None, resource))
    return Notification(subscription_id=subscription_id, topic=fields.get("topic"), status=fields.get("status"),
                        type=str(kind), events_since_start=fields.get("events-since-subscription-start"),
                        events=tuple(fields["events"]), resources=tuple(resources))


# -- handling ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotifyResult:
    feed: str
    type: str
    events: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    skipped: int = 0


def _focus_parts(focus: str) -> tuple[str, str, str | None] | None:
    """(type, id, version or None) from a relative or absolute reference."""
    base, _, version = focus.partition("/_history/")
    parts = base.rstrip("/").split("/")
    if len(parts) < 2 or not parts[-1]:
        return None
    return parts[-2], parts[-1], version or None


def _bundled(notification: Notification, rtype: str, rid: str, version: str | None) -> Mapping[str, Any] | None:
    """The Bundle's copy of the focus; when the focus names a version, only that version (a resource
    created and updated within one notification is in the Bundle twice)."""
    for full_url, resource in notification.resources:
        if resource.get("resourceType") != rtype:
            continue
        meta = resource.get("meta")
        vid = meta.get("versionId") if isinstance(meta, Mapping) else None
        if version is not None and vid is not None and str(vid) != version:
            continue
        if str(resource.get("id")) == rid:
            return resource
        parts = _focus_parts(full_url) if full_url else None
        if parts is not None and parts[:2] == (rtype, rid) and (version is None or parts[2] in (None, version)):
            return resource
    return None


def _resolve(notification: Notification, event: NotificationEvent, client: FhirClient) -> Mapping[str, Any] | None:
    """The focus resource: from the Bundle (full-resource) when it carries a version, else read it."""
    if not event.focus:
        return None
    parts = _focus_parts(event.focus)
    if parts is None:
        raise InputError("notification-event focus must reference a resource (Type/id)")
    rtype, rid, version = parts
    if rtype not in ASSESSED_TYPES:
        return None
    bundled = _bundled(notification, rtype, rid, version)
    meta = bundled.get("meta") if bundled is not None else None
    if bundled is not None and isinstance(meta, Mapping) and meta.get("versionId"):
        return bundled
    # id-only (or a resource without meta.versionId, which polling would key differently): ask the EHR
    try:
        if version:
            return dict(client.request("GET", f"{rtype}/{rid}/_history/{version}").json())
        return client.read(rtype, rid)
    except NotFoundError:
        log.warning("notified resource is gone from the EHR", extra={"resource_type": rtype})
        return None


def handle_notification(notification: Notification) -> NotifyResult:
    """Record the feed's heartbeat and ingest each event's focus through the one pipeline."""
    svc = service()
    if notification.type != "event-notification":
        _feed_heard(notification, got_events=False)
        log.info("subscription %s", notification.type, extra={"feed": notification.feed})
        return NotifyResult(notification.feed, notification.type)
    ingested = duplicates = quarantined = skipped = 0
    try:
        resources = []
        for event in notification.events:
            resource = _resolve(notification, event, svc.fhir)
            if resource is None or is_own_write(resource):
                skipped += 1
                continue
            resources.append(resource)
        # One transaction for the whole notification (up to hundreds of events at a busy hour).
        for result in svc.pipeline.ingest_batch(resources, source="ehr") if resources else []:
            if result.quarantine_id is not None:
                quarantined += 1
            elif result.duplicate:
                duplicates += 1
            else:
                ingested += 1
    except CdsError as exc:
        if not isinstance(exc, InputError):
            with svc.pool.connection() as conn:
                feeds.record_failure(conn, notification.feed, f"{exc.__class__.__name__}: {str(exc)[:300]}")
                conn.commit()
        raise
    newest = max((e.timestamp for e in notification.events if e.timestamp), default=None)
    _feed_heard(notification, got_events=ingested > 0, newest=newest)
    log.info("subscription notification", extra={"feed": notification.feed, "events": len(notification.events),
                                                  "ingested": ingested, "duplicates": duplicates})
    return NotifyResult(notification.feed, notification.type, len(notification.events), ingested, duplicates,
                        quarantined, skipped)


def _feed_heard(notification: Notification, *, got_events: bool, newest: datetime | None = None) -> None:
    with service().pool.connection() as conn:
        conn.execute("INSERT INTO feeds (name) VALUES (%s) ON CONFLICT DO NOTHING", (notification.feed,))
        feeds.record_success(conn, notification.feed, newest, got_events=got_events)
        conn.commit()


def _secret_presented() -> list[str]:
    settings = service().settings
    names = [settings.notify_secret_header] if settings.notify_secret_header else ["Authorization",
                                                                                     "X-Subscription-Secret"]
    found = []
    for name in names:
        value = request.headers.get(name, "").strip()
        if value.lower().startswith("bearer "):
            value = value[7:].strip()
        if value:
            found.append(value)
    return found


def check_secret() -> None:
    """The channel's shared secret, compared in constant time; 401 otherwise."""
    secret = service().settings.notify_secret
    if not secret:
        raise AuthError("Subscription notifications are not enabled here (CDS_NOTIFY_SECRET is not set)")
    if not any(hmac.compare_digest(value.encode(), secret.encode()) for value in _secret_presented()):
        raise AuthError("Subscription notification secret missing or wrong")


@bp.post("/fhir/notify")
def notify() -> Any:
    """rest-hook endpoint: authenticate, store the events, answer 200; workers assess them."""
    check_secret()
    notification = parse_notification(request.get_json(silent=True, force=True))
    result = handle_notification(notification)
    message = (f"{result.type}: {result.events} event(s), {result.ingested} new, {result.duplicates} already "
               f"known, {result.skipped} skipped, {result.quarantined} quarantined")
    return jsonify({"resourceType": "OperationOutcome",
                    "issue": [{"severity": "information", "code": "informational", "diagnostics": message}]})


# -- registering with the EHR --------------------------------------------------------------------------


def subscription_resource(endpoint: str, secret: str, topic_or_criteria: str, *, payload: str = "id-only",
                          heartbeat_s: int = 300, filters: Sequence[str] = (), header_name: str | None = None,
                          reason: str = "psych-cds: risk screening of questionnaires and chat messages"
                          ) -> dict[str, Any]:
    """The Subscription to POST: topic-based (Backport IG) when given a topic URL, else classic R4 criteria."""
    if payload not in ("empty", "id-only", "full-resource"):
        raise InputError("payload must be empty, id-only or full-resource")
    header = f"{header_name}: {secret}" if header_name else f"Authorization: Bearer {secret}"
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                               "header": [header]}
    subscription: dict[str, Any] = {"resourceType": "Subscription", "status": "requested", "reason": reason,
                                    "criteria": topic_or_criteria, "channel": channel}
    if topic_or_criteria.startswith(("http://", "https://")):
        subscription["meta"] = {"profile": [f"{BACKPORT}/backport-subscription"]}
        if filters:
            subscription["_criteria"] = {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                                        "valueString": f} for f in filters]}
        channel["extension"] = [{"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": heartbeat_s},
                                {"url": f"{BACKPORT}/backport-timeout", "valueUnsignedInt": 30}]
        channel["_payload"] = {"extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": payload}]}
    return subscription


def ensure_subscription(client: FhirClient, endpoint: str, secret: str, topic_or_criteria: str, *,
                        payload: str = "id-only", heartbeat_s: int = 300, filters: Sequence[str] = (),
                        header_name: str | None = None) -> dict[str, Any]:
    """Register psych-cds's rest-hook Subscription with the EHR once; returns the EHR's Subscription.

    An existing one for the same endpoint and topic/criteria (not ``off`` or ``error``) is reused, so
    running this at every deployment does not pile up subscriptions.
    """
    # /Subscription?url=https://cds.hospital.example.org/fhir/notify
    for existing in client.search_all("Subscription", {"url": endpoint}):
        if (existing.get("criteria") == topic_or_criteria and existing.get("status") not in ("off", "error")
                and (existing.get("channel") or {}).get("endpoint") == endpoint):
            return existing
    created = client.create(subscription_resource(endpoint, secret, topic_or_criteria, payload=payload,
                                                  heartbeat_s=heartbeat_s, filters=filters,
                                                  header_name=header_name))
    log.info("Subscription registered with the EHR", extra={"subscription": created.get("id")})
    return created
