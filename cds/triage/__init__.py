"""Triage-referral rules: load and validate rules/triage, evaluate signals into a TriageOutcome,
explain why, run shadow rule sets and backtests. Rules are data; see README.md here.

    >>> ruleset = load_ruleset()                       # rules/triage, or any candidate directory
    >>> outcome = ruleset.evaluate(signals, history, now)
    >>> outcome.tier, outcome.fired[0].trace           # ("PHQ-9 item 9 = 2 (≥ 1): positive suicide screen", ...)
"""

from __future__ import annotations

from .backtest import AlertCounts, BacktestReport, BacktestRow, backtest
from .cases import CaseResult, run_cases
from .resources import load_crisis_resources
from .ruleset import (
    DEFAULT_RULES_DIR,
    Explanation,
    Rule,
    RuleDecision,
    RuleSet,
    default_sla_for,
    load_ruleset,
)

__all__ = [
    "DEFAULT_RULES_DIR",
    "AlertCounts",
    "BacktestReport",
    "BacktestRow",
    "CaseResult",
    "Explanation",
    "Rule",
    "RuleDecision",
    "RuleSet",
    "backtest",
    "load_crisis_resources",
    "load_ruleset",
    "run_cases",
    "sla_for",
]


def sla_for(priority: str) -> int:
    """Minutes to acknowledge an alert of ``priority`` (stat/asap/urgent/routine, or a tier label),
    from the live rule-set manifest (rules/triage/ruleset.yaml)."""
    return default_sla_for(priority)
