"""Focus attention (paper §2.2, eq. (1)-(5)): a Gaussian focal bias added to crossmodal attention logits.

Two readings of eq. (1)-(5), chosen by ``model.focal_reading``
------------------------------------------------------------
The paper writes, for the L→A block (queries from speech A, keys from text L): at the i-th step, i ∈ {1..T_L},
μ_i = U_cᵀ tanh(W_p K_i + W_g G) and σ_i likewise (eq. 1-2), with K_i the i-th *projected key* and G = (1/T_L) Σ K_i;
μ̃_i = T_L·sigmoid(μ_i), σ̃_i = T_L·sigmoid(σ_i) (eq. 3-4); f_{i,j} = -(P_j - μ̃_i)² / (σ̃_i²/2) with j ∈ {1..T_A}
and P_j the absolute position of the speech vector x_j^A (eq. 5); f ∈ R^{T_L×T_A} is added *transposed* to the
T_A×T_L logits (eq. 6).

* ``"as_written"`` follows that wherever it is unambiguous: each KEY i gets a centre μ̃_i and scope σ̃_i, computed
  from its projected key K_i and G, the mean of the valid projected keys; P_j = j = 1..T_q are the positions of
  the valid QUERIES; the bias of query j for key i is f_{i,j} (f transposed onto the logits). The one place the
  text contradicts itself is the range: μ̃ is scaled to [0, T_L] yet compared with the speech positions 1..T_A.
  We scale μ̃ and σ̃ to the true length of the sequence whose positions P they are compared with (the queries':
  T_A in L→A, T_L in A→L); the paper calls T_L "the length of one modality". σ̃ gets ``sigma_min`` added (the
  paper: none, ``sigma_min=0``).
* ``"per_query"`` (the model before the paper preset followed the text, kept for comparability): each QUERY i
  gets a centre and scope over the KEY positions 0..T_k-1, computed from the query-stream state x_i (the
  layer-normed input, not a projection) and G = the mean of the valid layer-normed unprojected key states, scaled
  to the key length; the bias needs no transpose. This is the localness reading of Yang et al. 2018 (a query
  predicts where to look); ``sigma_min`` = 1 position by default.

In both, one (μ, σ) per centre is shared by all heads (eq. 1-2 have no head index; U_c, U_d are vectors), and
lengths and positions count valid steps only, so padding never shifts them. σ̃ is finally clamped at
``SIGMA_EPS`` = 1e-3 positions, a numerical guard (at that width the Gaussian is already a one-position spike)
that keeps -2/σ̃² finite when ``sigma_min=0``.

Worked example (per_query: one query, T_k = 4 valid keys padded to 6, μ_i = σ_i = 0, σ_min = 1):
    μ̃ = 4·sigmoid(0) = 2,  σ̃ = 4·sigmoid(0) + 1 = 3,
    f_j = -(P_j - 2)² / (3²/2)  for P = 0, 1, 2, 3  ->  -0.889, -0.222, 0, -0.222;  keys 4, 5 are padding -> -inf.
As written: a key with μ_i = σ_i = 0 seen by T_q = 4 valid queries: μ̃ = 2, σ̃ = 2, and the queries at P = 1..4
get f = -(P - 2)² / 2 = -0.5, 0, -0.5, -2 for that key.

Backends (Hugging Face style, looked up in ``ATTENTION_FUNCTIONS`` by ``attn_implementation``):
``"eager"`` is the plain reference the tests trust; ``"sdpa"`` (default) folds bias and padding into one float
additive mask for ``scaled_dot_product_attention``; ``"flex_attention"`` (CUDA only) computes the bias inside the
kernel from μ̃, σ̃ so no T_q×T_k tensor is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ser_platform.config import ModelConfig

__all__ = [
    "ATTENTION_FUNCTIONS",
    "SIGMA_EPS",
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
    "valid_positions",
]

SIGMA_EPS = 1e-3  # σ̃ is clamped here (positions): keeps -2/σ̃² and its gradient finite when sigma_min = 0


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
    step_states: Tensor, key_mean: Tensor, w_p: Tensor, w_g: Tensor, u_c: Tensor, u_d: Tensor
) -> tuple[Tensor, Tensor]:
    """Eq. (1)-(2): μ_i = U_cᵀ tanh(W_p K_i + W_g G),  σ_i = U_dᵀ tanh(W_p K_i + W_g G).

    step_states: (B, T, D), the vector of each step i (as written: the projected keys K_i; per_query: the
    query-stream states); key_mean G: (B, D); w_p, w_g: (D, D) shared; u_c, u_d: (D,) separate.
    Returns μ, σ: (B, T) raw (unscaled).
    """
    hidden = torch.tanh(F.linear(step_states, w_p) + F.linear(key_mean, w_g).unsqueeze(1))  # (B, T, D)
    # Both read-outs in one matmul: (B, T, D) @ (D, 2).
    centre_scope = hidden @ torch.stack((u_c, u_d), dim=1)
    return centre_scope[..., 0], centre_scope[..., 1]


def scale_to_length(values: Tensor, lengths: Tensor) -> Tensor:
    """Eq. (3)-(4): μ̃_i = T·sigmoid(μ_i), σ̃_i = T·sigmoid(σ_i), into [0, T] with T each sample's true length.

    values: (B, T_c) raw μ or σ; lengths: (B,) true (unpadded) lengths. Returns (B, T_c).
    """
    return lengths.unsqueeze(1) * torch.sigmoid(values)


def valid_positions(mask: Optional[Tensor], length: int, batch_size: int, device: torch.device,
                    first: int) -> Tensor:
    """Positions P of the steps of a sequence counted over valid steps only: ``first``, first + 1, ... (B, T) float32.

    mask: (B, T) bool or None (all valid). Under right padding P_j = first + j; a padded step repeats its
    predecessor's position (its bias is masked or its row zeroed anyway).
    """
    if mask is None:
        positions = torch.arange(first, first + length, device=device, dtype=torch.float32)
        return positions.expand(batch_size, -1)
    return (mask.cumsum(dim=1) - 1 + first).float()


def focal_bias(mu: Tensor, sigma: Tensor, positions: Tensor) -> Tensor:
    """Eq. (5): f_{i,j} = -(P_j - μ̃_i)² / (σ̃_i² / 2), the Gaussian focal bias of centre i at position j.

    mu = μ̃: (B, T_c) scaled centres; sigma = σ̃: (B, T_c) scaled scopes (> 0);
    positions = P: (B, T_p) or (T_p,) absolute positions. Returns f: (B, T_c, T_p).
    """
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    # -2/σ̃² per centre first: one (B, T_c) division instead of a (B, T_c, T_p) one.
    coefficient = (-2.0 / sigma.square()).unsqueeze(-1)
    distance = positions.unsqueeze(1) - mu.unsqueeze(-1)
    return distance.square() * coefficient


def _centre_axes(per_key: bool) -> tuple[int, int]:
    """(axis of the centres, axis of the positions) in a (B, T_q, T_k) logit tensor."""
    return (2, 1) if per_key else (1, 2)


class _FocalAttnMask(torch.autograd.Function):
    """Eq. (5) laid out on the (B, T_q, T_k) logits, -inf at padded keys, in one pass saving only the (B, T)
    inputs. Autograd through ``focal_bias`` keeps two (B, T_q, T_k) intermediates alive until backward (the
    distance for the square, the square for the product); this recomputes the distance in backward instead.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, coefficient: Tensor, positions: Tensor, key_keep: Optional[Tensor],
                per_key: bool) -> Tensor:
        centre_axis, position_axis = _centre_axes(per_key)
        distance = positions.unsqueeze(centre_axis) - mu.unsqueeze(position_axis)  # (B, T_q, T_k)
        attn_mask = distance.square_().mul_(coefficient.unsqueeze(position_axis))
        if key_keep is not None:
            attn_mask.masked_fill_(~key_keep.unsqueeze(1), float("-inf"))
        ctx.save_for_backward(mu, coefficient, positions, key_keep)
        ctx.per_key = per_key
        return attn_mask

    @staticmethod
    def backward(ctx, grad_mask: Tensor):
        mu, coefficient, positions, key_keep = ctx.saved_tensors
        centre_axis, position_axis = _centre_axes(ctx.per_key)
        if key_keep is not None:
            # Padded keys hold a constant -inf: no gradient flows through them.
            grad_mask = grad_mask.masked_fill(~key_keep.unsqueeze(1), 0.0)
        distance = positions.unsqueeze(centre_axis) - mu.unsqueeze(position_axis)
        grad_times_distance = grad_mask * distance
        # f = c·d², d = P - μ:  ∂f/∂c = d²,  ∂f/∂μ = -2·c·d; each centre sums over the positions it meets.
        grad_coefficient = (grad_times_distance * distance).sum(position_axis)
        grad_mu = -2.0 * coefficient * grad_times_distance.sum(position_axis)
        return grad_mu, grad_coefficient, None, None, None


def focal_attn_mask(mu: Tensor, sigma: Tensor, positions: Tensor, key_keep: Optional[Tensor],
                    per_key: bool = False) -> Tensor:
    """Eq. (5) as the float mask of the (B, T_q, T_k) logits, -inf where key k is padding.

    per_key=False: centres per query, mu = μ̃, sigma = σ̃: (B, T_q), positions of the keys (B, T_k): the mask is
    f. per_key=True (as written): centres per key (B, T_k), positions of the queries (B, T_q): the mask is fᵀ.
    Same value and gradients as ``focal_bias`` (transposed when per_key) then ``masked_fill(~key_keep, -inf)``,
    with one (B, T_q, T_k) tensor instead of three held for backward. key_keep: (B, T_k) bool or None.
    """
    return _FocalAttnMask.apply(mu, -2.0 / sigma.square(), positions, key_keep, per_key)


@dataclass
class FocalParameters:
    """The focus of one FocusAttention call (eq. (1)-(4)), shared by all heads.

    mu, sigma: (B, T_c) raw eq. (1)-(2), one per centre; mu_tilde: (B, T_c) eq. (3), in [0, T];
    sigma_tilde: (B, T_c) eq. (4) plus ``sigma_min``; positions: (B, T_p) P_j; lengths: (B,) the true lengths T
    that scale μ̃, σ̃. per_key=False: the centres are the queries and P the key positions (0, 1, ...);
    per_key=True (as written): the centres are the keys and P the query positions (1, 2, ...).
    """

    mu: Tensor
    sigma: Tensor
    mu_tilde: Tensor
    sigma_tilde: Tensor
    positions: Tensor
    lengths: Tensor
    per_key: bool = False

    def attn_bias(self) -> Tensor:
        """The bias on the (B, T_q, T_k) logits: f, or fᵀ when the centres are the keys (eq. 6's f^T)."""
        bias = focal_bias(self.mu_tilde, self.sigma_tilde, self.positions)
        return bias.transpose(1, 2) if self.per_key else bias


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


def eager_attention_forward(query: Tensor, key: Tensor, value: Tensor, focal: Optional[FocalParameters],
                            key_attention_mask: Optional[Tensor], *, dropout: float, scale: float) -> Tensor:
    """Reference: softmax(Q Kᵀ·scale + f, padded keys -> -inf) V, all-padding samples -> zeros."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, T_q, T_k)
    if focal is not None:
        scores = scores + focal.attn_bias().to(scores.dtype).unsqueeze(1)
    has_keys = None
    if key_attention_mask is not None:
        keep, has_keys = _attendable_keys(key_attention_mask)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout, training=dropout > 0.0)
    return _zero_keyless(torch.matmul(weights, value), has_keys)


def sdpa_attention_forward(query: Tensor, key: Tensor, value: Tensor, focal: Optional[FocalParameters],
                           key_attention_mask: Optional[Tensor], *, dropout: float, scale: float) -> Tensor:
    """Fast default: ``scaled_dot_product_attention`` with bias + padding as one float additive mask.

    With focus attention the mask is the bias with -inf at padded keys, (B, 1, T_q, T_k) broadcast over heads; the
    memory-efficient kernel takes it with gradients (flash takes no mask). Without, padding is a (B, 1, 1, T_k)
    bool mask, and no mask at all when there is no padding, so SDPA may pick flash.
    """
    keep, has_keys = (None, None) if key_attention_mask is None else _attendable_keys(key_attention_mask)
    attn_mask = None
    if focal is not None:
        attn_mask = focal_attn_mask(focal.mu_tilde, focal.sigma_tilde, focal.positions, keep, focal.per_key)
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


def _flex_score_mod(focal: Optional[FocalParameters], keep: Optional[Tensor]) -> Optional[Callable]:
    """flex_attention's ``score_mod``: eq. (5) (per query or, as written, per key) and the key padding."""
    if focal is None:
        if keep is None:
            return None
        return lambda score, b, h, q_idx, kv_idx: torch.where(keep[b, kv_idx], score, -float("inf"))
    centre = focal.mu_tilde
    coefficient = -2.0 / focal.sigma_tilde.square()  # eq. (5)'s -1/(σ̃²/2), per (batch, centre)
    positions = focal.positions

    if focal.per_key:
        def biased(score, b, q_idx, kv_idx):
            distance = positions[b, q_idx] - centre[b, kv_idx]
            return score + distance * distance * coefficient[b, kv_idx]
    else:
        def biased(score, b, q_idx, kv_idx):
            distance = positions[b, kv_idx] - centre[b, q_idx]
            return score + distance * distance * coefficient[b, q_idx]

    if keep is None:
        return lambda score, b, h, q_idx, kv_idx: biased(score, b, q_idx, kv_idx)
    return lambda score, b, h, q_idx, kv_idx: torch.where(keep[b, kv_idx], biased(score, b, q_idx, kv_idx),
                                                          -float("inf"))


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
    score_mod = _flex_score_mod(focal, keep)
    # The Triton kernel needs head_dim >= 16 (MulT's 30/5 gives 6): zero-pad Q, K (Q·K unchanged) and V (sliced
    # off the output) to the next power of two >= 16; the scale stays that of the true head_dim.
    head_dim = query.shape[-1]
    padded_dim = max(16, 1 << (head_dim - 1).bit_length())
    if padded_dim != head_dim:
        pad = (0, padded_dim - head_dim)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    output = _flex_kernel(compiled)(query, key, value, score_mod=score_mod, scale=scale)
    return _zero_keyless(output[..., :head_dim], has_keys)


def flex_attention_forward(query: Tensor, key: Tensor, value: Tensor, focal: Optional[FocalParameters],
                           key_attention_mask: Optional[Tensor], *, dropout: float, scale: float) -> Tensor:
    """Opt-in, CUDA only: the focal bias computed inside the kernel from μ̃, σ̃ (no T_q×T_k tensor)."""
    if query.device.type != "cuda":
        raise RuntimeError(
            f"attn_implementation='flex_attention' needs CUDA tensors, got {query.device.type!r}: PyTorch's "
            "flex_attention has no backward on CPU. Use attn_implementation='sdpa' (default) or 'eager'."
        )
    if dropout > 0.0:
        raise ValueError(
            f"attn_implementation='flex_attention' has no attention dropout, got dropout={dropout}; "
            "set model.attn_dropout=0 or use attn_implementation='sdpa'."
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

    Built from ``config`` (a ``ModelConfig``): ``embed_dim``, ``num_heads``, ``attn_dropout``,
    ``focus_attention``, ``focal_reading``, ``sigma_min``, ``attn_implementation``. Queries come from
    ``hidden_states`` (B, T_q, D), keys and values from ``key_value_states`` (B, T_k, D). With focus attention the
    module owns W_p, W_g (D×D, shared by μ and σ) and U_c, U_d (D-vectors) and computes one (μ̃, σ̃) per centre
    (per key as written, per query in the per_query reading: see the module docstring). σ̃ = T·sigmoid(σ) +
    ``sigma_min``: a positive floor is *added* rather than clamped so σ keeps its gradient everywhere.

    Without focus attention (``config.focus_attention=False``: Table 1 model B; or ``focal=False``: the plain
    self-attention layers after the crossmodal blocks) the μ/σ parameters are not created, so nothing is left
    unused (DDP would reject unused parameters).
    """

    def __init__(self, config: "ModelConfig", *, focal: bool = True) -> None:
        super().__init__()
        embed_dim, num_heads = config.embed_dim, config.num_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"model.embed_dim={embed_dim} must be a positive multiple of model.num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = config.attn_dropout
        self.focus_attention = focal and config.focus_attention
        self.per_key = config.focal_reading == "as_written"
        self.sigma_min = config.sigma_min
        self.attn_implementation = config.attn_implementation

        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        if self.focus_attention:
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

    def focal_parameters(self, hidden_states: Tensor, key_value_states: Tensor,
                         attention_mask: Optional[Tensor] = None, key_attention_mask: Optional[Tensor] = None,
                         keys: Optional[Tensor] = None) -> FocalParameters:
        """Eq. (1)-(4) for every centre: raw and length-scaled centre and scope, plus the positions P_j.

        ``keys``: the projected keys K = k_proj(key_value_states), (B, T_k, D), if already computed (as written,
        eq. 1-2 read them). μ̃, σ̃ and P are float32 whatever the states' dtype: bf16 cannot tell position 601
        from 600.
        """
        batch_size, device = hidden_states.shape[0], hidden_states.device
        if self.per_key:  # as written: steps i = the keys K_i, G their valid mean, positions of the queries
            keys = self.k_proj(key_value_states) if keys is None else keys
            key_mean, _ = key_summary(keys, key_attention_mask)
            step_states, lengths_from = keys, attention_mask
            other_len, first = hidden_states.shape[1], 1
        else:  # per query: steps i = the query-stream states, G the mean of the key-stream states
            key_mean, _ = key_summary(key_value_states, key_attention_mask)
            step_states, lengths_from = hidden_states, key_attention_mask
            other_len, first = key_value_states.shape[1], 0
        mu, sigma = focal_centre_and_scope(step_states, key_mean, self.w_p.weight, self.w_g.weight,
                                           self.u_c, self.u_d)
        mu, sigma = mu.float(), sigma.float()
        if lengths_from is None:
            lengths = torch.full((batch_size,), float(other_len), device=device)
        else:
            lengths = lengths_from.sum(dim=1, dtype=torch.float32)
        sigma_tilde = (scale_to_length(sigma, lengths) + self.sigma_min).clamp(min=SIGMA_EPS)
        return FocalParameters(
            mu=mu, sigma=sigma, mu_tilde=scale_to_length(mu, lengths), sigma_tilde=sigma_tilde,
            positions=valid_positions(lengths_from, other_len, batch_size, device, first),
            lengths=lengths, per_key=self.per_key,
        )

    def forward(self, hidden_states: Tensor, key_value_states: Tensor, attention_mask: Optional[Tensor] = None,
                key_attention_mask: Optional[Tensor] = None,
                output_focal: bool = False) -> tuple[Tensor, Optional[FocalParameters]]:
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

        keys = self.k_proj(key_value_states)
        focal = None
        if self.focus_attention:
            focal = self.focal_parameters(hidden_states, key_value_states, attention_mask, key_attention_mask, keys)

        attention = ATTENTION_FUNCTIONS[self.attn_implementation]
        output = attention(
            split_heads(self.q_proj(hidden_states)), split_heads(keys), split_heads(self.v_proj(key_value_states)),
            focal, key_attention_mask, dropout=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5,
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
