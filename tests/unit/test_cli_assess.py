"""`cds assess` scores a file offline: no database, no EHR."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cds.cli import cli
from tests.samples import chat, phq9


def _run(tmp_path: Path, doc: object) -> tuple[int, str]:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    result = CliRunner().invoke(cli, ["assess", str(path)], env={"CDS_DATABASE_URL": "postgresql://unused/x"})
    return result.exit_code, result.output


def test_phq9_with_item9_positive(tmp_path: Path) -> None:
    code, out = _run(tmp_path, phq9("Patient/p1", [2, 2, 2, 1, 1, 1, 1, 0, 2]))
    assert code == 0, out
    result = json.loads(out)
    assert result["scores"]["phq9"] == {"total": 12, "band": "moderate", "item9": 2}
    assert result["tier"] in ("moderate", "high")
    assert any(r["id"] == "phq9-item9-positive" for r in result["rules"])
    assert len(result["ruleset"]) == 64


def test_missing_item9_is_indeterminate_not_none(tmp_path: Path) -> None:
    code, out = _run(tmp_path, phq9("Patient/p1", [0, 0, 0, 0, 0, 0, 0, 0, None]))
    assert code == 0, out
    result = json.loads(out)
    assert "indeterminate" in result["flags"]
    assert any("44260-8" in m for m in result["missing"])


def test_bundle_of_one_patients_chat_is_assessed_as_a_conversation(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": chat("Patient/p2", "I bought a rope today", sent="2026-11-20T03:00:00Z")},
        {"resource": chat("Patient/p2", "I'm going to use it tonight", sent="2026-11-20T03:01:00Z")}]}
    code, out = _run(tmp_path, bundle)
    assert code == 0, out
    assert json.loads(out)["tier"] in ("high", "imminent")


def test_bad_input_exits_non_zero_with_a_message(tmp_path: Path) -> None:
    code, out = _run(tmp_path, {"resourceType": "Observation", "status": "final"})
    assert code != 0 and "resourceType" in out
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(cli, ["assess", str(path)])
    assert result.exit_code != 0 and "not valid JSON" in result.output
