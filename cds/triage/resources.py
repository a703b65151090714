"""Crisis resources by locale (rules/resources/<locale>.yaml), validated against their schema."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from cds.errors import InputError, RulesError
from cds.instruments.definition import load_schema, read_yaml, validate_document

from .ruleset import DEFAULT_RULES_DIR


def _normalise(locale: str) -> str:
    parts = locale.replace("_", "-").split("-")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"locale {locale!r}: expected language-REGION, e.g. zh-CN")
    return f"{parts[0].lower()}-{parts[1].upper()}"


@functools.lru_cache(maxsize=32)
def _load(path: Path, schema_dir: Path) -> tuple[dict[str, Any], ...]:
    doc = read_yaml(path)
    validate_document(doc, load_schema(schema_dir, "crisis-resources.schema.json"), path)
    if doc["locale"] != path.stem:
        raise RulesError(f"{path}: $.locale: {doc['locale']!r} must match the file name")
    return tuple(doc["resources"])


def load_crisis_resources(locale: str, rules_dir: Path | None = None) -> list[dict[str, Any]]:
    """The crisis lines for a locale, each ``{name, name_en, name_zh, phone, hours, note}``.

    ``name``/``hours``/``note`` are in the locale's language; ``name_en``/``name_zh`` give both names.
    Raises InputError for a locale we hold no resources for (never falls back to another country's
    numbers).
    """
    key = _normalise(locale)
    root = Path(rules_dir or DEFAULT_RULES_DIR).resolve()
    path = root / "resources" / f"{key}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "resources").glob("*.yaml"))
        raise InputError(f"no crisis resources for locale {key!r}; known: {', '.join(known)}")
    lang = "zh" if key.startswith("zh") else "en"
    return [{"name": r["name"][lang], "name_en": r["name"]["en"], "name_zh": r["name"]["zh"], "phone": r["phone"],
             "hours": r["hours"][lang], "note": r["note"][lang]}
            for r in _load(path, root / "schema")]
