"""Joint loss, eq. (7)-(10): the triplet term against brute-force loops over explicit triplet lists."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ser_platform.config import LossConfig
from ser_platform.losses import JointLoss, class_balanced_sampler, cross_entropy_loss
from ser_platform.models.ser_model import SEROutput


def squared_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return sum((float(a) - float(b)) ** 2 for a, b in zip(x, y))


def all_triplets(labels: list[int]) -> list[tuple[int, int, int]]:
    """Γ: every (anchor, positive, negative) with label[a] == label[p], a != p, label[n] != label[a]."""
    n = len(labels)
    return [(a, p, q) for a, p, q in itertools.product(range(n), repeat=3)
            if a != p and labels[a] == labels[p] and labels[q] != labels[a]]


def brute_force_eq8(embeddings: torch.Tensor, labels: list[int], margin: float, triplets=None) -> float:
    """Eq. (8) with eq. (7)'s hinge: mean over the triplets of max(0, D_pos - D_neg + M)."""
    triplets = all_triplets(labels) if triplets is None else triplets
    if not triplets:
        return 0.0
    total = 0.0
    for a, p, q in triplets:
        d_pos = squared_distance(embeddings[a], embeddings[p])
        d_neg = squared_distance(embeddings[a], embeddings[q])
        total += max(0.0, d_pos - d_neg + margin)
    return total / len(triplets)


def fake_output(batch: int = 12, dims=(6, 5, 7), classes: int = 4, seed: int = 0) -> SEROutput:
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_(True)

    return SEROutput(logits=leaf(batch, classes), embedding=leaf(batch, dims[0]),
                     speech_embedding=leaf(batch, dims[1]), text_embedding=leaf(batch, dims[2]))


LABELS = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 0]


def test_metric_term_is_eq8_and_differs_from_pml_defaults():
    output = fake_output()
    labels = torch.tensor(LABELS)
    margin = 0.3
    loss = JointLoss(LossConfig(alpha=1.0, beta=1.0, margin=margin))(output, labels)
    expected = brute_force_eq8(output.embedding.detach(), LABELS, margin)
    assert len(all_triplets(LABELS)) > 100
    assert float(loss.metric) == pytest.approx(expected, rel=1e-5)

    # PML's defaults (normalised, non-squared distance, mean over non-zero triplets only) give another number.
    from pytorch_metric_learning.losses import TripletMarginLoss

    default = float(TripletMarginLoss(margin=margin)(output.embedding.detach(), labels))
    assert abs(default - expected) > 0.1


def test_joint_loss_weights_and_cross_entropy_eq10():
    output = fake_output(seed=1)
    labels = torch.tensor(LABELS)
    alpha, beta, margin = 0.5, 2.0, 1.0
    result = JointLoss(LossConfig(alpha=alpha, beta=beta, margin=margin))(output, labels)
    logits = output.logits.detach()
    ce = sum(-math.log(math.exp(float(logits[i, y])) / sum(math.exp(float(v)) for v in logits[i]))
             for i, y in enumerate(LABELS)) / len(LABELS)
    assert float(result.ce) == pytest.approx(ce, rel=1e-5)
    assert float(result.loss.detach()) == pytest.approx(alpha * brute_force_eq8(output.embedding.detach(), LABELS, margin)
                                               + beta * ce, rel=1e-5)


def test_alpha_zero_is_cross_entropy_exactly_and_skips_the_triplet_term():
    output = fake_output(seed=2)
    labels = torch.tensor(LABELS)
    joint = JointLoss(LossConfig(alpha=0.0, beta=1.0))
    assert joint.metric_loss is None
    result = joint(output, labels)
    assert torch.equal(result.loss, F.cross_entropy(output.logits, labels))
    assert float(result.metric) == 0.0
    result.loss.backward()
    assert output.embedding.grad is None  # the embedding never entered the graph


@pytest.mark.parametrize("labels", [[2] * 6, [0, 1, 2, 3]], ids=["one class", "all singletons"])
def test_no_valid_triplet_gives_zero_not_nan_and_ce_still_drives(labels):
    output = fake_output(batch=len(labels), seed=3)
    result = JointLoss(LossConfig(alpha=1.0, beta=1.0))(output, torch.tensor(labels))
    assert float(result.metric) == 0.0
    assert torch.isfinite(result.loss)
    result.loss.backward()
    assert torch.isfinite(output.logits.grad).all() and output.logits.grad.abs().sum() > 0
    assert output.embedding.grad is None or torch.all(output.embedding.grad == 0)


def test_identical_embeddings_give_finite_gradients():
    output = fake_output(batch=6, seed=4)
    with torch.no_grad():
        output.embedding[1] = output.embedding[0]  # D = 0 between two samples: sqrt'(0) must not leak NaN
        output.embedding[2] = output.embedding[0]
    result = JointLoss(LossConfig(alpha=1.0, beta=1.0))(output, torch.tensor([0, 0, 1, 1, 2, 2]))
    result.loss.backward()
    assert torch.isfinite(output.embedding.grad).all()


@pytest.mark.parametrize("space, field", [("fused", "embedding"), ("speech", "speech_embedding"),
                                          ("text", "text_embedding")])
def test_space_picks_the_embedding(space, field):
    output = fake_output(seed=5)
    labels = torch.tensor(LABELS)
    result = JointLoss(LossConfig(alpha=1.0, beta=1.0, space=space, margin=2.0))(output, labels)
    assert float(result.metric) == pytest.approx(
        brute_force_eq8(getattr(output, field).detach(), LABELS, 2.0), rel=1e-5)
    result.loss.backward()
    for other in ("embedding", "speech_embedding", "text_embedding"):
        grad = getattr(output, other).grad
        reached = grad is not None and grad.abs().sum() > 0
        assert reached == (other == field), other


def test_semihard_miner_keeps_only_semihard_triplets():
    output = fake_output(seed=6)
    embeddings = output.embedding.detach()
    margin = 3.0
    semihard = []
    for a, p, q in all_triplets(LABELS):
        d_pos, d_neg = squared_distance(embeddings[a], embeddings[p]), squared_distance(embeddings[a], embeddings[q])
        if d_pos < d_neg < d_pos + margin:
            semihard.append((a, p, q))
    assert 0 < len(semihard) < len(all_triplets(LABELS))
    result = JointLoss(LossConfig(alpha=1.0, beta=1.0, margin=margin, miner="semihard"))(output, torch.tensor(LABELS))
    assert float(result.metric) == pytest.approx(brute_force_eq8(embeddings, LABELS, margin, semihard), rel=1e-4)


def test_hard_miner_keeps_only_violating_triplets():
    output = fake_output(seed=7)
    embeddings = output.embedding.detach()
    hard = [(a, p, q) for a, p, q in all_triplets(LABELS)
            if squared_distance(embeddings[a], embeddings[q]) < squared_distance(embeddings[a], embeddings[p])]
    assert hard
    result = JointLoss(LossConfig(alpha=1.0, beta=1.0, margin=0.5, miner="hard"))(output, torch.tensor(LABELS))
    assert float(result.metric) == pytest.approx(brute_force_eq8(embeddings, LABELS, 0.5, hard), rel=1e-4)


def test_cross_entropy_ignores_alpha_beta_and_matches_torch():
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(cross_entropy_loss(logits, labels),
                          -torch.log_softmax(logits, dim=1)[torch.arange(5), labels].mean())


# --- class-balanced sampler ---------------------------------------------------------------------------------


def test_class_balanced_sampler_batches_hold_m_per_class():
    labels = [0] * 30 + [1] * 9 + [2] * 20 + [3] * 5  # class 3 has fewer than m: drawn with replacement
    sampler = class_balanced_sampler(labels, samples_per_class=8, batch_size=32, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 64  # len(labels) rounded down to whole batches
    for start in range(0, len(indices), 32):
        counts = Counter(labels[i] for i in indices[start:start + 32])
        assert counts == {0: 8, 1: 8, 2: 8, 3: 8}


def test_class_balanced_sampler_is_seeded_and_reshuffles_each_epoch():
    labels = [i % 4 for i in range(80)]
    first = class_balanced_sampler(labels, 4, 8, seed=3)
    again = class_balanced_sampler(labels, 4, 8, seed=3)
    other = class_balanced_sampler(labels, 4, 8, seed=4)
    epoch1, epoch2 = list(first), list(first)
    assert epoch1 == list(again)
    assert epoch1 != epoch2
    assert epoch1 != list(other)
    # Two of the four classes per batch of 8, four of each.
    assert all(sorted(Counter(labels[i] for i in epoch1[s:s + 8]).values()) == [4, 4] for s in range(0, 80, 8))


@pytest.mark.parametrize("m, batch, message", [(4, 32, "samples_per_class=8"), (3, 32, "multiple"),
                                               (1, 4, ">= 2")])
def test_class_balanced_sampler_rejects_impossible_settings(m, batch, message):
    with pytest.raises(ValueError, match=message):
        class_balanced_sampler([i % 4 for i in range(64)], m, batch)
