"""The running parts of one process, built once from Settings: database pool, cipher, engines,
pipeline and FHIR client. ``cds serve``, ``cds worker`` and the tests all build it the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from cds.pipeline import Clock, Engines, Pipeline, utcnow
from cds.settings import Settings
from cds.store import db, replica
from integrations.fhir.client import FhirClient

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    db_url: str
    pool: ConnectionPool
    cipher: Any  # compliance.crypto.FieldCipher
    engines: Engines
    pipeline: Pipeline
    fhir: FhirClient
    extras: dict[str, Any] = field(default_factory=dict)
    read_pool: ConnectionPool | None = None  # the streaming replica the pages read (CDS_DATABASE_READ_URL)

    @classmethod
    def start(cls, settings: Settings, *, migrate: bool = True, pool_size: int = 8,
              clock: Clock = utcnow, engines: Engines | None = None) -> Service:
        from compliance.crypto import FieldCipher, load_kek, load_old_keks

        url = db.database_url(settings)
        if migrate:
            db.migrate(url)
        kek = load_kek(settings, create=settings.demo)
        old_keks = load_old_keks()  # CDS_OLD_KEK_FILES during a rotation
        pool = db.open_pool(url, max_size=pool_size)
        check_kek(pool, [kek, *old_keks])
        cipher = FieldCipher(kek, old_keks=old_keks)
        engines = engines or Engines.load(settings)
        fhir = FhirClient(settings.fhir_base_url, auth=_token_source(settings), timeout_s=10)
        from integrations.fhir.history import fetch_histories

        pipeline = Pipeline(pool, cipher, engines, settings, clock=clock,
                            history_source=lambda refs: fetch_histories(fhir, refs))
        read_pool = replica.open_read_pool(settings.database_read_url) if settings.database_read_url else None
        return cls(settings, url, pool, cipher, engines, pipeline, fhir, read_pool=read_pool)

    def close(self) -> None:
        if self.pipeline.affinity is not None:
            self.pipeline.affinity.close()
        if self.read_pool is not None:
            self.read_pool.close()
        self.pool.close()


def check_kek(pool: ConnectionPool, keks: list[Any]) -> None:
    """Refuse to start with a key-encryption key that wraps none of the stored data keys: every
    decryption would fail later, one event at a time. Says which key ids were expected."""
    from cds.errors import ConfigError

    with pool.connection() as conn:
        stored = {r[0] for r in conn.execute("SELECT DISTINCT kek_id FROM data_keys WHERE destroyed_at IS NULL")}
    known = {k.id for k in keks}
    if stored and not stored & known:
        pool.close()
        raise ConfigError(f"the key-encryption key (id {sorted(known)[0]}) does not match the stored data keys "
                          f"(wrapped under {', '.join(sorted(stored))}); set CDS_KEK_FILE to the right key, or "
                          "CDS_OLD_KEK_FILES during a rotation")


def _token_source(settings: Settings) -> Any:
    """SMART Backend Services when configured, none for the local sandbox."""
    if not settings.fhir_client_id:
        return None
    from integrations.fhir.smart import BackendServicesAuth

    return BackendServicesAuth.from_settings(settings)
