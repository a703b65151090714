"""One typed, frozen settings object read from ``CDS_*`` environment variables.

Defaults run the embedded demo on one machine; a hospital deployment sets CDS_DATABASE_URL,
CDS_FHIR_BASE_URL and CDS_KEK_FILE. Wrong values stop the service with a clear message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cds.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    extra: Mapping[str, str] = field(default_factory=dict)

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
        )
