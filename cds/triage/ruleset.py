"""Loading, validating, hashing and evaluating a triage rule set (rules/triage/)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cds.domain import FLAG_INDETERMINATE, Action, FiredRule, History, RiskTier, Signal, TriageOutcome
from cds.errors import RulesError
from cds.instruments.definition import load_schema, read_yaml, validate_document

from .logic import Context, evaluate

DEFAULT_RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
MANIFEST = "ruleset.yaml"
RULE_SCHEMA = "triage-rule.schema.json"
MANIFEST_SCHEMA = "ruleset.schema.json"
PRIORITY_ORDER = {"routine": 0, "urgent": 1, "asap": 2, "stat": 3}
ALERT_KINDS = frozenset({"nurse_alert", "discordance_alert", "supervisor_escalation"})


@dataclass(frozen=True)
class Rule:
    id: str
    version: str
    title: str
    source: str
    inputs: tuple[str, ...]
    logic: Mapping[str, Any]
    outputs: Mapping[str, Any]
    if_indeterminate: Mapping[str, Any]
    path: Path


@dataclass(frozen=True)
class RuleDecision:
    """How one rule came out on one evaluation: True fired, None undecided (missing data), False not."""

    rule: Rule
    value: bool | None
    trace: tuple[str, ...]
    missing: tuple[str, ...]
    floor: RiskTier | None
    flags: frozenset[str]
    actions: tuple[Action, ...]

    @property
    def fired(self) -> FiredRule:
        return FiredRule(self.rule.id, self.rule.version, self.rule.title, self.rule.source, self.trace)


@dataclass(frozen=True)
class Explanation:
    """Everything ``evaluate`` decided, rule by rule (the outcome plus the decisions behind it)."""

    outcome: TriageOutcome
    decisions: tuple[RuleDecision, ...]

    def decision(self, rule_id: str) -> RuleDecision:
        for d in self.decisions:
            if d.rule.id == rule_id:
                return d
        raise KeyError(rule_id)


class RuleSet:
    """A validated, hashed set of triage rules. ``evaluate`` is pure: same input, same outcome."""

    def __init__(self, *, version: str, shadow: bool, rules: Sequence[Rule], manifest: Mapping[str, Any],
                 hash: str, directory: Path) -> None:
        self.version = version
        self.shadow = shadow
        self.rules = tuple(rules)
        self.manifest = manifest
        self.hash = hash
        self.directory = directory
        self.priority_by_tier: dict[str, str] = dict(manifest["priority_by_tier"])
        self.sla_minutes: dict[str, int] = dict(manifest["sla_minutes"])
        self.labels: dict[str, str] = dict(manifest.get("signal_labels") or {})

    def __repr__(self) -> str:
        return f"RuleSet(version={self.version!r}, hash={self.hash[:12]}, shadow={self.shadow}, rules={len(self.rules)})"

    @functools.cached_property
    def lookback_signals(self) -> frozenset[str]:
        """Names of the signals some rule counts in the patient's history (``count`` with scope recent or
        all): the only earlier signals evaluation ever reads."""
        names: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, Mapping):
                if "count" in node and node.get("scope", "all") in ("recent", "all"):
                    names.add(str(node["count"]["signal"]))
                for value in node.values():
                    walk(value)
            elif isinstance(node, (list, tuple)):
                for value in node:
                    walk(value)

        for rule in self.rules:
            walk(rule.logic)
        return frozenset(names)

    def rule(self, rule_id: str) -> Rule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    def sla_for(self, priority: str) -> int:
        """Minutes to acknowledge an alert of this priority (or of the priority a tier maps to)."""
        key = self.priority_by_tier.get(priority, priority)
        try:
            return self.sla_minutes[key]
        except KeyError:
            raise RulesError(f"no SLA for priority {priority!r}; known: {', '.join(self.sla_minutes)}") from None

    def _actions(self, specs: Sequence[Mapping[str, Any]], rule: Rule, floor: RiskTier | None) -> tuple[Action, ...]:
        out = []
        for spec in specs:
            priority = spec["priority"]
            if priority == "by_tier":
                if floor is None or floor == RiskTier.NONE:
                    continue  # nothing to alert about at tier none
                priority = self.priority_by_tier[floor.label]
            params = dict(spec.get("params") or {})
            params["rule"] = rule.id
            out.append(Action(spec["kind"], priority, self.sla_minutes[priority], params))
        return tuple(out)

    def _floor(self, spec: Any, signals: Sequence[Signal]) -> RiskTier | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            return RiskTier.from_label(spec)
        tiers = [s.tier for s in signals if s.name == spec["from_signal"] and s.tier is not None]
        return max(tiers) if tiers else None

    def explain(self, signals: Sequence[Signal], history: History, now: datetime) -> Explanation:
        """Evaluate every rule and keep each decision (what ``evaluate`` returns, with the reasons)."""
        return self._decide(signals, history, now, trace_all=True)

    def _decide(self, signals: Sequence[Signal], history: History, now: datetime, *, trace_all: bool) -> Explanation:
        """``explain``; without ``trace_all`` the rules that did not fire keep no trace (only ``explain``
        shows those; the outcome carries the traces of the rules that fired or were undecided)."""
        ctx = Context(tuple(signals), history, now, self.labels)
        decisions = []
        for rule in self.rules:
            verdict = evaluate(rule.logic, ctx)
            missing = tuple(dict.fromkeys(verdict.missing))
            if verdict.value is True:
                floor = self._floor(rule.outputs.get("tier_floor"), signals)
                flags = frozenset(rule.outputs.get("flags", ()))
                actions = self._actions(rule.outputs.get("actions", ()), rule, floor)
                trace = tuple(verdict.lines) + ((f"tier at least {floor.label}",) if floor else ())
                decisions.append(RuleDecision(rule, True, trace, missing, floor, flags, actions))
            elif verdict.value is None:
                spec = rule.if_indeterminate
                flags = frozenset(spec.get("flags", ())) | {FLAG_INDETERMINATE}
                actions = self._actions(spec.get("actions", ()), rule, None)
                trace = ("undecided: missing data; missing data never lowers the tier",) + tuple(verdict.lines)
                decisions.append(RuleDecision(rule, None, trace, missing, None, flags, actions))
            else:
                decisions.append(RuleDecision(rule, False, tuple(verdict.lines) if trace_all else (), (), None,
                                              frozenset(), ()))

        acting = [d for d in decisions if d.value is not False]
        tier = history.previous_tier or RiskTier.NONE
        for d in acting:
            if d.floor is not None and d.floor > tier:
                tier = d.floor
        all_flags: set[str] = set()
        for d in acting:
            all_flags |= d.flags
        all_missing = [m for s in signals for m in s.missing] + [m for d in acting for m in d.missing]
        if all_missing:
            all_flags.add(FLAG_INDETERMINATE)
        all_actions: list[Action] = []
        for d in acting:
            for action in d.actions:
                if action not in all_actions:
                    all_actions.append(action)
        all_actions.sort(key=lambda a: -PRIORITY_ORDER.get(a.priority, 0))
        outcome = TriageOutcome(tier=tier, flags=frozenset(all_flags), missing=tuple(dict.fromkeys(all_missing)),
                                fired=tuple(d.fired for d in acting), actions=tuple(all_actions),
                                ruleset_hash=self.hash, ruleset_version=self.version, shadow=self.shadow)
        return Explanation(outcome, tuple(decisions))

    def evaluate(self, signals: Sequence[Signal], history: History, now: datetime) -> TriageOutcome:
        """Tier = max(previous tier, every fired rule's floor); flags, missing, fired rules and actions.

        Rules left undecided by missing data are listed in ``fired`` (their trace starts "undecided") and
        add the ``indeterminate`` flag and their ``if_indeterminate`` actions; they never lower anything.
        """
        return self._decide(signals, history, now, trace_all=False).outcome


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def _resolve(path: Path | None) -> tuple[Path, Path]:
    """(directory holding ruleset.yaml, manifest path) for a directory or a manifest file."""
    target = Path(path) if path is not None else DEFAULT_RULES_DIR / "triage"
    if target.is_dir():
        return target, target / MANIFEST
    return target.parent, target


def load_ruleset(path: Path | None = None, *, schema_dir: Path | None = None) -> RuleSet:
    """Load a rule set from a directory (or its ruleset.yaml); default ``rules/triage``.

    Any directory works, so a candidate rule set can be loaded beside the live one (shadow runs,
    backtests). Rules are validated against the engine's schemas (``rules/schema``). Raises RulesError
    naming the file and the JSON path of the problem.
    """
    directory, manifest_path = _resolve(path)
    return _load_cached(directory.resolve(), manifest_path.resolve(),
                        (schema_dir or DEFAULT_RULES_DIR / "schema").resolve(), _stamp(directory))


def _stamp(directory: Path) -> tuple[tuple[str, float], ...]:
    """File modification times, so an edited rule set is reloaded rather than served from cache."""
    try:
        return tuple((p.name, p.stat().st_mtime) for p in sorted(directory.glob("*.yaml")))
    except OSError:
        return ()


@functools.lru_cache(maxsize=16)
def _load_cached(directory: Path, manifest_path: Path, schema_dir: Path,
                 stamp: tuple[tuple[str, float], ...]) -> RuleSet:
    if not manifest_path.is_file():
        raise RulesError(f"{manifest_path}: rule-set manifest not found")
    rule_schema = load_schema(schema_dir, RULE_SCHEMA)
    manifest = read_yaml(manifest_path)
    validate_document(manifest, load_schema(schema_dir, MANIFEST_SCHEMA), manifest_path)
    schema_version = str(rule_schema.get("x-schema-version", ""))
    if manifest["schema_version"] != schema_version:
        raise RulesError(f"{manifest_path}: $.schema_version: {manifest['schema_version']!r} but the engine's "
                         f"rule schema is {schema_version!r}")
    rules: list[Rule] = []
    docs: dict[str, Any] = {}
    for i, name in enumerate(manifest["rules"]):
        rule_path = directory / name
        if not rule_path.is_file():
            raise RulesError(f"{manifest_path}: $.rules[{i}]: rule file {name!r} not found")
        doc = read_yaml(rule_path)
        validate_document(doc, rule_schema, rule_path)
        if rule_path.stem != doc["id"]:
            raise RulesError(f"{rule_path}: $.id: {doc['id']!r} must match the file name")
        _check_rule(doc, rule_path)
        docs[name] = doc
        rules.append(Rule(doc["id"], doc["version"], doc["title"], doc["source"].strip(), tuple(doc["inputs"]),
                          doc["logic"], doc.get("outputs") or {}, doc.get("if_indeterminate") or {}, rule_path))
    # Status is deployment, not content: promoting a shadow set to live keeps its hash.
    content = {"schema_version": schema_version,
               "manifest": {k: v for k, v in manifest.items() if k != "status"}, "rules": docs}
    digest = hashlib.sha256(_canonical(content)).hexdigest()
    return RuleSet(version=str(manifest["version"]), shadow=manifest["status"] == "shadow", rules=rules,
                   manifest=manifest, hash=digest, directory=directory)


def _check_rule(doc: Mapping[str, Any], path: Path) -> None:
    """What the schema cannot say: by_tier needs a floor; from_signal and logic must read declared inputs."""
    outputs = doc.get("outputs") or {}
    for j, action in enumerate(outputs.get("actions", ())):
        if action["priority"] == "by_tier" and "tier_floor" not in outputs:
            raise RulesError(f"{path}: $.outputs.actions[{j}].priority: by_tier needs outputs.tier_floor")
    for j, action in enumerate((doc.get("if_indeterminate") or {}).get("actions", ())):
        if action["priority"] == "by_tier":
            raise RulesError(f"{path}: $.if_indeterminate.actions[{j}].priority: by_tier is not possible here "
                             "(an undecided rule has no tier); name the priority")
    declared = set(doc["inputs"])
    used: list[tuple[str, str]] = []

    def walk(node: Mapping[str, Any], where: str) -> None:
        for key in ("all", "any"):
            for k, sub in enumerate(node.get(key, ())):
                walk(sub, f"{where}.{key}[{k}]")
        if "not" in node:
            walk(node["not"], f"{where}.not")
        if "count" in node:
            walk(node["count"], f"{where}.count")
        if "signal" in node:
            used.append((node["signal"], f"{where}.signal"))
        if "history" in node:
            used.append((f"history.{node['history']}", f"{where}.history"))

    walk(doc["logic"], "$.logic")
    floor = outputs.get("tier_floor")
    if isinstance(floor, Mapping):
        used.append((floor["from_signal"], "$.outputs.tier_floor.from_signal"))
    for name, where in used:
        if name not in declared:
            raise RulesError(f"{path}: {where}: {name!r} is not listed in inputs")


def default_sla_for(priority: str) -> int:
    return load_ruleset().sla_for(priority)
