"""MulT-style crossmodal transformer with focus attention (paper §2.2, eq. (6)), both directions.

L→A (``audio_from_text``): queries from speech A, keys/values from text L, one output per speech frame.
A→L (``text_from_audio``): queries from text L, keys/values from speech A, one output per token.

Structure follows MulT (Tsai et al. 2019, ``modules/transformer.py``): pre-LayerNorm, crossmodal multi-head
attention, residual, position-wise ReLU FFN (4×width), residual, final LayerNorm; keys/values in every layer are
the embedded source modality (not updated across layers). Unlike MulT, tensors are batch-first and both streams
carry bool padding masks (True = keep) throughout, and the query and key/value streams get separate pre-norms
(they are different modalities; MulT shares one LayerNorm between them).

``model.self_attention_layers > 0`` adds MulT's self-attention transformer after each direction (``src/models.py``:
``trans_l_mem`` ...): the direction's output re-embedded (√D scale + positions + embed dropout, as MulT's encoder
does with its input), then that many plain self-attention layers (no focal bias) and a final LayerNorm. MulT
gives it max(layers, 3) layers over the concatenation of a modality's two crossmodal outputs; with two
modalities there is one output per direction, and the layer count is the config's. The paper names no such
stage (its Table 3 concatenates the crossmodal outputs directly), so the paper preset has none.

Every module takes the ``ModelConfig`` (sizes, dropouts, focus attention settings): one set of defaults, in
``config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_platform.config import ModelConfig
from ser_platform.models.focus_attention import FocusAttention

__all__ = [
    "CrossmodalBlock",
    "CrossmodalFusion",
    "CrossmodalOutput",
    "CrossmodalTransformer",
    "sinusoidal_positional_embedding",
]


def sinusoidal_positional_embedding(positions: Tensor, embed_dim: int) -> Tensor:
    """PE of eq. (6): fairseq/MulT sinusoids, sin on the first half of the channels, cos on the second.

    positions: (B, T) float positions; returns (B, T, embed_dim) (an odd last channel is zero, as in MulT).
    The callers count positions from 0; MulT (fairseq's ``make_positions``) counts from 1: a fixed phase shift
    of every sinusoid, which we keep (changing it would change every recorded result for no modelling gain).
    """
    half = embed_dim // 2
    if half == 0:
        return positions.new_zeros(*positions.shape, embed_dim)
    # MulT's frequencies: exp(-k·log(10000)/(half-1)), k = 0..half-1.
    step = math.log(10000.0) / max(half - 1, 1)
    frequencies = torch.exp(torch.arange(half, device=positions.device, dtype=positions.dtype) * -step)
    angles = positions.unsqueeze(-1) * frequencies  # (B, T, half)
    embedding = torch.cat((angles.sin(), angles.cos()), dim=-1)
    if embed_dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class CrossmodalBlock(nn.Module):
    """One MulT layer: x + Attn(LN(x), LN'(y)), then x + FFN(LN(x)).

    ``self_attention=True``: the keys/values are the normed queries themselves (MulT's self-attention layer: one
    LayerNorm, no focal bias), and ``key_value_states`` is ignored.
    """

    def __init__(self, config: ModelConfig, *, self_attention: bool = False) -> None:
        super().__init__()
        embed_dim = config.embed_dim
        self.self_attention = self_attention
        self.query_norm = nn.LayerNorm(embed_dim)
        self.key_value_norm = None if self_attention else nn.LayerNorm(embed_dim)
        self.attention = FocusAttention(config, focal=not self_attention)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)
        self.relu_dropout = config.relu_dropout
        self.res_dropout = config.res_dropout

    def forward(self, hidden_states: Tensor, key_value_states: Optional[Tensor], attention_mask: Optional[Tensor],
                key_attention_mask: Optional[Tensor]) -> Tensor:
        queries = self.query_norm(hidden_states)
        if self.key_value_norm is None:
            keys, key_attention_mask = queries, attention_mask
        else:
            keys = self.key_value_norm(key_value_states)
        attended, _ = self.attention(queries, keys, attention_mask, key_attention_mask)
        hidden_states = hidden_states + F.dropout(attended, self.res_dropout, self.training)
        feed_forward = F.dropout(F.relu(self.fc1(self.ffn_norm(hidden_states))), self.relu_dropout, self.training)
        return hidden_states + F.dropout(self.fc2(feed_forward), self.res_dropout, self.training)


class CrossmodalTransformer(nn.Module):
    """One direction: ``config.num_layers`` crossmodal blocks + final LayerNorm (or, with ``self_attention``,
    ``config.self_attention_layers`` self-attention blocks + final LayerNorm).

    hidden_states: (B, T_q, D) embedded target modality (queries); key_value_states: (B, T_k, D) embedded source
    modality (None for self-attention); masks bool (B, T_q) / (B, T_k), True = keep. Returns (B, T_q, D), zero
    at padded queries.
    """

    def __init__(self, config: ModelConfig, *, self_attention: bool = False) -> None:
        super().__init__()
        num_layers = config.self_attention_layers if self_attention else config.num_layers
        if num_layers < 1:
            raise ValueError(f"{'model.self_attention_layers' if self_attention else 'model.num_layers'}="
                             f"{num_layers}: a transformer needs >= 1 layer")
        self.layers = nn.ModuleList(CrossmodalBlock(config, self_attention=self_attention) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(config.embed_dim)

    def forward(self, hidden_states: Tensor, key_value_states: Optional[Tensor], attention_mask: Optional[Tensor],
                key_attention_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, key_value_states, attention_mask, key_attention_mask)
        hidden_states = self.final_norm(hidden_states)
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return hidden_states


@dataclass
class CrossmodalOutput:
    """Both directions of the crossmodal fusion, zero at padded positions."""

    audio_from_text: Tensor  # (B, T_A, D): L→A, speech queries enriched by text
    text_from_audio: Tensor  # (B, T_L, D): A→L, text queries enriched by speech


class CrossmodalFusion(nn.Module):
    """Eq. (6) front end + both crossmodal directions (+ MulT's self-attention after each, if configured).

    ``CrossmodalFusion(config, text_dim, speech_dim)``: ``config`` a ``ModelConfig``; text_dim, speech_dim the
    widths of the two embedding networks' states. Z = √D · Conv1D(X) + PE(positions) per modality (MulT scales
    the projected input by √D before adding the sinusoids), then embed dropout on each stream as it enters each
    direction, as MulT does. text_states: (B, T_L, text_dim), text_mask (B, T_L); speech_states: (B, T_A,
    speech_dim), speech_mask (B, T_A); masks bool, True = keep (None = all valid). Positions count valid steps
    only, so padding never shifts them.
    """

    def __init__(self, config: ModelConfig, text_dim: int, speech_dim: int) -> None:
        super().__init__()
        self.embed_dim = config.embed_dim
        self.embed_dropout = config.embed_dropout
        # Conv1D with kernel 1 is a per-step linear map; kept as Conv1d to mirror MulT and eq. (6).
        self.text_projection = nn.Conv1d(text_dim, config.embed_dim, kernel_size=1, bias=False)
        self.speech_projection = nn.Conv1d(speech_dim, config.embed_dim, kernel_size=1, bias=False)
        self.audio_from_text = CrossmodalTransformer(config)
        self.text_from_audio = CrossmodalTransformer(config)
        self.audio_self_attention = self.text_self_attention = None
        if config.self_attention_layers > 0:
            self.audio_self_attention = CrossmodalTransformer(config, self_attention=True)
            self.text_self_attention = CrossmodalTransformer(config, self_attention=True)

    def embed(self, states: Tensor, mask: Optional[Tensor], projection: Optional[nn.Conv1d]) -> Tensor:
        """Eq. (6): Z = √D·Conv1D(X) + PE(T), zero at padded steps. (B, T, C) -> (B, T, D).

        ``projection=None``: X is already D-wide (the self-attention stage re-embeds a direction's output)."""
        projected = states if projection is None else projection(states.transpose(1, 2)).transpose(1, 2)
        if mask is None:
            positions = torch.arange(states.shape[1], device=states.device, dtype=projected.dtype)
            positions = positions.expand(states.shape[0], -1)
        else:
            positions = (mask.cumsum(dim=1) - 1).to(projected.dtype)
        embedded = math.sqrt(self.embed_dim) * projected + sinusoidal_positional_embedding(positions, self.embed_dim)
        if mask is not None:
            embedded = embedded * mask.unsqueeze(-1).to(embedded.dtype)
        return embedded

    def forward(
        self, text_states: Tensor, text_mask: Optional[Tensor], speech_states: Tensor, speech_mask: Optional[Tensor]
    ) -> CrossmodalOutput:
        if text_states.shape[0] != speech_states.shape[0]:
            raise ValueError(f"text and speech batch sizes differ: {text_states.shape[0]} vs {speech_states.shape[0]}")
        text = self.embed(text_states, text_mask, self.text_projection)
        speech = self.embed(speech_states, speech_mask, self.speech_projection)

        audio_from_text = self.audio_from_text(self.dropped(speech), self.dropped(text), speech_mask, text_mask)
        text_from_audio = self.text_from_audio(self.dropped(text), self.dropped(speech), text_mask, speech_mask)
        if self.audio_self_attention is not None:
            audio_from_text = self.self_attend(self.audio_self_attention, audio_from_text, speech_mask)
            text_from_audio = self.self_attend(self.text_self_attention, text_from_audio, text_mask)
        return CrossmodalOutput(audio_from_text=audio_from_text, text_from_audio=text_from_audio)

    def dropped(self, states: Tensor) -> Tensor:
        """MulT's embed dropout, drawn anew for each use of a stream."""
        return F.dropout(states, self.embed_dropout, self.training)

    def self_attend(self, stage: "CrossmodalTransformer", states: Tensor, mask: Optional[Tensor]) -> Tensor:
        """MulT's self-attention stage over one direction's output: re-embedded, dropped, then self-attention."""
        return stage(self.dropped(self.embed(states, mask, None)), None, mask, None)
