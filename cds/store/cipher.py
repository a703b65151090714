"""The seam between the store and compliance.crypto: what a PHI column needs from a cipher."""

from __future__ import annotations

import json
from typing import Any, Protocol

import psycopg


class Cipher(Protocol):
    def encrypt(self, conn: psycopg.Connection[Any], subject: str, plaintext: bytes, aad: bytes) -> bytes: ...

    def decrypt(self, conn: psycopg.Connection[Any], blob: bytes, aad: bytes) -> bytes: ...

    def sealed_by_live_key(self, blob: bytes) -> bool: ...


def seal_json(cipher: Cipher, conn: psycopg.Connection[Any], subject: str, value: Any, aad: str) -> bytes:
    try:
        plaintext = json.dumps(value, ensure_ascii=False, default=str).encode()
    except UnicodeEncodeError:  # lone surrogates (bad input is kept as it came): \u-escaped JSON round-trips
        plaintext = json.dumps(value, ensure_ascii=True, default=str).encode()
    return cipher.encrypt(conn, subject, plaintext, aad.encode())


def open_json(cipher: Cipher, conn: psycopg.Connection[Any], blob: bytes, aad: str) -> Any:
    return json.loads(cipher.decrypt(conn, bytes(blob), aad.encode()))
