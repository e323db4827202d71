"""Table 4's claim on the embedded default's corpus: the full model ahead of each single modality, trained with the
plain-torch loop (moved here from tests/unit/test_baselines.py, which checks each fusion mode's shapes, routing
and parameter summary on a tiny model). 5-7 minutes on 2 cores, no Ray: marked ``slow``, and started ahead of its
turn (``head_start``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_platform.config import load_config
from ser_platform.catalogue import COMPARE_MODELS_DEMO


# --- real training: the full model against each single modality ------------------------------------------------
#
# The plain-torch loop (train.fit_folds) on the embedded default's own corpus (ser_platform.demo) with the
# embedded default's own configuration for Table 4 (catalogue.COMPARE_MODELS_DEMO: 20 epochs, 16-d encoders, 1.5 s of
# audio), in-process batches as tests/unit/test_train_loop.py makes them, every leave-one-session-out fold; only
# model.fusion differs. The three models train in two spawned processes (the crossmodal model in one, the two
# single modalities in the other: about the same work), one torch thread each: 5-7 min on 2 cores alone (372 s
# on an Intel Xeon); in the suite it runs in the CPU the other tests leave idle, and its test waits seconds.
#
# Measured with exactly this configuration, mean test UA over the 5 folds (full / speech only / text only), and
# the full model minus each single modality, since the demo preset freezes wav2vec2's feature encoder (as the
# paper preset does), which Table 4's embedded default inherits:
#
#   training seed            0       1       2       3       4      mean
#   full model            0.699   0.661   0.662   0.694   0.711
#   speech only           0.558   0.599   0.643   0.613   0.622
#   text only             0.617   0.557   0.608   0.629   0.601
#   full - speech only   +0.140  +0.063  +0.019  +0.082  +0.089  +0.079  (one-sample t over the seeds: p = 0.016)
#   full - text only     +0.082  +0.104  +0.054  +0.065  +0.110  +0.083  (p = 0.002)
#
# With the feature encoder trained (before) the margins over speech alone were +0.087, +0.031, -0.025, +0.028,
# +0.104 (mean +0.045, p ~ 0.12) and over text alone +0.090, +0.154, +0.054, +0.118, +0.108: speech alone was
# stronger and one seed in five put it ahead of the full model. A CPU whose float rounding differs is in effect
# another seed (rounding differences of 1e-8 grow over training steps: issue 18), so the thresholds sit below
# every seed's margin, not only seed 0's: 0.01 over speech (the smallest, seed 2's, is +0.019; a threshold of
# 0.02 would fail a CPU that behaves like seed 2) and 0.04 over text (smallest +0.054). Across CPUs at seed 0:
# the table's 0.699 / 0.558 / 0.617 (+0.140, +0.082) came from the AMD EPYC machines of earlier stops; an Intel
# Xeon @ 2.80 GHz gave 0.694 / 0.549 / 0.621 (+0.146, +0.074), a difference smaller than the seeds'. The Ray
# run of the same embedded default before the change (experiments/compare_models.py, seed 0, BENCHMARKS.md) gave
# +0.121 over speech and +0.118 over text.
# (Tried and dropped: MFCC/spectrogram normalised with training-set statistics instead of per utterance, to keep
# each utterance's loudness; speech alone got no better, 0.463 / 0.496 / 0.471 at seeds 0-2 on a 40-per-session
# corpus against 0.502 at seed 0 per utterance. Fewer epochs (10) or a corpus with more one-modality utterances
# did not widen the margins. To shorten the test: 8 epochs without dropout gave margins over speech of +0.022,
# +0.104, +0.044 and over text of +0.051, -0.021, +0.043 at seeds 0-2, text alone ahead at seed 1; a corpus
# whose emotional utterances all carry the emotion in one modality only learned too slowly, full / speech / text
# 0.418 / 0.328 / 0.335 after 8 epochs without dropout.) The test runs seed 0, with thresholds below every
# margin measured, and prints the margins.

COMPARISON = dict(COMPARE_MODELS_DEMO)  # exactly the embedded default of experiments/compare_models.py
COMPARISON_FOLDS = (1, 2, 3, 4, 5)
COMPARISON_SEED = 0


def _synthetic_columns(dataset: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(dataset, columns=["id", "speaker", "mode", "label", "transcript", "audio"]).to_pydict()
    columns = {k: np.asarray(v, dtype=object) for k, v in table.items() if k != "audio"}
    columns["audio"] = np.empty(len(table["id"]), dtype=object)
    columns["audio"][:] = [np.asarray(a, dtype=np.float32) for a in table["audio"]]
    return columns


def _in_process_batches(config, columns):
    """``batches_for(fold, split, epoch)`` over in-memory rows: the fold's speakers (data.folds.fold_spec),
    class-balanced training batches reshuffled per epoch from the seed, evaluation batches in a fixed order."""
    from ser_platform.data.folds import fold_spec
    from ser_platform.data.loader import make_collate, plan_pool_batches
    from ser_platform.models.text import build_tokenizer

    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=64,
                           max_audio_samples=int(config.data.max_audio_seconds * 16000))
    size = config.train.batch_size
    evaluation: dict = {}

    def rows(fold, split):
        spec = fold_spec(fold)
        keep = np.asarray([spec.split_for(s) == split for s in columns["speaker"]])
        return {k: v[keep] for k, v in columns.items()}

    def batches_for(fold, split, epoch):
        if split == "train":
            data = rows(fold, split)
            order = np.random.default_rng([config.train.seed, fold, epoch]).permutation(len(data["id"]))
            plan = plan_pool_batches([{k: v[order] for k, v in data.items()}], size, bucket_by_length=False,
                                     samples_per_class=config.train.samples_per_class, seed=epoch)
            return [collate(b) for b in plan]
        if (fold, split) not in evaluation:
            data = rows(fold, split)
            evaluation[(fold, split)] = [collate({k: v[i:i + size] for k, v in data.items()})
                                         for i in range(0, len(data["id"]), size)]
        return evaluation[(fold, split)]

    return batches_for


def train_fusions(dataset: str, fusions: tuple[str, ...], seed: int) -> dict[str, dict[int, float]]:
    """Test UA per fold of each ``model.fusion`` in ``fusions`` (a spawned process runs this)."""
    from ser_platform.train import fit_folds

    torch.set_num_threads(1)
    columns = _synthetic_columns(dataset)
    scores = {}
    for fusion in fusions:
        config = load_config("demo", overrides={**COMPARISON, "model.fusion": fusion, "train.seed": seed})
        results = fit_folds(config, COMPARISON_FOLDS, _in_process_batches(config, columns), log=None)
        scores[fusion] = {fold: r.test_ua for fold, r in results.items()}
    return scores


def compare_fusions(dataset: str, seed: int) -> dict[str, dict[int, float]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        full = pool.submit(train_fusions, dataset, ("crossmodal",), seed)
        single = pool.submit(train_fusions, dataset, ("speech_only", "text_only"), seed)
        return {**full.result(), **single.result()}


def comparison(workdir: str, seed: int) -> dict[str, dict[int, float]]:
    """The demo's corpus written in ``workdir``, then the three models trained on it (the test's head start)."""
    from pathlib import Path

    from ser_platform.demo import ensure_demo_dataset

    return compare_fusions(ensure_demo_dataset(Path(workdir) / "demo", progress=False), seed)


MIN_MARGIN = {"speech_only": 0.01, "text_only": 0.04}  # below every seed's margin: the measurements above


# Started when the suite's collection ends, at the lowest CPU priority (tests/conftest.py, head_start): its
# ~10 CPU-minutes go into the CPU the rest of the suite leaves idle, and the test, run last, waits for what is left.
@pytest.mark.slow
@pytest.mark.head_start(comparison, COMPARISON_SEED)
def test_the_full_model_is_ahead_of_each_single_modality(head_start):
    scores = head_start.result(timeout=840)  # pytest-timeout's 900 s applies to the wait, not the whole run
    means = {fusion: float(np.mean([scores[fusion][f] for f in COMPARISON_FOLDS])) for fusion in scores}
    print(f"\nmean test UA over folds {COMPARISON_FOLDS} (seed {COMPARISON_SEED}; {head_start.timing}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    for fusion in ("speech_only", "text_only"):
        margin = means["crossmodal"] - means[fusion]
        print(f"full model - {fusion}: {margin:+.3f} (per fold: "
              + ", ".join(f"{scores['crossmodal'][f] - scores[fusion][f]:+.3f}" for f in COMPARISON_FOLDS) + ")")
        assert margin >= MIN_MARGIN[fusion], (fusion, margin, scores)
