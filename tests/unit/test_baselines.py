"""Table 4's baselines (``model.fusion``): each mode's shapes, that only its part changes (state-dict keys, shared
parts giving the same embeddings as the full model with the same weights), early fusion's F(x) against its
formula, which inputs each mode reads, padding invariance, the metric-loss spaces each mode has, the summary,
and the compare_models experiment; then real training on the synthetic corpus: the full model ahead of each
single modality, by a margin measured here.
"""

from __future__ import annotations

import re

import pytest
import torch

from ser_platform.config import FUSIONS, ConfigError, ModelConfig, load_config
from ser_platform.models.ser_model import SERModel, model_summary
from ser_platform.catalogue import COMPARE_MODELS, COMPARE_MODELS_DEMO, EXPERIMENTS

from support import TINY_MODEL as TINY
from support import check_metric_loss_routing, make_batch, make_model, take

PARTS = {  # the top-level modules each mode builds
    "crossmodal": {"text_encoder", "speech_encoder", "fusion", "embedding_layer", "classifier"},
    "early": {"text_encoder", "speech_encoder", "embedding_layer", "classifier"},
    "speech_only": {"speech_encoder", "embedding_layer", "classifier"},
    "text_only": {"text_encoder", "embedding_layer", "classifier"},
}
POOLED = {"crossmodal": 2 * TINY.embed_dim, "early": TINY.speech.tiny_hidden_size + TINY.text.tiny_hidden_size,
          "speech_only": TINY.speech.tiny_hidden_size, "text_only": TINY.text.tiny_hidden_size}


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
    # The paper's full model ("Ours" = its Table 1 A) puts the metric loss on the speech embedding; so does every
    # baseline that has one; "Text only" has none and uses F(x) (config.PAPER_TABLE_SPACES).
    assert {name: c.loss.space for name, c in built.items()} == {
        "Speech only": "speech", "Text only": "fused", "Early fusion": "speech", "Crossmodal without FA": "speech",
        "Full model": "speech"}


def test_compare_models_embedded_default_trains_to_convergence_and_the_paper_preset_keeps_its_own():
    from ser_platform.cli import experiment_config, experiment_parser

    parser = experiment_parser("compare_models", "x", "")
    demo = experiment_config(parser.parse_args([]), COMPARE_MODELS)
    assert demo.train.epochs == COMPARE_MODELS_DEMO["train.epochs"] == 20 and demo.model.embed_dim == 16
    assert demo.loss.space == "speech" and demo.data.max_audio_seconds == 1.5
    flags = experiment_config(parser.parse_args(["--epochs", "3", "--set", "model.embed_dim=8"]), COMPARE_MODELS)
    assert flags.train.epochs == 3 and flags.model.embed_dim == 8  # the user's flags still win
    paper = experiment_config(parser.parse_args(["--preset", "paper"]), COMPARE_MODELS)
    assert paper.train.epochs == load_config("paper").train.epochs and paper.model.embed_dim != 16
    assert paper.loss.space == "speech"


# Real training, the full model against each single modality: tests/integration/test_baselines_training.py.
