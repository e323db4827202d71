"""Text and speech embedding networks: offline tokenizer, tiny encoders, masks, padding invariance, guided
attention against an explicit loop, and the published encoder sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ser_platform.config import ModelConfig, SpeechEncoderConfig, TextEncoderConfig
from ser_platform.models.speech import (
    AcousticFeatureEncoder,
    GuidedAttention,
    SpeechEncoder,
    SSLSpeechEncoder,
    group_norm_over_valid_frames,
    masked_standardize,
    spectrogram_bins,
)
from ser_platform.models.text import ROBERTA_SPECIAL_TOKENS, TextEncoder, build_tokenizer


TEXT = TextEncoderConfig(tiny_hidden_size=16, tiny_num_layers=1, tiny_num_heads=2)
SPEECH = SpeechEncoderConfig(tiny_hidden_size=16, tiny_num_layers=1, tiny_num_heads=2, tiny_conv_dim=8,
                             cnn_channels=8, lstm_hidden=6)
MODEL = ModelConfig(speech=SPEECH)  # the composite speech modules take the model's config (dropout, encoders)




@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXT)


# --- text ---------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_is_robertas_scheme_with_one_token_per_byte(tokenizer):
    assert len(tokenizer) == 5 + 256
    assert tokenizer.convert_tokens_to_ids(list(ROBERTA_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]  # RoBERTa's ids
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "Well, I'm NOT angry! [LAUGHTER] café"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>
    assert len(ids) == len(text.encode("utf-8")) + 2  # no merges: one token per UTF-8 byte
    assert all(5 <= i < 261 for i in ids[1:-1])
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert build_tokenizer(TEXT)(text)["input_ids"] == ids  # deterministic, nothing learnt


def test_tokenizer_truncates_to_max_length_and_pads_right(tokenizer):
    batch = tokenizer(["x" * 2000, "hi"], truncation=True, max_length=512, padding=True)
    assert len(batch["input_ids"][0]) == 512 and batch["input_ids"][0][-1] == 2
    assert batch["input_ids"][1][:4] == [0, tokenizer.convert_tokens_to_ids("h"),
                                         tokenizer.convert_tokens_to_ids("i"), 2]
    assert set(batch["input_ids"][1][4:]) == {1} and sum(batch["attention_mask"][1]) == 4


def test_text_encoder_masks_padding_and_is_padding_invariant(tokenizer):
    torch.manual_seed(0)
    encoder = TextEncoder(TEXT).eval()
    batch = tokenizer(["a much longer transcript than the other", "short"], padding=True, return_tensors="pt")
    states, mask = encoder(batch["input_ids"], batch["attention_mask"])
    assert states.shape == (2, batch["input_ids"].shape[1], 16) and encoder.output_dim == 16
    assert torch.equal(mask, batch["attention_mask"].bool())
    assert torch.all(states[1, ~mask[1]] == 0)
    alone = tokenizer(["short"], return_tensors="pt")
    alone_states, _ = encoder(alone["input_ids"], alone["attention_mask"])
    n = alone["input_ids"].shape[1]
    assert torch.allclose(alone_states[0], states[1, :n], atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_tiny_encoders_own_dropout_is_tiny_dropout(tokenizer, dropout):
    """model.{text,speech}.tiny_dropout: Hugging Face's hidden/attention (and wav2vec2's activation) dropout of the
    tiny encoders; at 0 a training-mode forward pass is the eval-mode one, at 0.1 (their default) it is not."""
    text = TextEncoder(TextEncoderConfig(**{**TEXT.__dict__, "tiny_dropout": dropout}))
    speech = SSLSpeechEncoder(SpeechEncoderConfig(**{**SPEECH.__dict__, "tiny_dropout": dropout,
                                                     "mask_time_prob": 0.0}))
    hf_text, hf_speech = text.encoder.config, speech.encoder.config
    assert (hf_text.hidden_dropout_prob, hf_text.attention_probs_dropout_prob) == (dropout, dropout)
    assert (hf_speech.hidden_dropout, hf_speech.activation_dropout, hf_speech.attention_dropout) == (dropout,) * 3
    batch = tokenizer(["a transcript of some length", "short"], padding=True, return_tensors="pt")
    audio, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    for encoder, inputs in ((text, (batch["input_ids"], batch["attention_mask"])), (speech, (audio, lengths))):
        torch.manual_seed(1)
        trained = encoder.train()(*inputs)[0]
        evaluated = encoder.eval()(*inputs)[0]
        assert torch.allclose(trained, evaluated, atol=1e-6) == (dropout == 0.0)


def test_frozen_text_encoder_has_no_gradient_and_stays_in_eval(tokenizer):
    encoder = TextEncoder(TEXT, frozen=True)
    encoder.train()
    assert not encoder.encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    batch = tokenizer(["hello"], return_tensors="pt")
    states, _ = encoder(batch["input_ids"], batch["attention_mask"])
    assert not states.requires_grad


# --- speech -------------------------------------------------------------------------------------------------


BASE_STACK = ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))  # wav2vec2-base (kernels, strides)
TINY_STACK = ((20, 8, 4), (10, 8, 4))  # the tiny encoder's shorter stack, same 320-sample stride


def conv_stack_frames(num_samples: int, stack=TINY_STACK) -> int:
    """Frames out of a stack of valid (unpadded) convolutions, one layer at a time."""
    for kernel, stride in zip(*stack):
        num_samples = (num_samples - kernel) // stride + 1
    return num_samples


def test_masked_standardize_uses_valid_steps_only():
    rng = np.random.default_rng(0)
    values = torch.tensor(rng.normal(3.0, 2.0, size=(2, 9, 3)), dtype=torch.float32)
    lengths = [9, 5]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    out = masked_standardize(values, mask)
    for b, n in enumerate(lengths):
        valid = values[b, :n].numpy()
        expected = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-7)
        np.testing.assert_allclose(out[b, :n].numpy(), expected, atol=1e-5)
        assert torch.all(out[b, n:] == 0)


def test_tiny_wav2vec2_keeps_the_320_sample_stride_and_frame_mask():
    torch.manual_seed(0)
    encoder = SSLSpeechEncoder(SPEECH).eval()
    config = encoder.encoder.config
    assert (tuple(config.conv_kernel), tuple(config.conv_stride)) == TINY_STACK
    assert math.prod(config.conv_stride) == 320
    lengths = torch.tensor([16000, 8000, 4321, 400])
    assert encoder.frame_lengths(lengths).tolist() == [conv_stack_frames(int(n)) for n in lengths]
    # 20 ms frames, as many as wav2vec2-base gives for 1 s and for 0.5 s.
    assert conv_stack_frames(16000) == conv_stack_frames(16000, BASE_STACK) == 49
    assert conv_stack_frames(8000) == conv_stack_frames(8000, BASE_STACK) == 24
    audio = torch.randn(4, 16000) * (torch.arange(16000)[None] < lengths[:, None])
    states, mask = encoder(audio, lengths)
    assert states.shape == (4, 49, 16)
    assert mask.sum(1).tolist() == [conv_stack_frames(int(n)) for n in lengths]
    assert torch.all(states[~mask] == 0)


def test_wav2vec2_valid_frames_ignore_padding_and_input_scale():
    torch.manual_seed(0)
    encoder = SSLSpeechEncoder(SPEECH).eval()
    clip = torch.randn(1, 7000)
    alone, alone_mask = encoder(clip, torch.tensor([7000]))
    padded = torch.cat((3.0 * clip, torch.zeros(1, 9000)), dim=1)  # louder and padded: normalisation undoes both
    batched, mask = encoder(padded, torch.tensor([7000]))
    frames = int(alone_mask.sum())
    assert int(mask.sum()) == frames
    assert torch.allclose(alone[0, :frames], batched[0, :frames], atol=1e-4)


def test_acoustic_encoder_halves_the_frame_rate_and_ignores_padding():
    torch.manual_seed(0)
    encoder = AcousticFeatureEncoder(MODEL, 40).eval()  # 8 CNN channels, 6 LSTM units per direction
    features = torch.randn(1, 37, 40)
    alone, alone_lengths = encoder(features, torch.tensor([37]))
    assert alone.shape == (1, 19, 12) and alone_lengths.tolist() == [math.ceil(37 / 2)]
    padded = torch.cat((features, 5.0 + torch.randn(1, 24, 40)), dim=1)  # garbage, not zeros, in the padding
    batched, lengths = encoder(padded, torch.tensor([37]))
    assert lengths.tolist() == [19] and batched.shape == (1, 31, 12)
    assert torch.allclose(alone[0], batched[0, :19], atol=1e-5)
    assert torch.all(batched[0, 19:] == 0)
    with pytest.raises(ValueError, match=r"\(B, T, 40\)"):
        encoder(torch.randn(1, 10, 13), torch.tensor([10]))


def test_guided_attention_matches_an_explicit_loop():
    torch.manual_seed(0)
    module = GuidedAttention(MODEL, 8, 2).eval()
    queries = torch.randn(2, 5, 8)
    guide = torch.randn(2, 4, 8)
    guide_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = module(queries, guide, guide_mask)

    with torch.no_grad():
        expected = torch.empty_like(out)
        for b in range(2):
            keys = [j for j in range(4) if guide_mask[b, j]]
            for i in range(5):
                heads = []
                for h in range(2):
                    cols = slice(4 * h, 4 * h + 4)
                    q = module.q_proj(queries[b, i])[cols]
                    scores = [float(q @ module.k_proj(guide[b, j])[cols]) / math.sqrt(4) for j in keys]
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    heads.append(sum(w / sum(weights) * module.v_proj(guide[b, j])[cols]
                                     for w, j in zip(weights, keys)))
                x = module.attention_norm(queries[b, i] + module.out_proj(torch.cat(heads)))
                expected[b, i] = module.ffn_norm(x + module.fc2(torch.relu(module.fc1(x))))
    assert torch.allclose(out, expected, atol=1e-5)


def test_guided_attention_with_an_all_padding_guide_is_finite():
    module = GuidedAttention(MODEL, 8, 2).eval()
    out = module(torch.randn(1, 3, 8), torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(out).all()


def speech_batch(seconds: list[float], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    samples = [int(s * 16000) for s in seconds]
    frames = [1 + n // 160 for n in samples]
    audio = torch.zeros(len(samples), max(samples))
    mfcc = torch.zeros(len(samples), max(frames), 40)
    spectrogram = torch.zeros(len(samples), max(frames), 321)
    for b, (n, t) in enumerate(zip(samples, frames)):
        audio[b, :n] = torch.randn(n, generator=generator)
        mfcc[b, :t] = torch.randn(t, 40, generator=generator)
        spectrogram[b, :t] = torch.randn(t, 321, generator=generator)
    return audio, torch.tensor(samples), mfcc, spectrogram, torch.tensor(frames)


def test_speech_encoder_follows_the_wav2vec2_frame_grid():
    torch.manual_seed(0)
    encoder = SpeechEncoder(MODEL).eval()
    assert spectrogram_bins(SPEECH) == 321  # 40 ms window at 16 kHz: n_fft 640
    audio, audio_lengths, mfcc, spectrogram, feature_lengths = speech_batch([1.0, 0.55])
    out = encoder(audio, audio_lengths, mfcc, spectrogram, feature_lengths)
    assert out.states.shape == (2, conv_stack_frames(16000), 16)
    assert out.mask.sum(1).tolist() == [conv_stack_frames(16000), conv_stack_frames(8800)]
    assert torch.all(out.states[~out.mask] == 0)
    # Precomputed frozen-encoder states give the same result without the audio.
    ssl_states, _ = encoder.ssl(audio, audio_lengths)
    cached = encoder(None, audio_lengths, mfcc, spectrogram, feature_lengths, ssl_states=ssl_states)
    assert torch.allclose(cached.states, out.states, atol=1e-6)
    with pytest.raises(ValueError, match="321"):
        encoder(audio, audio_lengths, mfcc, spectrogram[..., :200], feature_lengths)


def test_speech_encoder_is_padding_invariant():
    torch.manual_seed(0)
    encoder = SpeechEncoder(MODEL).eval()
    audio, audio_lengths, mfcc, spectrogram, feature_lengths = speech_batch([0.6, 1.0], seed=1)
    batched = encoder(audio, audio_lengths, mfcc, spectrogram, feature_lengths)
    n, t = int(audio_lengths[0]), int(feature_lengths[0])
    alone = encoder(audio[:1, :n], audio_lengths[:1], mfcc[:1, :t], spectrogram[:1, :t], feature_lengths[:1])
    frames = int(alone.mask.sum())
    assert torch.allclose(alone.states[0, :frames], batched.states[0, :frames], atol=1e-5)


def test_frozen_speech_encoder_freezes_only_wav2vec2():
    encoder = SpeechEncoder(ModelConfig(speech=SPEECH, encoders="frozen"))
    encoder.train()
    assert not encoder.ssl.encoder.training and encoder.mfcc_encoder.training
    assert not any(p.requires_grad for p in encoder.ssl.parameters())
    assert all(p.requires_grad for p in encoder.guided_attention.parameters())


def test_group_norm_over_valid_frames_is_the_group_norm_of_each_utterance_alone():
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    frames = [11, 6, 0, 9]
    hidden = torch.randn(4, 8, 11, generator=generator) + 3.0  # garbage (not zeros) in the padding
    out = group_norm_over_valid_frames(hidden, frames, norm)
    for b, n in enumerate(frames):
        if n:
            torch.testing.assert_close(out[b, :, :n], norm(hidden[b:b + 1, :, :n])[0])
        assert torch.all(out[b, :, n:] == 0)
    # The whole padded batch through the plain GroupNorm gives other values: the padding enters its statistics.
    assert not torch.allclose(norm(hidden)[1, :, :6], out[1, :, :6], atol=1e-3)


def tiny_group_norm_speech(folder) -> SpeechEncoderConfig:
    """The tiny encoder's sizes with wav2vec2-base's kind of conv stack (GroupNorm in the first layer, no attention
    mask in Hugging Face's recipe), as a local config folder."""
    from transformers import Wav2Vec2Config

    Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   conv_dim=(8, 8, 8), conv_kernel=TINY_STACK[0], conv_stride=TINY_STACK[1], conv_bias=False,
                   feat_extract_norm="group", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
                   mask_time_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0, feat_proj_dropout=0.0).save_pretrained(folder)
    return SpeechEncoderConfig(name=str(folder), mask_time_prob=0.0)


def test_valid_frames_group_norm_survives_activation_checkpointing(tmp_path):
    """Checkpointing recomputes each conv layer in backward: the GroupNorm over valid frames must be recomputed the
    same way, so the gradients (of the trained conv stack too) equal those without checkpointing, and each
    utterance's states equal its states alone."""
    speech = tiny_group_norm_speech(tmp_path)
    audio, lengths = torch.randn(3, 6000), torch.tensor([6000, 3500, 4200])
    audio = audio * (torch.arange(6000)[None] < lengths[:, None])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = SSLSpeechEncoder(speech, pretrained=False).train()
        if checkpointing:
            encoder.gradient_checkpointing_enable()
        states, mask = encoder(audio, lengths)
        (states * torch.linspace(-1, 1, 16)).sum().backward()
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
        results.append((states.detach(), grads))
    (plain, plain_grads), (checkpointed, grads) = results
    assert any(name.startswith("encoder.feature_extractor.conv_layers.0") for name in grads)
    torch.testing.assert_close(checkpointed, plain)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    encoder.eval()
    with torch.no_grad():
        batched, mask = encoder(audio, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone, alone_mask = encoder(audio[b:b + 1, :n], lengths[b:b + 1])
            frames = int(alone_mask.sum())
            torch.testing.assert_close(batched[b, :frames], alone[0, :frames], rtol=1e-5, atol=1e-5)


def test_feature_encoder_freezing_and_specaugment_follow_the_config():
    torch.manual_seed(0)
    encoder = SSLSpeechEncoder(SpeechEncoderConfig(**{**SPEECH.__dict__, "freeze_feature_encoder": True,
                                                      "mask_time_prob": 0.2}))
    conv = encoder.encoder.feature_extractor
    assert not any(p.requires_grad for p in conv.parameters())
    rest = [p for name, p in encoder.encoder.named_parameters() if not name.startswith("feature_extractor.")]
    assert rest and all(p.requires_grad for p in rest)
    assert encoder.encoder.config.mask_time_prob == 0.2
    default = SSLSpeechEncoder(SPEECH)
    assert all(p.requires_grad for p in default.parameters()) and default.encoder.config.mask_time_prob == 0.05
    # Audio through the frozen conv stack still trains the rest.
    states, _ = encoder.train()(torch.randn(2, 4000), torch.tensor([4000, 2500]))
    states.square().sum().backward()
    assert all(p.grad is None for p in conv.parameters())
    assert encoder.encoder.encoder.layers[0].attention.q_proj.weight.grad is not None


# --- published sizes, built without weights -----------------------------------------------------------------


def test_roberta_large_architecture_matches_its_published_size():
    with torch.device("meta"):
        encoder = TextEncoder(TextEncoderConfig(name="roberta-large"), pretrained=False)
    hidden, ffn, layers, vocab, positions = 1024, 4096, 24, 50265, 514
    per_layer = (4 * (hidden * hidden + hidden)  # Q, K, V, output projections
                 + 2 * hidden  # attention LayerNorm
                 + (hidden * ffn + ffn) + (ffn * hidden + hidden)  # feed-forward
                 + 2 * hidden)  # output LayerNorm
    embeddings = (vocab + positions + 1) * hidden + 2 * hidden  # words, positions, one token type, LayerNorm
    assert sum(p.numel() for p in encoder.parameters()) == embeddings + layers * per_layer
    assert encoder.output_dim == 1024


def test_wav2vec2_base_architecture_matches_its_published_config():
    with torch.device("meta"):
        encoder = SSLSpeechEncoder(SpeechEncoderConfig(name="facebook/wav2vec2-base"), pretrained=False)
    config = encoder.encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        768, 12, 12, 3072)
    assert list(config.conv_dim) == [512] * 7
    assert (tuple(config.conv_kernel), tuple(config.conv_stride)) == BASE_STACK
    # GroupNorm conv stack: over each utterance's valid frames with the attention mask (default), or Hugging
    # Face's recipe for such checkpoints, a zero-padded batch with no mask (group_norm="padded").
    assert config.feat_extract_norm == "group" and encoder.valid_frames_norm and encoder.pass_attention_mask
    with torch.device("meta"):
        padded = SSLSpeechEncoder(SpeechEncoderConfig(name="facebook/wav2vec2-base", group_norm="padded"),
                                  pretrained=False)
    assert not padded.valid_frames_norm and not padded.pass_attention_mask
    assert 94e6 < sum(p.numel() for p in encoder.parameters()) < 96e6  # "95M" in the wav2vec 2.0 paper
