"""Instrument scoring: published cut-offs on both sides, every C-SSRS/ASQ path, input forms, missing data."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds.domain import RiskTier
from cds.errors import InputError, RulesError
from cds.instruments import DEFAULT_RULES_DIR, load_catalog, score_questionnaire_response

PHQ9 = ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"]
GAD7 = ["69725-0", "68509-0", "69733-4", "69734-2", "69735-9", "69689-8", "69736-7"]
CSSRS = ["93246-7", "93247-5", "93248-3", "93249-1", "93250-9", "93267-3", "93269-9"]
ASQ = ["asq-1", "asq-2", "asq-3", "asq-4", "asq-5"]
FREQ = ["LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"]
YES = {"valueCoding": {"system": "http://loinc.org", "code": "LA33-6"}}
NO = {"valueCoding": {"system": "http://loinc.org", "code": "LA32-8"}}
DECLINED = {"valueCoding": {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                            "code": "asked-declined"}}


def response(pairs: list[tuple[str, Any]], questionnaire: str | None = None) -> dict[str, Any]:
    qr: dict[str, Any] = {"resourceType": "QuestionnaireResponse", "status": "completed",
                          "authored": "2025-03-01T09:00:00+08:00",
                          "item": [{"linkId": link, "answer": [a]} if a is not None else {"linkId": link}
                                   for link, a in pairs]}
    if questionnaire:
        qr["questionnaire"] = questionnaire
    return qr


def coded(value: int) -> dict[str, Any]:
    return {"valueCoding": {"system": "http://loinc.org", "code": FREQ[value]}}


def spread(total: int, n: int, last: int = 0) -> list[int]:
    """n item values (0-3) summing to total, the last item fixed to ``last``."""
    values = [0] * (n - 1)
    remaining = total - last
    for i in range(n - 1):
        values[i] = min(3, remaining)
        remaining -= values[i]
    assert remaining == 0, "total not reachable"
    return values + [last]


def phq9(values: Sequence[int | None], slash: bool = True, form: str = "coding") -> dict[str, Any]:
    def answer(v: int | None) -> Any:
        if v is None:
            return None
        if form == "coding":
            return coded(v)
        return {"valueInteger": v} if form == "integer" else {"valueDecimal": float(v)}
    return response([(("/" if slash else "") + link, answer(v)) for link, v in zip(PHQ9, values)],
                    "http://loinc.org/q/44249-1")


@pytest.mark.parametrize(("total", "band"), [
    (0, "minimal"), (4, "minimal"), (5, "mild"), (9, "mild"), (10, "moderate"), (14, "moderate"),
    (15, "moderately_severe"), (19, "moderately_severe"), (20, "severe"), (27, "severe")])
def test_phq9_bands_on_both_sides_of_each_cut_off(total: int, band: str) -> None:
    last = 3 if total == 27 else 0
    result = score_questionnaire_response(phq9(spread(total, 9, last)))
    assert result.instrument == "phq9"
    assert result.scores == {"total": total, "band": band, "item9": last}
    assert result.missing == ()


@pytest.mark.parametrize(("item9", "tier"), [(0, RiskTier.NONE), (1, RiskTier.MODERATE), (3, RiskTier.MODERATE)])
def test_phq9_item9_positive_whatever_the_total(item9: int, tier: RiskTier) -> None:
    result = score_questionnaire_response(phq9([0] * 8 + [item9]))
    signal = result.signal("phq9.item9")
    assert signal.tier == tier and signal.value == item9
    assert signal.source == "phq9@1.0.0"
    assert signal.evidence[0].ref == "linkId:/44260-8"


@pytest.mark.parametrize(("total", "band"), [(0, "minimal"), (4, "minimal"), (5, "mild"), (9, "mild"),
                                             (10, "moderate"), (14, "moderate"), (15, "severe"), (21, "severe")])
def test_gad7_bands_on_both_sides_of_each_cut_off(total: int, band: str) -> None:
    values = spread(total, 7, 3 if total == 21 else 0)
    qr = response([("/" + link, coded(v)) for link, v in zip(GAD7, values)], "http://loinc.org/q/69737-5")
    assert score_questionnaire_response(qr).scores == {"total": total, "band": band}


@pytest.mark.parametrize(("values", "screen"), [((1, 1), "negative"), ((2, 0), "negative"), ((2, 1), "positive"),
                                                ((3, 3), "positive")])
def test_phq2_positive_from_three(values: tuple[int, int], screen: str) -> None:
    qr = response([("44250-9", coded(values[0])), ("44255-8", coded(values[1]))])
    result = score_questionnaire_response(qr)
    assert result.instrument == "phq2"
    assert result.scores == {"total": sum(values), "screen": screen}


@pytest.mark.parametrize("form", ["coding", "integer", "decimal"])
@pytest.mark.parametrize("slash", [True, False])
def test_link_id_slash_and_answer_form_do_not_change_the_score(slash: bool, form: str) -> None:
    values = [2, 1, 0, 3, 1, 1, 2, 0, 1]
    result = score_questionnaire_response(phq9(list(values), slash=slash, form=form))
    assert result.scores == {"total": 11, "band": "moderate", "item9": 1}


def test_questionnaire_recognised_by_link_ids_without_canonical() -> None:
    qr = phq9([1] * 9)
    del qr["questionnaire"]
    assert score_questionnaire_response(qr).instrument == "phq9"


def test_nested_groups_are_read() -> None:
    qr = phq9([1] * 9)
    qr["item"] = [{"linkId": "phq-group", "item": qr["item"]}]
    assert score_questionnaire_response(qr).scores["total"] == 9


def test_missing_item9_is_indeterminate_and_named() -> None:
    result = score_questionnaire_response(phq9([0] * 8 + [None]))
    assert result.missing == ("phq9 item 9 (44260-8)",)
    assert result.indeterminate
    item9 = result.signal("phq9.item9")
    assert item9.value is None and item9.tier is None and item9.missing == ("phq9 item 9 (44260-8)",)
    assert result.scores["item9"] is None
    # The total may be prorated (authors allow 1-2 missing), but it still carries what is missing.
    assert result.scores["total"] == 0 and result.signal("phq9.total").missing


def test_declined_item9_is_missing_not_zero() -> None:
    qr = phq9([0] * 9)
    qr["item"][8]["answer"] = [DECLINED]
    result = score_questionnaire_response(qr)
    assert result.scores["item9"] is None
    assert "phq9 item 9 (44260-8)" in result.missing
    assert any("asked-declined" in note for note in result.notes)


def test_phq9_prorates_two_missing_but_not_three() -> None:
    two = score_questionnaire_response(phq9([None, None, 2, 2, 2, 2, 2, 2, 0]))
    assert two.scores["total"] == 15  # 12 answered points x 9/7 items = 15.4, rounded
    three = score_questionnaire_response(phq9([None, None, None, 2, 2, 2, 2, 2, 0]))
    assert three.scores["total"] is None and three.scores["band"] is None
    assert len(three.missing) == 3


def test_gad7_is_not_prorated() -> None:
    qr = response([(link, {"valueInteger": 3}) for link in GAD7[:6]])
    result = score_questionnaire_response(qr)
    assert result.scores == {"total": None, "band": None}
    assert result.missing == ("gad7 item 7 (69736-7)",)


def test_recorded_total_is_cross_checked() -> None:
    qr = phq9([1] * 9)
    qr["item"].append({"linkId": "/44261-6", "answer": [{"valueInteger": 4}]})
    result = score_questionnaire_response(qr)
    assert result.scores["total"] == 9
    assert any("differs from the computed total 9" in note for note in result.notes)


def cssrs(answers: list[Any]) -> dict[str, Any]:
    return response([("/" + link, a) for link, a in zip(CSSRS, answers) if a != "skip"], "http://loinc.org/q/93373-9")


@pytest.mark.parametrize(("answers", "risk"), [
    ([NO, NO, "skip", "skip", "skip", NO, "skip"], "none"),
    ([YES, NO, "skip", "skip", "skip", NO, "skip"], "low"),
    ([NO, YES, NO, NO, NO, NO, "skip"], "low"),
    ([YES, YES, YES, NO, NO, NO, "skip"], "moderate"),
    ([NO, NO, "skip", "skip", "skip", YES, NO], "moderate"),
    ([YES, YES, NO, YES, NO, NO, "skip"], "high"),
    ([YES, YES, NO, NO, YES, NO, "skip"], "high"),
    ([NO, NO, "skip", "skip", "skip", YES, YES], "high"),
])
def test_cssrs_every_triage_path(answers: list[Any], risk: str) -> None:
    result = score_questionnaire_response(cssrs(answers))
    assert result.scores == {"risk": risk}
    assert result.missing == ()
    assert result.signal("cssrs.risk").tier == RiskTier.from_label(risk)


def test_cssrs_accepts_value_boolean() -> None:
    answers = [{"valueBoolean": True}, {"valueBoolean": True}, {"valueBoolean": False}, {"valueBoolean": True},
               {"valueBoolean": False}, {"valueBoolean": False}, "skip"]
    assert score_questionnaire_response(cssrs(answers)).scores == {"risk": "high"}


def test_cssrs_unanswered_q6_timing_keeps_moderate_floor_and_names_it() -> None:
    result = score_questionnaire_response(cssrs([NO, NO, "skip", "skip", "skip", YES, None]))
    assert result.scores == {"risk": "moderate"}
    assert result.missing == ("cssrs Q6 within past 3 months (93269-9)",)


def asq(answers: list[Any]) -> dict[str, Any]:
    return response([(link, a) for link, a in zip(ASQ, answers) if a != "skip"],
                    "https://psych-cds.example.org/fhir/Questionnaire/asq")


@pytest.mark.parametrize(("answers", "result", "tier"), [
    ([NO, NO, NO, NO, "skip"], "negative", RiskTier.NONE),
    ([YES, NO, NO, NO, NO], "non_acute_positive", RiskTier.MODERATE),
    ([NO, NO, NO, YES, NO], "non_acute_positive", RiskTier.MODERATE),
    ([NO, DECLINED, NO, NO, NO], "non_acute_positive", RiskTier.MODERATE),
    ([NO, NO, YES, NO, YES], "acute_positive", RiskTier.IMMINENT),
    ([DECLINED, NO, NO, NO, DECLINED], "acute_positive", RiskTier.IMMINENT),
])
def test_asq_acute_non_acute_refusal(answers: list[Any], result: str, tier: RiskTier) -> None:
    scored = score_questionnaire_response(asq(answers))
    assert scored.scores["result"] == result
    assert scored.signal("asq.result").tier == tier
    assert scored.missing == ()


def test_asq_positive_with_q5_unanswered_is_non_acute_floor_and_indeterminate() -> None:
    scored = score_questionnaire_response(asq([YES, NO, NO, NO, None]))
    assert scored.scores["result"] == "non_acute_positive"
    assert scored.missing == ("asq Q5 thoughts right now (asq-5)",)


def test_asq_unanswered_q1_is_not_negative() -> None:
    scored = score_questionnaire_response(asq([None, NO, NO, NO, "skip"]))
    assert scored.scores["result"] == "negative"  # the floor the answers prove ...
    assert scored.missing  # ... flagged indeterminate, naming Q1 and Q5
    assert "asq Q1 wished dead (asq-1)" in scored.missing


@pytest.mark.parametrize(("qr", "message"), [
    ({"resourceType": "Observation"}, "expected a QuestionnaireResponse"),
    (response([("unknown-1", {"valueInteger": 1})], "http://example.org/q/x"), "no known instrument"),
    (phq9([4, 0, 0, 0, 0, 0, 0, 0, 0], form="integer"), "outside 0..3"),
    (response([("/44260-8", {"valueDecimal": 1.5})], "http://loinc.org/q/44249-1"), "not a whole number"),
    (response([("/44260-8", {"valueBoolean": True})], "http://loinc.org/q/44249-1"), "yes/no answer is not possible"),
    (response([("/44260-8", {"valueCoding": {"code": "LA9999-9"}})], "http://loinc.org/q/44249-1"), "LA9999-9"),
    (response([("/44260-8", {"valueString": "sometimes"})], "http://loinc.org/q/44249-1"), "unsupported answer type"),
    (response([("/44260-8", coded(1)), ("44260-8", coded(2))], "http://loinc.org/q/44249-1"), "more than once"),
])
def test_impossible_input_raises_input_error(qr: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        score_questionnaire_response(qr)


def test_every_item_has_english_and_chinese_text() -> None:
    for instrument in load_catalog():
        assert instrument.title["en"] and instrument.title["zh"]
        for item in instrument.items:
            assert item.text["en"] and item.text["zh"], item.label
            assert any("\u4e00" <= ch <= "\u9fff" for ch in item.text["zh"]), item.label


def test_invalid_definition_raises_rules_error_naming_file_and_path(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    phq = rules / "instruments" / "phq9.yaml"
    phq.write_text(phq.read_text(encoding="utf-8").replace("max: 3", "max: three", 1), encoding="utf-8")
    with pytest.raises(RulesError, match=r"(?s)phq9\.yaml.*\$\.answer_sets\.frequency\.max"):
        load_catalog(rules)


def test_bands_must_cover_the_range(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    gad = rules / "instruments" / "gad7.yaml"
    gad.write_text(gad.read_text(encoding="utf-8").replace("{min: 15, max: 21", "{min: 16, max: 21"), encoding="utf-8")
    with pytest.raises(RulesError, match=r"(?s)gad7\.yaml.*bands must be contiguous"):
        load_catalog(rules)


answer = st.integers(min_value=0, max_value=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(answer, min_size=9, max_size=9), st.lists(st.integers(0, 3), min_size=9, max_size=9))
def test_phq9_tier_and_total_never_fall_when_any_answer_rises(base: list[int], bump: list[int]) -> None:
    raised = [min(3, b + d) for b, d in zip(base, bump)]
    low = score_questionnaire_response(phq9(list(base)))
    high = score_questionnaire_response(phq9(list(raised)))
    assert high.scores["total"] >= low.scores["total"]
    low_tier, high_tier = low.signal("phq9.item9").tier, high.signal("phq9.item9").tier
    assert low_tier is not None and high_tier is not None and high_tier >= low_tier


yes_no = st.booleans()


@settings(max_examples=200, deadline=None)
@given(st.lists(yes_no, min_size=7, max_size=7), st.lists(yes_no, min_size=7, max_size=7))
def test_cssrs_tier_never_falls_when_an_answer_turns_yes(base: list[bool], more: list[bool]) -> None:
    raised = [a or b for a, b in zip(base, more)]

    def tier(answers: list[bool]) -> RiskTier:
        tier_ = score_questionnaire_response(cssrs([{"valueBoolean": a} for a in answers])).signal("cssrs.risk").tier
        assert tier_ is not None
        return tier_

    assert tier(raised) >= tier(base)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["no", "yes", "refused"]), min_size=5, max_size=5),
       st.lists(st.booleans(), min_size=5, max_size=5))
def test_asq_tier_never_falls_when_an_answer_turns_yes(base: list[str], turn: list[bool]) -> None:
    raised = ["yes" if t else b for b, t in zip(base, turn)]
    form = {"no": NO, "yes": YES, "refused": DECLINED}

    def tier(answers: list[str]) -> RiskTier:
        tier_ = score_questionnaire_response(asq([form[a] for a in answers])).signal("asq.result").tier
        assert tier_ is not None
        return tier_

    assert tier(raised) >= tier(base)
