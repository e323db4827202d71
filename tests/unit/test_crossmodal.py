"""Crossmodal transformer (eq. 6): shapes, wiring of the two directions, padding invariance, backends."""

import math

import pytest
import torch

from ser_platform.config import ModelConfig

from ser_platform.models.crossmodal import (
    CrossmodalFusion,
    CrossmodalOutput,
    CrossmodalTransformer,
    sinusoidal_positional_embedding,
)

TEXT_DIM, SPEECH_DIM, EMBED_DIM = 12, 10, 16


def _masks(lengths, total):
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def _config(**settings) -> ModelConfig:
    return ModelConfig(**{"embed_dim": EMBED_DIM, "num_heads": 4, "num_layers": 2, **settings})


def _fusion(seed=0, **settings):
    torch.manual_seed(seed)
    return CrossmodalFusion(_config(**settings), TEXT_DIM, SPEECH_DIM).eval()


def test_positional_embedding_matches_mult_formula():
    dim, half = 7, 3
    embedding = sinusoidal_positional_embedding(torch.arange(5.0)[None], dim)
    for position in range(5):
        for k in range(half):
            angle = position / 10000 ** (k / (half - 1))
            assert embedding[0, position, k].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert embedding[0, position, half + k].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert embedding[0, position, dim - 1] == 0


def test_embedding_is_scaled_projection_plus_positions():
    fusion = _fusion()
    text = torch.randn(2, 5, TEXT_DIM)
    mask = _masks([5, 3], 5)
    embedded = fusion.embed(text, mask, fusion.text_projection)
    weight = fusion.text_projection.weight[:, :, 0]  # (D, C)
    for b, length in enumerate([5, 3]):
        for t in range(5):
            expected = torch.zeros(EMBED_DIM)
            if t < length:
                expected = math.sqrt(EMBED_DIM) * weight @ text[b, t]
                expected = expected + sinusoidal_positional_embedding(torch.tensor([[float(t)]]), EMBED_DIM)[0, 0]
            torch.testing.assert_close(embedded[b, t], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("focus_attention", [True, False])
def test_shapes_of_both_directions(focus_attention):
    fusion = _fusion(focus_attention=focus_attention)
    text_mask, speech_mask = _masks([6, 4, 1], 6), _masks([11, 9, 3], 11)
    output = fusion(torch.randn(3, 6, TEXT_DIM), text_mask, torch.randn(3, 11, SPEECH_DIM), speech_mask)
    assert isinstance(output, CrossmodalOutput)
    assert output.audio_from_text.shape == (3, 11, EMBED_DIM)
    assert output.text_from_audio.shape == (3, 6, EMBED_DIM)
    assert (output.audio_from_text[~speech_mask] == 0).all() and (output.text_from_audio[~text_mask] == 0).all()


def test_directions_are_wired_queries_from_the_target_modality():
    """L→A: speech frame i's output depends on speech frame i and all text; A→L the other way round."""
    fusion = _fusion()
    text, speech = torch.randn(1, 6, TEXT_DIM), torch.randn(1, 11, SPEECH_DIM)
    base = fusion(text, None, speech, None)
    nudged_speech = speech.clone()
    nudged_speech[0, 3] += 1.0
    moved = fusion(text, None, nudged_speech, None)
    changed_frames = (moved.audio_from_text - base.audio_from_text).abs().amax(-1)[0] > 1e-6
    assert changed_frames.tolist() == [i == 3 for i in range(11)]
    assert ((moved.text_from_audio - base.text_from_audio).abs().amax(-1) > 1e-6).all()

    nudged_text = text.clone()
    nudged_text[0, 2] += 1.0
    moved = fusion(nudged_text, None, speech, None)
    changed_tokens = (moved.text_from_audio - base.text_from_audio).abs().amax(-1)[0] > 1e-6
    assert changed_tokens.tolist() == [i == 2 for i in range(6)]
    assert ((moved.audio_from_text - base.audio_from_text).abs().amax(-1) > 1e-6).all()


# The paper preset's reading of eq. (1)-(5), and MulT's self-attention stage: each must keep every invariance.
VARIANTS = {"default": {}, "as_written": {"focal_reading": "as_written", "sigma_min": 0.0},
            "self_attention": {"self_attention_layers": 2}}
MODELS = [(True, "default"), (False, "default"), (True, "as_written"), (True, "self_attention")]




@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("focus_attention, variant", MODELS)
def test_padding_changes_nothing(attn_implementation, focus_attention, variant):
    """Each sample, padded in a batch with garbage at its padded steps, gives what it gives alone unpadded."""
    fusion = _fusion(focus_attention=focus_attention, attn_implementation=attn_implementation, **VARIANTS[variant])
    text_lengths, speech_lengths = [6, 2, 4], [9, 11, 1]
    text = 30 * torch.randn(3, 6, TEXT_DIM)
    speech = 30 * torch.randn(3, 11, SPEECH_DIM)
    batched = fusion(text, _masks(text_lengths, 6), speech, _masks(speech_lengths, 11))
    for b, (text_length, speech_length) in enumerate(zip(text_lengths, speech_lengths)):
        alone = fusion(text[b : b + 1, :text_length], None, speech[b : b + 1, :speech_length], None)
        torch.testing.assert_close(batched.audio_from_text[b, :speech_length], alone.audio_from_text[0],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.text_from_audio[b, :text_length], alone.text_from_audio[0],
                                   rtol=1e-4, atol=1e-5)


def test_sdpa_matches_eager_through_the_fusion_with_gradients():
    torch.manual_seed(3)
    inputs = (torch.randn(3, 6, TEXT_DIM), _masks([6, 3, 0], 6), torch.randn(3, 11, SPEECH_DIM), _masks([8, 11, 5], 11))
    results = {}
    for attn_implementation in ("eager", "sdpa"):
        fusion = _fusion(attn_implementation=attn_implementation)
        output = fusion(*inputs)
        (output.audio_from_text.square().sum() + output.text_from_audio.sin().sum()).backward()
        results[attn_implementation] = (output, {name: p.grad for name, p in fusion.named_parameters()})
    (eager, eager_grads), (sdpa, sdpa_grads) = results["eager"], results["sdpa"]
    torch.testing.assert_close(sdpa.audio_from_text, eager.audio_from_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa.text_from_audio, eager.text_from_audio, rtol=1e-5, atol=1e-5)
    # Sample 2 has no text at all: speech queries see nothing (zero attention), its text output is all padding.
    assert torch.isfinite(eager.audio_from_text).all() and (eager.text_from_audio[2] == 0).all()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("focus_attention, variant", MODELS)
def test_every_parameter_gets_a_gradient(focus_attention, variant):
    """DDP (find_unused_parameters=False) needs this: no parameter may sit unused in either mode."""
    fusion = _fusion(focus_attention=focus_attention, **VARIANTS[variant]).train()
    output = fusion(torch.randn(2, 6, TEXT_DIM), _masks([6, 4], 6), torch.randn(2, 9, SPEECH_DIM), _masks([9, 5], 9))
    # Random weights per output feature: a plain .sum() of a final LayerNorm's output (weight 1, bias 0) is constant
    # in its input, so every upstream gradient would be float round-off (exactly 0 on some CPUs).
    weights = torch.randn(2, EMBED_DIM)
    ((output.audio_from_text @ weights[0]).sum() + (output.text_from_audio @ weights[1]).sum()).backward()
    names = [name for name, _ in fusion.named_parameters()]
    assert any(".w_p." in name for name in names) == focus_attention
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_transformer_depth_and_final_norm():
    torch.manual_seed(0)
    transformer = CrossmodalTransformer(_config(num_layers=3, attn_dropout=0.0, relu_dropout=0.0,
                                                res_dropout=0.0)).eval()
    assert len(transformer.layers) == 3
    hidden_states = torch.randn(2, 5, EMBED_DIM)
    output = transformer(hidden_states, torch.randn(2, 7, EMBED_DIM), _masks([5, 2], 5), _masks([7, 7], 7))
    valid = output[0]  # final LayerNorm with its initial affine: zero mean, unit variance per step
    torch.testing.assert_close(valid.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(valid.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert (output[1, 2:] == 0).all()
    with pytest.raises(ValueError, match="num_layers"):
        CrossmodalTransformer(_config(num_layers=0))


def test_self_attention_stage_is_mults_mem_transformer_after_each_direction():
    """self_attention_layers=0 is the crossmodal-only model (same parameters, same output); N > 0 adds per
    direction N plain self-attention layers (no focal parameters, one LayerNorm per attention) over the
    direction's output re-embedded (√D scale + positions), then a final LayerNorm."""
    plain = _fusion(self_attention_layers=0)
    stacked = _fusion(self_attention_layers=3)
    assert plain.audio_self_attention is None and plain.text_self_attention is None
    extra = set(stacked.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(stacked.state_dict())
    assert {name.split(".")[0] for name in extra} == {"audio_self_attention", "text_self_attention"}
    assert {int(name.split(".")[2]) for name in extra if ".layers." in name} == {0, 1, 2}
    assert not any(".w_p." in name or "key_value_norm" in name for name in extra)

    stacked.load_state_dict({**stacked.state_dict(), **plain.state_dict()})
    inputs = (torch.randn(2, 6, TEXT_DIM), _masks([6, 4], 6), torch.randn(2, 9, SPEECH_DIM), _masks([9, 5], 9))
    crossmodal_only = plain(*inputs)
    output = stacked(*inputs)
    text_mask, speech_mask = inputs[1], inputs[3]
    for stage, before, after, mask in (
        (stacked.audio_self_attention, crossmodal_only.audio_from_text, output.audio_from_text, speech_mask),
        (stacked.text_self_attention, crossmodal_only.text_from_audio, output.text_from_audio, text_mask),
    ):
        positions = (mask.cumsum(1) - 1).float()
        states = math.sqrt(EMBED_DIM) * before + sinusoidal_positional_embedding(positions, EMBED_DIM)
        states = states * mask[..., None]
        for layer in stage.layers:  # x + Attn(LN(x), LN(x)), x + FFN(LN(x)): MulT's self-attention layer
            normed = layer.query_norm(states)
            attended, _ = layer.attention(normed, normed, mask, mask)
            states = states + attended
            states = states + layer.fc2(torch.relu(layer.fc1(layer.ffn_norm(states))))
        expected = stage.final_norm(states) * mask[..., None]
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(output.audio_from_text, crossmodal_only.audio_from_text)

