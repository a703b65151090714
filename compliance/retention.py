"""Retention: remove patient text that is past its retention period (policy as data in retention.yaml).

Data keys are per patient, so expiring one row cannot be done by destroying a key; instead the
encrypted column is overwritten with a tombstone (``compliance.crypto.make_tombstone``) which
decrypts to ErasedError. Rows, ids and non-text columns stay. Each run is audited (one record per
patient and kind, with the row ids) in the same transaction as the change, and is idempotent: rows
already tombstoned are skipped, so a second run changes and records nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from cds.errors import ConfigError
from compliance import audit
from compliance.crypto import FieldCipher, make_tombstone

POLICY_FILE = Path(__file__).with_name("retention.yaml")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MAX_IDS_IN_AUDIT = 200


@dataclass(frozen=True)
class RetentionRule:
    kind: str
    table: str
    column: str
    age_from: str
    days: int
    where: Mapping[str, tuple[str, ...]]
    where_not: Mapping[str, tuple[str, ...]]
    patient_column: str | None
    description: str = ""


@dataclass(frozen=True)
class RetentionPolicy:
    version: int
    rules: tuple[RetentionRule, ...]


def _ident(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ConfigError(f"retention policy: {where} must be a lower-case SQL identifier, got {value!r}")
    return value


def _filters(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"retention policy: {where} must be a mapping of column to value(s)")
    out: dict[str, tuple[str, ...]] = {}
    for column, values in raw.items():
        items = values if isinstance(values, list) else [values]
        if not items or not all(isinstance(v, (str, int)) for v in items):
            raise ConfigError(f"retention policy: {where}.{column} must be a value or a list of values")
        out[_ident(column, f"{where} column")] = tuple(str(v) for v in items)
    return out


def load_policy(path: Path = POLICY_FILE) -> RetentionPolicy:
    """Read and validate the retention policy; ConfigError names what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read retention policy {path}: {exc}") from exc
    if not isinstance(raw, Mapping) or not isinstance(raw.get("kinds"), Mapping):
        raise ConfigError(f"retention policy {path} needs a `kinds` mapping")
    rules = []
    for kind, spec in raw["kinds"].items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"retention policy: kind {kind!r} must be a mapping")
        days = spec.get("days")
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ConfigError(f"retention policy: {kind}.days must be a positive integer, got {days!r}")
        patient = spec.get("patient_column", "patient_ref")
        rules.append(RetentionRule(
            kind=str(kind), table=_ident(spec.get("table"), f"{kind}.table"),
            column=_ident(spec.get("column"), f"{kind}.column"),
            age_from=_ident(spec.get("age_from"), f"{kind}.age_from"), days=days,
            where=_filters(spec.get("where"), f"{kind}.where"),
            where_not=_filters(spec.get("where_not"), f"{kind}.where_not"),
            patient_column=None if patient is None else _ident(patient, f"{kind}.patient_column"),
            description=str(spec.get("description", ""))))
    return RetentionPolicy(int(raw.get("version", 1)), tuple(rules))


def _expire_query(rule: RetentionRule) -> sql.Composed:
    conditions: list[sql.Composable] = [
        sql.SQL("{} < %(cutoff)s").format(sql.Identifier(rule.age_from)),
        sql.SQL("{col} IS NOT NULL AND length({col}) > 0 AND get_byte({col}, 0) <> 0").format(
            col=sql.Identifier(rule.column)),
    ]
    for column, values in rule.where.items():
        conditions.append(sql.SQL("{}::text = ANY({})").format(sql.Identifier(column), sql.Literal(list(values))))
    for column, values in rule.where_not.items():
        conditions.append(sql.SQL("{}::text <> ALL({})").format(sql.Identifier(column), sql.Literal(list(values))))
    patient = sql.Identifier(rule.patient_column) if rule.patient_column else sql.SQL("NULL::text")
    return sql.SQL(
        "WITH expired AS (SELECT id, {patient} AS patient_ref FROM {table} WHERE {conditions}"
        " ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"
        " UPDATE {table} AS t SET {column} = %(tombstone)s FROM expired WHERE t.id = expired.id"
        " RETURNING t.id::text, expired.patient_ref").format(
        patient=patient, table=sql.Identifier(rule.table), conditions=sql.SQL(" AND ").join(conditions),
        column=sql.Identifier(rule.column))


def apply_retention(conn: psycopg.Connection[Any], cipher: FieldCipher | None, now: datetime, *,
                    policy: RetentionPolicy | None = None, actor: str = "psych-cds",
                    batch: int = 1000) -> dict[str, int]:
    """Tombstone every value past its retention period, in the caller's transaction; returns rows
    changed per kind. Audited per patient and kind; idempotent.

    ``cipher`` is not needed to overwrite ciphertext (nothing is decrypted); it is accepted so that
    the scheduled job calls every compliance task the same way.
    """
    del cipher
    policy = policy or load_policy()
    counts: dict[str, int] = {}
    for rule in policy.rules:
        cutoff = now - timedelta(days=rule.days)
        query = _expire_query(rule)
        by_patient: dict[str | None, list[str]] = defaultdict(list)
        while True:
            rows = conn.execute(query, {"cutoff": cutoff, "batch": batch,
                                        "tombstone": make_tombstone(rule.kind)}).fetchall()
            for row_id, patient in rows:
                by_patient[patient].append(str(row_id))
            if len(rows) < batch:
                break
        counts[rule.kind] = sum(len(ids) for ids in by_patient.values())
        for patient, ids in sorted(by_patient.items(), key=lambda item: item[0] or ""):
            entity: dict[str, Any] = {"what": f"{rule.table}.{rule.column}", "kind": rule.kind,
                                      "row_count": len(ids),
                                      "ids_sha256": hashlib.sha256(",".join(ids).encode()).hexdigest()}
            if len(ids) <= _MAX_IDS_IN_AUDIT:
                entity["ids"] = ids
            audit.record(conn, event_type=audit.EventType.RETENTION, action="D", actor=actor,
                         patient_ref=patient, purpose="HOPERAT", entity=entity,
                         detail={"days": rule.days, "cutoff": audit.format_ts(cutoff),
                                 "policy_version": policy.version})
    return counts
