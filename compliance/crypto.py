"""Envelope encryption of PHI columns: one AES-256-GCM data key (DEK) per subject, wrapped by a KEK.

Why this shape:

* One DEK per patient (the *subject*) makes erasure a key operation: destroying the DEK
  (crypto-shredding) makes every ciphertext of that patient unreadable, in every table, backup and
  replica, without finding and rewriting the rows.
* DEKs live wrapped in ``data_keys`` (migration 0100_crypto.sql), so the database alone never holds
  readable text; the KEK lives outside it (a 0600 file or ``CDS_KEK``).
* Each blob says which DEK sealed it and binds itself to its row by AAD, so a ciphertext copied into
  another row (or another patient's row) fails to decrypt instead of showing the wrong text.
* Rotating the KEK re-wraps the DEKs only (a few bytes per patient); the data rows stay as they are.

Blob layout::

    version | DEK id (8 bytes, big-endian) | nonce (12 bytes) | AES-256-GCM ciphertext + 16-byte tag
    GCM AAD = the 9 header bytes + the caller's AAD

Version 0x01 seals the plaintext as it is; 0x02 seals its zlib stream (RFC 1950), written when the
plaintext is at least ``COMPRESS_MIN_BYTES`` long and compression saves an eighth or more. An
assessment's signals (evidence spans of a whole conversation, ~7 KB of repetitive JSON) seal to ~0.7 KB
instead of ~7 KB: the row stays inline instead of going to TOAST, and PostgreSQL writes that much less
table and WAL per message. The version byte is authenticated (it is in the AAD), so a blob cannot be
relabelled from one version to the other, and decompression only ever runs on authenticated data.
Compressing before encrypting lets a blob's length depend on how repetitive its content is; the length
is visible to whoever reads the database, and only someone who could also place text of their own in
the same blob (the same patient's conversation) could probe that, so it is accepted for data at rest.

A blob starting with 0x00 is a retention tombstone (see compliance.retention): it decrypts to
ErasedError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cds.errors import ConfigError, CryptoError, ErasedError
from cds.settings import Settings
from compliance import audit

FORMAT_V1 = 0x01  # plaintext sealed as it is
FORMAT_V2 = 0x02  # plaintext's zlib stream sealed
COMPRESS_MIN_BYTES = 512  # shorter plaintexts are sealed as they are (a zlib stream saves little there)
COMPRESS_LEVEL = 3  # zlib's fast strategy: ~13 us for 5 KB of signal JSON, 8x smaller; level 6 is 3x slower
TOMBSTONE = 0x00
KEY_BYTES = 32
NONCE_BYTES = 12
_HEADER = struct.Struct(">BQ")  # version, DEK id
_MIN_BLOB = _HEADER.size + NONCE_BYTES + 16
SEAL_ID_BYTES = _HEADER.size + NONCE_BYTES  # a blob's header and random nonce: unique to each sealing
_WRAP_AAD_PREFIX = b"psych-cds/dek/v1|"

#: Environment variable holding the KEK as base64 (wins over the file when set).
KEK_ENV = "CDS_KEK"
#: Previous KEK files (os.pathsep-separated) still accepted for unwrapping during a rotation.
OLD_KEK_FILES_ENV = "CDS_OLD_KEK_FILES"


@dataclass(frozen=True)
class Kek:
    """A key-encryption key. ``id`` tells keys apart in ``data_keys.kek_id`` without revealing them."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ConfigError(f"a KEK must be {KEY_BYTES} bytes, got {len(self.key)}")

    @property
    def id(self) -> str:
        return hashlib.sha256(self.key).hexdigest()[:16]

    @classmethod
    def generate(cls) -> Kek:
        return cls(secrets.token_bytes(KEY_BYTES))

    def to_base64(self) -> str:
        return base64.b64encode(self.key).decode("ascii")


def _decode_kek(raw: bytes, where: str) -> Kek:
    """A KEK file holds the key as base64 text (what we write) or as 32 raw bytes."""
    text = raw.strip()
    if len(raw) == KEY_BYTES and len(text) != 44:
        return Kek(raw)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{where} must hold a base64-encoded {KEY_BYTES}-byte key") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where} must hold a {KEY_BYTES}-byte key, got {len(key)} bytes")
    return Kek(key)


def write_kek_file(path: Path, kek: Kek) -> None:
    """Write ``kek`` to a new file readable by its owner only (mode 0600); never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(kek.to_base64() + "\n")


def load_kek_file(path: Path, *, create: bool = False) -> Kek:
    """Read one KEK file; with ``create``, generate it (0600) when it does not exist."""
    if not path.exists():
        if not create:
            raise ConfigError(f"KEK file {path} does not exist: set CDS_KEK_FILE to the key-encryption key "
                              f"file (32 random bytes, base64) or CDS_KEK to the key itself")
        kek = Kek.generate()
        try:
            write_kek_file(path, kek)
        except FileExistsError:  # another process created it first: use theirs
            return load_kek_file(path)
        return kek
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"KEK file {path} is readable by group or others; chmod 600 it")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read KEK file {path}: {exc.strerror}") from exc
    return _decode_kek(raw, f"KEK file {path}")


def load_kek(settings: Settings, create: bool = False) -> Kek:
    """The current KEK: ``CDS_KEK`` (base64) when set, else ``settings.kek_file``.

    ``create`` generates the file when missing (the demo and tests); in production a missing or
    malformed KEK stops the service with ConfigError rather than silently starting with a new key,
    which would make every stored ciphertext unreadable.
    """
    env = os.environ.get(KEK_ENV)
    if env:
        return _decode_kek(env.encode("ascii", "replace"), KEK_ENV)
    return load_kek_file(settings.kek_file, create=create)


def load_old_keks(env: dict[str, str] | None = None) -> list[Kek]:
    """KEKs retired by a rotation still in progress (``CDS_OLD_KEK_FILES``), for FieldCipher(old_keks=)."""
    raw = (os.environ if env is None else env).get(OLD_KEK_FILES_ENV, "")
    return [load_kek_file(Path(p)) for p in raw.split(os.pathsep) if p.strip()]


def _wrap_aad(subject: str) -> bytes:
    return _WRAP_AAD_PREFIX + subject.encode("utf-8")


def wrap_dek(kek: Kek, subject: str, dek: bytes) -> bytes:
    """nonce | AES-256-GCM(KEK, DEK) with the subject as AAD, so a wrapped key moved to another
    subject's row does not unwrap."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(kek.key).encrypt(nonce, dek, _wrap_aad(subject))


def unwrap_dek(kek: Kek, subject: str, wrapped: bytes) -> bytes:
    try:
        return AESGCM(kek.key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(subject))
    except InvalidTag as exc:
        raise CryptoError(f"data key of {subject!r} does not unwrap under KEK {kek.id}") from exc


def make_tombstone(kind: str) -> bytes:
    """A value for a PHI column whose content was removed under the retention policy."""
    return bytes([TOMBSTONE]) + b"cds-tombstone|" + kind.encode("utf-8")


def is_tombstone(blob: bytes) -> bool:
    return len(blob) > 0 and blob[0] == TOMBSTONE


@dataclass
class _Dek:
    id: int
    subject: str
    key: AESGCM
    loaded: float


def _lifetime(dek_id: int) -> float:
    """A key's cache lifetime as a fraction of the TTL, in [0.75, 1.0), spread evenly over the ids."""
    return 0.75 + 0.25 * ((dek_id * 2654435761) % 4096) / 4096


class FieldCipher:
    """Encrypts and decrypts PHI column values with per-subject data keys (see module docstring).

    Works on the connection it is given, inside the caller's transaction. Unwrapped DEKs are kept
    in a small thread-safe LRU so that the pipeline does not query ``data_keys`` for every row:

    * by DEK id, for decryption (ids are never reused, so entries are safe after a rollback);
    * by subject, for encryption, only once the key row is known to be committed (its
      ``created_at`` is older than the current transaction), so a rolled-back key creation can never
      leave data encrypted under a key that does not exist.

    Erasure and rotation in this process evict entries at once (every FieldCipher registers
    itself); entries expire after ``ttl_s`` at most so that an erasure made by another process takes
    effect here within that time. Each key's lifetime is between 3/4 of ``ttl_s`` and all of it, set by
    its id (``_lifetime``): keys loaded together (a ward's patients in the first seconds of a stream)
    would otherwise all expire together and be read again in one burst each minute, a query in the
    middle of each event's transaction (the bench day: 4,500 reloads in one 30-s window, 1,200 in the
    next, the slow windows' p99 twice the others').
    """

    def __init__(self, kek: Kek, *, old_keks: Sequence[Kek] = (), cache_size: int = 4096,
                 ttl_s: float = 60.0) -> None:
        self.kek = kek
        self._keks: dict[str, Kek] = {k.id: k for k in old_keks}
        self._keks[kek.id] = kek
        self._cache_size = cache_size
        self._ttl_s = ttl_s
        self._by_id: OrderedDict[int, _Dek] = OrderedDict()
        self._by_subject: OrderedDict[str, _Dek] = OrderedDict()
        self._lock = threading.Lock()
        _CIPHERS.add(self)

    # -- cache ---------------------------------------------------------------------------------

    def _cached(self, table: OrderedDict[Any, _Dek], key: Any) -> _Dek | None:
        with self._lock:
            dek = table.get(key)
            if dek is None:
                return None
            if time.monotonic() - dek.loaded > self._ttl_s * _lifetime(dek.id):
                del table[key]
                return None
            table.move_to_end(key)
            return dek

    def _remember(self, dek: _Dek, *, by_subject: bool) -> None:
        with self._lock:
            self._by_id[dek.id] = dek
            self._by_id.move_to_end(dek.id)
            if by_subject:
                self._by_subject[dek.subject] = dek
                self._by_subject.move_to_end(dek.subject)
            for table in (self._by_id, self._by_subject):
                while len(table) > self._cache_size:
                    table.popitem(last=False)

    def forget(self, subject: str | None = None) -> None:
        """Drop cached keys of ``subject`` (all when None)."""
        with self._lock:
            if subject is None:
                self._by_id.clear()
                self._by_subject.clear()
                return
            self._by_subject.pop(subject, None)
            for dek_id in [i for i, d in self._by_id.items() if d.subject == subject]:
                del self._by_id[dek_id]

    # -- keys ----------------------------------------------------------------------------------

    def _unwrap(self, dek_id: int, subject: str, wrapped: bytes, kek_id: str) -> _Dek:
        kek = self._keks.get(kek_id)
        if kek is None:
            raise CryptoError(f"data key {dek_id} is wrapped by KEK {kek_id}, which this process does not "
                              f"have (loaded: {', '.join(sorted(self._keks))}); add it to {OLD_KEK_FILES_ENV}")
        return _Dek(dek_id, subject, AESGCM(unwrap_dek(kek, subject, bytes(wrapped))), time.monotonic())

    def _dek_for_subject(self, conn: psycopg.Connection[Any], subject: str) -> _Dek:
        dek = self._cached(self._by_subject, subject)
        if dek is not None:
            return dek
        row = conn.execute(
            "SELECT id, wrapped_key, kek_id, created_at < now() FROM data_keys"
            " WHERE subject = %s AND destroyed_at IS NULL", (subject,)).fetchone()
        if row is None:
            key = AESGCM.generate_key(bit_length=256)
            inserted = conn.execute(
                "INSERT INTO data_keys (subject, wrapped_key, kek_id) VALUES (%s, %s, %s)"
                " ON CONFLICT (subject) WHERE destroyed_at IS NULL DO NOTHING RETURNING id",
                (subject, wrap_dek(self.kek, subject, key), self.kek.id)).fetchone()
            if inserted is not None:
                dek = _Dek(int(inserted[0]), subject, AESGCM(key), time.monotonic())
                self._remember(dek, by_subject=False)  # not committed yet: never reuse by subject
                return dek
            # another transaction created it and committed while we waited on the unique index
            row = conn.execute(
                "SELECT id, wrapped_key, kek_id, created_at < now() FROM data_keys"
                " WHERE subject = %s AND destroyed_at IS NULL", (subject,)).fetchone()
            if row is None:
                raise CryptoError(f"data key of {subject!r} vanished while being created")
        dek = self._unwrap(int(row[0]), subject, row[1], str(row[2]))
        self._remember(dek, by_subject=bool(row[3]))
        return dek

    def _dek_by_id(self, conn: psycopg.Connection[Any], dek_id: int) -> _Dek:
        dek = self._cached(self._by_id, dek_id)
        if dek is not None:
            return dek
        row = conn.execute(
            "SELECT subject, wrapped_key, kek_id, destroyed_at FROM data_keys WHERE id = %s",
            (dek_id,)).fetchone()
        if row is None:
            raise CryptoError(f"unknown data key {dek_id}")
        if row[3] is not None:
            raise ErasedError(f"data key {dek_id} was destroyed (erased); the text cannot be recovered")
        dek = self._unwrap(dek_id, str(row[0]), row[1], str(row[2]))
        self._remember(dek, by_subject=False)
        return dek

    # -- data ----------------------------------------------------------------------------------

    def encrypt(self, conn: psycopg.Connection[Any], subject: str, plaintext: bytes, aad: bytes) -> bytes:
        """Seal ``plaintext`` under ``subject``'s DEK (created on first use), bound to ``aad``."""
        if not subject:
            raise CryptoError("encrypt needs a subject (the patient reference the data belongs to)")
        dek = self._dek_for_subject(conn, subject)
        version = FORMAT_V1
        if len(plaintext) >= COMPRESS_MIN_BYTES:
            packed = zlib.compress(plaintext, COMPRESS_LEVEL)
            if len(packed) <= len(plaintext) - len(plaintext) // 8:
                version, plaintext = FORMAT_V2, packed
        header = _HEADER.pack(version, dek.id)
        nonce = secrets.token_bytes(NONCE_BYTES)
        return header + nonce + dek.key.encrypt(nonce, plaintext, header + aad)

    def decrypt(self, conn: psycopg.Connection[Any], blob: bytes, aad: bytes) -> bytes:
        """Open a blob from :meth:`encrypt`; CryptoError if it was tampered with or belongs to another
        row (AAD), ErasedError if its DEK was destroyed or it is a retention tombstone."""
        blob = bytes(blob)
        if is_tombstone(blob):
            raise ErasedError("this value was removed under the retention policy")
        if len(blob) < _MIN_BLOB:
            raise CryptoError("ciphertext too short")
        version, dek_id = _HEADER.unpack_from(blob)
        if version not in (FORMAT_V1, FORMAT_V2):
            raise CryptoError(f"unknown ciphertext format version {version}")
        dek = self._dek_by_id(conn, dek_id)
        start = _HEADER.size
        nonce = blob[start:start + NONCE_BYTES]
        try:
            plaintext = dek.key.decrypt(nonce, blob[start + NONCE_BYTES:], blob[:start] + aad)
        except InvalidTag as exc:
            raise CryptoError("ciphertext does not authenticate: tampered, or not this row's value (AAD)") from exc
        if version == FORMAT_V2:
            try:
                return zlib.decompress(plaintext)
            except zlib.error as exc:  # authenticated, so written so by a faulty sealer, never by an attacker
                raise CryptoError("sealed value is not a valid zlib stream") from exc
        return plaintext

    def sealed_by_live_key(self, blob: bytes) -> bool:
        """Whether ``blob`` is sealed under a data key this process holds, unexpired and not erased here:
        what :meth:`decrypt` would use without asking the database. A cache of what such a blob decrypted
        to may be served while this holds; an erasure then reaches the cache as it reaches the key cache
        (at once in this process, within the key TTL in the others)."""
        blob = bytes(blob)
        if is_tombstone(blob) or len(blob) < _MIN_BLOB:
            return False
        return self._cached(self._by_id, _HEADER.unpack_from(blob)[1]) is not None

    def encrypt_json(self, conn: psycopg.Connection[Any], subject: str, value: Any, aad: bytes) -> bytes:
        return self.encrypt(conn, subject, json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                                                      default=str).encode("utf-8"), aad)

    def decrypt_json(self, conn: psycopg.Connection[Any], blob: bytes, aad: bytes) -> Any:
        return json.loads(self.decrypt(conn, blob, aad))


_CIPHERS: weakref.WeakSet[FieldCipher] = weakref.WeakSet()


def _forget_everywhere(subject: str | None) -> None:
    for cipher in list(_CIPHERS):
        cipher.forget(subject)


def rotate_kek(conn: psycopg.Connection[Any], old: Kek, new: Kek, *, actor: str = "psych-cds") -> int:
    """Re-wrap every live DEK wrapped by ``old`` under ``new``; returns how many. Audited.

    Runs in the caller's transaction and locks only the ``data_keys`` rows it rewrites: readers and
    new-key creation go on meanwhile. Processes keep decrypting throughout as long as they hold both
    KEKs (``FieldCipher(new, old_keks=[old])`` or the reverse); data rows are not touched because the
    DEKs themselves do not change.
    """
    if old.id == new.id:
        raise CryptoError("the new KEK is the same key as the old one")
    with audit.own_transaction(conn):
        return _rewrap(conn, old, new, actor)


def _rewrap(conn: psycopg.Connection[Any], old: Kek, new: Kek, actor: str) -> int:
    rows = conn.execute(
        "SELECT id, subject, wrapped_key FROM data_keys WHERE kek_id = %s AND destroyed_at IS NULL"
        " ORDER BY id FOR UPDATE", (old.id,)).fetchall()
    updates = [(wrap_dek(new, subject, unwrap_dek(old, subject, bytes(wrapped))), new.id, dek_id)
               for dek_id, subject, wrapped in rows]
    with conn.cursor() as cur:
        cur.executemany("UPDATE data_keys SET wrapped_key = %s, kek_id = %s, rotated_at = now() WHERE id = %s",
                        updates)
    remaining = conn.execute(
        "SELECT count(*) FROM data_keys WHERE destroyed_at IS NULL AND kek_id <> %s", (new.id,)).fetchone()
    audit.record(conn, event_type=audit.EventType.KEY_ROTATION, action="U", actor=actor,
                 entity={"what": "data_keys", "old_kek_id": old.id, "new_kek_id": new.id},
                 detail={"rewrapped": len(updates), "other_keks_remaining": int(remaining[0]) if remaining else 0})
    _forget_everywhere(None)
    return len(updates)


def erase_subject(conn: psycopg.Connection[Any], subject: str, reason: str, actor: str) -> int:
    """Crypto-shred ``subject``: destroy its DEK(s) so its ciphertexts can never be read again.

    Returns how many keys were destroyed (0 when already erased or never seen); the erasure is audited
    in the same transaction either way. The wrapped key is NULLed in the row; PostgreSQL keeps the old
    row version until VACUUM and backups keep it until they expire, but without the KEK's cooperation
    it is useless, and the policy is to VACUUM data_keys after erasures (see compliance/README.md).
    """
    if not reason.strip():
        raise CryptoError("erasure needs a reason (it is recorded in the audit log)")
    with audit.own_transaction(conn):
        return _destroy_keys(conn, subject, reason, actor)


def _destroy_keys(conn: psycopg.Connection[Any], subject: str, reason: str, actor: str) -> int:
    rows = conn.execute(
        "UPDATE data_keys SET wrapped_key = NULL, kek_id = NULL, destroyed_at = now(), destroyed_reason = %s"
        " WHERE subject = %s AND destroyed_at IS NULL RETURNING id", (reason, subject)).fetchall()
    ids = [int(r[0]) for r in rows]
    audit.record(conn, event_type=audit.EventType.ERASURE, action="D", actor=actor,
                 patient_ref=subject if subject.startswith("Patient/") else None, purpose="PATRQT",
                 entity={"what": subject, "data_key_ids": ids},
                 detail={"keys_destroyed": len(ids), "reason": reason.strip()[:200]})
    _forget_everywhere(subject)
    return len(ids)
