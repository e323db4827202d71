"""MulT-style crossmodal transformer with focus attention (paper §2.2, eq. (6)), both directions.

L→A (``audio_from_text``): queries from speech A, keys/values from text L, one output per speech frame.
A→L (``text_from_audio``): queries from text L, keys/values from speech A, one output per token.

Structure follows MulT (Tsai et al. 2019, ``modules/transformer.py``): pre-LayerNorm, crossmodal multi-head
attention, residual, position-wise ReLU FFN (4×width), residual, final LayerNorm; keys/values in every layer are
the embedded source modality (not updated across layers). Unlike MulT, tensors are batch-first and both streams
carry bool padding masks (True = keep) throughout, and the query and key/value streams get separate pre-norms
(they are different modalities; MulT shares one LayerNorm between them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """One MulT crossmodal layer: x + Attn(LN(x), LN'(y)), then x + FFN(LN(x))."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        attn_dropout: float,
        relu_dropout: float,
        res_dropout: float,
        focus_attention: bool,
        attn_implementation: str,
        sigma_min: float,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(embed_dim)
        self.key_value_norm = nn.LayerNorm(embed_dim)
        self.attention = FocusAttention(
            embed_dim, num_heads, dropout=attn_dropout, focus_attention=focus_attention,
            attn_implementation=attn_implementation, sigma_min=sigma_min,
        )
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout

    def forward(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor,
        attention_mask: Optional[Tensor],
        key_attention_mask: Optional[Tensor],
    ) -> Tensor:
        attended, _ = self.attention(
            self.query_norm(hidden_states), self.key_value_norm(key_value_states),
            attention_mask, key_attention_mask,
        )
        hidden_states = hidden_states + F.dropout(attended, self.res_dropout, self.training)
        feed_forward = F.dropout(F.relu(self.fc1(self.ffn_norm(hidden_states))), self.relu_dropout, self.training)
        return hidden_states + F.dropout(self.fc2(feed_forward), self.res_dropout, self.training)


class CrossmodalTransformer(nn.Module):
    """One direction: ``num_layers`` crossmodal blocks + final LayerNorm.

    hidden_states: (B, T_q, D) embedded target modality (queries); key_value_states: (B, T_k, D) embedded source
    modality; masks bool (B, T_q) / (B, T_k), True = keep. Returns (B, T_q, D), zero at padded queries.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        *,
        attn_dropout: float = 0.1,
        relu_dropout: float = 0.1,
        res_dropout: float = 0.1,
        focus_attention: bool = True,
        attn_implementation: str = "sdpa",
        sigma_min: float = 1.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        self.layers = nn.ModuleList(
            CrossmodalBlock(
                embed_dim, num_heads, attn_dropout=attn_dropout, relu_dropout=relu_dropout,
                res_dropout=res_dropout, focus_attention=focus_attention,
                attn_implementation=attn_implementation, sigma_min=sigma_min,
            )
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor,
        attention_mask: Optional[Tensor],
        key_attention_mask: Optional[Tensor],
    ) -> Tensor:
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
    """Eq. (6) front end + both crossmodal directions.

    Z = √D · Conv1D(X) + PE(positions) per modality (MulT scales the projected input by √D before adding the
    sinusoids), then embed dropout on each stream as it enters each direction, as MulT does.
    text_states: (B, T_L, text_dim), text_mask (B, T_L); speech_states: (B, T_A, speech_dim), speech_mask
    (B, T_A); masks bool, True = keep (None = all valid). Positions count valid steps only, so padding never
    shifts them.
    """

    def __init__(
        self,
        text_dim: int,
        speech_dim: int,
        embed_dim: int = 40,
        num_heads: int = 8,
        num_layers: int = 4,
        *,
        attn_dropout: float = 0.1,
        relu_dropout: float = 0.1,
        res_dropout: float = 0.1,
        embed_dropout: float = 0.25,
        focus_attention: bool = True,
        attn_implementation: str = "sdpa",
        sigma_min: float = 1.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.embed_dropout = embed_dropout
        # Conv1D with kernel 1 is a per-step linear map; kept as Conv1d to mirror MulT and eq. (6).
        self.text_projection = nn.Conv1d(text_dim, embed_dim, kernel_size=1, bias=False)
        self.speech_projection = nn.Conv1d(speech_dim, embed_dim, kernel_size=1, bias=False)
        settings = dict(
            attn_dropout=attn_dropout, relu_dropout=relu_dropout, res_dropout=res_dropout,
            focus_attention=focus_attention, attn_implementation=attn_implementation, sigma_min=sigma_min,
        )
        self.audio_from_text = CrossmodalTransformer(embed_dim, num_heads, num_layers, **settings)
        self.text_from_audio = CrossmodalTransformer(embed_dim, num_heads, num_layers, **settings)

    def embed(self, states: Tensor, mask: Optional[Tensor], projection: nn.Conv1d) -> Tensor:
        """Eq. (6): Z = √D·Conv1D(X) + PE(T), zero at padded steps. (B, T, C) -> (B, T, D)."""
        projected = projection(states.transpose(1, 2)).transpose(1, 2)  # Conv1d wants (B, C, T)
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

        def dropped(states: Tensor) -> Tensor:
            return F.dropout(states, self.embed_dropout, self.training)

        return CrossmodalOutput(
            audio_from_text=self.audio_from_text(dropped(speech), dropped(text), speech_mask, text_mask),
            text_from_audio=self.text_from_audio(dropped(text), dropped(speech), text_mask, speech_mask),
        )
