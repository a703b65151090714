"""CLI groups for compliance work, registered by cds/cli.py: ``cds audit``, ``cds keys``, ``cds patient``.

Each command takes its database URL and settings from the click context object set up by cds/cli.py:
``ctx.obj["db_url"]()`` (a callable, so that starting the embedded database happens only for
commands that need it) and ``ctx.obj["settings"]`` (a Settings). Every command that reads or
changes protected data is itself audited.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psycopg

from cds.errors import CdsError
from cds.settings import Settings
from cds.store.db import connect
from compliance import audit as audit_log
from compliance import export
from compliance.audit import EventType
from compliance.crypto import Kek, erase_subject, load_kek, load_kek_file, rotate_kek


def _settings() -> Settings:
    obj = click.get_current_context().obj
    settings: Settings = obj["settings"]
    return settings


def _connect() -> psycopg.Connection[Any]:
    return connect(click.get_current_context().obj["db_url"]())


def _operator(actor: str | None) -> str:
    """Who is running the command: --actor, else ``cli:<os user>``."""
    if actor:
        return actor
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _fail(exc: CdsError) -> None:
    raise click.ClickException(f"{exc.__class__.__name__}: {exc}")


def _timestamp(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"not an ISO date/time: {value!r}") from exc
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


actor_option = click.option("--actor", help="who is acting (Practitioner/... or user id); default cli:<os user>")


# --------------------------------------------------------------------------------------------------
# cds audit
# --------------------------------------------------------------------------------------------------


@click.group("audit")
def audit_group() -> None:
    """Verify, sign and export the tamper-evident audit log."""


@audit_group.command("verify")
@click.option("--from", "from_seq", type=int, help="first seq to check (default: the first)")
@click.option("--to", "to_seq", type=int, help="last seq to check (default: the last)")
@click.option("--public-key", "public_keys", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="trusted checkpoint public key (PEM); default: the keys stored in the database")
@actor_option
def verify_command(from_seq: int | None, to_seq: int | None, public_keys: tuple[Path, ...],
                   actor: str | None) -> None:
    """Re-walk the hash chain and checkpoint signatures; exit 1 naming the first bad record."""
    keys = [p.read_text() for p in public_keys] or None
    with _connect() as conn:
        result = audit_log.verify(conn, from_seq, to_seq, keys)
        conn.rollback()
        audit_log.record(conn, event_type=EventType.AUDIT_VERIFY, action="E", actor=_operator(actor),
                     outcome=0 if result.ok else 8,
                     entity={"what": "audit_log", "from_seq": from_seq, "to_seq": to_seq},
                     detail={"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
                             "checkpoints_ok": result.checkpoints_ok, "trusted_keys": bool(keys)})
        conn.commit()
    click.echo(json.dumps({"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
                           "reason": result.reason, "checkpoints_ok": result.checkpoints_ok}))
    if not result.ok:
        sys.exit(1)


@audit_group.command("checkpoint")
@click.option("--create-key", is_flag=True, help="create the signing key if it does not exist")
def checkpoint_command(create_key: bool) -> None:
    """Sign the current head of the chain now (the scheduler does this every few minutes)."""
    try:
        signer = audit_log.load_signer(_settings(), create=create_key)
    except CdsError as exc:
        _fail(exc)
        return
    with _connect() as conn:
        seq = audit_log.sign_checkpoint(conn, signer)
        conn.commit()
    click.echo(json.dumps({"seq": seq, "public_key_id": signer.key_id}))


@audit_group.command("public-key")
def public_key_command() -> None:
    """Print the checkpoint signing public key (PEM) to publish to auditors."""
    try:
        click.echo(audit_log.load_signer(_settings()).public_key_pem(), nl=False)
    except CdsError as exc:
        _fail(exc)


@audit_group.command("export")
@click.option("--from", "from_ts", required=True, help="start (ISO date/time, inclusive; UTC if no zone)")
@click.option("--to", "to_ts", required=True, help="end (ISO date/time, exclusive)")
@click.option("--format", "fmt", type=click.Choice(["fhir", "csv"]), default="fhir", show_default=True)
@click.option("--patient", help="only records about this patient (Patient/...)")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="file to write (default stdout)")
@actor_option
def export_command(from_ts: str, to_ts: str, fmt: str, patient: str | None, output: Path | None,
                   actor: str | None) -> None:
    """Export audit records as a FHIR AuditEvent bundle or CSV (the export is itself audited)."""
    start, end = _timestamp(from_ts), _timestamp(to_ts)
    out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        with _connect() as conn:
            if fmt == "fhir":
                count = export.write_fhir_bundle(conn, out, start, end, patient)
            else:
                count = 0
                for chunk in export.iter_csv(conn, start, end, patient):
                    out.write(chunk)
                    count += chunk.count("\r\n")
                count = max(0, count - 1)
            conn.rollback()
            audit_log.record(conn, event_type=EventType.EXPORT, action="R", actor=_operator(actor),
                         patient_ref=patient,
                         entity={"what": "audit_log", "from": from_ts, "to": to_ts, "format": fmt},
                         detail={"records": count, "to_file": output is not None})
            conn.commit()
    finally:
        if output:
            out.close()
    if output:
        click.echo(json.dumps({"records": count, "output": str(output)}), err=True)


# --------------------------------------------------------------------------------------------------
# cds keys
# --------------------------------------------------------------------------------------------------


@click.group("keys")
def keys_group() -> None:
    """Manage the key-encryption key (KEK) that wraps the per-patient data keys."""


@keys_group.command("rotate")
@click.option("--new-kek-file", type=click.Path(dir_okay=False, path_type=Path),
              help="file of the new KEK (default: <CDS_KEK_FILE>.new)")
@click.option("--create", is_flag=True, help="generate the new KEK file (0600) if it does not exist")
@actor_option
def rotate_command(new_kek_file: Path | None, create: bool, actor: str | None) -> None:
    """Re-wrap every data key under a new KEK; data rows are not touched.

    Zero-downtime order: (1) create the new KEK and give every process both keys
    (CDS_KEK_FILE=new, CDS_OLD_KEK_FILES=old), (2) run this, (3) drop the old key.
    """
    settings = _settings()
    path = new_kek_file or settings.kek_file.with_name(settings.kek_file.name + ".new")
    try:
        old = load_kek(settings)
        new: Kek = load_kek_file(path, create=create)
    except CdsError as exc:
        _fail(exc)
        return
    if old.id == new.id:
        raise click.ClickException("the new KEK is the key already in use; nothing to rotate")
    with _connect() as conn:
        count = rotate_kek(conn, old, new, actor=_operator(actor))
        conn.commit()
    click.echo(json.dumps({"rewrapped": count, "old_kek_id": old.id, "new_kek_id": new.id,
                           "new_kek_file": str(path)}))
    click.echo(f"Next: point CDS_KEK_FILE at {path} on every node; keep the old key in CDS_OLD_KEK_FILES "
               f"until all have restarted, then destroy it.", err=True)


# --------------------------------------------------------------------------------------------------
# cds patient
# --------------------------------------------------------------------------------------------------


@click.group("patient")
def patient_group() -> None:
    """Patient-level data-subject requests."""


@patient_group.command("erase")
@click.argument("patient_ref")
@click.option("--reason", required=True, help="why (request id, legal basis); recorded in the audit log")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@actor_option
def erase_command(patient_ref: str, reason: str, yes: bool, actor: str | None) -> None:
    """Crypto-shred PATIENT_REF: destroy the patient's data key so that all their stored text
    (messages, answers, evidence, notes) can never be read again. Irreversible."""
    if not patient_ref.startswith("Patient/") or len(patient_ref) <= len("Patient/"):
        raise click.BadParameter("expected a reference like Patient/123", param_hint="PATIENT_REF")
    if not yes:
        click.confirm(f"Irreversibly erase all stored text of {patient_ref}?", abort=True)
    try:
        with _connect() as conn:
            count = erase_subject(conn, patient_ref, reason, _operator(actor))
            conn.commit()
    except CdsError as exc:
        _fail(exc)
        return
    click.echo(json.dumps({"patient": patient_ref, "keys_destroyed": count}))


# the names cds/cli.py registers
audit = audit_group
keys = keys_group
patient = patient_group
groups = (audit_group, keys_group, patient_group)
