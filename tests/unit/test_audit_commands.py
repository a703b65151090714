"""compliance.commands through click's CliRunner: audit verify/export/checkpoint, keys rotate, patient erase."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from cds.errors import ErasedError
from cds.settings import Settings
from cds.store.db import connect
from compliance import audit
from compliance.commands import audit_group, keys_group, patient_group
from compliance.crypto import FieldCipher, load_kek, load_kek_file

AAD = b"events.resource|ehr|Communication|1|1"


@pytest.fixture
def obj(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("CDS_KEK", raising=False)
    monkeypatch.delenv("CDS_AUDIT_SIGNING_KEY_FILE", raising=False)
    return {"db_url": lambda: db_url, "settings": Settings.from_env({"CDS_DATA_DIR": str(tmp_path)})}


def _invoke(group: Any, args: list[str], obj: dict[str, Any], **kw: Any) -> Any:
    return CliRunner().invoke(group, args, obj=obj, catch_exceptions=False, **kw)


def _seed(db_url: str, n: int = 3) -> None:
    with connect(db_url) as conn:
        for i in range(n):
            audit.record(conn, event_type="rest.read", action="R", actor="Practitioner/1",
                         patient_ref="Patient/1", entity={"what": f"RiskAssessment/{i}"})
        conn.commit()


def test_verify_reports_ok_and_is_itself_audited(obj: dict[str, Any], db_url: str) -> None:
    _seed(db_url)
    result = _invoke(audit_group, ["verify", "--actor", "Practitioner/officer"], obj)
    assert result.exit_code == 0
    assert json.loads(result.output) == {"ok": True, "checked": 3, "first_bad_seq": None, "reason": "ok",
                                         "checkpoints_ok": 0}
    with connect(db_url) as conn:
        last = audit.search(conn, limit=1)[0]
    assert last.event_type == "audit.verify" and last.actor == "Practitioner/officer"


def test_verify_exits_1_naming_the_first_bad_record(obj: dict[str, Any], db_url: str, db_admin_url: str) -> None:
    _seed(db_url, 5)
    with psycopg.connect(db_admin_url, autocommit=True) as admin:
        admin.execute("SET session_replication_role = replica")
        admin.execute("DELETE FROM audit_log WHERE seq = 2")
    result = _invoke(audit_group, ["verify"], obj)
    assert result.exit_code == 1 and json.loads(result.output)["first_bad_seq"] == 2


def test_checkpoint_then_verify_with_the_published_key(obj: dict[str, Any], db_url: str, tmp_path: Path) -> None:
    _seed(db_url)
    assert _invoke(audit_group, ["checkpoint"], obj).exit_code != 0  # no key yet, and not asked to create
    signed = _invoke(audit_group, ["checkpoint", "--create-key"], obj)
    assert json.loads(signed.output)["seq"] == 3
    pem = tmp_path / "audit.pub"
    pem.write_text(_invoke(audit_group, ["public-key"], obj).output)
    result = _invoke(audit_group, ["verify", "--public-key", str(pem)], obj)
    assert json.loads(result.output)["checkpoints_ok"] == 1 and result.exit_code == 0


def test_export_fhir_and_csv_to_files(obj: dict[str, Any], db_url: str, tmp_path: Path) -> None:
    _seed(db_url)
    fhir_file, csv_file = tmp_path / "a.json", tmp_path / "a.csv"
    window = ["--from", "2000-01-01", "--to", "2100-01-01"]
    assert _invoke(audit_group, ["export", *window, "--output", str(fhir_file)], obj).exit_code == 0
    bundle = json.loads(fhir_file.read_text())
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["AuditEvent"] * 3
    assert _invoke(audit_group, ["export", *window, "--format", "csv", "--patient", "Patient/1",
                                 "--output", str(csv_file)], obj).exit_code == 0
    assert len(csv_file.read_text().splitlines()) == 4
    stdout = _invoke(audit_group, ["export", *window], obj).output
    assert len(json.loads(stdout)["entry"]) == 5  # the two exports before are in the log now
    with connect(db_url) as conn:
        exports = audit.search(conn, event_type="export")
    assert [e.detail["records"] for e in reversed(exports)] == [3, 3, 5]


def test_keys_rotate_rewraps_under_the_new_kek(obj: dict[str, Any], db_url: str) -> None:
    settings: Settings = obj["settings"]
    old = load_kek(settings, create=True)
    with connect(db_url) as conn:
        blob = FieldCipher(old).encrypt(conn, "Patient/1", "原文".encode(), AAD)
        conn.commit()
    result = _invoke(keys_group, ["rotate", "--create"], obj)
    assert result.exit_code == 0, result.output
    new_file = settings.kek_file.with_name("kek.key.new")
    assert json.loads(result.output.splitlines()[0])["rewrapped"] == 1
    with connect(db_url) as conn:
        assert FieldCipher(load_kek_file(new_file)).decrypt(conn, blob, AAD) == "原文".encode()


def test_patient_erase_shreds_and_records(obj: dict[str, Any], db_url: str) -> None:
    kek = load_kek(obj["settings"], create=True)
    with connect(db_url) as conn:
        blob = FieldCipher(kek).encrypt(conn, "Patient/5", b"text", AAD)
        conn.commit()
    refused = CliRunner().invoke(patient_group, ["erase", "Patient/5", "--reason", "req 1"], obj=obj, input="n\n")
    assert refused.exit_code == 1
    bad = CliRunner().invoke(patient_group, ["erase", "5", "--reason", "x", "--yes"], obj=obj)
    assert bad.exit_code == 2
    result = _invoke(patient_group, ["erase", "Patient/5", "--reason", "PIPL Art. 47 request 1", "--yes",
                                     "--actor", "Practitioner/dpo"], obj)
    assert json.loads(result.output) == {"patient": "Patient/5", "keys_destroyed": 1}
    with connect(db_url) as conn:
        with pytest.raises(ErasedError):
            FieldCipher(kek).decrypt(conn, blob, AAD)
        assert audit.search(conn, limit=1)[0].event_type == "erasure"
        assert audit.verify(conn).ok
