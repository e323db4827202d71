"""Speech embedding network (paper §2.1.2, Figure 1(a)): wav2vec 2.0 frames + MFCC/spectrogram encoders,
combined by guided attention into the speech embedding sequence X_A.

Parts
-----
* ``SSLSpeechEncoder``: a wav2vec2-style checkpoint (paper: facebook/wav2vec2-base, 768-d) -> frame states at
  20 ms (the conv stack strides 320 samples) with a frame mask from ``_get_feat_extract_output_lengths``.
  The waveform is normalised per utterance over its valid samples (zero mean, unit variance), as
  ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does for wav2vec2-base, so padding never enters the statistics.
  "tiny" = a random ``Wav2Vec2Config`` of ``tiny_*`` sizes with a cheaper conv stack: 3 layers (kernels 20, 8,
  4; strides 10, 8, 4) instead of wav2vec2-base's 7, narrow channels (``tiny_conv_dim``), yet the same
  320-sample (20 ms) stride and a 330-sample receptive field (base: 400). Measured on 2 s × 32 utterances,
  fwd+bwd at one thread: 0.36× the time of base's 7-layer stack at the same width (the first layer's 10 ms
  output at 16 kHz / 5 was the bulk of it). Per-frame LayerNorm in the conv stack (``feat_extract_norm=
  "layer"``) so padding never changes valid outputs.
  wav2vec2-base itself normalises its first conv layer's output with GroupNorm over the whole sequence. Run as
  Hugging Face prescribes for such checkpoints (zero-padded input, no attention mask) its valid outputs change
  with the padding, i.e. with the batch mates: at random initialisation a 1 s utterance padded to 4 s moved by
  a median 61 % (BENCHMARKS.md, "Batch mates"). ``model.speech.group_norm="valid"`` (the default) computes that
  GroupNorm over each utterance's own frames and passes the attention mask, so every utterance gets exactly the
  states it gets alone, in training and evaluation alike, at the cost of the batched pass (same section);
  "padded" restores Hugging Face's recipe. LayerDrop is set to 0: it skips whole layers at random, which DDP
  rejects as unused parameters.
* ``AcousticFeatureEncoder`` (one for the MFCC, one for the spectrogram): utterance-level mean/variance
  normalisation over valid frames, a 1-D CNN over time (feature bins as channels; the first conv strides by 2,
  10 ms -> 20 ms, which also halves the cost of the wide 321-bin spectrogram conv), then a BiLSTM over packed
  sequences. Padding is zeroed before every conv and the LSTM never
  sees it, so a sample's valid outputs do not depend on how much padding its batch adds.
* ``GuidedAttention`` (MCAN, Yu et al. 2019, ref. [25]): X <- LN(X + MHA(X, Y, Y)); X <- LN(X + FFN(X)),
  post-norm as in MCAN, padded keys masked.

Choices where the paper is vague
--------------------------------
* Which stream queries which: the wav2vec2 states are the queries, the concatenated MFCC+spectrogram encodings
  the keys/values. The paper motivates the acoustic encoders as adding the prosody that wav2vec2 alone misses
  [23]; with wav2vec2 as the guided stream, the residual path of the guided attention carries the (pre-trained)
  wav2vec2 states straight through and the acoustic stream adds to them, and the speech embedding keeps
  wav2vec2's frame grid, width (768 for the paper) and mask.
* Frame rates: the features arrive at a 10 ms hop; the acoustic CNN strides by 2 so both streams run at 20 ms
  (the acoustic stream is 1-2 frames longer than wav2vec2's, whose frames need a full 25 ms window). Attention
  needs no exact alignment; equal rates keep the key sequence short and the two streams comparable.
* Spectrogram encoder input: log-power bins (``n_fft = win_ms`` at 16 kHz, 321 bins for 40 ms) as channels of a
  1-D conv, like the MFCC encoder; the paper gives no CNN details.
* Dropout of the acoustic encoders and the guided attention: ``model.dropout`` (0.25, the paper's only figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ser_platform.config import TINY_ENCODER, ModelConfig, SpeechEncoderConfig
from ser_platform.models.text import PretrainedEncoder, check_layer

__all__ = [
    "KNOWN_SPEECH_CONFIGS",
    "SAMPLE_RATE",
    "AcousticFeatureEncoder",
    "GuidedAttention",
    "SSLSpeechEncoder",
    "SpeechEncoder",
    "SpeechEncoderOutput",
    "build_speech_encoder_config",
    "first_conv_group_norm",
    "group_norm_over_valid_frames",
    "lengths_to_mask",
    "masked_standardize",
    "padding_treatment",
    "spectrogram_bins",
]

SAMPLE_RATE = 16_000  # wav2vec2 checkpoints are trained on 16 kHz audio; the features use the same rate
_W2V2_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_W2V2_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)  # product 320 samples = 20 ms
_TINY_CONV_KERNEL = (20, 8, 4)  # receptive field 20 + 7·10 + 3·80 = 330 samples
_TINY_CONV_STRIDE = (10, 8, 4)  # product 320 samples = 20 ms, as wav2vec2-base

# Published sizes (the checkpoint's config.json) for building the architecture without a download.
KNOWN_SPEECH_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/wav2vec2-base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        conv_dim=(512,) * 7, conv_kernel=_W2V2_CONV_KERNEL, conv_stride=_W2V2_CONV_STRIDE, conv_bias=False,
        feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16, mask_time_prob=0.05, layerdrop=0.0,
    ),
}


def lengths_to_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(B,) lengths -> (B, max_length) bool mask, True at the first ``length`` positions."""
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def masked_standardize(values: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """Zero mean, unit variance over the valid steps of each sample, separately per channel; zero at padding.

    values: (B, T) or (B, T, C); mask: (B, T) bool. Statistics use valid steps only (population variance, as
    ``Wav2Vec2FeatureExtractor``'s ``zero_mean_unit_var_norm``), so padding never changes them.
    """
    keep = mask.to(values.dtype)
    if values.dim() == 3:
        keep = keep.unsqueeze(-1)
    count = keep.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (values * keep).sum(dim=1, keepdim=True) / count
    variance = ((values - mean).square() * keep).sum(dim=1, keepdim=True) / count
    return (values - mean) / torch.sqrt(variance + eps) * keep


def spectrogram_bins(speech_config: SpeechEncoderConfig) -> int:
    """Spectrogram width the model expects: n_fft // 2 + 1 with n_fft = the window in samples (640 -> 321)."""
    return int(round(speech_config.win_ms * SAMPLE_RATE / 1000.0)) // 2 + 1


def build_speech_encoder_config(speech_config: SpeechEncoderConfig, *, pretrained: bool = True):
    """The Hugging Face config of the SSL speech encoder ("tiny", a known name without weights, or AutoConfig)."""
    from transformers import AutoConfig, Wav2Vec2Config

    if speech_config.name == TINY_ENCODER:
        hidden = speech_config.tiny_hidden_size  # a multiple of tiny_num_heads (config.SpeechEncoderConfig checks)
        return Wav2Vec2Config(
            hidden_size=hidden, num_hidden_layers=speech_config.tiny_num_layers,
            num_attention_heads=speech_config.tiny_num_heads, intermediate_size=4 * hidden,
            conv_dim=(speech_config.tiny_conv_dim,) * len(_TINY_CONV_KERNEL), conv_kernel=_TINY_CONV_KERNEL,
            conv_stride=_TINY_CONV_STRIDE, conv_bias=False, feat_extract_norm="layer",
            # A short positional conv (wav2vec2-base: 128 taps) suits 1-3 s of tiny-model audio; groups must
            # divide the width.
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=math.gcd(hidden, 16),
            mask_time_prob=speech_config.mask_time_prob, layerdrop=0.0,
            hidden_dropout=speech_config.tiny_dropout, activation_dropout=speech_config.tiny_dropout,
            attention_dropout=speech_config.tiny_dropout,
        )
    if not pretrained and speech_config.name in KNOWN_SPEECH_CONFIGS:
        return Wav2Vec2Config(**{**KNOWN_SPEECH_CONFIGS[speech_config.name],
                                 "mask_time_prob": speech_config.mask_time_prob})
    return AutoConfig.from_pretrained(speech_config.name, layerdrop=0.0, mask_time_prob=speech_config.mask_time_prob)


def padding_treatment(hf_config: Any, speech_config: SpeechEncoderConfig) -> str:
    """How the SSL encoder meets padding: "layer" (per-frame LayerNorm conv stack, attention mask passed: padding
    never reaches a valid output), "valid" (GroupNorm over each utterance's valid frames, mask passed: the same)
    or "padded" (Hugging Face's recipe for GroupNorm checkpoints: no mask, the padding enters the statistics).
    What a cache of the encoder's states must record: "padded" states depend on the batching."""
    if getattr(hf_config, "feat_extract_norm", "layer") != "group":
        return "layer"
    return speech_config.group_norm


def first_conv_group_norm(encoder: nn.Module) -> nn.GroupNorm:
    """The GroupNorm of a wav2vec2-style conv stack's first layer (wav2vec2-base, HuBERT base, WavLM base)."""
    try:
        norm = encoder.feature_extractor.conv_layers[0].layer_norm
    except (AttributeError, IndexError, TypeError):
        norm = None
    if not isinstance(norm, nn.GroupNorm):
        raise ValueError(f"{type(encoder).__name__} has feat_extract_norm='group' but no GroupNorm at "
                         "feature_extractor.conv_layers[0].layer_norm; set model.speech.group_norm='padded'")
    return norm


def group_norm_over_valid_frames(hidden_states: Tensor, valid_frames: Sequence[int], norm: nn.GroupNorm) -> Tensor:
    """``norm`` applied to each utterance's valid frames alone, exactly as if it had been run unpadded.

    hidden_states: (B, C, T) the first conv layer's output of a zero-padded batch; valid_frames: B frame counts.
    Returns (B, C, T), zero at padded frames. One ``group_norm`` call per utterance: the same kernel and statistics
    as a batch of one, and autograd keeps only what ``group_norm`` itself saves (no (B, C, T) temporaries).
    """
    total = hidden_states.shape[-1]
    pieces = []
    for index, frames in enumerate(valid_frames):
        piece = hidden_states[index:index + 1, :, :frames]
        if frames > 0:
            piece = F.group_norm(piece, norm.num_groups, norm.weight, norm.bias, norm.eps)
        pieces.append(F.pad(piece, (0, total - frames)))
    return torch.cat(pieces, dim=0)


def _valid_frames_hook(norm: nn.GroupNorm, inputs: tuple[Tensor, ...], output: Tensor) -> Optional[Tensor]:
    """Forward hook on the first conv GroupNorm: its output recomputed over the valid frames that
    ``SSLSpeechEncoder.layer_states`` stored on it (``norm.valid_frames``). It stays registered, and the frames
    stay stored, so that activation checkpointing's recomputation in backward normalises the same way."""
    frames = getattr(norm, "valid_frames", None)
    if frames is None:
        return None
    hidden_states = inputs[0]
    if len(frames) != hidden_states.shape[0] or max(frames, default=0) > hidden_states.shape[-1]:
        raise RuntimeError(f"the first conv GroupNorm got a batch of shape {tuple(hidden_states.shape)} but valid "
                           f"frames {list(frames)}: run the encoder through SSLSpeechEncoder")
    return group_norm_over_valid_frames(hidden_states, frames, norm)


class SSLSpeechEncoder(PretrainedEncoder):
    """wav2vec2-style frame states: ``forward(input_values (B,S), audio_lengths (B,)) -> (states, mask)``.

    states (B, T_w, output_dim), zero at padded frames; mask (B, T_w) bool from ``frame_lengths``. The states
    are layer ``speech_config.layer`` (-1 = the encoder's output ``last_hidden_state``; L = ``hidden_states[L]``);
    :meth:`layer_states` gives several layers from one pass.
    ``frozen``: requires_grad False, always in eval mode, run under ``torch.no_grad()``; random weights of a
    frozen encoder ("tiny", or ``pretrained=False``) come from ``speech_config.tiny_seed`` alone (a fixed
    feature extractor, the same in every fold, so it can be cached like a checkpoint).
    ``cached``: states come from the frozen-encoder cache; no encoder is built (its config gives the sizes and
    ``frame_lengths``) and ``forward`` raises. Requires ``frozen``.

    From ``speech_config`` also: ``freeze_feature_encoder`` (Hugging Face's ``freeze_feature_encoder()`` on a
    trained encoder), ``mask_time_prob`` (its SpecAugment) and ``group_norm``: for a conv stack with GroupNorm
    (wav2vec2-base), "valid" normalises each utterance over its own frames and passes the attention mask, so an
    utterance's states are those it gets alone, whatever its batch mates; "padded" is Hugging Face's recipe (a
    zero-padded batch, no attention mask), under which padding changes the valid frames.
    """

    def __init__(self, speech_config: SpeechEncoderConfig, *, frozen: bool = False, pretrained: bool = True,
                 cached: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel

        if cached and not frozen:
            raise ValueError("an SSLSpeechEncoder served from the encoder cache must be frozen "
                             "(model.encoders='frozen')")
        self.frozen = frozen
        self.layer = int(speech_config.layer)
        hf_config = build_speech_encoder_config(speech_config, pretrained=pretrained)
        self.hf_config = hf_config
        self.num_layers = int(hf_config.num_hidden_layers)
        check_layer(self.layer, self.num_layers, "model.speech.layer")
        self.encoder: nn.Module | None = None
        if cached:
            if not (hasattr(hf_config, "conv_kernel") and hasattr(hf_config, "conv_stride")):
                raise ValueError(f"model.speech.name={speech_config.name!r}: its config has no conv_kernel/"
                                 "conv_stride, so it is not a wav2vec2-style encoder")
        elif pretrained and speech_config.name != TINY_ENCODER:
            self.encoder = AutoModel.from_pretrained(speech_config.name, config=hf_config)
        elif frozen:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(speech_config.tiny_seed)
                self.encoder = AutoModel.from_config(hf_config)
        else:
            self.encoder = AutoModel.from_config(hf_config)
        if self.encoder is not None and not hasattr(self.encoder, "_get_feat_extract_output_lengths"):
            raise ValueError(f"model.speech.name={speech_config.name!r}: {type(self.encoder).__name__} is not a "
                             "wav2vec2-style encoder (no _get_feat_extract_output_lengths)")
        self.output_dim = int(hf_config.hidden_size)
        self.num_heads = int(hf_config.num_attention_heads)
        treatment = padding_treatment(hf_config, speech_config)
        self.valid_frames_norm = treatment == "valid"
        # Hugging Face's rule: checkpoints whose conv stack uses GroupNorm take no attention mask; with the
        # GroupNorm over valid frames the padded frames are exactly what the mask must hide.
        self.pass_attention_mask = treatment != "padded"
        if self.encoder is not None and self.valid_frames_norm:
            first_conv_group_norm(self.encoder).register_forward_hook(_valid_frames_hook)
        if self.encoder is not None and frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        elif self.encoder is not None and speech_config.freeze_feature_encoder:
            if not hasattr(self.encoder, "freeze_feature_encoder"):
                raise ValueError(f"model.speech.freeze_feature_encoder=true: {type(self.encoder).__name__} has no "
                                 "freeze_feature_encoder()")
            self.encoder.freeze_feature_encoder()

    def frame_lengths(self, audio_lengths: Tensor) -> Tensor:
        """Valid frames per sample: the conv stack's output length for each number of valid samples."""
        if self.encoder is not None:
            return self.encoder._get_feat_extract_output_lengths(audio_lengths).clamp(min=0)
        # No encoder (cached): Hugging Face's formula, floor((L - kernel) / stride) + 1 per conv layer.
        if getattr(self.hf_config, "add_adapter", False):
            raise ValueError("frame_lengths of a cached encoder with an adapter (add_adapter) is not supported")
        lengths = audio_lengths
        for kernel, stride in zip(self.hf_config.conv_kernel, self.hf_config.conv_stride):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    def layer_states(self, input_values: Tensor, audio_lengths: Tensor,
                     layers: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """The frame states of each of ``layers`` from one pass, zero at padded frames; the frame mask."""
        self.check_runnable(layers, "speech layer", "speech_ssl_states")
        sample_mask = lengths_to_mask(audio_lengths, input_values.shape[1])
        waveform = masked_standardize(input_values, sample_mask)
        if self.valid_frames_norm:
            kernel, stride = self.hf_config.conv_kernel[0], self.hf_config.conv_stride[0]
            first_frames = (torch.div(audio_lengths - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
            first_conv_group_norm(self.encoder).valid_frames = tuple(first_frames.tolist())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.encoder(waveform, attention_mask=sample_mask.long() if self.pass_attention_mask else None,
                               output_hidden_states=any(layer != -1 for layer in layers))
        states = [out.last_hidden_state if layer == -1 else out.hidden_states[layer] for layer in layers]
        mask = lengths_to_mask(self.frame_lengths(audio_lengths), states[0].shape[1])
        return [s * mask.unsqueeze(-1).to(s.dtype) for s in states], mask

    def forward(self, input_values: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor]:
        states, mask = self.layer_states(input_values, audio_lengths, [self.layer])
        return states[0], mask


class AcousticFeatureEncoder(nn.Module):
    """CNN + BiLSTM over one acoustic feature sequence (MFCC or spectrogram), §2.1.2.

    ``AcousticFeatureEncoder(config, in_dim)``: ``config`` a ``ModelConfig`` (``speech.cnn_channels``,
    ``speech.lstm_hidden``, ``dropout``), in_dim the feature width (n_mfcc, or the spectrogram's bins).
    forward(features (B, T, in_dim), lengths (B,)) -> (states (B, T', 2·lstm_hidden), lengths' (B,)) with
    T' = ceil(T / 2) (stride-2 conv: 10 ms -> 20 ms); states are zero at padded steps.
    """

    def __init__(self, config: ModelConfig, in_dim: int) -> None:
        super().__init__()
        channels, lstm_hidden = config.speech.cnn_channels, config.speech.lstm_hidden
        self.in_dim = in_dim
        self.conv1 = nn.Conv1d(in_dim, channels, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(channels, lstm_hidden, batch_first=True, bidirectional=True)
        self.output_dim = 2 * lstm_hidden

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Length after the stride-2 conv (kernel 5, padding 2): floor((T - 1) / 2) + 1 = ceil(T / 2)."""
        return torch.div(lengths + 1, 2, rounding_mode="floor")

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"expected features of shape (B, T, {self.in_dim}), got {tuple(features.shape)}")
        mask = lengths_to_mask(lengths, features.shape[1])
        hidden = masked_standardize(features, mask).transpose(1, 2)  # (B, F, T): Conv1d wants channels first
        # Padding is zero before each conv, so it reads exactly the zeros an unpadded sample is padded with.
        out_lengths = self.output_lengths(lengths)
        hidden = F.relu(self.conv1(hidden))
        total = hidden.shape[2]
        out_mask = lengths_to_mask(out_lengths, total)
        hidden = F.relu(self.conv2(hidden * out_mask.unsqueeze(1).to(hidden.dtype)))
        hidden = self.dropout(hidden.transpose(1, 2))  # (B, T', C)
        # Packed sequences: the LSTM never steps through padding, in either direction.
        packed = pack_padded_sequence(hidden, out_lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=total)
        return states * out_mask.unsqueeze(-1).to(states.dtype), out_lengths


class GuidedAttention(nn.Module):
    """MCAN guided attention (ref. [25]): the queries X attend over the guide Y (keys and values).

    X <- LN(X + Dropout(MHA(X, Y, Y))); X <- LN(X + Dropout(FFN(X))), FFN = Linear(D, 4D)-ReLU-Dropout-Linear.
    ``GuidedAttention(config, embed_dim, num_heads)``: dropout ``config.dropout``; the width and heads are the
    wav2vec2 encoder's. hidden_states X: (B, T_q, D); guide_states Y: (B, T_k, D); guide_mask (B, T_k) bool,
    True = keep. A sample whose guide is all padding attends to all of it (no -inf-only softmax row); its output
    is the caller's to mask. Returns (B, T_q, D).
    """

    def __init__(self, config: ModelConfig, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: Tensor, guide_states: Tensor, guide_mask: Tensor) -> Tensor:
        batch_size, query_len, embed_dim = hidden_states.shape

        def split_heads(states: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, head_dim)
            return states.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)

        keep = guide_mask | ~guide_mask.any(dim=1, keepdim=True)
        attended = F.scaled_dot_product_attention(
            split_heads(self.q_proj(hidden_states)), split_heads(self.k_proj(guide_states)),
            split_heads(self.v_proj(guide_states)), attn_mask=keep[:, None, None, :],
        )
        attended = self.out_proj(attended.transpose(1, 2).reshape(batch_size, query_len, embed_dim))
        hidden_states = self.attention_norm(hidden_states + self.dropout(attended))
        feed_forward = self.fc2(self.dropout(F.relu(self.fc1(hidden_states))))
        return self.ffn_norm(hidden_states + self.dropout(feed_forward))


@dataclass
class SpeechEncoderOutput:
    """The speech embedding sequence X_A of §2.2 and its mask (True = keep)."""

    states: Tensor  # (B, T_A, output_dim), zero at padded frames; T_A = wav2vec2 frames (20 ms)
    mask: Tensor  # (B, T_A) bool


class SpeechEncoder(nn.Module):
    """The whole speech embedding network of Figure 1(a): GA(wav2vec2 frames, [MFCC enc ; spectrogram enc]).

    ``SpeechEncoder(config)``: ``config`` a ``ModelConfig`` (``speech``, ``encoders``: "frozen" freezes wav2vec2,
    ``dropout``); ``pretrained``: load a named checkpoint's weights.
    forward(input_values (B, S), audio_lengths (B,), mfcc (B, T, n_mfcc), spectrogram (B, T, n_freq),
    feature_lengths (B,), ssl_states=None) -> SpeechEncoderOutput. ``ssl_states`` (B, T_w, D): precomputed
    frozen wav2vec2 states (then ``input_values`` may be None; ``audio_lengths`` still gives the frame mask).
    ``cached=True``: the wav2vec2 states always come that way (from ``data.encoder_cache``): no wav2vec2 is built.
    """

    def __init__(self, config: ModelConfig, *, pretrained: bool = True, cached: bool = False) -> None:
        super().__init__()
        self.ssl = SSLSpeechEncoder(config.speech, frozen=config.encoders == "frozen", pretrained=pretrained,
                                    cached=cached)
        self.n_mfcc = config.speech.n_mfcc
        self.n_freq = spectrogram_bins(config.speech)
        self.mfcc_encoder = AcousticFeatureEncoder(config, self.n_mfcc)
        self.spectrogram_encoder = AcousticFeatureEncoder(config, self.n_freq)
        self.output_dim = self.ssl.output_dim
        acoustic_dim = self.mfcc_encoder.output_dim + self.spectrogram_encoder.output_dim
        self.acoustic_projection = nn.Linear(acoustic_dim, self.output_dim)
        self.guided_attention = GuidedAttention(config, self.output_dim, self.ssl.num_heads)

    def forward(self, input_values: Optional[Tensor], audio_lengths: Tensor, mfcc: Tensor, spectrogram: Tensor,
                feature_lengths: Tensor, ssl_states: Optional[Tensor] = None) -> SpeechEncoderOutput:
        if ssl_states is None:
            if input_values is None:
                raise ValueError("SpeechEncoder needs input_values (audio) unless ssl_states are given")
            ssl_states, ssl_mask = self.ssl(input_values, audio_lengths)
        else:
            frames = self.ssl.frame_lengths(audio_lengths)
            if int(frames.max()) > ssl_states.shape[1]:
                raise ValueError(f"ssl_states hold {ssl_states.shape[1]} frames but audio_lengths need "
                                 f"{int(frames.max())}: were they computed from this audio?")
            ssl_mask = lengths_to_mask(frames, ssl_states.shape[1])
            ssl_states = ssl_states * ssl_mask.unsqueeze(-1).to(ssl_states.dtype)
        if spectrogram.shape[-1] != self.n_freq:
            raise ValueError(f"spectrogram has {spectrogram.shape[-1]} bins, the model expects {self.n_freq} "
                             f"(n_fft // 2 + 1 for a model.speech.win_ms window at {SAMPLE_RATE} Hz)")
        if mfcc.shape[-1] != self.n_mfcc:
            raise ValueError(f"mfcc has {mfcc.shape[-1]} coefficients, model.speech.n_mfcc is {self.n_mfcc}")
        mfcc_states, acoustic_lengths = self.mfcc_encoder(mfcc, feature_lengths)
        spectrogram_states, _ = self.spectrogram_encoder(spectrogram, feature_lengths)
        acoustic = self.acoustic_projection(torch.cat((mfcc_states, spectrogram_states), dim=-1))
        acoustic_mask = lengths_to_mask(acoustic_lengths, acoustic.shape[1])
        states = self.guided_attention(ssl_states, acoustic, acoustic_mask)
        return SpeechEncoderOutput(states=states * ssl_mask.unsqueeze(-1).to(states.dtype), mask=ssl_mask)
