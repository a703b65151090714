"""The lexicon files are valid data with id + version, and bad lexicons are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cds.errors import RulesError
from cds.nlp.safety_net import KINDS, LEXICON_DIR, lexicons, load_lexicon, parse_lexicon


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_lexicon_has_id_version_and_known_kinds(lang: str) -> None:
    lex = lexicons()[lang]
    assert lex.id and lex.version.count(".") == 2 and lex.lang == lang
    assert lex.ref == f"lexicon:{lang}@{lex.version}"
    kinds = {p.kind for p in lex.patterns}
    assert kinds <= KINDS
    for needed in ("ideation", "plan", "means", "timing", "farewell", "preparatory_act", "aggression"):
        assert needed in kinds, f"{lang} lexicon lacks {needed}"


def _doc(lang: str) -> dict:
    return yaml.safe_load((LEXICON_DIR / f"{lang}.yaml").read_text(encoding="utf-8"))


def test_invalid_regex_is_refused() -> None:
    doc = _doc("en")
    doc["patterns"][0]["regex"] = "(unclosed"
    with pytest.raises(RulesError, match="invalid regular expression"):
        parse_lexicon(doc)


def test_unknown_kind_is_refused() -> None:
    doc = _doc("zh")
    doc["patterns"][0]["kind"] = "vibes"
    with pytest.raises(RulesError, match="unknown kind"):
        parse_lexicon(doc)


def test_duplicate_pattern_id_is_refused() -> None:
    doc = _doc("zh")
    doc["patterns"].append(dict(doc["patterns"][0]))
    with pytest.raises(RulesError, match="duplicate pattern id"):
        parse_lexicon(doc)


def test_missing_version_is_refused() -> None:
    doc = _doc("en")
    del doc["version"]
    with pytest.raises(RulesError, match="version"):
        parse_lexicon(doc)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="not found"):
        load_lexicon(tmp_path / "zh.yaml")


@pytest.mark.parametrize("regex", [r"计划[^，。]{0,8}自杀", r"kill\s+myself", r"(?s)die.*tonight", r"想死$", r"^goodbye",
                                   r"(?=\n)die", r"bye(?<=\s)", r"\Dpills"])
def test_a_pattern_that_could_cross_a_line_break_is_refused(regex: str) -> None:
    doc = _doc("zh")
    doc["patterns"][0]["regex"] = regex
    with pytest.raises(RulesError, match="stay within one line"):
        parse_lexicon(doc)
    doc = _doc("en")
    doc["idioms"] = [regex]
    with pytest.raises(RulesError, match="stay within one line"):
        parse_lexicon(doc)


@pytest.mark.parametrize("regex", [r"计划[^，。\n]{0,8}自杀", r"kill[ \t]+myself", r"\bdie\b", r"想死(?![^\n])",
                                   r"(a)\1", r"[\w]+ pills"])
def test_line_local_patterns_are_accepted(regex: str) -> None:
    doc = _doc("zh")
    doc["patterns"][0]["regex"] = regex
    parse_lexicon(doc)


def test_scopes_must_end_at_a_line_break() -> None:
    doc = _doc("en")
    doc["clause_breaks"] = "[.!?;]"
    with pytest.raises(RulesError, match="clause_breaks must include the line break"):
        parse_lexicon(doc)


def test_fragments_are_shared_by_the_patterns_that_name_them() -> None:
    doc = _doc("en")
    doc["fragments"]["pet"] = "cat|dog"
    doc["patterns"].append({"id": "en.test.pet", "kind": "aggression", "flag": "harm_to_others",
                            "regex": "\\bkick (?:the|my) {{pet}}\\b"})
    lex = parse_lexicon(doc)
    rx = next(p.regex for p in lex.patterns if p.id == "en.test.pet")
    assert rx.search("I want to kick the dog") and not rx.search("I want to kick the ball")


@pytest.mark.parametrize("fragments,pattern,message", [
    ({}, "kill {{nobody}}", "unknown fragment"),
    ({"a": "x|{{b}}", "b": "y"}, "{{a}}", "cannot use another fragment"),
    ({"a": "(unclosed"}, "{{a}}", "invalid regular expression"),
    ({"a": "x\\s+y"}, "{{a}}", "stay within one line"),
    ({"bad name": "x"}, "x", "must be letters"),
])
def test_bad_fragments_are_refused(fragments: dict, pattern: str, message: str) -> None:
    doc = _doc("en")
    doc["fragments"] = fragments
    doc["patterns"][0]["regex"] = pattern
    with pytest.raises(RulesError, match=message):
        parse_lexicon(doc)


def test_the_shipped_lexicons_use_only_known_fragments() -> None:
    for lang in ("zh", "en"):
        doc = _doc(lang)
        names = set(doc.get("fragments") or {})
        for p in doc["patterns"]:
            for used in re.findall(r"\{\{(\w+)\}\}", p["regex"]):
                assert used in names, (lang, p["id"], used)


@pytest.mark.parametrize("pattern, message", [
    ({"anchor_tier": "moderate"}, "anchor_tier goes with context: true"),
    ({"anchor_tier": "severe", "context": True}, "unknown anchor_tier"),
])
def test_a_bad_anchor_tier_is_refused(pattern: dict, message: str) -> None:
    doc = _doc("en")
    doc["patterns"][0] = {**doc["patterns"][0], **pattern}
    with pytest.raises(RulesError, match=message):
        parse_lexicon(doc)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_time_words_ask_for_an_anchor_of_at_least_moderate(lang: str) -> None:
    timing = [p for p in lexicons()[lang].patterns if p.kind == "timing"]
    assert timing and all(p.context and p.anchor_tier is not None and p.anchor_tier >= 2 for p in timing)


@pytest.mark.parametrize("bad,match", [
    ({"leet": {"12": "i"}}, "leet"), ({"leet": {"1": "I!"}}, "leet"), ({"masked": ["Kill"]}, "masked"),
    ({"split": "(unclosed"}, "invalid regular expression"), ({"split": "[ \\n]"}, "one line"), ({"spilt": " "}, "takes"),
])
def test_bad_obfuscation_settings_are_refused(bad: dict, match: str) -> None:
    doc = _doc("en")
    doc["obfuscation"] = bad
    with pytest.raises(RulesError, match=match):
        parse_lexicon(doc)
