"""The collate and the batch plans, on hand-made numpy batches in Ray Data's form (no Ray started here).

Truths: per-row tokenisation and slicing (the collate pads and crops), ``features.num_frames`` (feature
cropping), and brute-force counts over the planned batches (every row once, full batches, class groups,
triplets, padding). Ray Data itself (fold filters, per-epoch shuffles) is exercised in
tests/integration/test_ray_train.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ser_platform.config import TextEncoderConfig
from ser_platform.data.errors import DataError
from ser_platform.data.features import FeatureParams, num_frames
from ser_platform.data.iemocap import CLASSES
from ser_platform.data.loader import eval_batches, make_collate, plan_batches, plan_pool_batches
from ser_platform.models.text import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TextEncoderConfig())


def ragged(arrays):
    """A list of 1-d arrays as Ray Data hands a list<float32> column to a numpy collate: an object array."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = [np.asarray(a, dtype=np.float32) for a in arrays]
    return out


def numpy_batch(rng, n=5, *, lengths=None, features=False, params=FeatureParams()):
    lengths = lengths or [int(rng.integers(800, 4000)) for _ in range(n)]
    audio = [rng.standard_normal(length).astype(np.float32) for length in lengths]
    batch = {
        "id": np.asarray([f"Ses01F_impro01_F{i:03d}" for i in range(n)]),
        "label": np.asarray([CLASSES[i % 4] for i in range(n)]),
        "mode": np.asarray(["improvised" if i % 2 else "scripted" for i in range(n)]),
        "transcript": np.asarray(["Excuse me." * (i + 1) for i in range(n)]),
        "audio": ragged(audio),
        "duration": np.asarray([length / 16000 for length in lengths], dtype=np.float32),
    }
    if features:
        frames = [num_frames(length, params) for length in lengths]
        batch["num_frames"] = np.asarray(frames, dtype=np.int32)
        batch["mfcc"] = ragged([rng.standard_normal(t * params.n_mfcc) for t in frames])
        batch["spectrogram"] = ragged([rng.standard_normal(t * params.n_freq) for t in frames])
    return batch


def test_collate_pads_crops_and_tokenizes_row_by_row(tokenizer):
    rng = np.random.default_rng(0)
    batch = numpy_batch(rng, n=5, lengths=[1000, 3000, 2500, 4000, 1200])
    collate = make_collate(tokenizer, max_text_tokens=12, max_audio_samples=2800)
    out = collate(batch)

    assert out["ids"] == list(batch["id"]) and out["mode"] == list(batch["mode"])
    assert out["labels"].tolist() == [CLASSES.index(label) for label in batch["label"]]
    assert out["audio_lengths"].tolist() == [1000, 2800, 2500, 2800, 1200]
    assert out["input_values"].shape == (5, 2800) and out["input_values"].dtype == torch.float32
    for i, audio in enumerate(batch["audio"]):
        n = min(len(audio), 2800)
        np.testing.assert_array_equal(out["input_values"][i, :n].numpy(), audio[:n])
        assert torch.all(out["input_values"][i, n:] == 0)
    # Each row tokenised alone (truncated to 12), then padded with <pad>: what the batch must hold.
    assert out["attention_mask"].dtype == torch.bool
    for i, text in enumerate(batch["transcript"]):
        alone = tokenizer(str(text), truncation=True, max_length=12)["input_ids"]
        assert len(alone) <= 12
        assert out["input_ids"][i, :len(alone)].tolist() == alone
        assert torch.all(out["input_ids"][i, len(alone):] == tokenizer.pad_token_id)
        assert out["attention_mask"][i].tolist() == [True] * len(alone) + [False] * (out["input_ids"].shape[1] - len(alone))
    assert out["mfcc"] is None and out["spectrogram"] is None and out["feature_lengths"] is None


def test_collate_accepts_equal_length_audio_as_a_2d_array(tokenizer):
    # Ray Data gives a 2-d array when every row of a list column has the same length.
    rng = np.random.default_rng(1)
    batch = numpy_batch(rng, n=3, lengths=[1600] * 3)
    batch["audio"] = np.stack(list(batch["audio"]))
    out = make_collate(tokenizer, max_text_tokens=64, max_audio_samples=16000)(batch)
    assert out["input_values"].shape == (3, 1600)
    np.testing.assert_array_equal(out["input_values"].numpy(), batch["audio"])


def test_collate_crops_precomputed_features_to_the_cropped_audio(tokenizer):
    rng = np.random.default_rng(2)
    params = FeatureParams()
    batch = numpy_batch(rng, n=3, lengths=[1000, 6000, 3000], features=True, params=params)
    collate = make_collate(tokenizer, max_text_tokens=64, max_audio_samples=3200, feature_params=params)
    out = collate(batch)
    cap = num_frames(3200, params)
    expected = [min(num_frames(n, params), cap) for n in (1000, 6000, 3000)]
    assert out["feature_lengths"].tolist() == expected
    assert out["mfcc"].shape == (3, max(expected), params.n_mfcc)
    assert out["spectrogram"].shape == (3, max(expected), params.n_freq)
    for i in range(3):
        t, full = expected[i], int(batch["num_frames"][i])
        np.testing.assert_array_equal(out["mfcc"][i, :t].numpy(), batch["mfcc"][i].reshape(full, -1)[:t])
        np.testing.assert_array_equal(out["spectrogram"][i, :t].numpy(),
                                      batch["spectrogram"][i].reshape(full, -1)[:t])
        assert torch.all(out["mfcc"][i, t:] == 0)


@pytest.mark.parametrize("column, value, message", [
    ("label", "frustrated", "label 'frustrated'"),
    ("audio", np.zeros(0, dtype=np.float32), "non-empty"),
])
def test_collate_names_the_bad_row(tokenizer, column, value, message):
    rng = np.random.default_rng(3)
    batch = numpy_batch(rng, n=3)
    batch[column] = batch[column].astype(object)
    batch[column][1] = value
    with pytest.raises(DataError, match=message) as err:
        make_collate(tokenizer, max_text_tokens=64, max_audio_samples=16000)(batch)
    assert str(batch["id"][1]) in str(err.value)


def test_collate_rejects_features_whose_frame_count_does_not_divide(tokenizer):
    rng = np.random.default_rng(4)
    batch = numpy_batch(rng, n=2, features=True)
    batch["num_frames"] = batch["num_frames"] + 1
    with pytest.raises(DataError, match="num_frames"):
        make_collate(tokenizer, max_text_tokens=64, max_audio_samples=16000)(batch)


# --- batch plans -------------------------------------------------------------------------------------------

def valid_triplets(labels) -> int:
    """Brute force: (anchor, positive, negative) index triples with a != p, label[a] == label[p] != label[n]."""
    return sum(1 for a, p, n in itertools.permutations(range(len(labels)), 3)
               if labels[a] == labels[p] and labels[a] != labels[n])


@pytest.mark.parametrize("samples_per_class, bucket", [(0, False), (0, True), (2, False), (4, True), (3, False)])
@pytest.mark.parametrize("n, batch_size", [(64, 8), (37, 8), (5, 8), (30, 1)])
def test_plan_batches_places_every_row_once_in_full_batches(samples_per_class, bucket, n, batch_size):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 4, size=n)
    lengths = rng.uniform(1, 10, size=n)
    batches, leftover = plan_batches(labels, lengths, batch_size, samples_per_class=samples_per_class,
                                     bucket_by_length=bucket, rng=np.random.default_rng(0))
    placed = np.concatenate(batches + [leftover]) if batches else leftover
    assert sorted(placed.tolist()) == list(range(n))
    assert len(batches) == n // batch_size
    assert all(len(b) == batch_size for b in batches) and len(leftover) == n % batch_size


def test_class_balanced_batches_hold_groups_of_m_per_class_and_triplets():
    labels = np.repeat(np.arange(4), 16)  # 4 classes x 16 rows
    lengths = np.ones(64)
    batches, leftover = plan_batches(labels, lengths, 8, samples_per_class=2, bucket_by_length=False,
                                     rng=np.random.default_rng(5))
    assert len(batches) == 8 and len(leftover) == 0
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=4)
        assert counts.tolist() == [2, 2, 2, 2]  # groups of m=2 cycling through the 4 classes
        assert valid_triplets(labels[batch].tolist()) > 0
    # A plain random cut of the same pool is not balanced in general; the balanced plan always is.
    plain, _ = plan_batches(labels, lengths, 8, samples_per_class=0, bucket_by_length=False,
                            rng=np.random.default_rng(5))
    assert any(np.bincount(labels[b], minlength=4).tolist() != [2, 2, 2, 2] for b in plain)


def test_class_balanced_plan_survives_a_class_that_runs_short():
    labels = np.asarray([0] * 20 + [1] * 3 + [2])
    batches, leftover = plan_batches(labels, np.ones(24), 6, samples_per_class=4, bucket_by_length=False,
                                     rng=np.random.default_rng(6))
    assert sorted(np.concatenate(batches + [leftover]).tolist()) == list(range(24))
    assert len(batches) == 4


def padding(batches, lengths) -> float:
    return float(sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches))


def test_bucketing_cuts_padding_to_the_sorted_minimum():
    rng = np.random.default_rng(7)
    lengths = rng.uniform(1, 15, size=96)
    labels = rng.integers(0, 4, size=96)
    plain, _ = plan_batches(labels, lengths, 8, samples_per_class=0, bucket_by_length=False,
                            rng=np.random.default_rng(1))
    bucketed, _ = plan_batches(labels, lengths, 8, samples_per_class=0, bucket_by_length=True,
                               rng=np.random.default_rng(1))
    # 96 = 12 full batches: bucketing = consecutive runs of the sorted lengths, the least padding possible.
    ordered = np.sort(lengths)
    minimum = sum(8 * ordered[i + 7] - ordered[i:i + 8].sum() for i in range(0, 96, 8))
    assert padding(bucketed, lengths) == pytest.approx(minimum)
    assert padding(bucketed, lengths) < 0.5 * padding(plain, lengths)
    # ... and the batch order is shuffled, not shortest-first.
    maxima = [lengths[b].max() for b in bucketed]
    assert maxima != sorted(maxima)
    balanced, _ = plan_batches(labels, lengths, 8, samples_per_class=2, bucket_by_length=True,
                               rng=np.random.default_rng(1))
    balanced_plain, _ = plan_batches(labels, lengths, 8, samples_per_class=2, bucket_by_length=False,
                                     rng=np.random.default_rng(1))
    assert padding(balanced, lengths) < padding(balanced_plain, lengths)


def test_plans_follow_the_seed():
    labels, lengths = np.arange(40) % 4, np.linspace(1, 4, 40)

    def plan(seed):
        batches, _ = plan_batches(labels, lengths, 8, samples_per_class=2, bucket_by_length=False,
                                  rng=np.random.default_rng(seed))
        return [b.tolist() for b in batches]

    assert plan(3) == plan(3)
    assert plan(3) != plan(4)


def pools(rng, sizes, *, equal_length_pool=None):
    start = 0
    for index, size in enumerate(sizes):
        lengths = [1600] * size if index == equal_length_pool else [int(x) for x in rng.integers(800, 3200, size)]
        batch = numpy_batch(rng, n=size, lengths=lengths)
        batch["id"] = np.asarray([f"row{start + i:04d}" for i in range(size)])
        if index == equal_length_pool:
            batch["audio"] = np.stack(list(batch["audio"]))  # Ray's 2-d form, concatenated with ragged pools
        start += size
        yield batch


@pytest.mark.parametrize("sizes, batch_size", [([32, 32, 7], 8), ([5, 5, 5, 5], 8), ([3], 4), ([16, 16], 4)])
def test_pool_plans_yield_ceil_n_over_b_batches_and_every_row_once(sizes, batch_size):
    rng = np.random.default_rng(sum(sizes))
    out = list(plan_pool_batches(pools(rng, sizes, equal_length_pool=0), batch_size, samples_per_class=2,
                                 bucket_by_length=True, seed=11))
    n = sum(sizes)
    assert len(out) == math.ceil(n / batch_size)
    assert all(len(b["id"]) == batch_size for b in out[:-1])
    ids = [i for b in out for i in b["id"]]
    assert sorted(ids) == [f"row{i:04d}" for i in range(n)]
    for b in out:  # rows stay whole: each id keeps its own audio length
        assert len(b["audio"]) == len(b["id"]) == len(b["label"])


class FakeShard:
    """The slice of Ray's DataIterator that eval_batches uses: iter_batches in a fixed order."""

    def __init__(self, n):
        self.n = n

    def iter_batches(self, *, batch_size, batch_format):
        assert batch_format == "numpy"
        rng = np.random.default_rng(0)
        for start in range(0, self.n, batch_size):
            size = min(batch_size, self.n - start)
            batch = numpy_batch(rng, n=size, lengths=[1000] * size)
            batch["id"] = np.asarray([f"row{start + i:03d}" for i in range(size)])
            yield batch


def test_eval_batches_split_the_batches_between_ranks(tokenizer):
    collate = make_collate(tokenizer, max_text_tokens=16, max_audio_samples=16000)
    shard = FakeShard(23)
    single = [i for b in eval_batches(shard, collate, batch_size=4) for i in b["ids"]]
    assert single == [f"row{i:03d}" for i in range(23)]
    per_rank = [[i for b in eval_batches(shard, collate, batch_size=4, rank=r, world_size=3) for i in b["ids"]]
                for r in range(3)]
    assert sorted(sum(per_rank, [])) == single
    assert all(set(a).isdisjoint(b) for a, b in itertools.combinations(per_rank, 2))
    assert per_rank[1][:4] == single[4:8]  # rank 1 takes batch 1 of the unsplit order
