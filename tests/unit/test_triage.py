"""Triage rules: loading and validation, hashing, shadow mode, floors, missing data, backtest, CLI."""

from __future__ import annotations

import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cds.domain import FLAG_DISCORDANT, FLAG_HARM_TO_OTHERS, FLAG_INDETERMINATE, History, RiskTier, Signal
from cds.errors import InputError, RulesError
from cds.triage import (
    DEFAULT_RULES_DIR,
    AlertCounts,
    BacktestRow,
    backtest,
    load_crisis_resources,
    load_ruleset,
    run_cases,
    sla_for,
)
from cds.triage.commands import rules as rules_group

NOW = datetime(2025, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=8)))
KNOWN = History(prior_attempt=False)


def sig(name: str, value: object, tier: RiskTier | None = None, **kw: object) -> Signal:
    return Signal(name, value, "test", tier, **kw)  # type: ignore[arg-type]


@pytest.fixture()
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_default_ruleset_loads_with_version_hash_and_rules() -> None:
    ruleset = load_ruleset()
    assert ruleset.version == "2026.1.0" and not ruleset.shadow
    assert len(ruleset.hash) == 64
    assert {"phq9-item9-positive", "discordance", "text-safety-net", "harm-to-others"} <= {r.id for r in ruleset.rules}


def test_lookback_signals_are_the_ones_count_tests_read_from_history() -> None:
    rs = load_ruleset()
    assert rs.lookback_signals == {"text.tier", "phq9.item9", "cssrs.risk", "asq.result"}


def test_phq9_item9_outcome_carries_hash_fired_rule_trace_and_actions() -> None:
    ruleset = load_ruleset()
    outcome = ruleset.evaluate([sig("phq9.item9", 2, RiskTier.MODERATE)], KNOWN, NOW)
    assert outcome.tier == RiskTier.MODERATE
    assert outcome.ruleset_hash == ruleset.hash and outcome.ruleset_version == ruleset.version
    fired = {f.id: f for f in outcome.fired}
    assert "PHQ-9 item 9 = 2 (≥ 1): positive suicide screen" in fired["phq9-item9-positive"].trace
    alert = next(a for a in outcome.actions if a.kind == "nurse_alert")
    assert (alert.priority, alert.sla_minutes) == ("urgent", 240)


def test_hash_is_stable_and_changes_when_a_rule_changes(rules_copy: Path) -> None:
    live = load_ruleset()
    assert load_ruleset(rules_copy / "triage").hash == live.hash  # same content, other directory
    edit(rules_copy / "triage" / "phq9-item9-positive.yaml", "gte: 1", "gte: 2")
    assert load_ruleset(rules_copy / "triage").hash != live.hash


def test_hash_ignores_comments_and_status_but_not_sla(rules_copy: Path) -> None:
    live = load_ruleset()
    manifest = rules_copy / "triage" / "ruleset.yaml"
    edit(manifest, "status: live", "status: shadow  # candidate")
    shadow = load_ruleset(rules_copy / "triage")
    assert shadow.shadow and shadow.hash == live.hash
    edit(manifest, "stat: 5 ", "stat: 3 ")
    assert load_ruleset(rules_copy / "triage").hash != live.hash


def test_shadow_ruleset_marks_every_outcome(rules_copy: Path) -> None:
    edit(rules_copy / "triage" / "ruleset.yaml", "status: live", "status: shadow")
    outcome = load_ruleset(rules_copy / "triage" / "ruleset.yaml").evaluate(
        [sig("text.tier", "high", RiskTier.HIGH)], KNOWN, NOW)
    assert outcome.shadow is True
    assert load_ruleset().evaluate([], KNOWN, NOW).shadow is False


def test_schema_invalid_rule_names_file_and_json_path(rules_copy: Path) -> None:
    edit(rules_copy / "triage" / "harm-to-others.yaml", "eq: true", "equals: true")
    with pytest.raises(RulesError, match=r"(?s)harm-to-others\.yaml.*\$\.logic.*equals"):
        load_ruleset(rules_copy / "triage")


def test_unknown_priority_is_rejected(rules_copy: Path) -> None:
    edit(rules_copy / "triage" / "harm-to-others.yaml", "priority: urgent", "priority: whenever")
    with pytest.raises(RulesError, match=r"(?s)harm-to-others\.yaml.*\$\.outputs\.actions\[0\]\.priority"):
        load_ruleset(rules_copy / "triage")


def test_logic_reading_an_undeclared_input_is_rejected(rules_copy: Path) -> None:
    edit(rules_copy / "triage" / "phq9-severe-referral.yaml", "inputs: [phq9.total]", "inputs: [phq9.band]")
    with pytest.raises(RulesError, match=r"'phq9.total' is not listed in inputs"):
        load_ruleset(rules_copy / "triage")


def test_missing_rule_file_and_manifest_are_reported(rules_copy: Path, tmp_path: Path) -> None:
    (rules_copy / "triage" / "discordance.yaml").unlink()
    with pytest.raises(RulesError, match=r"\$\.rules\[12\].*discordance\.yaml"):
        load_ruleset(rules_copy / "triage")
    with pytest.raises(RulesError, match="manifest not found"):
        load_ruleset(tmp_path / "nowhere")


def test_later_denial_does_not_lower_the_tier() -> None:
    ruleset = load_ruleset()
    history = History(previous_tier=RiskTier.HIGH, prior_attempt=False)
    outcome = ruleset.evaluate([sig("text.tier", "none", RiskTier.NONE), sig("phq9.item9", 0, RiskTier.NONE)],
                               history, NOW)
    assert outcome.tier == RiskTier.HIGH


def test_indeterminate_signal_adds_flag_missing_and_an_alert_never_a_lower_tier() -> None:
    missing = ("phq9 item 9 (44260-8)",)
    outcome = load_ruleset().evaluate([sig("phq9.item9", None, None, missing=missing)],
                                      History(previous_tier=RiskTier.LOW, prior_attempt=False), NOW)
    assert FLAG_INDETERMINATE in outcome.flags
    assert "phq9 item 9 (44260-8)" in outcome.missing
    assert outcome.tier == RiskTier.LOW
    assert any(a.params.get("task") == "complete_phq9_item9" and a.priority == "urgent" for a in outcome.actions)
    undecided = next(f for f in outcome.fired if f.id == "phq9-item9-positive")
    assert undecided.trace[0].startswith("undecided")


def test_safety_net_sets_high_and_a_stat_alert() -> None:
    # The safety net's signal carries what it found and the tier that implies (cds/nlp).
    outcome = load_ruleset().evaluate([sig("text.safety_net", ["plan", "timing"], RiskTier.HIGH),
                                       sig("text.tier", "low", RiskTier.LOW)], KNOWN, NOW)
    assert outcome.tier == RiskTier.HIGH
    assert any(a.kind == "nurse_alert" and a.priority == "stat" and a.sla_minutes == 5 for a in outcome.actions)
    assert any(a.kind == "crisis_resources" for a in outcome.actions)


def test_safety_net_below_high_does_not_fire_the_stat_rule() -> None:
    outcome = load_ruleset().evaluate([sig("text.safety_net", ["ideation"], RiskTier.LOW)], KNOWN, NOW)
    assert not any(f.id == "text-safety-net" for f in outcome.fired)


def test_harm_to_others_flag_and_urgent_alert() -> None:
    outcome = load_ruleset().evaluate([sig("text.harm_to_others", True)], KNOWN, NOW)
    assert FLAG_HARM_TO_OTHERS in outcome.flags
    assert any(a.kind == "nurse_alert" and a.priority == "urgent" for a in outcome.actions)


@pytest.mark.parametrize(("days_ago", "discordant"), [(1, True), (13.9, True), (14.5, False)])
def test_discordance_window(days_ago: float, discordant: bool) -> None:
    recent = sig("text.tier", "moderate", RiskTier.MODERATE, observed_at=NOW - timedelta(days=days_ago))
    outcome = load_ruleset().evaluate([sig("phq9.item9", 0, RiskTier.NONE)],
                                      History(prior_attempt=False, recent_signals=(recent,)), NOW)
    assert (FLAG_DISCORDANT in outcome.flags) is discordant
    assert any(a.kind == "discordance_alert" for a in outcome.actions) is discordant


def test_age_and_conditions_are_usable_in_logic(rules_copy: Path) -> None:
    rule = rules_copy / "triage" / "bipolar-depression-referral.yaml"
    edit(rule, "inputs: [history.conditions, phq9.total]", "inputs: [history.conditions, history.age_years, phq9.total]")
    edit(rule, "    - {signal: phq9.total, gte: 10, says: moderate or worse depression}",
         "    - {signal: phq9.total, gte: 10, says: moderate or worse depression}\n    - {history: age_years, lt: 18}")
    ruleset = load_ruleset(rules_copy / "triage")
    signals = [sig("phq9.total", 12), sig("phq9.item9", 0, RiskTier.NONE)]
    def fired(history: History) -> bool:
        return any(f.id == "bipolar-depression-referral" and not f.trace[0].startswith("undecided")
                   for f in ruleset.evaluate(signals, history, NOW).fired)
    assert fired(History(prior_attempt=False, conditions=("F31.2",), age_years=16))
    assert not fired(History(prior_attempt=False, conditions=("F31.2",), age_years=40))
    assert not fired(History(prior_attempt=False, conditions=("F33.1",), age_years=16))
    unknown_age = ruleset.evaluate(signals, History(prior_attempt=False, conditions=("F31.2",)), NOW)
    assert "history.age_years" in unknown_age.missing  # unknown age leaves it undecided, never off


def test_sla_minutes_come_from_data() -> None:
    assert [sla_for(p) for p in ("stat", "asap", "urgent", "routine")] == [5, 15, 240, 1440]
    assert [sla_for(t) for t in ("imminent", "high", "moderate", "low")] == [5, 15, 240, 1440]
    with pytest.raises(RulesError):
        sla_for("whenever")


def test_crisis_resources_by_locale() -> None:
    zh = load_crisis_resources("zh-CN")
    assert {"12356", "010-82951332", "400-161-9995"} <= {r["phone"] for r in zh}
    assert all(r["name_en"] and r["name_zh"] and r["hours"] and r["note"] for r in zh)
    assert "988" in {r["phone"] for r in load_crisis_resources("en-US")}
    assert "116 123" in {r["phone"] for r in load_crisis_resources("en_gb")}
    with pytest.raises(InputError, match="no crisis resources"):
        load_crisis_resources("fr-FR")


def test_backtest_counts_alerts_per_day_and_rule(rules_copy: Path) -> None:
    edit(rules_copy / "triage" / "phq9-item9-positive.yaml", "gte: 1", "gte: 2")
    candidate = load_ruleset(rules_copy / "triage")
    live = load_ruleset()
    day1, day2 = date(2025, 3, 1), date(2025, 3, 2)
    rows = [
        BacktestRow(day1, "Patient/1", [sig("phq9.item9", 1, RiskTier.MODERATE)], KNOWN),
        BacktestRow(day1, "Patient/2", [sig("phq9.item9", 0, RiskTier.NONE)], KNOWN),
        BacktestRow(day2, "Patient/1", [sig("phq9.item9", 3, RiskTier.MODERATE)], KNOWN),
        BacktestRow(day2, "Patient/3", [sig("text.harm_to_others", True)], KNOWN),
    ]
    report = backtest(candidate, live, rows)
    assert report.rows == 4
    assert report.by_rule["phq9-item9-positive"] == AlertCounts(candidate=1, live=2)
    assert report.by_rule["harm-to-others"] == AlertCounts(candidate=1, live=1)
    assert report.by_day[day1] == AlertCounts(candidate=0, live=1)
    assert report.by_day[day2] == AlertCounts(candidate=2, live=2)
    assert report.by_day_rule[(day2, "phq9-item9-positive")] == AlertCounts(1, 1)
    assert report.tier_lower == 1 and report.tier_higher == 0
    assert report.candidate_hash == candidate.hash and report.live_hash == live.hash
    assert "delta -1" in report.summary_lines()[1]


def test_backtest_streams_an_unsized_iterable() -> None:
    ruleset = load_ruleset()
    rows = (BacktestRow(date(2025, 3, 1), f"Patient/{i}", [sig("text.tier", "high", RiskTier.HIGH)], KNOWN)
            for i in range(3))
    report = backtest(ruleset, ruleset, rows, progress=False)
    assert report.rows == 3 and report.by_rule["text-tier-alert"] == AlertCounts(3, 3)


def test_rules_check_command_passes_and_fails(rules_copy: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(rules_group, ["check"])
    assert ok.exit_code == 0, ok.output
    assert "0 failed" in ok.output
    edit(rules_copy / "triage" / "cases" / "phq9-item9-positive" / "in-item9-several-days.yaml",
         "expect:\n  tier: moderate", "expect:\n  tier: low")
    bad = runner.invoke(rules_group, ["check", "--rules-dir", str(rules_copy)])
    assert bad.exit_code == 1
    assert "in-item9-several-days.yaml" in bad.output and "1 failed" in bad.output


def test_run_cases_reports_a_rule_without_cases(rules_copy: Path) -> None:
    shutil.rmtree(rules_copy / "triage" / "cases" / "harm-to-others")
    failed = [r for r in run_cases(rules_copy) if not r.passed]
    assert {r.message for r in failed} == {"rule harm-to-others has no in-* case", "rule harm-to-others has no out-* case"}


TIERS = [None, *RiskTier]
signal_values = st.fixed_dictionaries({
    "item9": st.one_of(st.none(), st.integers(0, 3)),
    "cssrs": st.sampled_from(TIERS),
    "asq": st.sampled_from([None, "negative", "non_acute_positive", "acute_positive"]),
    "text": st.sampled_from(TIERS),
    "net": st.booleans(),
    "previous": st.sampled_from(TIERS),
})
ASQ_TIER = {"negative": RiskTier.NONE, "non_acute_positive": RiskTier.MODERATE, "acute_positive": RiskTier.IMMINENT}
ASQ_ORDER = [None, "negative", "non_acute_positive", "acute_positive"]


def to_signals(v: dict[str, object]) -> tuple[list[Signal], History]:
    out = []
    if v["item9"] is not None:
        item9 = int(v["item9"])  # type: ignore[call-overload]
        out.append(sig("phq9.item9", item9, RiskTier.MODERATE if item9 >= 1 else RiskTier.NONE))
    if isinstance(v["cssrs"], RiskTier):
        out.append(sig("cssrs.risk", v["cssrs"].label, v["cssrs"]))
    if v["asq"] is not None:
        out.append(sig("asq.result", v["asq"], ASQ_TIER[str(v["asq"])]))
    if isinstance(v["text"], RiskTier):
        out.append(sig("text.tier", v["text"].label, v["text"]))
    if v["net"]:
        out.append(sig("text.safety_net", True))
    previous = v["previous"] if isinstance(v["previous"], RiskTier) else None
    return out, History(previous_tier=previous, prior_attempt=False)


def rise(a: object, b: object, order: list[object]) -> object:
    return a if order.index(a) >= order.index(b) else b


@settings(max_examples=300, deadline=None)
@given(signal_values, signal_values)
def test_triage_tier_never_falls_when_any_input_rises(base: dict[str, object], other: dict[str, object]) -> None:
    raised = {
        "item9": rise(base["item9"], other["item9"], [None, 0, 1, 2, 3]),
        "cssrs": rise(base["cssrs"], other["cssrs"], list(TIERS)),
        "asq": rise(base["asq"], other["asq"], list(ASQ_ORDER)),
        "text": rise(base["text"], other["text"], list(TIERS)),
        "net": bool(base["net"]) or bool(other["net"]),
        "previous": rise(base["previous"], other["previous"], list(TIERS)),
    }
    ruleset = load_ruleset()
    low = ruleset.evaluate(*to_signals(base), NOW)
    high = ruleset.evaluate(*to_signals(raised), NOW)
    assert high.tier >= low.tier
    assert max((s.tier for s in to_signals(raised)[0] if s.tier is not None), default=RiskTier.NONE) <= high.tier


def _count_by_hand(test: dict, ctx: object) -> tuple[object, list[str], list[str]]:
    """The count test worked out signal by signal, every verdict asked anew (the reference for the cached one)."""
    from cds.triage.logic import OPS, _in_window, _op_of, _window, test_signal

    inner = test["count"]
    pool = [(s, True) for s in ctx.signals] + [(s, False) for s in ctx.history.recent_signals]  # type: ignore[attr-defined]
    sure = unsure = 0
    missing: list[str] = []
    for s, current in pool:
        if s.name != inner["signal"] or not _in_window(s, _window(ctx, float(test["within_days"])), current):  # type: ignore[arg-type]
            continue
        v = test_signal(inner, s, ctx)  # type: ignore[arg-type]
        sure += v.value is True
        unsure += v.value is None
        missing += v.missing if v.value is None else []
    outcomes = {OPS[_op_of(test)](n, test[_op_of(test)]) for n in range(sure, sure + unsure + 1)}
    return (outcomes.pop() if len(outcomes) == 1 else None), [f"{sure}+{unsure}"], missing


_TIERS = st.sampled_from([None, *RiskTier])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["text.tier", "phq9.item9"]), _TIERS,
                          st.sampled_from([(), ("text risk model (unavailable)",)]),
                          st.floats(min_value=0, max_value=20)), max_size=40),
       st.sampled_from([1, 2, 3]))
def test_count_over_a_long_history_matches_asking_every_signal(rows: list[tuple], gte: int) -> None:
    """The count test works each distinct signal's verdict out once; over long, repetitive histories
    (one text.tier per chat message) it must count exactly as asking every signal would."""
    from cds.triage.logic import Context, _test_count

    recent = tuple(sig(name, t.label if t is not None else None, t, missing=m, observed_at=NOW - timedelta(days=d))
                   for name, t, m, d in rows)
    ctx = Context(signals=[sig("text.tier", "low", RiskTier.LOW)], history=History(recent_signals=recent), now=NOW,
                  labels={})
    test = {"count": {"signal": "text.tier", "field": "tier", "gte": "moderate"}, "within_days": 14, "gte": gte}
    got = _test_count(test, ctx)
    want_value, (counts,), want_missing = _count_by_hand(test, ctx)
    sure, unsure = (int(x) for x in counts.split("+"))
    assert got.value == want_value and got.missing == (want_missing if want_value is None else [])
    assert f": {sure} time(s) within 14 days" in got.lines[0] and ((f"(+{unsure} undecided)" in got.lines[0]) == bool(unsure))
