"""Screening-API clients: keys are shown once and stored only as SHA-256; a fixed-window rate limit
kept in PostgreSQL, so every web process counts against the same budget."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from cds.errors import AuthError, ConflictError, RateLimitError
from cds.store.db import autocommit_when_idle

KEY_PREFIX = "cds_"


@dataclass(frozen=True)
class ApiClient:
    id: int
    name: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_client(conn: psycopg.Connection[Any], name: str, actor: str) -> str:
    """Create a client and return its key (the only time the key exists outside the caller)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        conn.execute("INSERT INTO api_clients (name, key_sha256, created_by) VALUES (%s, %s, %s)",
                     (name, _digest(key), actor))
    except psycopg.errors.UniqueViolation as exc:
        raise ConflictError(f"a client named {name!r} exists already") from exc
    return key


def revoke_client(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("UPDATE api_clients SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL"
                       " RETURNING id", (name,)).fetchone()
    return row is not None


def _presented_digest(key: str | None) -> str:
    """The digest a presented key is looked up by; a missing or malformed key is refused here."""
    if not key or not key.startswith(KEY_PREFIX):
        raise AuthError("an API key is required (Authorization: Bearer <key>)")
    return _digest(key)


def _client(row: Any, digest: str) -> ApiClient:
    """The client of a looked-up (id, name, key_sha256, ...) row; no row is an unknown or revoked key."""
    if row is None or not hmac.compare_digest(row[2], digest):
        raise AuthError("unknown or revoked API key")
    return ApiClient(int(row[0]), str(row[1]))


def authenticate(conn: psycopg.Connection[Any], key: str | None) -> ApiClient:
    digest = _presented_digest(key)
    row = conn.execute("SELECT id, name, key_sha256 FROM api_clients WHERE key_sha256 = %s AND revoked_at IS NULL",
                       (digest,)).fetchone()
    return _client(row, digest)


def authenticate_and_charge(conn: psycopg.Connection[Any], key: str | None, now: datetime,
                            per_minute: int) -> ApiClient:
    """``authenticate`` and count the request in this minute's window, in one statement that commits on
    its own (one round trip). A revoked or unknown key is refused (401) and charges nothing; over the
    limit raises RateLimitError (429) and, as when the charge was rolled back, a refused request is not
    counted: the window's count stops at the limit."""
    digest = _presented_digest(key)
    window = now.replace(second=0, microsecond=0)
    with autocommit_when_idle(conn):
        row = conn.execute(
            "WITH client AS (SELECT id, name, key_sha256 FROM api_clients"
            "   WHERE key_sha256 = %(digest)s AND revoked_at IS NULL),"
            " charged AS (INSERT INTO rate_windows (client_id, window_start, count)"
            "   SELECT id, %(window)s, 1 FROM client WHERE %(limit)s >= 1"
            "   ON CONFLICT (client_id, window_start) DO UPDATE SET count = rate_windows.count + 1"
            "   WHERE rate_windows.count < %(limit)s RETURNING count)"
            " SELECT id, name, key_sha256, (SELECT count FROM charged) FROM client",
            {"digest": digest, "window": window, "limit": per_minute}).fetchone()
    client = _client(row, digest)  # no row: refused there
    assert row is not None
    if row[3] is None:  # the window is full: nothing was counted
        raise RateLimitError(f"rate limit of {per_minute} requests per minute exceeded")
    return client
