"""Focus attention (paper §2.2, eq. (1)-(5)): a Gaussian focal bias added to crossmodal attention logits.

Reading of the paper's indices
------------------------------
The paper's indices disagree with each other: μ_i is scaled to [0, T_L] (eq. 3) yet compared with the speech
positions P_j (eq. 5), and f is T_L×T_A but added transposed to the A-query logits (eq. 6). We read it as in
You et al. 2019 (the paper's ref. [15], focus attention for summarisation), where the decoder state — the
*query* — predicts where in the *attended* sequence to look:

* each QUERY position i gets its own centre μ̃_i and scope σ̃_i over the KEY sequence it attends to;
* the "i-th step" vector fed to W_p is the query-stream state x_i (You et al.'s decoder state);
* G is the mean of the valid key states (the "complementary" summary of the attended-to sequence);
* μ̃_i, σ̃_i are scaled to that key sequence's TRUE length T_k (padding excluded), and P_j = 0..T_k-1 are the
  positions of the valid keys;
* one μ/σ per query, shared by all heads (eq. 1-2 have no head index; U_c, U_d are vectors).

This is the only reading under which every shape in eq. (1)-(6) agrees: f ∈ R^{T_q×T_k} adds to
Q K^T ∈ R^{T_q×T_k} with no transpose, and the [0, T] range of μ̃ matches the positions it is compared with.

Worked example (one query, T_k = 4 valid keys padded to 6, μ_i = σ_i = 0, σ_min = 1):
    μ̃ = 4·sigmoid(0) = 2,  σ̃ = 4·sigmoid(0) + 1 = 3,
    f_j = -(P_j - 2)² / (3²/2)  for P = 0, 1, 2, 3  ->  -0.889, -0.222, 0, -0.222;  keys 4, 5 are padding -> -inf.

Backends (Hugging Face style, looked up in ``ATTENTION_FUNCTIONS`` by ``attn_implementation``):
``"eager"`` is the plain reference the tests trust; ``"sdpa"`` (default) folds bias and padding into one float
additive mask for ``scaled_dot_product_attention``; ``"flex_attention"`` (CUDA only) computes the bias inside the
kernel from μ̃, σ̃ so no T_q×T_k tensor is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_FUNCTIONS",
    "FocalParameters",
    "FocusAttention",
    "eager_attention_forward",
    "flex_attention_forward",
    "focal_bias",
    "focal_attn_mask",
    "focal_centre_and_scope",
    "key_summary",
    "scale_to_length",
    "sdpa_attention_forward",
]


# --------------------------------------------------------------------------------------------------------------
# One equation, one function
# --------------------------------------------------------------------------------------------------------------


def key_summary(key_value_states: Tensor, key_attention_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """G of eq. (1)-(2): mean of the valid key states, and each sample's true key length T_k.

    key_value_states: (B, T_k, D); key_attention_mask: (B, T_k) bool, True = keep, or None (all valid).
    Returns G: (B, D) in the states' dtype and key_lengths: (B,) float32 (exact counts even when the states are
    bf16). A sample with no valid key gets G = 0 (its attention output is zero anyway) instead of 0/0.
    """
    batch_size, key_len, _ = key_value_states.shape
    if key_attention_mask is None:
        lengths = torch.full((batch_size,), float(key_len), device=key_value_states.device)
        return key_value_states.mean(dim=1), lengths
    lengths = key_attention_mask.sum(dim=1, dtype=torch.float32)
    # (B, 1, T_k) @ (B, T_k, D) -> (B, 1, D): the masked sum without a (B, T_k, D) temporary.
    total = torch.bmm(key_attention_mask.to(key_value_states.dtype).unsqueeze(1), key_value_states).squeeze(1)
    return total / lengths.clamp(min=1.0).to(total.dtype).unsqueeze(1), lengths


def focal_centre_and_scope(
    query_states: Tensor, key_mean: Tensor, w_p: Tensor, w_g: Tensor, u_c: Tensor, u_d: Tensor
) -> tuple[Tensor, Tensor]:
    """Eq. (1)-(2): μ_i = U_cᵀ tanh(W_p x_i + W_g G),  σ_i = U_dᵀ tanh(W_p x_i + W_g G).

    query_states x: (B, T_q, D), the query-stream state at each step i; key_mean G: (B, D);
    w_p, w_g: (D, D) shared; u_c, u_d: (D,) separate. Returns μ, σ: (B, T_q) raw (unscaled).
    """
    hidden = torch.tanh(F.linear(query_states, w_p) + F.linear(key_mean, w_g).unsqueeze(1))  # (B, T_q, D)
    # Both read-outs in one matmul: (B, T_q, D) @ (D, 2).
    centre_scope = hidden @ torch.stack((u_c, u_d), dim=1)
    return centre_scope[..., 0], centre_scope[..., 1]


def scale_to_length(values: Tensor, lengths: Tensor) -> Tensor:
    """Eq. (3)-(4): μ̃_i = T·sigmoid(μ_i), σ̃_i = T·sigmoid(σ_i), into [0, T] with T each sample's true length.

    values: (B, T_q) raw μ or σ; lengths: (B,) true (unpadded) key lengths. Returns (B, T_q).
    """
    return lengths.unsqueeze(1) * torch.sigmoid(values)


def focal_bias(mu: Tensor, sigma: Tensor, key_positions: Tensor) -> Tensor:
    """Eq. (5): f_{i,j} = -(P_j - μ̃_i)² / (σ̃_i² / 2), the Gaussian focal bias added to the logits.

    mu = μ̃: (B, T_q) scaled centres; sigma = σ̃: (B, T_q) scaled scopes (> 0);
    key_positions = P: (B, T_k) or (T_k,) absolute key positions. Returns attn_bias f: (B, T_q, T_k).
    """
    if key_positions.dim() == 1:
        key_positions = key_positions.unsqueeze(0)
    # -2/σ̃² per query first: one (B, T_q) division instead of a (B, T_q, T_k) one.
    coefficient = (-2.0 / sigma.square()).unsqueeze(-1)
    distance = key_positions.unsqueeze(1) - mu.unsqueeze(-1)
    return distance.square() * coefficient


class _FocalAttnMask(torch.autograd.Function):
    """Eq. (5) with -inf at padded keys in one pass, saving only the (B, T_q) / (B, T_k) inputs.

    Autograd through ``focal_bias`` keeps two (B, T_q, T_k) intermediates alive until backward (the distance for
    the square, the square for the product); this recomputes the distance in backward instead.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, coefficient: Tensor, key_positions: Tensor, key_keep: Optional[Tensor]) -> Tensor:
        distance = key_positions.unsqueeze(1) - mu.unsqueeze(-1)  # (B, T_q, T_k)
        attn_mask = distance.square_().mul_(coefficient.unsqueeze(-1))
        if key_keep is not None:
            attn_mask.masked_fill_(~key_keep.unsqueeze(1), float("-inf"))
        ctx.save_for_backward(mu, coefficient, key_positions, key_keep)
        return attn_mask

    @staticmethod
    def backward(ctx, grad_mask: Tensor):
        mu, coefficient, key_positions, key_keep = ctx.saved_tensors
        if key_keep is not None:
            # Padded keys hold a constant -inf: no gradient flows through them.
            grad_mask = grad_mask.masked_fill(~key_keep.unsqueeze(1), 0.0)
        distance = key_positions.unsqueeze(1) - mu.unsqueeze(-1)
        grad_times_distance = grad_mask * distance
        # f = c·d², d = P - μ:  ∂f/∂c = d²,  ∂f/∂μ = -2·c·d.
        grad_coefficient = (grad_times_distance * distance).sum(-1)
        grad_mu = -2.0 * coefficient * grad_times_distance.sum(-1)
        return grad_mu, grad_coefficient, None, None


def focal_attn_mask(mu: Tensor, sigma: Tensor, key_positions: Tensor, key_keep: Optional[Tensor]) -> Tensor:
    """Eq. (5) fused with the key padding: f_{i,j} = -(P_j - μ̃_i)² / (σ̃_i²/2), -inf where key j is padding.

    Same value and gradients as ``focal_bias(...).masked_fill(~key_keep, -inf)`` with one (B, T_q, T_k) tensor
    instead of three held for backward. mu = μ̃, sigma = σ̃: (B, T_q); key_positions: (B, T_k);
    key_keep: (B, T_k) bool or None. Returns (B, T_q, T_k).
    """
    return _FocalAttnMask.apply(mu, -2.0 / sigma.square(), key_positions, key_keep)


@dataclass
class FocalParameters:
    """Per-query focus of one FocusAttention call (eq. (1)-(4)); shared by all heads.

    mu, sigma: (B, T_q) raw eq. (1)-(2); mu_tilde: (B, T_q) eq. (3), in key positions [0, T_k];
    sigma_tilde: (B, T_q) eq. (4) plus the floor sigma_min; key_positions: (B, T_k) P_j;
    key_lengths: (B,) true key lengths T_k.
    """

    mu: Tensor
    sigma: Tensor
    mu_tilde: Tensor
    sigma_tilde: Tensor
    key_positions: Tensor
    key_lengths: Tensor


# --------------------------------------------------------------------------------------------------------------
# Backends: (query, key, value) are (B, H, T, head_dim); each returns (B, H, T_q, head_dim).
# A sample with no valid key would give a softmax over only -inf (NaN, whose backward is NaN even where the
# output is later zeroed): every backend lets such a sample attend to all its (padded) keys, then zeroes it.
# --------------------------------------------------------------------------------------------------------------


def _attendable_keys(key_attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(keep, has_keys): keep = mask, with all-padding samples unmasked; has_keys: (B,) bool."""
    has_keys = key_attention_mask.any(dim=-1)
    return key_attention_mask | ~has_keys.unsqueeze(-1), has_keys


def _zero_keyless(output: Tensor, has_keys: Optional[Tensor]) -> Tensor:
    if has_keys is None:
        return output
    return output * has_keys.view(-1, 1, 1, 1).to(output.dtype)


def _materialised_bias(focal: Optional[FocalParameters]) -> Optional[Tensor]:
    if focal is None:
        return None
    return focal_bias(focal.mu_tilde, focal.sigma_tilde, focal.key_positions)


def eager_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    focal: Optional[FocalParameters],
    key_attention_mask: Optional[Tensor],
    *,
    dropout: float,
    scale: float,
) -> Tensor:
    """Reference: softmax(Q Kᵀ·scale + f, padded keys -> -inf) V, all-padding samples -> zeros."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, T_q, T_k)
    attn_bias = _materialised_bias(focal)
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype).unsqueeze(1)
    has_keys = None
    if key_attention_mask is not None:
        keep, has_keys = _attendable_keys(key_attention_mask)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout, training=dropout > 0.0)
    return _zero_keyless(torch.matmul(weights, value), has_keys)


def sdpa_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    focal: Optional[FocalParameters],
    key_attention_mask: Optional[Tensor],
    *,
    dropout: float,
    scale: float,
) -> Tensor:
    """Fast default: ``scaled_dot_product_attention`` with bias + padding as one float additive mask.

    With focus attention the mask is f with -inf at padded keys, (B, 1, T_q, T_k) broadcast over heads; the
    memory-efficient kernel takes it with gradients (flash takes no mask). Without, padding is a (B, 1, 1, T_k)
    bool mask, and no mask at all when there is no padding, so SDPA may pick flash.
    """
    keep, has_keys = (None, None) if key_attention_mask is None else _attendable_keys(key_attention_mask)
    attn_mask = None
    if focal is not None:
        attn_mask = focal_attn_mask(focal.mu_tilde, focal.sigma_tilde, focal.key_positions, keep)
        attn_mask = attn_mask.to(query.dtype).unsqueeze(1)  # computed in float32, SDPA wants the query dtype
    elif keep is not None:
        attn_mask = keep[:, None, None, :]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
    return _zero_keyless(output, has_keys)


_compiled_flex_attention: Optional[Callable] = None


def _flex_kernel(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex_attention
    if not compiled:
        return flex_attention
    if _compiled_flex_attention is None:
        # Uncompiled flex_attention materialises the scores; compiled, it is one fused kernel.
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def _flex_focal_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    focal: Optional[FocalParameters],
    key_attention_mask: Optional[Tensor],
    *,
    scale: float,
    compiled: bool = True,
) -> Tensor:
    """flex_attention with eq. (5) and padding in ``score_mod``; device checks are the caller's."""
    has_keys = None
    keep = None
    if key_attention_mask is not None:
        keep, has_keys = _attendable_keys(key_attention_mask)
    score_mod = None
    if focal is not None:
        centre = focal.mu_tilde
        coefficient = -2.0 / focal.sigma_tilde.square()  # eq. (5)'s -1/(σ̃²/2), per (batch, query)
        positions = focal.key_positions

        if keep is None:

            def score_mod(score, b, h, q_idx, kv_idx):
                distance = positions[b, kv_idx] - centre[b, q_idx]
                return score + distance * distance * coefficient[b, q_idx]

        else:

            def score_mod(score, b, h, q_idx, kv_idx):
                distance = positions[b, kv_idx] - centre[b, q_idx]
                biased = score + distance * distance * coefficient[b, q_idx]
                return torch.where(keep[b, kv_idx], biased, -float("inf"))

    elif keep is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(keep[b, kv_idx], score, -float("inf"))

    # The Triton kernel needs head_dim >= 16 (MulT-like 40/8 gives 5): zero-pad Q, K (Q·K unchanged) and V
    # (sliced off the output) to the next power of two >= 16; the scale stays that of the true head_dim.
    head_dim = query.shape[-1]
    padded_dim = max(16, 1 << (head_dim - 1).bit_length())
    if padded_dim != head_dim:
        pad = (0, padded_dim - head_dim)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    output = _flex_kernel(compiled)(query, key, value, score_mod=score_mod, scale=scale)
    return _zero_keyless(output[..., :head_dim], has_keys)


def flex_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    focal: Optional[FocalParameters],
    key_attention_mask: Optional[Tensor],
    *,
    dropout: float,
    scale: float,
) -> Tensor:
    """Opt-in, CUDA only: the focal bias computed inside the kernel from μ̃, σ̃ (no T_q×T_k tensor)."""
    if query.device.type != "cuda":
        raise RuntimeError(
            f"attn_implementation='flex_attention' needs CUDA tensors, got {query.device.type!r}: PyTorch's "
            "flex_attention has no backward on CPU. Use attn_implementation='sdpa' (default) or 'eager'."
        )
    if dropout > 0.0:
        raise ValueError(
            f"attn_implementation='flex_attention' has no attention dropout, got dropout={dropout}; "
            "set attn_dropout=0 or use attn_implementation='sdpa'."
        )
    return _flex_focal_attention(query, key, value, focal, key_attention_mask, scale=scale)


ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "eager": eager_attention_forward,
    "sdpa": sdpa_attention_forward,
    "flex_attention": flex_attention_forward,
}


# --------------------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------------------


class FocusAttention(nn.Module):
    """Multi-head crossmodal attention with the focal bias of eq. (1)-(5) added to its logits (eq. 6).

    Queries come from ``hidden_states`` (B, T_q, D), keys and values from ``key_value_states`` (B, T_k, D).
    With ``focus_attention=True`` the module owns W_p, W_g (D×D, shared by μ and σ) and U_c, U_d (D-vectors) and
    computes one (μ̃_i, σ̃_i) per query, shared by all heads (see the module docstring for the reading of the
    paper's indices). σ̃ = T_k·sigmoid(σ) + ``sigma_min``: the floor is *added* rather than clamped so the
    Gaussian never narrows below ``sigma_min`` key positions (f would turn into a hard one-hot with vanishing
    gradients, or 0/0 at σ̃ = 0) while σ keeps its gradient everywhere.

    ``focus_attention=False`` (Table 1 model B) is the same module without the bias; the μ/σ parameters are not
    created, so nothing is left unused (DDP would reject unused parameters).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        focus_attention: bool = True,
        attn_implementation: str = "sdpa",
        sigma_min: float = 1.0,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if sigma_min <= 0.0:
            raise ValueError(f"sigma_min={sigma_min} must be > 0: σ̃ = 0 divides by zero in eq. (5)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.focus_attention = focus_attention
        self.sigma_min = sigma_min
        self.attn_implementation = attn_implementation

        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        if focus_attention:
            self.w_p = nn.Linear(embed_dim, embed_dim, bias=False)
            self.w_g = nn.Linear(embed_dim, embed_dim, bias=False)
            bound = 1.0 / math.sqrt(embed_dim)  # nn.Linear's default range for a D -> 1 projection
            self.u_c = nn.Parameter(torch.empty(embed_dim).uniform_(-bound, bound))
            self.u_d = nn.Parameter(torch.empty(embed_dim).uniform_(-bound, bound))

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        if name not in ATTENTION_FUNCTIONS:
            raise ValueError(f"attn_implementation={name!r} is not one of {sorted(ATTENTION_FUNCTIONS)}")
        self._attn_implementation = name

    def focal_parameters(
        self, hidden_states: Tensor, key_value_states: Tensor, key_attention_mask: Optional[Tensor]
    ) -> FocalParameters:
        """Eq. (1)-(4) for every query: raw and length-scaled centre and scope, plus the key positions P_j.

        μ̃, σ̃ and P are float32 whatever the states' dtype: bf16 cannot tell position 601 from 600.
        """
        key_mean, key_lengths = key_summary(key_value_states, key_attention_mask)
        mu, sigma = focal_centre_and_scope(
            hidden_states, key_mean, self.w_p.weight, self.w_g.weight, self.u_c, self.u_d
        )
        mu, sigma = mu.float(), sigma.float()
        if key_attention_mask is None:
            key_positions = torch.arange(key_value_states.shape[1], device=key_value_states.device,
                                         dtype=torch.float32).expand(key_value_states.shape[0], -1)
        else:
            # Rank among the valid keys: P_j = j under right padding, and still the true position otherwise.
            key_positions = (key_attention_mask.cumsum(dim=1) - 1).float()
        return FocalParameters(
            mu=mu,
            sigma=sigma,
            mu_tilde=scale_to_length(mu, key_lengths),
            sigma_tilde=scale_to_length(sigma, key_lengths) + self.sigma_min,
            key_positions=key_positions,
            key_lengths=key_lengths,
        )

    def forward(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        key_attention_mask: Optional[Tensor] = None,
        output_focal: bool = False,
    ) -> tuple[Tensor, Optional[FocalParameters]]:
        """hidden_states: (B, T_q, D) queries; key_value_states: (B, T_k, D); masks (B, T_q) / (B, T_k) bool,
        True = keep. Returns the output (B, T_q, D), zero at padded queries and for samples with no valid key,
        and the FocalParameters when ``output_focal`` (None without focus attention)."""
        batch_size, query_len, embed_dim = hidden_states.shape
        key_len = key_value_states.shape[1]
        if embed_dim != self.embed_dim or key_value_states.shape[::2] != (batch_size, embed_dim):
            raise ValueError(
                f"expected hidden_states (B, T_q, {self.embed_dim}) and key_value_states (B, T_k, {self.embed_dim}) "
                f"with the same B, got {tuple(hidden_states.shape)} and {tuple(key_value_states.shape)}"
            )
        for name, mask, length in (("attention_mask", attention_mask, query_len),
                                   ("key_attention_mask", key_attention_mask, key_len)):
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, length)):
                raise ValueError(f"{name} must be bool of shape {(batch_size, length)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")

        def split_heads(states: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, head_dim)
            return states.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)

        query = split_heads(self.q_proj(hidden_states))
        key = split_heads(self.k_proj(key_value_states))
        value = split_heads(self.v_proj(key_value_states))
        focal = None
        if self.focus_attention:
            focal = self.focal_parameters(hidden_states, key_value_states, key_attention_mask)

        attention = ATTENTION_FUNCTIONS[self.attn_implementation]
        output = attention(
            query, key, value, focal, key_attention_mask,
            dropout=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5,
        )
        output = self.out_proj(output.transpose(1, 2).reshape(batch_size, query_len, embed_dim))
        # Zero rows after out_proj (its bias would refill them): padded queries and samples with no valid key.
        row_keep = attention_mask
        if key_attention_mask is not None:
            has_keys = key_attention_mask.any(dim=1, keepdim=True)
            row_keep = has_keys if row_keep is None else row_keep & has_keys
        if row_keep is not None:
            output = output * row_keep.unsqueeze(-1).to(output.dtype)
        return output, (focal if output_focal else None)
