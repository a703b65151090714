"""The embedded PostgreSQL the project starts (`make demo`, `make bench`, `cds serve` without
CDS_DATABASE_URL) carries the WAL and cache settings a chat-rate write load needs, on first start and
after."""

from __future__ import annotations

from pathlib import Path

import psycopg


def _settings(url: str, names: list[str]) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return {n: str(conn.execute("SELECT current_setting(%s)", (n,)).fetchone()[0])  # type: ignore[index]
                for n in names}


def test_embedded_server_is_tuned_for_a_steady_write_load(tmp_path: Path) -> None:
    from cds.store.db import EMBEDDED_SETTINGS, start_embedded, stop_embedded

    pgdata = tmp_path / "pg"
    names = sorted(EMBEDDED_SETTINGS)
    try:
        url = start_embedded(pgdata)
        assert _settings(url, names) == EMBEDDED_SETTINGS  # PostgreSQL's defaults: 1GB, 5min, 128MB
        stop_embedded(pgdata)
        # kept in postgresql.auto.conf: a restart starts with them (and start_embedded changes nothing)
        auto_conf = (pgdata / "postgresql.auto.conf").read_text()
        assert all(name in auto_conf for name in names)
        url = start_embedded(pgdata)
        assert _settings(url, names) == EMBEDDED_SETTINGS
        assert (pgdata / "postgresql.auto.conf").read_text() == auto_conf
    finally:
        stop_embedded(pgdata)
