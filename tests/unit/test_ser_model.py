"""The full model: shapes, padding invariance, ablation switches touching only their part, gradient routing of
the metric loss to the chosen embedding space, focus-attention parameters learning, a tiny batch overfitted,
frozen encoders and their cached states, and the parameter summary."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ser_platform.config import LossConfig, ModelConfig, preset
from ser_platform.losses import JointLoss
from ser_platform.models.ser_model import FOCAL_PARAMETER_NAMES, SERModel, masked_mean, model_summary

from support import TINY_MODEL as TINY  # tests/support.py: test_baselines builds the same models
from support import base_shaped_speech, check_metric_loss_routing, make_batch, make_model, take




def test_masked_mean_matches_a_loop():
    states = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = masked_mean(states, mask)
    assert torch.allclose(out[0], states[0].mean(0), atol=1e-6)
    assert torch.allclose(out[1], (states[1, 0] + states[1, 1]) / 2, atol=1e-6)
    assert torch.all(out[2] == 0)


def test_output_shapes():
    model = make_model().eval()
    out = model(**make_batch([0.5, 0.8, 0.6], [4, 9, 1]))
    assert out.logits.shape == (3, 4)
    assert out.embedding.shape == (3, TINY.embedding_dim)
    assert out.speech_embedding.shape == (3, TINY.speech.tiny_hidden_size)
    assert out.text_embedding.shape == (3, TINY.text.tiny_hidden_size)
    assert all(torch.isfinite(t).all() for t in (out.logits, out.embedding, out.speech_embedding, out.text_embedding))


@pytest.mark.parametrize("focus_attention", [True, False])
def test_a_sample_gives_the_same_output_alone_and_batched_with_longer_ones(focus_attention):
    model = make_model(ModelConfig(**{**TINY.__dict__, "focus_attention": focus_attention})).eval()
    batch = make_batch([0.5, 1.0, 0.9], [3, 17, 11], seed=1)
    with torch.no_grad():
        batched = model(**batch)
        alone = model(**take(batch, 0))
    for field in ("logits", "embedding", "speech_embedding", "text_embedding"):
        assert torch.allclose(getattr(alone, field)[0], getattr(batched, field)[0], atol=1e-5), field


def test_without_focus_attention_only_the_focal_parameters_go():
    with_fa = make_model()
    without = make_model(ModelConfig(**{**TINY.__dict__, "focus_attention": False}))
    names_fa = set(with_fa.state_dict())
    names = set(without.state_dict())
    focal = {n for n in names_fa if FOCAL_PARAMETER_NAMES & set(n.split("."))}
    # Eq. (1)-(2) in each FocusAttention of both directions: W_p, W_g (weights), U_c, U_d.
    assert len(focal) == 4 * 2 * TINY.num_layers
    assert names == names_fa - focal
    result = without.load_state_dict(with_fa.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == focal


def test_gradients_reach_the_focus_attention_parameters():
    model = make_model().train()
    batch = make_batch([0.5, 0.7, 0.6, 0.5], [5, 8, 3, 6])
    loss = JointLoss(LossConfig())(model(**batch), torch.tensor([0, 0, 1, 1])).loss
    loss.backward()
    focal = {n: p for n, p in model.named_parameters() if FOCAL_PARAMETER_NAMES & set(n.split("."))}
    assert len(focal) == 8
    for name, parameter in focal.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_alpha_zero_loss_is_the_models_cross_entropy():
    model = make_model().eval()
    labels = torch.tensor([0, 1, 2])
    out = model(**make_batch([0.5, 0.6, 0.7], [3, 4, 5]))
    loss = JointLoss(LossConfig(alpha=0.0, beta=1.0))(out, labels)
    assert torch.equal(loss.loss, F.cross_entropy(out.logits, labels))


@pytest.mark.parametrize("space, reached, untouched", [
    ("text", ["text_encoder"], ["speech_encoder", "fusion", "embedding_layer", "classifier"]),
    ("speech", ["speech_encoder"], ["text_encoder", "fusion", "embedding_layer", "classifier"]),
    ("fused", ["fusion", "embedding_layer", "speech_encoder", "text_encoder"], ["classifier"]),
])
def test_metric_loss_trains_only_what_lies_below_its_embedding_space(space, reached, untouched):
    check_metric_loss_routing(make_model().eval(), space, reached, untouched)  # eval: no dropout, same graph


def test_eager_and_sdpa_attention_give_the_same_model_output():
    sdpa = make_model().eval()
    eager = make_model(ModelConfig(**{**TINY.__dict__, "attn_implementation": "eager"})).eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = make_batch([0.5, 0.9], [4, 12], seed=3)
    with torch.no_grad():
        assert torch.allclose(sdpa(**batch).logits, eager(**batch).logits, atol=1e-5)


@pytest.mark.slow
def test_the_tiny_model_overfits_a_tiny_batch():
    model = make_model(seed=1)
    batch = make_batch([0.5] * 8, [6] * 8, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss_fn = JointLoss(LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracy = 0.0
    for step in range(200):
        model.train()
        optimizer.zero_grad()
        loss_fn(model(**batch), labels).loss.backward()
        optimizer.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                accuracy = float((model(**batch).logits.argmax(1) == labels).float().mean())
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"train accuracy {accuracy} after {step + 1} steps"


def test_frozen_encoders_take_cached_states_and_do_not_train():
    config = ModelConfig(**{**TINY.__dict__, "encoders": "frozen"})
    model = make_model(config)
    model.train()
    assert not model.text_encoder.encoder.training and not model.speech_encoder.ssl.encoder.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "text_encoder" not in trainable and "fusion" in trainable
    assert not any(p.requires_grad for p in model.speech_encoder.ssl.parameters())

    model.eval()
    batch = make_batch([0.5, 0.8], [5, 9], seed=5)
    with torch.no_grad():
        text_states, _ = model.text_encoder(batch["input_ids"], batch["attention_mask"])
        ssl_states, _ = model.speech_encoder.ssl(batch["input_values"], batch["audio_lengths"])
        direct = model(**batch)
        cached = model(**{**batch, "input_values": None, "input_ids": None}, text_states=text_states,
                       speech_ssl_states=ssl_states)
    assert torch.allclose(direct.logits, cached.logits, atol=1e-6)
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**batch, "input_ids": None})


def summary_rows(text: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^(.+?)\s{2,}([\d,]+)\s+([\d,]+)$", line)
        if match:
            rows[match.group(1).strip()] = (int(match.group(2).replace(",", "")), int(match.group(3).replace(",", "")))
    return rows


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_model_summary_parts_add_up(name):
    model_config = preset(name).model
    rows = summary_rows(model_summary(model_config))
    parts = [k for k in rows if k != "total" and not k.startswith("of which")]
    assert sum(rows[k][0] for k in parts) == rows["total"][0]
    if name == "paper":
        assert rows["text encoder"][0] > 350e6 and rows["speech: wav2vec2"][0] > 94e6
    else:
        # The demo model is small enough to build for real: the summary counts what training will hold.
        assert rows["total"][0] == sum(p.numel() for p in SERModel(model_config).parameters())


def test_model_summary_shows_frozen_encoders_as_not_trainable():
    rows = summary_rows(model_summary(ModelConfig(**{**TINY.__dict__, "encoders": "frozen"})))
    assert rows["text encoder"][1] == 0 and rows["speech: wav2vec2"][1] == 0
    assert rows["total"][1] == rows["total"][0] - rows["text encoder"][0] - rows["speech: wav2vec2"][0]


@pytest.mark.parametrize("group_norm", ["valid", "padded"])
def test_logits_do_not_depend_on_batch_mates_with_a_wav2vec2_base_shaped_encoder(tmp_path, group_norm):
    """Issue 14: an utterance's logits alone and inside a padded evaluation batch agree to 1e-5 with wav2vec2-base's
    real config (GroupNorm conv stack; random weights, 2 layers); Hugging Face's zero-padded recipe does not."""
    config = ModelConfig(**{**TINY.__dict__, "speech": base_shaped_speech(tmp_path, group_norm=group_norm)})
    torch.manual_seed(0)
    model = SERModel(config, pretrained=False).eval()
    batch = make_batch([0.5, 0.15, 0.3], [5, 9, 3], seed=1)
    with torch.no_grad():
        batched = model(**batch).logits
        differences = [float((model(**take(batch, b)).logits[0] - batched[b]).abs().max()) for b in range(3)]
    if group_norm == "valid":
        assert max(differences) < 1e-5, differences
    else:  # the longest utterance has no padding; the others' valid frames change with it
        assert differences[0] < 1e-5 and min(differences[1:]) > 1e-3, differences


def _loss_and_gradients(config: ModelConfig, batch: dict, labels: torch.Tensor):
    model = make_model(config, seed=4).train()
    torch.manual_seed(5)  # the same dropout and SpecAugment draws in both runs
    np.random.seed(5)
    loss = JointLoss(LossConfig(space="speech"))(model(**batch), labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return model, float(loss.detach()), grads


@pytest.mark.parametrize("encoders", ["finetune", "frozen"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(encoders):
    """model.gradient_checkpointing: Hugging Face activation checkpointing in the trained encoders only; the
    forward pass in training mode (dropout, SpecAugment) and every gradient are unchanged."""
    base = ModelConfig(**{**TINY.__dict__, "encoders": encoders})
    batch, labels = make_batch([0.5, 0.7, 0.6, 0.5], [5, 8, 3, 6], seed=6), torch.tensor([0, 0, 1, 1])
    plain, plain_loss, plain_grads = _loss_and_gradients(base, batch, labels)
    checkpointed, loss, grads = _loss_and_gradients(ModelConfig(**{**base.__dict__, "gradient_checkpointing": True}),
                                                    batch, labels)
    encoders_hf = (checkpointed.text_encoder.encoder, checkpointed.speech_encoder.ssl.encoder)
    layers = [m for encoder in encoders_hf for m in encoder.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing == (encoders == "finetune") for m in layers)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
