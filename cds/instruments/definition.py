"""Instrument definitions: the YAML in rules/instruments/, validated and turned into typed values.

The definitions are data (items, LOINC codes, answer values, bands, tier mappings, en/zh texts); this
module only checks them and gives them types. Scoring lives in ``scoring.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cds.domain import RiskTier
from cds.errors import RulesError

SCHEMA_FILE = "instrument.schema.json"


@dataclass(frozen=True)
class AnswerOption:
    code: str
    value: int | str
    text: Mapping[str, str]


@dataclass(frozen=True)
class AnswerSet:
    name: str
    kind: str  # "ordinal" (integer values, may arrive as numbers) | "nominal" (coded only)
    options: Mapping[str, AnswerOption]  # by answer code
    minimum: int | None = None
    maximum: int | None = None
    booleans: Mapping[bool, str] | None = None  # valueBoolean -> value


@dataclass(frozen=True)
class Item:
    id: str
    label: str  # names the item in "missing" lists, e.g. "phq9 item 9 (44260-8)"
    link_ids: tuple[str, ...]  # without a leading slash
    answers: AnswerSet
    text: Mapping[str, str]
    enable_when: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Band:
    minimum: int
    maximum: int
    label: str


@dataclass(frozen=True)
class Outcome:
    value: str
    tier: RiskTier
    when: Mapping[str, Any]
    why: str


@dataclass(frozen=True)
class ItemSignal:
    name: str
    item: str
    tiers: tuple[Mapping[str, Any], ...]
    why: str


@dataclass(frozen=True)
class Instrument:
    id: str
    version: str
    title: Mapping[str, str]
    source: str
    canonicals: tuple[str, ...]
    panel_codes: tuple[str, ...]
    items: tuple[Item, ...]
    method: str  # "sum" | "decision"
    scoring: Mapping[str, Any]
    item_signals: tuple[ItemSignal, ...]
    path: Path

    @property
    def source_tag(self) -> str:
        """The ``source`` written on every signal, e.g. ``phq9@1.0.0``."""
        return f"{self.id}@{self.version}"

    def item(self, item_id: str) -> Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise KeyError(item_id)

    @property
    def sum_items(self) -> tuple[Item, ...]:
        ids = self.scoring.get("items")
        return tuple(self.item(i) for i in ids) if ids else self.items

    @property
    def total_link_ids(self) -> tuple[str, ...]:
        return tuple(_strip(x) for x in self.scoring.get("total", {}).get("link_ids", ()))

    @property
    def bands(self) -> tuple[Band, ...]:
        return tuple(Band(int(b["min"]), int(b["max"]), str(b["label"]))
                     for b in self.scoring.get("bands", {}).get("ranges", ()))

    @property
    def band_name(self) -> str:
        return str(self.scoring.get("bands", {}).get("name", "band"))

    @property
    def outcomes(self) -> tuple[Outcome, ...]:
        return tuple(Outcome(str(o["value"]), RiskTier.from_label(o["tier"]), o["when"], str(o["why"]))
                     for o in self.scoring.get("outcomes", ()))

    @property
    def max_prorate_missing(self) -> int:
        return int(self.scoring.get("prorate", {}).get("max_missing", 0))


def _strip(link_id: str) -> str:
    return link_id.removeprefix("/")


def load_schema(schema_dir: Path, name: str) -> dict[str, Any]:
    path = schema_dir / name
    try:
        schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RulesError(f"{path}: cannot read JSON Schema: {exc}") from exc
    return schema


def json_path(parts: Iterator[Any] | Any) -> str:
    """``["logic", "all", 0, "gte"]`` -> ``$.logic.all[0].gte``."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_document(doc: Any, schema: Mapping[str, Any], path: Path) -> None:
    """Raise RulesError naming the file and the JSON path of every schema violation."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        for err in errors[:10]:
            for leaf in _leaf_errors(err):
                lines.append(f"{json_path(leaf.absolute_path)}: {leaf.message}")
        raise RulesError(f"{path}: does not match {schema.get('$id', 'schema')}:\n  " + "\n  ".join(lines))


def _leaf_errors(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors that say what is wrong, not "is not valid under any of the given schemas".

    For a oneOf/anyOf, the branch meant is the one whose required keys are present (no "required"
    error); among those, the one with the fewest errors.
    """
    if not error.context:
        return [error]
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0] if sub.relative_schema_path else 0, []).append(sub)
    meant = [errs for errs in branches.values() if not any(e.validator == "required" for e in errs)]
    chosen = min(meant or list(branches.values()), key=len)
    if not meant and len(branches) > 1:
        return [error]
    return [leaf for sub in chosen for leaf in _leaf_errors(sub)]


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"{path}: cannot read YAML: {exc}") from exc


def parse_instrument(doc: Mapping[str, Any], path: Path) -> Instrument:
    """Build an Instrument from a schema-valid document and check what the schema cannot."""

    def fail(where: str, message: str) -> RulesError:
        return RulesError(f"{path}: {where}: {message}")

    answer_sets: dict[str, AnswerSet] = {}
    for name, spec in doc["answer_sets"].items():
        options = {code: AnswerOption(code, opt["value"], opt["text"]) for code, opt in spec["codes"].items()}
        if spec["kind"] == "ordinal":
            if "min" not in spec or "max" not in spec:
                raise fail(f"$.answer_sets.{name}", "an ordinal answer set needs min and max")
            for code, opt in options.items():
                if not isinstance(opt.value, int) or not spec["min"] <= opt.value <= spec["max"]:
                    raise fail(f"$.answer_sets.{name}.codes.{code}", "value outside min..max")
        booleans = None
        if "booleans" in spec:
            booleans = {key == "true": str(v) for key, v in spec["booleans"].items()}
        answer_sets[name] = AnswerSet(name, spec["kind"], options, spec.get("min"), spec.get("max"), booleans)

    items: list[Item] = []
    seen_links: set[str] = set()
    for i, raw in enumerate(doc["items"]):
        if raw["answers"] not in answer_sets:
            raise fail(f"$.items[{i}].answers", f"unknown answer set {raw['answers']!r}")
        links = tuple(_strip(x) for x in raw["link_ids"])
        if seen_links & set(links):
            raise fail(f"$.items[{i}].link_ids", "linkId used by two items")
        seen_links.update(links)
        items.append(Item(raw["id"], raw["label"], links, answer_sets[raw["answers"]], raw["text"],
                          raw.get("enable_when")))
    item_ids = {item.id for item in items}
    if len(item_ids) != len(items):
        raise fail("$.items", "item ids must be unique")

    def check_condition(cond: Mapping[str, Any], where: str) -> None:
        for key in ("all", "any"):
            for j, sub in enumerate(cond.get(key, ())):
                check_condition(sub, f"{where}.{key}[{j}]")
        if "not" in cond:
            check_condition(cond["not"], f"{where}.not")
        if "item" in cond and cond["item"] not in item_ids:
            raise fail(f"{where}.item", f"unknown item {cond['item']!r}")

    for i, raw in enumerate(doc["items"]):
        if raw.get("enable_when"):
            check_condition(raw["enable_when"], f"$.items[{i}].enable_when")

    scoring = doc["scoring"]
    if scoring["method"] == "sum":
        for j, item_id in enumerate(scoring.get("items", ())):
            if item_id not in item_ids:
                raise fail(f"$.scoring.items[{j}]", f"unknown item {item_id!r}")
        summed = [i for i in items if not scoring.get("items") or i.id in scoring["items"]]
        for item in summed:
            if item.answers.kind != "ordinal":
                raise fail("$.scoring", f"item {item.id} is summed but its answers are not ordinal")
        low = sum(int(i.answers.minimum or 0) for i in summed)
        high = sum(int(i.answers.maximum or 0) for i in summed)
        expected = low
        for j, band in enumerate(scoring["bands"]["ranges"]):
            if band["min"] != expected or band["max"] < band["min"]:
                raise fail(f"$.scoring.bands.ranges[{j}]", f"bands must be contiguous from {low}; expected min {expected}")
            expected = band["max"] + 1
        if expected - 1 != high:
            raise fail("$.scoring.bands.ranges", f"bands must end at the maximum total {high}")
    else:
        for j, outcome in enumerate(scoring["outcomes"]):
            check_condition(outcome["when"], f"$.scoring.outcomes[{j}].when")

    signals = []
    for j, raw in enumerate(doc.get("item_signals", ())):
        if raw["item"] not in item_ids:
            raise fail(f"$.item_signals[{j}].item", f"unknown item {raw['item']!r}")
        if not raw["name"].startswith(doc["id"] + "."):
            raise fail(f"$.item_signals[{j}].name", f"signal names must start with {doc['id']}.")
        signals.append(ItemSignal(raw["name"], raw["item"], tuple(raw.get("tiers", ())), raw.get("why", "")))

    return Instrument(
        id=doc["id"], version=doc["version"], title=doc["title"], source=doc["source"],
        canonicals=tuple(doc["recognise"]["canonicals"]),
        panel_codes=tuple(doc["recognise"].get("panel_codes", ())), items=tuple(items),
        method=scoring["method"], scoring=scoring, item_signals=tuple(signals), path=path)


def load_instruments(instruments_dir: Path, schema_dir: Path) -> dict[str, Instrument]:
    """Read, validate and parse every ``*.yaml`` directly in ``instruments_dir``."""
    if not instruments_dir.is_dir():
        raise RulesError(f"{instruments_dir}: instrument directory not found")
    schema = load_schema(schema_dir, SCHEMA_FILE)
    found: dict[str, Instrument] = {}
    for path in sorted(instruments_dir.glob("*.yaml")):
        doc = read_yaml(path)
        validate_document(doc, schema, path)
        instrument = parse_instrument(doc, path)
        if instrument.id in found:
            raise RulesError(f"{path}: $.id: instrument {instrument.id!r} also defined in {found[instrument.id].path}")
        if path.stem != instrument.id:
            raise RulesError(f"{path}: $.id: {instrument.id!r} must match the file name")
        found[instrument.id] = instrument
    if not found:
        raise RulesError(f"{instruments_dir}: no instrument definitions found")
    return found
