"""Shadow rule sets run beside the live one without alerting; a backtest replays stored history
through a candidate and counts the alerts it would raise (real DB, real EHR, real rules)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from cds.jobs import ingest_cycle
from cds.settings import REPO_ROOT
from tests.samples import chat, patient, phq9

pytestmark = pytest.mark.integration


@pytest.fixture
def candidate(tmp_path: Path) -> Path:
    """The live rules minus the discordance rule, marked shadow."""
    target = tmp_path / "candidate"
    shutil.copytree(REPO_ROOT / "rules" / "triage", target)
    manifest = (target / "ruleset.yaml").read_text(encoding="utf-8")
    manifest = re.sub(r"(?m)^version: .*$", "version: 2026.2.0-rc1", manifest.replace("status: live", "status: shadow"))
    manifest = manifest.replace("  - discordance.yaml\n", "")
    (target / "ruleset.yaml").write_text(manifest, encoding="utf-8")
    return target


@pytest.fixture
def shadowed(settings_env: dict[str, str], candidate: Path) -> Iterator[Any]:
    from cds.pipeline import Engines
    from cds.service import Service
    from cds.settings import Settings

    settings = Settings.from_env({**settings_env, "CDS_SHADOW_RULESETS": str(candidate)})
    svc = Service.start(settings, migrate=False, engines=Engines.load(settings), pool_size=2)
    yield svc
    svc.close()


def test_shadow_rules_are_stored_but_never_alert_and_backtest_counts_the_difference(
        ehr: Any, shadowed: Any, candidate: Path) -> None:
    pat = ehr.create(patient(mrn="MRN-S-1"))
    ref = f"Patient/{pat['id']}"
    ehr.create(phq9(ref, [1, 1, 0, 0, 0, 0, 0, 0, 0]))
    ingest_cycle(shadowed)
    ehr.create(chat(ref, "I keep thinking about killing myself, every single day"))
    ingest_cycle(shadowed)
    with shadowed.pool.connection() as conn:
        rows = conn.execute("SELECT shadow, ruleset_version, fired FROM assessments ORDER BY id").fetchall()
        alert_kinds = {r[0] for r in conn.execute("SELECT kind FROM alerts")}
    assert [r[0] for r in rows] == [False, True, False, True]
    assert rows[1][1] == "2026.2.0-rc1"
    live_rules = {f["id"] for f in rows[2][2]}
    shadow_rules = {f["id"] for f in rows[3][2]}
    assert "discordance" in live_rules and "discordance" not in shadow_rules
    assert "discordance" in alert_kinds  # from the live set only

    result = CliRunner().invoke(
        __import__("cds.cli", fromlist=["cli"]).cli,
        ["rules", "backtest", "--ruleset", str(candidate), "--json"],
        env={"CDS_DATABASE_URL": shadowed.db_url})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["events"] == 2
    assert report["by_rule"]["discordance"] == {"candidate": 0, "live": 1}
    assert report["candidate"]["version"] == "2026.2.0-rc1"
