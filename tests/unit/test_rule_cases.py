"""Every instrument case and every triage rule's in-/out- case, one parametrised test each."""

from __future__ import annotations

import pytest

from cds.triage import DEFAULT_RULES_DIR, CaseResult, run_cases

RESULTS = run_cases()


@pytest.mark.parametrize("result", RESULTS, ids=[str(r.path.relative_to(DEFAULT_RULES_DIR)) for r in RESULTS])
def test_case(result: CaseResult) -> None:
    assert result.passed, f"{result.path}: {result.message}"


def test_every_rule_and_instrument_has_cases() -> None:
    paths = {str(r.path.relative_to(DEFAULT_RULES_DIR)) for r in RESULTS}
    assert any(p.startswith("triage/cases/discordance/in-") for p in paths)
    assert any(p.startswith("instruments/cases/phq9/") for p in paths)
    assert len(RESULTS) >= 60
