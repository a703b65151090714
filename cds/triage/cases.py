"""The case runner: every instrument case and every rule's in-/out- cases, as data.

Triage cases live in ``rules/triage/cases/<rule-id>/in-*.yaml`` (must fire) and ``out-*.yaml`` (must not
fire); instrument cases in ``rules/instruments/cases/<instrument>/*.yaml|json``. Each rule needs at
least one of each kind; a rule without them fails the run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cds.domain import Evidence, History, RiskTier, Signal
from cds.errors import CdsError, InputError, RulesError
from cds.instruments import InstrumentCatalog, load_catalog, score_questionnaire_response
from cds.instruments.definition import read_yaml

from .ruleset import DEFAULT_RULES_DIR, RuleSet, load_ruleset


@dataclass(frozen=True)
class CaseResult:
    path: Path
    passed: bool
    message: str = ""


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        moment = datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def signal_from_case(data: Mapping[str, Any]) -> Signal:
    tier = data.get("tier")
    return Signal(name=str(data["name"]), value=data.get("value"), source=str(data.get("source", "case")),
                  tier=RiskTier.from_label(tier) if tier else None,
                  evidence=tuple(Evidence.from_json(e) for e in data.get("evidence", ())),
                  missing=tuple(data.get("missing", ())), observed_at=_when(data.get("observed_at")))


def history_from_case(data: Mapping[str, Any] | None) -> History:
    data = data or {}
    previous = data.get("previous_tier")
    return History(previous_tier=RiskTier.from_label(previous) if previous else None,
                   prior_attempt=data.get("prior_attempt"), conditions=tuple(data.get("conditions", ())),
                   age_years=data.get("age_years"),
                   recent_signals=tuple(signal_from_case(s) for s in data.get("recent_signals", ())))


def _read(path: Path) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RulesError(f"{path}: cannot read JSON: {exc}") from exc
    return read_yaml(path)


def check_triage_case(path: Path, rule_id: str, ruleset: RuleSet, catalog: InstrumentCatalog) -> CaseResult:
    case = _read(path)
    if not isinstance(case, Mapping) or "now" not in case:
        return CaseResult(path, False, "a case needs at least `now` (and signals / questionnaire_responses)")
    must_fire = path.name.startswith("in-")
    signals = [signal_from_case(s) for s in case.get("signals", ())]
    for qr in case.get("questionnaire_responses", ()):
        signals += score_questionnaire_response(qr, catalog).signals
    now = _when(case["now"])
    assert now is not None
    explanation = ruleset.explain(signals, history_from_case(case.get("history")), now)
    outcome = explanation.outcome
    decision = explanation.decision(rule_id)
    expect = case.get("expect") or {}
    problems: list[str] = []
    wanted = expect.get("decision", "fired")
    if must_fire and wanted == "fired" and decision.value is not True:
        problems.append(f"expected {rule_id} to fire; it was {_word(decision.value)}: {list(decision.trace)}")
    if must_fire and wanted == "undecided" and decision.value is not None:
        problems.append(f"expected {rule_id} undecided; it was {_word(decision.value)}")
    if not must_fire and decision.value is not False:
        problems.append(f"expected {rule_id} not to fire; it was {_word(decision.value)}: {list(decision.trace)}")
    if "tier" in expect and outcome.tier != RiskTier.from_label(expect["tier"]):
        problems.append(f"tier {outcome.tier.label}, expected {expect['tier']}")
    if "flags" in expect and outcome.flags != frozenset(expect["flags"]):
        problems.append(f"flags {sorted(outcome.flags)}, expected {sorted(expect['flags'])}")
    for flag in expect.get("flags_include", ()):
        if flag not in outcome.flags:
            problems.append(f"flag {flag} missing from {sorted(outcome.flags)}")
    for flag in expect.get("flags_exclude", ()):
        if flag in outcome.flags:
            problems.append(f"flag {flag} present but must not be")
    for item in expect.get("missing_include", ()):
        if item not in outcome.missing:
            problems.append(f"{item!r} not in missing {list(outcome.missing)}")
    for want in expect.get("actions_include", ()):
        if not any(a.kind == want["kind"] and a.priority == want.get("priority", a.priority)
                   and a.params.get("rule") == want.get("rule", rule_id) for a in outcome.actions):
            problems.append(f"no action {want} from {want.get('rule', rule_id)} in "
                            f"{[(a.kind, a.priority, a.params.get('rule')) for a in outcome.actions]}")
    for text in expect.get("trace_include", ()):
        if not any(text in line for line in decision.trace):
            problems.append(f"trace has no line containing {text!r}: {list(decision.trace)}")
    return CaseResult(path, not problems, "; ".join(problems))


def _word(value: bool | None) -> str:
    return {True: "fired", None: "undecided", False: "not fired"}[value]


def check_instrument_case(path: Path, catalog: InstrumentCatalog) -> CaseResult:
    case = _read(path)
    expect = case.get("expect") or {}
    try:
        result = score_questionnaire_response(case["questionnaire_response"], catalog)
    except InputError as exc:
        if "error" in expect and str(expect["error"]) in str(exc):
            return CaseResult(path, True)
        return CaseResult(path, False, f"InputError: {exc}")
    if "error" in expect:
        return CaseResult(path, False, f"expected InputError containing {expect['error']!r}; got {result.scores}")
    problems: list[str] = []
    if "instrument" in expect and result.instrument != expect["instrument"]:
        problems.append(f"instrument {result.instrument}, expected {expect['instrument']}")
    for key, value in (expect.get("scores") or {}).items():
        if result.scores.get(key) != value:
            problems.append(f"scores.{key} = {result.scores.get(key)!r}, expected {value!r}")
    if "missing" in expect and list(result.missing) != list(expect["missing"]):
        problems.append(f"missing {list(result.missing)}, expected {expect['missing']}")
    for name, want in (expect.get("signals") or {}).items():
        try:
            sig = result.signal(name)
        except KeyError:
            problems.append(f"no signal {name}")
            continue
        if "value" in want and sig.value != want["value"]:
            problems.append(f"{name}.value = {sig.value!r}, expected {want['value']!r}")
        if "tier" in want and (sig.tier.label if sig.tier is not None else None) != want["tier"]:
            problems.append(f"{name}.tier = {sig.tier}, expected {want['tier']}")
    for text in expect.get("notes_include", ()):
        if not any(text in note for note in result.notes):
            problems.append(f"no note containing {text!r}: {list(result.notes)}")
    return CaseResult(path, not problems, "; ".join(problems))


def run_cases(rules_dir: Path | None = None) -> list[CaseResult]:
    """Run every instrument case and every triage rule case under ``rules_dir`` (default ``rules/``).

    A definition that fails to load is reported as a failed result rather than raised, so ``cds rules
    check`` can list everything wrong at once.
    """
    root = Path(rules_dir or DEFAULT_RULES_DIR).resolve()
    results: list[CaseResult] = []
    try:
        catalog = load_catalog(root)
    except RulesError as exc:
        return [CaseResult(root / "instruments", False, str(exc))]
    for directory in sorted(p for p in (root / "instruments" / "cases").glob("*") if p.is_dir()):
        if directory.name not in catalog.instruments:
            results.append(CaseResult(directory, False, f"no instrument {directory.name!r}"))
            continue
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.json")]):
            results.append(_guard(path, lambda p=path: check_instrument_case(p, catalog)))
    for instrument in catalog:
        if not any((root / "instruments" / "cases" / instrument.id).glob("*.*")):
            results.append(CaseResult(root / "instruments" / "cases" / instrument.id, False,
                                      f"instrument {instrument.id} has no cases"))
    try:
        ruleset = load_ruleset(root / "triage", schema_dir=root / "schema")
    except RulesError as exc:
        return results + [CaseResult(root / "triage", False, str(exc))]
    cases_dir = ruleset.directory / "cases"
    known = {rule.id for rule in ruleset.rules}
    for directory in sorted(p for p in cases_dir.glob("*") if p.is_dir()):
        if directory.name not in known:
            results.append(CaseResult(directory, False, f"cases for unknown rule {directory.name!r}"))
    for rule in ruleset.rules:
        directory = cases_dir / rule.id
        files = sorted(directory.glob("*.yaml"))
        for kind in ("in-", "out-"):
            if not any(f.name.startswith(kind) for f in files):
                results.append(CaseResult(directory, False, f"rule {rule.id} has no {kind}* case"))
        for path in files:
            if not path.name.startswith(("in-", "out-")):
                results.append(CaseResult(path, False, "case files are named in-*.yaml or out-*.yaml"))
                continue
            results.append(_guard(path, lambda p=path, r=rule.id: check_triage_case(p, r, ruleset, catalog)))
    return results


def _guard(path: Path, check: Any) -> CaseResult:
    try:
        result: CaseResult = check()
        return result
    except (CdsError, KeyError, TypeError, ValueError) as exc:
        return CaseResult(path, False, f"{type(exc).__name__}: {exc}")
