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


def authenticate(conn: psycopg.Connection[Any], key: str | None) -> ApiClient:
    if not key or not key.startswith(KEY_PREFIX):
        raise AuthError("an API key is required (Authorization: Bearer <key>)")
    digest = _digest(key)
    row = conn.execute("SELECT id, name, key_sha256 FROM api_clients WHERE key_sha256 = %s AND revoked_at IS NULL",
                       (digest,)).fetchone()
    if row is None or not hmac.compare_digest(row[2], digest):
        raise AuthError("unknown or revoked API key")
    return ApiClient(int(row[0]), str(row[1]))


def charge(conn: psycopg.Connection[Any], client: ApiClient, now: datetime, per_minute: int) -> int:
    """Count one request in this minute's window; over the limit raises RateLimitError (429)."""
    window = now.replace(second=0, microsecond=0)
    row = conn.execute("INSERT INTO rate_windows (client_id, window_start, count) VALUES (%s, %s, 1)"
                       " ON CONFLICT (client_id, window_start) DO UPDATE SET count = rate_windows.count + 1"
                       " RETURNING count", (client.id, window)).fetchone()
    count = int(row[0]) if row else 0
    if count > per_minute:
        raise RateLimitError(f"rate limit of {per_minute} requests per minute exceeded")
    return count
