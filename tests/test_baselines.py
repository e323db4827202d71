"""Table 4's baselines (``model.fusion``): each mode's shapes, that only its part changes (state-dict keys, shared
parts giving the same embeddings as the full model with the same weights), early fusion's F(x) against its
formula, which inputs each mode reads, padding invariance, the metric-loss spaces each mode has, the summary,
and the compare_models experiment; then real training on the synthetic corpus: the full model ahead of each
single modality, by a margin measured here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ser_platform.config import FUSIONS, ConfigError, ModelConfig, load_config
from ser_platform.models.ser_model import SERModel, model_summary
from ser_platform.sweep import COMPARE_MODELS, COMPARE_MODELS_DEMO, EXPERIMENTS

from test_ser_model import TINY, check_metric_loss_routing, make_batch, make_model, take  # tests/ is on sys.path

PARTS = {  # the top-level modules each mode builds
    "crossmodal": {"text_encoder", "speech_encoder", "fusion", "embedding_layer", "classifier"},
    "early": {"text_encoder", "speech_encoder", "embedding_layer", "classifier"},
    "speech_only": {"speech_encoder", "embedding_layer", "classifier"},
    "text_only": {"text_encoder", "embedding_layer", "classifier"},
}
POOLED = {"crossmodal": 2 * TINY.embed_dim, "early": TINY.speech.tiny_hidden_size + TINY.text.tiny_hidden_size,
          "speech_only": TINY.speech.tiny_hidden_size, "text_only": TINY.text.tiny_hidden_size}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_fusion(fusion: str, **changes) -> ModelConfig:
    return ModelConfig(**{**TINY.__dict__, "fusion": fusion, **changes})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_mode_gives_its_shapes_and_only_its_embeddings(fusion):
    model = make_model(with_fusion(fusion)).eval()
    out = model(**make_batch([0.5, 0.8, 0.6], [4, 9, 1]))
    assert out.logits.shape == (3, TINY.num_classes) and out.embedding.shape == (3, TINY.embedding_dim)
    has_speech, has_text = fusion != "text_only", fusion != "speech_only"
    assert (out.speech_embedding is not None) == has_speech and (out.text_embedding is not None) == has_text
    if has_speech:
        assert out.speech_embedding.shape == (3, TINY.speech.tiny_hidden_size)
    if has_text:
        assert out.text_embedding.shape == (3, TINY.text.tiny_hidden_size)
    assert torch.isfinite(out.logits).all()
    assert model.embedding_layer.in_features == POOLED[fusion]


@pytest.mark.parametrize("fusion", ["early", "speech_only", "text_only"])
def test_a_baseline_drops_only_its_parts_and_keeps_the_others_unchanged(fusion):
    full, baseline = make_model(), make_model(with_fusion(fusion), seed=1)
    assert {name for name, _ in baseline.named_children() if getattr(baseline, name) is not None} - {"dropout"} \
        == PARTS[fusion]
    dropped = PARTS["crossmodal"] - PARTS[fusion]
    full_state, state = full.state_dict(), baseline.state_dict()
    assert set(state) == {k for k in full_state if k.split(".")[0] not in dropped}
    for key, value in state.items():  # same shapes everywhere but the FC that takes the pooled vector
        if key != "embedding_layer.weight":
            assert value.shape == full_state[key].shape, key
    # The full model's weights for every part the baseline has: its encoders then give exactly the same embeddings.
    shared = {k: v for k, v in full_state.items() if k in state and k != "embedding_layer.weight"}
    result = baseline.load_state_dict(shared, strict=False)
    assert result.missing_keys == ["embedding_layer.weight"] and not result.unexpected_keys
    full.eval(), baseline.eval()
    batch = make_batch([0.5, 0.7], [5, 8], seed=3)
    with torch.no_grad():
        a, b = full(**batch), baseline(**batch)
    for field in ("speech_embedding", "text_embedding"):
        if getattr(b, field) is not None:
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_early_fusion_is_the_fc_of_the_concatenated_pooled_embeddings():
    model = make_model(with_fusion("early")).eval()
    with torch.no_grad():
        out = model(**make_batch([0.5, 0.9, 0.6], [3, 12, 7], seed=4))
        expected = model.embedding_layer(torch.cat((out.speech_embedding, out.text_embedding), dim=-1))
        logits = model.classifier(torch.relu(expected))
    torch.testing.assert_close(out.embedding, expected)
    torch.testing.assert_close(out.logits, logits)


@pytest.mark.parametrize("fusion, ignored", [("speech_only", "text"), ("text_only", "speech")])
def test_a_single_modality_reads_only_its_own_inputs(fusion, ignored):
    model = make_model(with_fusion(fusion)).eval()
    batch = make_batch([0.5, 0.6], [4, 6], seed=5)
    other = make_batch([0.5, 0.6], [4, 6], seed=6)  # same lengths, other content
    keys = ("input_ids",) if ignored == "text" else ("input_values", "mfcc", "spectrogram")
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**{**batch, **{k: other[k] for k in keys}}).logits
        c = model(**other).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)
    if ignored == "text":
        assert torch.equal(a, model(**{**batch, "input_ids": None}).logits)  # not even needed
    else:
        assert torch.equal(a, model(**{**batch, "input_values": None}).logits)


@pytest.mark.parametrize("fusion", ["early", "speech_only", "text_only"])
def test_a_sample_gives_the_same_output_alone_and_batched(fusion):
    model = make_model(with_fusion(fusion)).eval()
    batch = make_batch([0.5, 1.0, 0.9], [3, 17, 11], seed=1)
    with torch.no_grad():
        batched, alone = model(**batch), model(**take(batch, 0))
    assert torch.allclose(alone.logits[0], batched.logits[0], atol=1e-5)
    assert torch.allclose(alone.embedding[0], batched.embedding[0], atol=1e-5)


@pytest.mark.parametrize("fusion, space, reached, untouched", [
    ("early", "speech", ["speech_encoder"], ["text_encoder", "embedding_layer", "classifier"]),
    ("early", "fused", ["speech_encoder", "text_encoder", "embedding_layer"], ["classifier"]),
    ("speech_only", "fused", ["speech_encoder", "embedding_layer"], ["classifier"]),
    ("text_only", "text", ["text_encoder"], ["embedding_layer", "classifier"]),
])
def test_the_metric_loss_spaces_a_baseline_has_still_route_their_gradients(fusion, space, reached, untouched):
    check_metric_loss_routing(make_model(with_fusion(fusion)).eval(), space, reached, untouched)


@pytest.mark.parametrize("fusion, space", [("speech_only", "text"), ("text_only", "speech")])
def test_a_space_the_model_lacks_is_a_config_error_naming_both_keys(fusion, space):
    with pytest.raises(ConfigError, match=rf"loss.space='{space}' with model.fusion='{fusion}'"):
        load_config("demo", overrides={"model.fusion": fusion, "loss.space": space})
    load_config("demo", overrides={"model.fusion": fusion, "loss.space": "fused"})  # F(x) exists in every mode
    with pytest.raises(ConfigError, match=r"model.fusion='late'"):
        load_config("demo", overrides={"model.fusion": "late"})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_summary_counts_the_parts_each_mode_builds(fusion):
    config = with_fusion(fusion)
    text = model_summary(config)
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^(.+?)\s{2,}([\d,]+)\s+([\d,]+)$", line)
        if match:
            rows[match.group(1).strip()] = int(match.group(2).replace(",", ""))
    assert rows["total"] == sum(p.numel() for p in SERModel(config).parameters())
    assert rows["total"] == sum(v for k, v in rows.items() if k not in ("total", "of which focus attention"))
    assert ("text encoder" in rows) == (fusion != "speech_only")
    assert ("speech: wav2vec2" in rows) == (fusion != "text_only")
    assert ("crossmodal fusion" in rows) == (fusion == "crossmodal")


def test_compare_models_is_table_4_and_every_variant_is_a_valid_config():
    assert EXPERIMENTS["compare_models"] is COMPARE_MODELS and COMPARE_MODELS.table == "4"
    base = load_config("demo", overrides=dict(COMPARE_MODELS.defaults))
    built = {name: base.replace(overrides) for name, overrides in COMPARE_MODELS.variants.items()}
    assert {c.model.fusion for c in built.values()} == set(FUSIONS)
    assert built["Crossmodal without FA"].model.focus_attention is False
    assert built["Full model"].model.focus_attention is True and built["Full model"].model.fusion == "crossmodal"
    assert {c.loss.space for c in built.values()} == {"fused"}


def test_compare_models_embedded_default_trains_to_convergence_and_the_paper_preset_keeps_its_own():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import sweep_flags

    parser = sweep_flags.build_parser("x")
    demo = sweep_flags.experiment_config(parser.parse_args([]), COMPARE_MODELS)
    assert demo.train.epochs == COMPARE_MODELS_DEMO["train.epochs"] == 20 and demo.model.embed_dim == 16
    assert demo.loss.space == "fused" and demo.data.max_audio_seconds == 1.5
    flags = sweep_flags.experiment_config(parser.parse_args(["--epochs", "3", "--set", "model.embed_dim=8"]),
                                          COMPARE_MODELS)
    assert flags.train.epochs == 3 and flags.model.embed_dim == 8  # the user's flags still win
    paper = sweep_flags.experiment_config(parser.parse_args(["--preset", "paper"]), COMPARE_MODELS)
    assert paper.train.epochs == load_config("paper").train.epochs and paper.model.embed_dim != 16
    assert paper.loss.space == "fused"


# --- real training: the full model against each single modality ------------------------------------------------
#
# The plain-torch loop (train.fit_folds) on the embedded default's own corpus (ser_platform.demo) with the
# embedded default's own configuration for Table 4 (sweep.COMPARE_MODELS_DEMO: 20 epochs, 16-d encoders, 1.5 s of
# audio), in-process batches as tests/test_train_loop.py makes them, every leave-one-session-out fold; only
# model.fusion differs. The three models train in two spawned processes (the crossmodal model in one, the two
# single modalities in the other: about the same work), one torch thread each: ~3 min on 2 cores.
#
# Measured with exactly this configuration, mean test UA over the 5 folds (full / speech only / text only), and
# the full model minus each single modality:
#
#   training seed            0       1       2       3       4      mean
#   full model            0.711   0.742   0.665   0.710   0.718
#   speech only           0.624   0.711   0.690   0.682   0.614
#   text only             0.621   0.588   0.611   0.592   0.610
#   full - speech only   +0.087  +0.031  -0.025  +0.028  +0.104  +0.045
#   full - text only     +0.090  +0.154  +0.054  +0.118  +0.108  +0.105
#
# So the full model is ahead of text alone for every seed and of speech alone for 4 of 5: on this corpus speech
# is the strong modality and the fusion's gain over it varies with the seed (a paired t-test over the five seeds
# gives p ~ 0.12: not beyond noise at five seeds). The Ray run of the same embedded default
# (experiments/compare_models.py, seed 0, BENCHMARKS.md) gave +0.121 over speech and +0.118 over text.
# (Tried and dropped: MFCC/spectrogram normalised with training-set statistics instead of per utterance, to keep
# each utterance's loudness; speech alone got no better, 0.463 / 0.496 / 0.471 at seeds 0-2 on a 40-per-session
# corpus against 0.502 at seed 0 per utterance.) The test runs seed 0; its thresholds are below seed 0's margins
# and, for text, below every margin measured (a regression there is a real change), and it prints the margins.

COMPARISON = dict(COMPARE_MODELS_DEMO)  # exactly the embedded default of experiments/compare_models.py
COMPARISON_FOLDS = (1, 2, 3, 4, 5)
COMPARISON_SEED = 0


def _synthetic_columns(dataset: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(dataset, columns=["id", "speaker", "mode", "label", "transcript", "audio"]).to_pydict()
    columns = {k: np.asarray(v, dtype=object) for k, v in table.items() if k != "audio"}
    columns["audio"] = np.empty(len(table["id"]), dtype=object)
    columns["audio"][:] = [np.asarray(a, dtype=np.float32) for a in table["audio"]]
    return columns


def _in_process_batches(config, columns):
    """``batches_for(fold, split, epoch)`` over in-memory rows: the fold's speakers (data.folds.fold_spec),
    class-balanced training batches reshuffled per epoch from the seed, evaluation batches in a fixed order."""
    from ser_platform.data.folds import fold_spec
    from ser_platform.data.loader import make_collate, plan_pool_batches
    from ser_platform.models.text import build_tokenizer

    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=64,
                           max_audio_samples=int(config.data.max_audio_seconds * 16000))
    size = config.train.batch_size
    evaluation: dict = {}

    def rows(fold, split):
        spec = fold_spec(fold)
        keep = np.asarray([spec.split_for(s) == split for s in columns["speaker"]])
        return {k: v[keep] for k, v in columns.items()}

    def batches_for(fold, split, epoch):
        if split == "train":
            data = rows(fold, split)
            order = np.random.default_rng([config.train.seed, fold, epoch]).permutation(len(data["id"]))
            plan = plan_pool_batches([{k: v[order] for k, v in data.items()}], size, bucket_by_length=False,
                                     samples_per_class=config.train.samples_per_class, seed=epoch)
            return [collate(b) for b in plan]
        if (fold, split) not in evaluation:
            data = rows(fold, split)
            evaluation[(fold, split)] = [collate({k: v[i:i + size] for k, v in data.items()})
                                         for i in range(0, len(data["id"]), size)]
        return evaluation[(fold, split)]

    return batches_for


def train_fusions(dataset: str, fusions: tuple[str, ...], seed: int) -> dict[str, dict[int, float]]:
    """Test UA per fold of each ``model.fusion`` in ``fusions`` (a spawned process runs this)."""
    from ser_platform.train import fit_folds

    torch.set_num_threads(1)
    columns = _synthetic_columns(dataset)
    scores = {}
    for fusion in fusions:
        config = load_config("demo", overrides={**COMPARISON, "model.fusion": fusion, "train.seed": seed})
        results = fit_folds(config, COMPARISON_FOLDS, _in_process_batches(config, columns), log=None)
        scores[fusion] = {fold: r.test_ua for fold, r in results.items()}
    return scores


def compare_fusions(dataset: str, seed: int) -> dict[str, dict[int, float]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        full = pool.submit(train_fusions, dataset, ("crossmodal",), seed)
        single = pool.submit(train_fusions, dataset, ("speech_only", "text_only"), seed)
        return {**full.result(), **single.result()}


@pytest.fixture(scope="module")
def comparison_dataset(tmp_path_factory) -> str:
    from ser_platform.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("comparison") / "demo", progress=False)  # the demo's corpus


MIN_MARGIN = {"speech_only": 0.02, "text_only": 0.04}  # see the measurements above


def test_the_full_model_is_ahead_of_each_single_modality(comparison_dataset):
    import time

    started = time.perf_counter()
    scores = compare_fusions(comparison_dataset, COMPARISON_SEED)
    means = {fusion: float(np.mean([scores[fusion][f] for f in COMPARISON_FOLDS])) for fusion in scores}
    elapsed = time.perf_counter() - started
    print(f"\nmean test UA over folds {COMPARISON_FOLDS} (seed {COMPARISON_SEED}, {elapsed:.0f} s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    for fusion in ("speech_only", "text_only"):
        margin = means["crossmodal"] - means[fusion]
        print(f"full model - {fusion}: {margin:+.3f} (per fold: "
              + ", ".join(f"{scores['crossmodal'][f] - scores[fusion][f]:+.3f}" for f in COMPARISON_FOLDS) + ")")
        assert margin >= MIN_MARGIN[fusion], (fusion, margin, scores)
