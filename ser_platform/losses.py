"""Joint loss (paper §2.3, eq. (7)-(10)): L = α·L_metric + β·L_ce, the triplet term on a chosen embedding space.

Eq. (8) with the hinge of eq. (7): L_metric = (1/N) Σ_{(a,p,n) ∈ Γ} max(0, ‖F(a)-F(p)‖² - ‖F(a)-F(n)‖² + M),
Γ = every valid triplet of the batch (anchor and positive share a label, the negative does not, a ≠ p), N = |Γ|.
pytorch-metric-learning's ``TripletMarginLoss`` computes exactly that once it is told to; its defaults are not
eq. (8) (margin 0.05, L2-*normalised*, *non-squared* distance, mean over the *non-zero* triplets only), so every
piece is set explicitly: ``LpDistance(normalize_embeddings=False, p=2, power=2)``, ``MeanReducer()`` (mean over
all N triplets, zeros included), ``triplets_per_anchor="all"``, no swap, no smoothing.

``loss.miner="semihard"`` / ``"hard"`` replaces Γ by the triplets ``TripletMarginMiner`` selects (same distance
and margin); the mean is then over the mined triplets. A batch with no valid triplet (one class, or every class
a singleton) gives a metric term of exactly 0 — never NaN — and the cross-entropy still drives the gradient.
α = 0 (Table 1 model C) skips the triplet term entirely: L = β·L_ce.

Triplets need at least two utterances of a class and one of another in a batch: ``class_balanced_sampler``
(PML's ``MPerClassSampler``) draws such batches for in-process loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Sampler

from ser_platform.config import LossConfig

if TYPE_CHECKING:
    from ser_platform.models.ser_model import SEROutput

__all__ = [
    "JointLoss",
    "LossOutput",
    "class_balanced_sampler",
    "cross_entropy_loss",
    "joint_loss",
    "select_embedding",
    "triplet_distance",
    "triplet_metric_loss",
    "triplet_miner",
]


def triplet_distance():
    """D of eq. (8): squared Euclidean distance between the *unnormalised* embeddings."""
    from pytorch_metric_learning.distances import LpDistance

    return LpDistance(normalize_embeddings=False, p=2, power=2)


def triplet_metric_loss(margin: float):
    """Eq. (8): PML ``TripletMarginLoss`` as the paper defines it (hinge at M, squared L2, mean over all triplets)."""
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.reducers import MeanReducer

    return TripletMarginLoss(margin=margin, swap=False, smooth_loss=False, triplets_per_anchor="all",
                             distance=triplet_distance(), reducer=MeanReducer())


def triplet_miner(miner: str, margin: float):
    """None for "all" (Γ = every valid triplet), else a ``TripletMarginMiner`` of that type on eq. (8)'s distance."""
    if miner == "all":
        return None
    from pytorch_metric_learning.miners import TripletMarginMiner

    return TripletMarginMiner(margin=margin, type_of_triplets=miner, distance=triplet_distance())


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. (10): L_ce = -Σ_k ŷ_k log y_k with y = softmax(logits), averaged over the batch."""
    return F.cross_entropy(logits, labels)


def joint_loss(metric: Optional[Tensor], ce: Tensor, alpha: float, beta: float) -> Tensor:
    """Eq. (9): L = α·L_metric + β·L_ce; ``metric=None`` (α = 0) gives β·L_ce exactly."""
    if metric is None:
        return beta * ce
    return alpha * metric + beta * ce


def select_embedding(output: "SEROutput", space: str) -> Tensor:
    """The embedding the metric loss sees (Table 3): "fused" F(x), "speech" X_A or "text" X_L, pooled."""
    spaces = {"fused": output.embedding, "speech": output.speech_embedding, "text": output.text_embedding}
    if space not in spaces:
        raise ValueError(f"loss.space={space!r}: expected one of {sorted(spaces)}")
    if spaces[space] is None:  # a single-modality baseline (model.fusion); Config rejects the pair up front
        raise ValueError(f"loss.space={space!r}: this model has no {space} embedding (model.fusion)")
    return spaces[space]


@dataclass
class LossOutput:
    loss: Tensor  # eq. (9), what backward() is called on
    metric: Tensor  # eq. (8), detached; 0 when α = 0 (not computed) or when the batch has no valid triplet
    ce: Tensor  # eq. (10), detached


class JointLoss(nn.Module):
    """``forward(output: SEROutput, labels (B,) long) -> LossOutput`` for ``config.loss`` (eq. (7)-(10))."""

    def __init__(self, loss_config: LossConfig) -> None:
        super().__init__()
        self.config = loss_config
        self.metric_loss = triplet_metric_loss(loss_config.margin) if loss_config.alpha > 0 else None
        self.miner = triplet_miner(loss_config.miner, loss_config.margin) if loss_config.alpha > 0 else None

    def metric(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Eq. (8) on (B, E) embeddings; 0 (with a graph to the embeddings) when there is no valid triplet."""
        # The triplet term is computed in fp32: squared distances overflow / lose precision in bf16.
        embeddings = embeddings.float()
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.metric_loss(embeddings, labels, indices)

    def forward(self, output: "SEROutput", labels: Tensor) -> LossOutput:
        ce = cross_entropy_loss(output.logits, labels)
        metric = None
        if self.metric_loss is not None:
            metric = self.metric(select_embedding(output, self.config.space), labels)
        loss = joint_loss(metric, ce, self.config.alpha, self.config.beta)
        zero = torch.zeros((), device=ce.device, dtype=ce.dtype)
        return LossOutput(loss=loss, metric=(zero if metric is None else metric.detach()), ce=ce.detach())


class _SeededMPerClassSampler(Sampler[int]):
    """PML's ``MPerClassSampler`` drawing from its own ``numpy`` generator instead of PML's global one, so a
    seed gives the same sequence of batches whatever else uses PML in the process; each ``iter()`` (epoch)
    continues the generator, giving a new order per epoch."""

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, length: int, seed: int) -> None:
        from pytorch_metric_learning.samplers import MPerClassSampler

        self._sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, length_before_new_iter=length)
        self._random = np.random.RandomState(seed)

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self):
        from pytorch_metric_learning.utils import common_functions

        # MPerClassSampler draws through the module-level NUMPY_RANDOM; its __iter__ builds the whole index
        # list eagerly, so swapping the generator in for that one call is enough.
        saved = common_functions.NUMPY_RANDOM
        common_functions.NUMPY_RANDOM = self._random
        try:
            indices = list(iter(self._sampler))
        finally:
            common_functions.NUMPY_RANDOM = saved
        return iter(int(index) for index in indices)


def class_balanced_sampler(labels: Sequence[int], samples_per_class: int, batch_size: int, seed: int = 0):
    """A ``torch`` Sampler of class-balanced batches, PML's ``MPerClassSampler``, so that triplets exist.

    Every consecutive ``batch_size`` indices hold ``batch_size // samples_per_class`` distinct classes, each
    with ``samples_per_class`` utterances (drawn without replacement within a class while it has enough, with
    replacement otherwise). One pass yields ``len(labels)`` indices rounded down to whole batches (PML's default
    would be 100,000); use it with ``DataLoader(..., sampler=s, batch_size=batch_size, drop_last=False)``.
    Requirements (PML's): ``batch_size`` divisible by ``samples_per_class``, and ``samples_per_class`` × number of
    classes ≥ ``batch_size`` — with IEMOCAP's 4 classes and batches of 32 that means 8 per class.
    """
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"class_balanced_sampler: labels must be a non-empty 1-d sequence, got shape {array.shape}")
    classes = int(np.unique(array).size)
    if samples_per_class < 2:
        raise ValueError(f"train.samples_per_class={samples_per_class}: need >= 2 utterances of a class per batch "
                         "for a triplet to exist")
    if batch_size % samples_per_class:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of "
                         f"train.samples_per_class={samples_per_class}")
    if samples_per_class * classes < batch_size:
        fitting = next(m for m in range(-(-batch_size // classes), batch_size + 1) if batch_size % m == 0)
        raise ValueError(
            f"train.samples_per_class={samples_per_class} x {classes} classes = {samples_per_class * classes} "
            f"< train.batch_size={batch_size}: set train.samples_per_class={fitting} "
            f"(or a smaller batch)")
    if array.size < batch_size:
        raise ValueError(f"class_balanced_sampler: {array.size} labels cannot fill one batch of {batch_size}")
    return _SeededMPerClassSampler(array, samples_per_class, batch_size, int(array.size), seed)
