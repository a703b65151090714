"""One typed, frozen settings object read from ``CDS_*`` environment variables.

Defaults run the embedded demo on one machine; a hospital deployment sets CDS_DATABASE_URL,
CDS_FHIR_BASE_URL and CDS_KEK_FILE. Wrong values stop the service with a clear message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FHIR_SCOPES = ("system/*.read system/RiskAssessment.write system/Flag.write system/Communication.write"
                       " system/Task.write system/ServiceRequest.write system/Provenance.write"
                       " system/AuditEvent.write")
# The audit log's copy in the EHR (compliance.ehr_export reads these defaults from here): Bundles sent per
# 5-s run, and how far the copy may trail before an operations alarm says so.
AUDIT_EXPORT_BATCHES = 2
AUDIT_EXPORT_MAX_LAG_S = 900


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str | None  # None = start embedded PostgreSQL under data_dir/pg
    fhir_base_url: str
    fhir_token_url: str | None
    fhir_client_id: str | None
    fhir_private_key_file: Path | None
    host: str
    port: int
    poll_interval_s: float
    poll_overlap_s: int
    poll_page_size: int
    outbox_interval_s: float
    outbox_max_attempts: int
    worker_batch_size: int
    kek_file: Path
    secret_key_file: Path
    rules_dir: Path
    model_dir: Path | None
    care_team_ref: str | None
    default_locale: str
    timezone: str
    require_model: bool
    demo: bool
    public_base_url: str  # how clients reach this service (CDS Hooks aud, links in alerts)
    screen_rate_per_min: int  # screening API requests per client per minute
    shadow_rulesets: tuple[Path, ...]  # rule sets evaluated beside the live one, never alerting
    default_ward: str | None  # ward given to patients the EHR assigns none (demo: ward5)
    extra: Mapping[str, str] = field(default_factory=dict)
    # -- EHR integration: SMART Backend Services, CDS Hooks, Subscriptions, feed watchdog ----------
    fhir_scopes: str = DEFAULT_FHIR_SCOPES  # space-separated SMART system scopes asked of the EHR
    fhir_jwt_alg: str = "RS384"  # RS384 | ES384: client-assertion signature algorithm
    fhir_key_id: str | None = None  # JWK kid; None = the key's RFC 7638 thumbprint
    # EHRs allowed to call CDS Hooks: issuer -> {jwks_url | jwks, jku: [...], client_id, fhir_servers}
    cds_hooks_issuers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cds_hooks_allow_unauthenticated: bool = False  # demo/test only; logged loudly when on
    cds_hooks_cors_origins: tuple[str, ...] = ("*",)  # browser EHR clients (bearer JWT, no cookies)
    notify_secret: str | None = None  # shared secret of the Subscription rest-hook channel
    notify_secret_header: str | None = None  # None = Authorization: Bearer <secret> or X-Subscription-Secret
    feed_heartbeat_s: int = 300  # Subscription heartbeat period; silent for 2x this raises an alarm
    audit_export_batches: int = AUDIT_EXPORT_BATCHES  # AuditEvent Bundles (50 each) sent to the EHR per 5-s run
    audit_export_max_lag_s: int = AUDIT_EXPORT_MAX_LAG_S  # the EHR's audit copy trailing longer raises an alarm
    gc_freeze_s: float = 10.0  # long-running processes freeze GC survivors this often (cds.gc_pacing; 0 = off)
    gc_sweep_s: float = 3600.0  # ... and run one full collection this often
    # -- polling: how often a poll re-reads the whole overlap, and what the polls in between re-read ------
    poll_reconcile_s: float = 10.0
    poll_recent_overlap_s: float = 1.0
    # -- workers: how long an event waits for the worker whose patients it belongs to before any takes it ------
    claim_affinity_s: float = 10.0  # cds.store.affinity; 0 = no preference (plain id order)
    # -- a streaming replica for the pages' reads (cds.store.replica); None = everything on the primary --------
    database_read_url: str | None = None
    read_replica_wait_s: float = 0.5  # how long a page waits for the replica to catch up before reading the primary
    # -- SMART App Launch (EHR launch) and OpenID Connect single sign-on: see cds.web.smart_launch -------
    smart_issuers: tuple[str, ...] = ()  # FHIR bases allowed as launch `iss`; from_env defaults to fhir_base_url
    smart_client_id: str | None = None  # None = /smart/launch answers that SMART launch is not set up
    smart_client_secret: str | None = None  # None = public client (PKCE only); else client_secret_basic
    smart_authorize_url: str | None = None  # used when the EHR publishes no .well-known/smart-configuration
    smart_token_url: str | None = None  # idem
    smart_scopes: str = "launch openid fhirUser patient/*.read"
    smart_oidc_issuer: str | None = None  # id_token issuer (+ its JWKS) when smart-configuration names none
    oidc_issuer: str | None = None  # the hospital identity provider; None = no single sign-on
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None  # None = public client (PKCE only); else client_secret_basic
    oidc_scopes: str = "openid profile"
    oidc_username_claim: str = "preferred_username"  # id_token claim matched to users.username (else sub)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("CDS_DATA_DIR") or (REPO_ROOT / "var")).resolve()
        fhir = env.get("CDS_FHIR_BASE_URL", "http://127.0.0.1:8090/fhir").rstrip("/")
        if not fhir.startswith(("http://", "https://")):
            raise ConfigError(f"CDS_FHIR_BASE_URL must be an http(s) URL, got {fhir!r}")
        locale = env.get("CDS_LOCALE", "zh-CN")
        if locale not in ("zh-CN", "en-US", "en-GB"):
            raise ConfigError(f"CDS_LOCALE must be zh-CN, en-US or en-GB, got {locale!r}")
        key_file = env.get("CDS_FHIR_PRIVATE_KEY_FILE")
        model_dir = env.get("CDS_MODEL_DIR")
        return cls(
            data_dir=data_dir,
            database_url=env.get("CDS_DATABASE_URL") or None,
            fhir_base_url=fhir,
            fhir_token_url=env.get("CDS_FHIR_TOKEN_URL") or None,
            fhir_client_id=env.get("CDS_FHIR_CLIENT_ID") or None,
            fhir_private_key_file=Path(key_file) if key_file else None,
            host=env.get("CDS_HOST", "127.0.0.1"),
            port=_int(env, "CDS_PORT", 8080, 1),
            poll_interval_s=_float(env, "CDS_POLL_INTERVAL_S", 2.0),
            poll_overlap_s=_int(env, "CDS_POLL_OVERLAP_S", 60),
            poll_page_size=_int(env, "CDS_POLL_PAGE_SIZE", 100, 1),
            outbox_interval_s=_float(env, "CDS_OUTBOX_INTERVAL_S", 1.0),
            outbox_max_attempts=_int(env, "CDS_OUTBOX_MAX_ATTEMPTS", 50, 1),
            worker_batch_size=_int(env, "CDS_WORKER_BATCH_SIZE", 50, 1),
            kek_file=Path(env.get("CDS_KEK_FILE") or (data_dir / "keys" / "kek.key")),
            secret_key_file=Path(env.get("CDS_SECRET_KEY_FILE") or (data_dir / "keys" / "session.key")),
            rules_dir=Path(env.get("CDS_RULES_DIR") or (REPO_ROOT / "rules")),
            model_dir=Path(model_dir) if model_dir else None,
            care_team_ref=env.get("CDS_CARE_TEAM_REF") or None,
            default_locale=locale,
            timezone=env.get("CDS_TIMEZONE", "Asia/Shanghai"),
            require_model=_bool(env, "CDS_REQUIRE_MODEL", True),
            demo=_bool(env, "CDS_DEMO", False),
            public_base_url=(env.get("CDS_PUBLIC_BASE_URL")
                             or f"http://{env.get('CDS_HOST', '127.0.0.1')}:{env.get('CDS_PORT', '8080')}").rstrip("/"),
            screen_rate_per_min=_int(env, "CDS_SCREEN_RATE_PER_MIN", 600, 1),
            shadow_rulesets=tuple(Path(p) for p in (env.get("CDS_SHADOW_RULESETS") or "").split(os.pathsep) if p),
            default_ward=env.get("CDS_DEFAULT_WARD") or ("ward5" if _bool(env, "CDS_DEMO", False) else None),
            fhir_scopes=" ".join((env.get("CDS_FHIR_SCOPES") or DEFAULT_FHIR_SCOPES).split()),
            fhir_jwt_alg=_choice(env, "CDS_FHIR_JWT_ALG", "RS384", ("RS384", "ES384")),
            fhir_key_id=env.get("CDS_FHIR_KEY_ID") or None,
            cds_hooks_issuers=_hook_issuers(env),
            cds_hooks_allow_unauthenticated=_bool(env, "CDS_HOOKS_ALLOW_UNAUTHENTICATED", False),
            cds_hooks_cors_origins=tuple((env.get("CDS_HOOKS_CORS_ORIGINS") or "*").split()),
            notify_secret=env.get("CDS_NOTIFY_SECRET") or None,
            notify_secret_header=env.get("CDS_NOTIFY_SECRET_HEADER") or None,
            feed_heartbeat_s=_int(env, "CDS_FEED_HEARTBEAT_S", 300, 1),
            audit_export_batches=_int(env, "CDS_AUDIT_EXPORT_BATCHES", AUDIT_EXPORT_BATCHES, 1),
            audit_export_max_lag_s=_int(env, "CDS_AUDIT_EXPORT_MAX_LAG_S", AUDIT_EXPORT_MAX_LAG_S, 1),
            gc_freeze_s=_float(env, "CDS_GC_FREEZE_S", 10.0),
            gc_sweep_s=_float(env, "CDS_GC_SWEEP_S", 3600.0),
            poll_reconcile_s=max(0.0, _float(env, "CDS_POLL_RECONCILE_S", 10.0)),
            claim_affinity_s=max(0.0, _float(env, "CDS_CLAIM_AFFINITY_S", 10.0)),
            poll_recent_overlap_s=max(0.0, _float(env, "CDS_POLL_RECENT_OVERLAP_S", 1.0)),
            database_read_url=env.get("CDS_DATABASE_READ_URL") or None,
            read_replica_wait_s=max(0.0, _float(env, "CDS_READ_REPLICA_WAIT_S", 0.5)),
            smart_issuers=_urls(env, "CDS_SMART_ISSUERS") or (fhir,),
            smart_client_id=env.get("CDS_SMART_CLIENT_ID") or None,
            smart_client_secret=env.get("CDS_SMART_CLIENT_SECRET") or None,
            smart_authorize_url=_url(env, "CDS_SMART_AUTHORIZE_URL"),
            smart_token_url=_url(env, "CDS_SMART_TOKEN_URL"),
            smart_scopes=" ".join((env.get("CDS_SMART_SCOPES") or "launch openid fhirUser patient/*.read").split()),
            smart_oidc_issuer=_url(env, "CDS_SMART_OIDC_ISSUER"),
            oidc_issuer=_url(env, "CDS_OIDC_ISSUER"),
            oidc_client_id=env.get("CDS_OIDC_CLIENT_ID") or None,
            oidc_client_secret=env.get("CDS_OIDC_CLIENT_SECRET") or None,
            oidc_scopes=" ".join((env.get("CDS_OIDC_SCOPES") or "openid profile").split()),
            oidc_username_claim=env.get("CDS_OIDC_USERNAME_CLAIM") or "preferred_username",
        )


def _url(env: Mapping[str, str], name: str) -> str | None:
    """An optional http(s) URL setting, without a trailing slash."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _urls(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of http(s) URLs, each without a trailing slash."""
    out = []
    for part in (env.get(name) or "").split(","):
        if part.strip():
            out.append(_url({name: part}, name))
    return tuple(u for u in out if u)


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


_ISSUER_KEYS = frozenset({"jwks_url", "jwks", "jku", "client_id", "fhir_servers"})


def _hook_issuers(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The EHRs trusted to call CDS Hooks, from CDS_HOOKS_ISSUERS (JSON) or CDS_HOOKS_ISSUERS_FILE.

    ``{"https://ehr.example.org": {"jwks_url": "https://ehr.example.org/jwks.json",
    "jku": ["https://ehr.example.org/jwks.json"], "client_id": "ehr-cds-client"}}``; ``jwks`` (an
    inline JWK Set) may stand in for ``jwks_url``; ``fhir_servers`` limits the fhirServer URLs this
    issuer may send (prefixes).
    """
    import json

    raw = env.get("CDS_HOOKS_ISSUERS") or ""
    path = env.get("CDS_HOOKS_ISSUERS_FILE")
    if path:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"CDS_HOOKS_ISSUERS_FILE cannot be read: {exc.__class__.__name__}") from exc
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"CDS_HOOKS_ISSUERS must be a JSON object: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ConfigError("CDS_HOOKS_ISSUERS must be a JSON object of issuer -> settings")
    out: dict[str, dict[str, Any]] = {}
    for issuer, conf in parsed.items():
        if not isinstance(conf, dict) or not (conf.get("jwks_url") or conf.get("jwks")):
            raise ConfigError(f"CDS_HOOKS_ISSUERS[{issuer!r}] needs jwks_url or jwks")
        unknown = set(conf) - _ISSUER_KEYS
        if unknown:
            raise ConfigError(f"CDS_HOOKS_ISSUERS[{issuer!r}] has unknown keys: {', '.join(sorted(unknown))}")
        for key in ("jku", "fhir_servers"):
            if not isinstance(conf.get(key, []), list):
                raise ConfigError(f"CDS_HOOKS_ISSUERS[{issuer!r}].{key} must be a list of URLs")
        out[str(issuer)] = dict(conf)
    return out
