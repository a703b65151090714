"""Tamper-evident audit log: an append-only, SHA-256 hash chain with Ed25519-signed checkpoints.

* :func:`record` appends one record in the caller's transaction, so a change and the record of it
  commit (or roll back) together. Appends are serialised by a transaction-scoped advisory lock,
  which makes ``seq`` gapless and lets each record carry the hash of the one before it. The lock
  is held until the caller commits: call ``record`` late in a transaction.
* Each record's hash is SHA-256 over the canonical JSON (sorted keys, no whitespace, UTF-8) of its
  fields including ``prev_hash`` (see :func:`canonical_bytes`), so an external verifier can
  recompute it from an export.
* The database refuses UPDATE/DELETE/TRUNCATE (grants and triggers, 0101_audit.sql). Someone who
  bypasses that (a superuser disabling the triggers) is caught by :func:`verify`; someone who also
  rewrites the chain from the edit onward is caught by the signed checkpoints, whose private key is
  not in the database.
* Detail and entity hold references, ids, hashes and codes only, never patient text: the log is
  kept longer than the data, and erasure must not leave text behind in it.

Event types are coded constants (:class:`EventType`); :data:`CODINGS` maps each to the FHIR
AuditEvent type/subtype it exports as (one table, like Medplum's ``util/auditevent.ts``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cds.errors import ConfigError
from cds.settings import Settings

#: pg_advisory_xact_lock key that serialises appends (and checkpoint signing).
AUDIT_LOCK = 0x0C_D5_A0_D1
GENESIS_HASH = "0" * 64
ACTIONS = frozenset("CRUDE")
OUTCOMES = frozenset((0, 4, 8, 12))  # FHIR AuditEvent.outcome: success, minor, serious, major failure
SIGNING_KEY_ENV = "CDS_AUDIT_SIGNING_KEY_FILE"
_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
# NUL in canonical JSON: "\u0000" after an even number of backslashes ("\\u0000" is a backslash, then text).
_ESCAPED_NUL_RE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
#: Keys that would carry patient text; record() refuses them anywhere in entity/detail.
PHI_KEYS = frozenset({"text", "message_text", "payload", "content", "transcript", "resource", "given",
                      "family", "birthdate", "telecom", "address", "answer", "note"})


# --------------------------------------------------------------------------------------------------
# Coded event types
# --------------------------------------------------------------------------------------------------

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
CDS_AUDIT_SUBTYPE = "https://psych-cds.example.org/fhir/CodeSystem/audit-event-subtype"


class EventType:
    """The ``event_type`` values the service records. Families (``alert.*``, ``event.*``) take a
    suffix naming the transition; see :data:`CODINGS` for the FHIR coding each exports as."""

    REST_READ = "rest.read"
    REST_VREAD = "rest.vread"
    REST_SEARCH = "rest.search"
    REST_CREATE = "rest.create"
    REST_UPDATE = "rest.update"
    REST_DELETE = "rest.delete"
    LOGIN = "login"
    LOGOUT = "logout"
    LOGIN_FAILED = "login.failed"
    BREAK_GLASS = "break-glass"
    ASSESSMENT = "assessment"
    ALERT = "alert"  # family: alert.open, alert.acknowledge, alert.escalate, alert.resolve ...
    EVENT = "event"  # family: event.received, event.quarantined, event.failed
    FHIR_WRITE = "fhir.write"
    CDSHOOKS_CALL = "cdshooks.call"
    CONFIG_CHANGE = "config.change"
    RULE_CHANGE = "rule.change"
    MODEL_CHANGE = "model.change"
    ERASURE = "erasure"
    RETENTION = "retention"
    EXPORT = "export"
    KEY_ROTATION = "key.rotate"
    AUDIT_VERIFY = "audit.verify"


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str

    def to_fhir(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


@dataclass(frozen=True)
class EventCoding:
    """How one event type appears as a FHIR AuditEvent (IHE BALP / DICOM codes)."""

    type: Coding
    subtype: tuple[Coding, ...]
    action: str  # the usual action; record() takes the actual one


def _dcm(code: str, display: str) -> Coding:
    return Coding(DCM, code, display)


def _rest(code: str) -> Coding:
    return Coding(RESTFUL_INTERACTION, code, code)


def _own(code: str, display: str) -> Coding:
    return Coding(CDS_AUDIT_SUBTYPE, code, display)


REST = Coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")
PATIENT_RECORD = _dcm("110110", "Patient Record")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
SECURITY_ALERT = _dcm("110113", "Security Alert")
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")

CODINGS: dict[str, EventCoding] = {
    EventType.REST_READ: EventCoding(REST, (_rest("read"),), "R"),
    EventType.REST_VREAD: EventCoding(REST, (_rest("vread"),), "R"),
    EventType.REST_SEARCH: EventCoding(REST, (_rest("search-type"),), "E"),
    EventType.REST_CREATE: EventCoding(REST, (_rest("create"),), "C"),
    EventType.REST_UPDATE: EventCoding(REST, (_rest("update"),), "U"),
    EventType.REST_DELETE: EventCoding(REST, (_rest("delete"),), "D"),
    EventType.LOGIN: EventCoding(USER_AUTHENTICATION, (_dcm("110122", "Login"),), "E"),
    EventType.LOGOUT: EventCoding(USER_AUTHENTICATION, (_dcm("110123", "Logout"),), "E"),
    EventType.LOGIN_FAILED: EventCoding(USER_AUTHENTICATION, (_dcm("110122", "Login"),), "E"),
    EventType.BREAK_GLASS: EventCoding(SECURITY_ALERT, (_dcm("110127", "Emergency Override Started"),), "E"),
    EventType.ASSESSMENT: EventCoding(PATIENT_RECORD, (_own("assessment", "Risk assessment"),), "C"),
    EventType.ALERT: EventCoding(PATIENT_RECORD, (_own("alert", "Alert transition"),), "U"),
    EventType.EVENT: EventCoding(PATIENT_RECORD, (_own("event", "Input event"),), "C"),
    EventType.FHIR_WRITE: EventCoding(REST, (_rest("transaction"),), "C"),
    EventType.CDSHOOKS_CALL: EventCoding(_dcm("110112", "Query"), (_own("cds-hooks", "CDS Hooks call"),), "E"),
    EventType.CONFIG_CHANGE: EventCoding(SECURITY_ALERT, (_dcm("110129", "Security Configuration"),), "U"),
    EventType.RULE_CHANGE: EventCoding(SECURITY_ALERT, (_dcm("110131", "Software Configuration"),), "U"),
    EventType.MODEL_CHANGE: EventCoding(SECURITY_ALERT, (_dcm("110131", "Software Configuration"),), "U"),
    EventType.ERASURE: EventCoding(PATIENT_RECORD, (_own("erasure", "Erasure (crypto-shredding)"),), "D"),
    EventType.RETENTION: EventCoding(PATIENT_RECORD, (_own("retention", "Removed under retention policy"),), "D"),
    EventType.EXPORT: EventCoding(_dcm("110106", "Export"), (), "R"),
    EventType.KEY_ROTATION: EventCoding(SECURITY_ALERT, (_dcm("110129", "Security Configuration"),), "U"),
    EventType.AUDIT_VERIFY: EventCoding(_dcm("110101", "Audit Log Used"), (), "E"),
}
_FALLBACK = EventCoding(APPLICATION_ACTIVITY, (), "E")


def coding_for(event_type: str) -> EventCoding:
    """The FHIR coding of ``event_type``: exact match, else its family (``alert.resolve`` -> ``alert``),
    else Application Activity. The suffix is added as a subtype of our own code system."""
    found = CODINGS.get(event_type)
    if found is not None:
        return found
    family = event_type.split(".", 1)[0]
    base = CODINGS.get(family, _FALLBACK)
    return EventCoding(base.type, base.subtype + (_own(event_type, event_type),), base.action)


# --------------------------------------------------------------------------------------------------
# Records and their hash
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    recorded_at: datetime
    event_type: str
    action: str
    outcome: int
    actor: str
    actor_role: str | None
    patient_ref: str | None
    purpose: str | None
    entity: Any
    detail: Any
    prev_hash: str
    hash: str

    def hash_fields(self) -> dict[str, Any]:
        return _hash_fields(self.seq, format_ts(self.recorded_at), self.event_type, self.action, self.outcome,
                            self.actor, self.actor_role, self.patient_ref, self.purpose, self.entity,
                            self.detail, self.prev_hash)


def format_ts(ts: datetime) -> str:
    """The canonical timestamp in the hash: UTC, microseconds, ``Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canon_float(text: str) -> int | float:
    """Numbers as jsonb gives them back: integral values become exact ints (``1e20``, ``5.0`` -> 5),
    others the nearest float (jsonb keeps the decimal digits that Python wrote)."""
    exact = Decimal(text)
    if not exact.is_finite():
        raise ValueError("audit values must be finite numbers")
    if exact == exact.to_integral_value():
        return int(exact)
    return float(text)


def normalise_json(value: Any) -> Any:
    """``value`` as it will read back from a jsonb column, so the hash is the same on both sides."""
    if value is None:
        return None
    return _JSONB.decode(json.dumps(value, allow_nan=False, default=str))


def _hash_fields(seq: int, recorded_at: str, event_type: str, action: str, outcome: int, actor: str,
                 actor_role: str | None, patient_ref: str | None, purpose: str | None, entity: Any,
                 detail: Any, prev_hash: str) -> dict[str, Any]:
    return {"seq": seq, "recorded_at": recorded_at, "event_type": event_type, "action": action,
            "outcome": outcome, "actor": actor, "actor_role": actor_role, "patient_ref": patient_ref,
            "purpose": purpose, "entity": entity, "detail": detail, "prev_hash": prev_hash}


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_JSONB = json.JSONDecoder(parse_float=_canon_float)


def canonical_json(value: Any) -> str:
    """The canonical JSON text of any value (as used inside the hashed record)."""
    return _CANONICAL.encode(value)


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 (non-ASCII kept as is), integral numbers as ints."""
    return _CANONICAL.encode(fields).encode("utf-8")


def record_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def _check_no_phi(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).lower().replace("_", "") in _PHI_KEYS_FOLDED:
                raise ValueError(f"audit {where} must not carry patient text (key {key!r}); "
                                 "record a reference, id or hash instead")
            _check_no_phi(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_no_phi(item, where)


_PHI_KEYS_FOLDED = frozenset(k.replace("_", "") for k in PHI_KEYS)


def record(conn: psycopg.Connection[Any], *, event_type: str, action: str, actor: str, role: str | None = None,
           patient_ref: str | None = None, purpose: str | None = None, outcome: int = 0,
           entity: Mapping[str, Any] | None = None, detail: Mapping[str, Any] | None = None) -> int:
    """Append one audit record in the caller's transaction and return its ``seq``.

    ``action`` is one of C R U D E; ``outcome`` 0/4/8/12 as FHIR AuditEvent.outcome; ``purpose`` a
    v3 PurposeOfUse/ActReason code (TREAT, ETREAT, PATRQT ...). ``entity``/``detail`` must hold no
    patient text (keys like ``text`` or ``content`` are refused). Needs READ COMMITTED (the default):
    under REPEATABLE READ a stale snapshot makes the insert fail on the ``seq`` key rather than fork
    the chain.
    """
    prepared = _prepare(event_type=event_type, action=action, actor=actor, role=role, patient_ref=patient_ref,
                        purpose=purpose, outcome=outcome, entity=entity, detail=detail)
    with own_transaction(conn):
        return _append(conn, [prepared])


@dataclass(frozen=True)
class _Prepared:
    event_type: str
    action: str
    outcome: int
    actor: str
    role: str | None
    patient_ref: str | None
    purpose: str | None
    # Made before the append lock is taken, so that under it a record costs a few string joins and one
    # SHA-256: the record's canonical JSON around the three fields the chain decides (prev_hash,
    # recorded_at, seq; see _chained), and entity / detail as the INSERT sends them.
    head: str
    middle: str
    entity_json: str | None
    detail_json: str | None


def _fragments(event_type: str, action: str, outcome: int, actor: str, role: str | None, patient_ref: str | None,
               purpose: str | None, entity_n: Any, detail_n: Any) -> tuple[str, str]:
    """The canonical JSON of a record (``canonical_bytes(_hash_fields(...))``) is, with its keys sorted,
    ``head`` + "prev_hash" + ``middle`` + "recorded_at" + "seq": every key before "prev_hash" goes in
    ``head``, "purpose" in ``middle``. Each value encodes the same alone as inside the whole object."""
    before = _CANONICAL.encode({"action": action, "actor": actor, "actor_role": role, "detail": detail_n,
                                "entity": entity_n, "event_type": event_type, "outcome": outcome,
                                "patient_ref": patient_ref})
    return before[:-1] + ",", '"purpose":' + _CANONICAL.encode(purpose) + ","


def _chained(r: _Prepared, seq: int, recorded_at: str, prev_hash: str) -> str:
    """``record_hash(_hash_fields(...))`` of a prepared record, from its fragments. ``prev_hash`` is hex and
    ``recorded_at`` is format_ts's digits and separators: neither needs JSON escaping."""
    text = f'{r.head}"prev_hash":"{prev_hash}",{r.middle}"recorded_at":"{recorded_at}","seq":{seq}}}'
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _prepare(*, event_type: str, action: str, actor: str, role: str | None = None, patient_ref: str | None = None,
             purpose: str | None = None, outcome: int = 0, entity: Mapping[str, Any] | None = None,
             detail: Mapping[str, Any] | None = None) -> _Prepared:
    """Check and normalise one record before any lock is taken (what cannot be stored fails here)."""
    if not _EVENT_TYPE_RE.match(event_type):
        raise ValueError(f"bad audit event_type {event_type!r}")
    if action not in ACTIONS:
        raise ValueError(f"audit action must be one of C R U D E, got {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be 0, 4, 8 or 12, got {outcome!r}")
    if not actor:
        raise ValueError("audit actor is required")
    _check_no_phi(entity, "entity")
    _check_no_phi(detail, "detail")
    entity_n = normalise_json(entity)
    detail_n = normalise_json(detail)
    head, middle = _fragments(event_type, action, outcome, actor, role, patient_ref, purpose, entity_n, detail_n)
    try:  # lone surrogates, NUL: the fragments hold every text value of the record, canonically encoded
        text = (head + middle).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("audit values must be valid Unicode text") from exc
    if _ESCAPED_NUL_RE.search(text):
        raise ValueError("audit values must not contain NUL characters")
    return _Prepared(event_type, action, outcome, actor, role, patient_ref, purpose, head, middle,
                     None if entity_n is None else json.dumps(entity_n, ensure_ascii=False),
                     None if detail_n is None else json.dumps(detail_n, ensure_ascii=False))


def own_transaction(conn: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
    """A transaction when ``conn`` is in autocommit mode with none open (so locks last until the work is
    done), else nothing: the caller's transaction is used (one it opened itself with BEGIN included,
    as ``cds.store.db.pipelined_transaction`` does)."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return conn.transaction()
    return nullcontext()


def _append(conn: psycopg.Connection[Any], records: Sequence[_Prepared]) -> int:
    """Chain ``records`` onto the log under the append lock: one lock, one read of the chain's head and
    one multi-row insert, whatever their number. Returns the last ``seq``."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
    # a new statement after the lock: its snapshot sees the last committed record
    row = conn.execute(
        "SELECT clock_timestamp(), (SELECT seq FROM audit_log ORDER BY seq DESC LIMIT 1),"
        " (SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1)").fetchone()
    assert row is not None
    recorded_at: datetime = row[0]
    seq = int(row[1]) if row[1] is not None else 0
    prev_hash = str(row[2]) if row[2] is not None else GENESIS_HASH
    rows = []
    stamp = format_ts(recorded_at)
    for r in records:
        seq += 1
        digest = _chained(r, seq, stamp, prev_hash)
        rows.append((seq, recorded_at, r.event_type, r.action, r.outcome, r.actor, r.role, r.patient_ref, r.purpose,
                     r.entity_json, r.detail_json, prev_hash, digest))
        prev_hash = digest
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_log (seq, recorded_at, event_type, action, outcome, actor, actor_role, patient_ref,"
            " purpose, entity, detail, prev_hash, hash)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s)", rows)
    return seq


_RECORD_COLUMNS = ("seq, recorded_at, event_type, action, outcome, actor, actor_role, patient_ref, purpose,"
                   " entity, detail, prev_hash, hash")


def _to_record(row: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(int(row[0]), row[1], row[2], row[3], int(row[4]), row[5], row[6], row[7], row[8],
                       row[9], row[10], row[11], row[12])


def search(conn: psycopg.Connection[Any], *, from_ts: datetime | None = None, to_ts: datetime | None = None,
           patient_ref: str | None = None, actor: str | None = None, event_type: str | None = None,
           before_seq: int | None = None, limit: int = 100) -> list[AuditRecord]:
    """Newest first, for the compliance officer's page; ``event_type`` matches a family too."""
    where, params = _filters(from_ts, to_ts, patient_ref)
    if actor:
        where.append("actor = %s")
        params.append(actor)
    if event_type:
        where.append("(event_type = %s OR event_type LIKE %s)")
        params += [event_type, event_type + ".%"]
    if before_seq is not None:
        where.append("seq < %s")
        params.append(before_seq)
    query = (f"SELECT {_RECORD_COLUMNS} FROM audit_log WHERE {' AND '.join(where) or 'true'}"
             " ORDER BY seq DESC LIMIT %s")
    return [_to_record(r) for r in conn.execute(query, [*params, limit]).fetchall()]


def _filters(from_ts: datetime | None, to_ts: datetime | None,
             patient_ref: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if from_ts is not None:
        where.append("recorded_at >= %s")
        params.append(from_ts)
    if to_ts is not None:
        where.append("recorded_at < %s")
        params.append(to_ts)
    if patient_ref:
        where.append("patient_ref = %s")
        params.append(patient_ref)
    return where, params


def iter_records(conn: psycopg.Connection[Any], from_ts: datetime | None = None, to_ts: datetime | None = None,
                 patient_ref: str | None = None, *, batch: int = 2000) -> Iterator[AuditRecord]:
    """Records in ``[from_ts, to_ts)`` in chain order, streamed with a server-side cursor (needs a
    non-autocommit connection)."""
    where, params = _filters(from_ts, to_ts, patient_ref)
    query = f"SELECT {_RECORD_COLUMNS} FROM audit_log WHERE {' AND '.join(where) or 'true'} ORDER BY seq"
    with conn.cursor(name="audit_export") as cur:
        cur.itersize = batch
        cur.execute(query, params)
        for row in cur:
            yield _to_record(row)


# --------------------------------------------------------------------------------------------------
# Signed checkpoints
# --------------------------------------------------------------------------------------------------


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _load_public_key(key: str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    loaded = serialization.load_pem_public_key(key.encode() if isinstance(key, str) else key)
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError("audit checkpoint keys must be Ed25519 public keys")
    return loaded


class Signer:
    """The Ed25519 key that signs checkpoints. Its private half lives in a 0600 file outside the
    database; the public half is published (:meth:`public_key_pem`) and stored in audit_signing_keys."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def private_key_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def signing_key_path(settings: Settings) -> Path:
    return Path(os.environ.get(SIGNING_KEY_ENV) or (settings.data_dir / "keys" / "audit-signing.pem"))


def load_signer(settings: Settings, create: bool = False) -> Signer:
    """The checkpoint signer from ``CDS_AUDIT_SIGNING_KEY_FILE`` (default data_dir/keys/audit-signing.pem);
    ``create`` writes a new key (0600) when the file is missing."""
    path = signing_key_path(settings)
    if not path.exists():
        if not create:
            raise ConfigError(f"audit signing key {path} does not exist; create one with "
                              f"`cds audit keygen` or set {SIGNING_KEY_ENV}")
        signer = Signer.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_signer(settings)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signer.private_key_pem())
        return signer
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"audit signing key {path} is readable by group or others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"audit signing key {path} is not a PEM Ed25519 private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"audit signing key {path} is not an Ed25519 key")
    return Signer(key)


def checkpoint_message(seq: int, hash_: str, signed_at: datetime, key_id: str) -> bytes:
    """What a checkpoint signature covers (documented so that others can verify it)."""
    return (f"psych-cds audit checkpoint v1\nseq={seq}\nhash={hash_}\nsigned_at={format_ts(signed_at)}\n"
            f"key={key_id}\n").encode("ascii")


def publish_key(conn: psycopg.Connection[Any], signer: Signer) -> None:
    conn.execute("INSERT INTO audit_signing_keys (key_id, public_key_pem) VALUES (%s, %s)"
                 " ON CONFLICT (key_id) DO NOTHING", (signer.key_id, signer.public_key_pem()))


def sign_checkpoint(conn: psycopg.Connection[Any], signer: Signer) -> int:
    """Sign the latest record's hash (in the caller's transaction); returns its seq, 0 if the log is
    empty. Idempotent: signing an already-signed head returns the same seq."""
    with own_transaction(conn):
        return _sign_head(conn, signer)


def _sign_head(conn: psycopg.Connection[Any], signer: Signer) -> int:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
    row = conn.execute("SELECT seq, hash, clock_timestamp() FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return 0
    seq, hash_, signed_at = int(row[0]), str(row[1]), row[2]
    if conn.execute("SELECT 1 FROM audit_checkpoints WHERE seq = %s", (seq,)).fetchone():
        return seq
    publish_key(conn, signer)
    signature = signer.sign(checkpoint_message(seq, hash_, signed_at, signer.key_id))
    conn.execute("INSERT INTO audit_checkpoints (seq, hash, signed_at, signature, public_key_id)"
                 " VALUES (%s, %s, %s, %s, %s)", (seq, hash_, signed_at, signature, signer.key_id))
    return seq


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str
    checkpoints_ok: int


@dataclass(frozen=True)
class _Problem:
    seq: int
    reason: str


def _trusted_keys(conn: psycopg.Connection[Any],
                  public_keys: Iterable[str | bytes | Ed25519PublicKey] | None) -> dict[str, Ed25519PublicKey]:
    if public_keys is None:  # weaker: whoever can write the database can add a key
        pems: Iterable[str | bytes | Ed25519PublicKey] = [
            r[0] for r in conn.execute("SELECT public_key_pem FROM audit_signing_keys").fetchall()]
    else:
        pems = public_keys
    keys = [_load_public_key(k) for k in pems]
    return {key_id_of(k): k for k in keys}


def _check_checkpoints(conn: psycopg.Connection[Any], lo: int, hi: int | None,
                       keys: Mapping[str, Ed25519PublicKey]) -> tuple[dict[int, str], _Problem | None, int]:
    """Signature-check the checkpoints in [lo, hi]; returns {seq: signed hash}, the first bad one, and
    how many verified."""
    rows = conn.execute(
        "SELECT seq, hash, signed_at, signature, public_key_id FROM audit_checkpoints"
        " WHERE seq >= %s AND (%s::bigint IS NULL OR seq <= %s) ORDER BY seq", (lo, hi, hi)).fetchall()
    signed: dict[int, str] = {}
    for seq, hash_, signed_at, signature, key_id in rows:
        key = keys.get(key_id)
        if key is None:
            return signed, _Problem(int(seq), f"checkpoint {seq} is signed by unknown key {key_id}"), len(signed)
        try:
            key.verify(bytes(signature), checkpoint_message(int(seq), hash_, signed_at, key_id))
        except InvalidSignature:
            return signed, _Problem(int(seq), f"checkpoint {seq} has an invalid signature (forged or altered)"), \
                len(signed)
        signed[int(seq)] = str(hash_)
    return signed, None, len(signed)


_VERIFY_QUERY = (
    "SELECT seq, to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), event_type,"
    " action, outcome, actor, actor_role, patient_ref, purpose, entity::text, detail::text, prev_hash, hash"
    " FROM audit_log WHERE seq >= %s AND (%s::bigint IS NULL OR seq <= %s) ORDER BY seq")


def verify(conn: psycopg.Connection[Any], from_seq: int | None = None, to_seq: int | None = None,
           public_keys: Iterable[str | bytes | Ed25519PublicKey] | None = None, *,
           batch: int = 10000) -> VerifyResult:
    """Re-walk the chain over [from_seq, to_seq] and the checkpoints in it; name the first bad record.

    Detects an edited record (its hash no longer matches its fields), a deleted one (gap in seq), an
    inserted or reordered one (prev_hash no longer links), a chain rewritten from some point on
    (a signed checkpoint no longer matches), a truncated tail (a checkpoint beyond the last record)
    and a forged checkpoint (bad signature). ``public_keys`` are the trusted, published checkpoint
    keys (PEM); without them the keys stored in the database are used, which an attacker who can
    write the database could replace. Streams with a server-side cursor (needs a non-autocommit
    connection); reads only, and leaves the transaction open for the caller to end.
    """
    lo = max(1, from_seq or 1)
    keys = _trusted_keys(conn, public_keys)
    signed, cp_problem, checkpoints_ok = _check_checkpoints(conn, lo, to_seq, keys)

    problem: _Problem | None = None
    checked = 0
    prev_seq = lo - 1
    prev_hash: str | None = None
    prev_prev_hash: str | None = None
    start = lo - 1 if lo > 1 else 1  # start one early so the first record's link is checked too
    encode = _CANONICAL.encode
    decode = _JSONB.decode
    sha256 = hashlib.sha256
    with conn.cursor(name="audit_verify") as cur:
        cur.itersize = batch
        cur.execute(_VERIFY_QUERY, (start, to_seq, to_seq))
        for (seq, ts, event_type, action, outcome, actor, role, patient, purpose, entity, detail, link,
             stored) in cur:
            if seq < lo:  # the anchor before the range: trust its hash, check only what follows
                prev_seq, prev_hash = seq, stored
                continue
            if seq != prev_seq + 1:
                missing = prev_seq + 1
                problem = _Problem(missing, f"record {missing} is missing (records {missing}..{seq - 1} deleted)"
                                   if seq > missing else f"record {seq} is out of order")
                break
            fields = {"seq": seq, "recorded_at": ts, "event_type": event_type, "action": action,
                      "outcome": outcome, "actor": actor, "actor_role": role, "patient_ref": patient,
                      "purpose": purpose,
                      "entity": None if entity is None else decode(entity),
                      "detail": None if detail is None else decode(detail),
                      "prev_hash": link}
            digest = sha256(encode(fields).encode("utf-8")).hexdigest()
            if digest != stored:
                problem = _Problem(seq, f"record {seq} was altered: its hash does not match its content")
                break
            expected = GENESIS_HASH if seq == 1 else prev_hash
            if expected is not None and link != expected:
                if prev_prev_hash is not None and link == prev_prev_hash:
                    problem = _Problem(seq - 1, f"record {seq - 1} was inserted: record {seq} links to "
                                                f"record {seq - 2}")
                else:
                    problem = _Problem(seq, f"record {seq} does not link to record {seq - 1} (prev_hash "
                                            f"mismatch: record {seq - 1} or {seq} was rewritten, or reordered)")
                break
            want = signed.get(seq)
            if want is not None and want != stored:
                problem = _Problem(seq, f"record {seq} differs from its signed checkpoint: the chain was "
                                        f"rewritten up to here")
                break
            checked += 1
            prev_prev_hash, prev_hash, prev_seq = prev_hash, stored, seq
    if problem is None and signed:
        last_signed = max(signed)
        if last_signed > prev_seq:
            problem = _Problem(prev_seq + 1, f"the log ends at record {prev_seq} but checkpoint {last_signed} "
                                             f"was signed: records {prev_seq + 1}..{last_signed} were deleted")
    candidates = [p for p in (problem, cp_problem) if p is not None]
    if not candidates:
        return VerifyResult(True, checked, None, "ok", checkpoints_ok)
    first = min(candidates, key=lambda p: p.seq)
    return VerifyResult(False, checked, first.seq, first.reason, checkpoints_ok)


def record_batch(conn: psycopg.Connection[Any], entries: Iterable[Mapping[str, Any]]) -> None:
    """Append several records at once, for callers that collect them during a long transaction and
    append them last: the chain's append lock is then held only from here to the commit, never across
    network calls or other work (which would make every audited transaction wait on it)."""
    prepared = [_prepare(**entry) for entry in entries]
    if prepared:
        with own_transaction(conn):
            _append(conn, prepared)
