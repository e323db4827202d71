"""The per-worker loop (train.py) in plain torch: no Ray. A small real SERModel + JointLoss on random rows.

Truths: the test scores recomputed by hand (brute-force WA/UA) from the weights of the best validation epoch;
an uninterrupted run (for resume); a run of one fold alone (for fresh, seeded models per fold); a single-process
step over the concatenated batch (for DDP, on two gloo processes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ser_platform.config import load_config
from ser_platform.data.features import AcousticFeatures, FeatureParams
from ser_platform.data.loader import LocalFolds, make_collate
from ser_platform.models.ser_model import SERModel, SEROutput
from ser_platform.models.text import build_tokenizer
from ser_platform.train import (Hooks, derive_seed, fit_folds, predict, seed_everything, summarize_trial,
                                train_epoch)

from support import TINY_SIZES, comparable, fold_rows

TINY = {
    **TINY_SIZES,
    "train.batch_size": 8, "train.samples_per_class": 2, "train.lr": 3e-3, "train.epochs": 3, "train.seed": 7,
    "data.max_audio_seconds": 0.5,
}


def tiny_config(**overrides):
    return load_config("demo", overrides={**TINY, **overrides})


class Folds:
    """The library's in-process data path (``loader.LocalFolds``) over random rows, one table per fold; records
    every request."""

    def __init__(self, config, folds=(1, 2)):
        self.config = config
        self.collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=32,
                                    max_audio_samples=int(config.data.max_audio_seconds * 16000))
        self.local = {f: LocalFolds(fold_rows(f, (24, 12, 12)), config, self.collate) for f in folds}
        self.calls: list[tuple[int, str, int]] = []

    def split(self, fold, split):
        return self.local[fold].split(fold, split)

    def batches(self, fold, split, epoch, *, rank=0, world_size=1):
        return self.local[fold].batches_for(fold, split, epoch, rank=rank, world_size=world_size)

    def __call__(self, fold, split, epoch):
        self.calls.append((fold, split, epoch))
        return self.batches(fold, split, epoch)


class Recorder(Hooks):
    def __init__(self):
        self.states: dict[tuple[int, int], dict] = {}
        self.events: list[tuple] = []

    def on_fold_start(self, fold):
        self.events.append(("start", fold))

    def on_epoch_end(self, fold, epoch, metrics, state_fn):
        self.events.append(("epoch", fold, epoch))
        if state_fn is not None:  # a checkpoint is due (train.checkpoint_every)
            self.states[(fold, epoch)] = state_fn()

    def on_fold_end(self, fold, result, state_fn):
        self.events.append(("end", fold))
        self.states[(fold, "done")] = state_fn()


def brute_scores(labels, preds, num_classes=4):
    """WA = share correct; UA = mean over the classes present of the per-class recall (plain loops)."""
    wa = sum(int(t == p) for t, p in zip(labels, preds)) / len(labels)
    recalls = []
    for c in range(num_classes):
        rows = [p for t, p in zip(labels, preds) if t == c]
        if rows:
            recalls.append(sum(int(p == c) for p in rows) / len(rows))
    return wa, sum(recalls) / len(recalls)


@pytest.fixture(scope="module")
def full_run():
    """Two folds, three epochs, every epoch's state recorded: shared by the tests below (one training)."""
    torch.set_num_threads(1)
    config = tiny_config()
    data, hooks = Folds(config), Recorder()
    results = fit_folds(config, [1, 2], data, hooks=hooks, log=None)
    return config, data, hooks, results


@pytest.mark.slow  # full_run: two folds, three epochs
def test_model_selection_on_validation_and_one_test_pass_with_the_best_weights(full_run):
    config, data, hooks, results = full_run
    for fold in (1, 2):
        result = results[fold]
        val_uas = [h["val_ua"] for h in result.history]
        assert result.epochs_run == 3 and len(val_uas) == 3
        assert result.best_epoch == 1 + int(np.argmax(val_uas))  # first epoch of the maximum
        assert result.val_ua == max(val_uas)
        # The test split is read exactly once, after the fold's last validation pass.
        fold_calls = [c for c in data.calls if c[0] == fold]
        assert [c[1] for c in fold_calls].count("test") == 1 and fold_calls[-1][1] == "test"

        # Recompute the test scores from the best epoch's weights, by hand, in the model as the fold built it
        # (its seed draws the frozen wav2vec2 feature encoder, which checkpoints leave out).
        seed_everything(derive_seed(config.train.seed, fold))
        model = SERModel(config.model)
        loaded = model.load_state_dict(hooks.states[(fold, result.best_epoch)]["model"], strict=False)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert set(loaded.missing_keys) == frozen and not loaded.unexpected_keys
        model.eval()
        features = AcousticFeatures(FeatureParams.from_speech_config(config.model.speech))
        labels, preds, modes = [], [], []
        with torch.no_grad():
            for batch in data.batches(fold, "test", 0):
                mfcc, spec, lengths = features(batch["input_values"], batch["audio_lengths"])
                out = model(batch["input_values"], batch["audio_lengths"], mfcc, spec, lengths, batch["input_ids"],
                            batch["attention_mask"])
                labels += batch["labels"].tolist()
                preds += out.logits.argmax(-1).tolist()
                modes += batch["mode"]
        wa, ua = brute_scores(labels, preds)
        assert result.test_wa == pytest.approx(wa) and result.test_ua == pytest.approx(ua)
        assert result.num_test == 12 and sum(map(sum, result.confusion)) == 12
        for subset in ("improvised", "scripted"):
            keep = [i for i, m in enumerate(modes) if m == subset]
            swa, sua = brute_scores([labels[i] for i in keep], [preds[i] for i in keep])
            assert result.subsets[subset]["n"] == len(keep)
            assert result.subsets[subset]["wa"] == pytest.approx(swa)
            assert result.subsets[subset]["ua"] == pytest.approx(sua)


@pytest.mark.slow  # full_run: two folds, three epochs
def test_each_fold_starts_from_a_fresh_seeded_model_and_runs_reproduce(full_run):
    config, _, _, results = full_run
    alone = fit_folds(config, [2], Folds(config), log=None)[2]
    assert comparable(alone) == comparable(results[2])  # fold 2 does not depend on fold 1 having run first
    assert comparable(results[1])["history"] != comparable(results[2])["history"]


@pytest.mark.slow  # full_run: two folds, three epochs
def test_a_run_resumed_from_an_epoch_checkpoint_ends_as_the_uninterrupted_run(full_run, tmp_path):
    config, _, hooks, results = full_run
    # Through a file, as a checkpoint would travel: torch.save, then load with weights_only=True.
    path = tmp_path / "state.pt"
    torch.save(hooks.states[(2, 1)], path)  # holds fold 1's result as finished
    state = torch.load(path, weights_only=True)
    data = Folds(config)
    resumed = fit_folds(config, [1, 2], data, resume_state=state, log=None)
    assert [c for c in data.calls if c[1] == "train"] == [(2, "train", 2), (2, "train", 3)]  # fold 1 not rerun
    assert comparable(resumed[1]) == comparable(results[1])
    assert comparable(resumed[2]) == {**comparable(results[2]), "resumed_from": [1]}


def test_early_stopping_after_patience_epochs_without_a_better_validation_ua():
    # lr 1e-12: the weights (so the validation UA) do not move, so epoch 1 stays best.
    config = tiny_config(**{"train.lr": 1e-12, "train.patience": 1, "train.epochs": 5})
    result = fit_folds(config, [1], Folds(config, folds=(1,)), log=None)[1]
    assert result.best_epoch == 1
    assert result.epochs_run == 2


@pytest.mark.parametrize("fusion, computes_features", [("text_only", False), ("speech_only", True)])
def test_acoustic_features_are_computed_only_for_a_model_that_reads_speech(fusion, computes_features, monkeypatch):
    calls = []
    original = AcousticFeatures.forward
    monkeypatch.setattr(AcousticFeatures, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    config = tiny_config(**{"model.fusion": fusion, "train.epochs": 1})
    lines = []
    result = fit_folds(config, [1], Folds(config, folds=(1,)), log=lines.append)[1]
    assert result.epochs_run == 1 and 0 <= result.test_ua <= 1
    assert bool(calls) == computes_features
    assert lines[0] == "fold 1: training, 1 epoch(s)" and lines[1].startswith("fold 1 epoch 1/1 | train loss")


@pytest.mark.slow  # full_run: two folds, three epochs
def test_summary_is_mean_and_sample_std_over_folds(full_run):
    _, _, _, results = full_run
    summary = summarize_trial(results)
    values = [results[1].test_ua, results[2].test_ua]
    assert summary["test_ua_mean"] == pytest.approx(np.mean(values))
    assert summary["test_ua_std"] == pytest.approx(np.std(values, ddof=1))
    assert {"val_ua_mean", "val_ua_std", "test_wa_mean", "test_wa_std"} <= set(summary)


# --- DDP on two gloo processes -----------------------------------------------------------------------------

class LinearStandIn(torch.nn.Module):
    """Deterministic (no dropout, no masking noise): mean audio energy and token stats -> logits."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.classify = torch.nn.Linear(4, 4)

    def forward(self, input_values, audio_lengths, mfcc, spectrogram, feature_lengths, input_ids, attention_mask):
        x = torch.stack([input_values.abs().sum(1) / audio_lengths, mfcc.mean((1, 2)),
                         attention_mask.float().sum(1) / 10], dim=1)
        e = self.embed(x)
        return SEROutput(logits=self.classify(torch.tanh(e)), embedding=e, speech_embedding=e, text_embedding=e)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from ser_platform.losses import JointLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name, config in (("linear", tiny_config(**{"loss.alpha": 0.0})), ("ser", tiny_config())):
            torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
            model = LinearStandIn() if name == "linear" else SERModel(config.model)
            wrapped = DistributedDataParallel(model)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            data = Folds(config, folds=(1,))
            features = AcousticFeatures(FeatureParams.from_speech_config(config.model.speech))
            loss_fn = JointLoss(config.loss)
            # One step on this rank's half of one batch of 8 (rank 0: rows 0-3, rank 1: rows 4-7).
            batch = data.collate({k: v[rank * 4:(rank + 1) * 4] for k, v in data.split(1, "train").items()})
            train_epoch(wrapped, loss_fn, optimizer, [batch], config=config, features=features,
                        device=torch.device("cpu"), world_size=world_size)
            params = {k: v.detach().clone() for k, v in model.state_dict().items()}
            # Evaluation gathered over ranks: each rank scores its share of the validation batches.
            pred = predict(model, loss_fn, data.batches(1, "val", 0, rank=rank, world_size=world_size),
                           config=config, features=features, device=torch.device("cpu"), world_size=world_size)
            torch.save({"params": params, "pred": pred}, Path(out_dir) / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_after_a_ddp_step_every_rank_holds_the_same_parameters(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    for name in ("linear", "ser"):
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=False) for r in range(world_size)]
        for key, value in ranks[0]["params"].items():
            torch.testing.assert_close(ranks[1]["params"][key], value, rtol=0, atol=0, msg=key)
        assert ranks[0]["pred"] == ranks[1]["pred"]  # both ranks hold the gathered predictions
        assert len(ranks[0]["pred"]["ids"]) == 12  # every validation row once

    # The linear stand-in has no randomness: DDP's step equals one step on the concatenated batch.
    from ser_platform.losses import JointLoss

    config = tiny_config(**{"loss.alpha": 0.0})
    torch.manual_seed(100)  # rank 0's initial weights, which DDP broadcast
    model = LinearStandIn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = Folds(config, folds=(1,))
    batch = data.collate({k: v[:8] for k, v in data.split(1, "train").items()})
    train_epoch(model, JointLoss(config.loss), optimizer, [batch], config=config,
                features=AcousticFeatures(FeatureParams.from_speech_config(config.model.speech)),
                device=torch.device("cpu"))
    ddp = torch.load(tmp_path / "linear-rank0.pt", weights_only=False)["params"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp[key], value, msg=key)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


@pytest.mark.slow  # three short trainings of one fold
def test_checkpoints_keep_no_frozen_weights_no_second_copy_of_the_best_and_resume_exactly(tmp_path):
    config = tiny_config(**{"model.encoders": "frozen", "train.epochs": 2})
    hooks = Recorder()
    uninterrupted = fit_folds(config, [1], Folds(config, folds=(1,)), hooks=hooks, log=None)[1]
    model = SERModel(config.model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("text_encoder.encoder.", "speech_encoder.ssl.encoder.")) for n in frozen)
    for epoch in (1, 2):
        state = hooks.states[(1, epoch)]
        assert not frozen & set(state["model"]), "frozen encoders' weights are rebuilt from the config, not stored"
        assert set(state["model"]) == set(model.state_dict()) - frozen
        if state["best"]["epoch"] == epoch:  # the best epoch is this one: its weights are not stored twice
            assert state["best"]["model"] is None and state["best"]["is_current"]
        else:
            assert set(state["best"]["model"]) == set(state["model"])
    trained_bytes = _tensor_bytes({k: v for k, v in model.state_dict().items() if k not in frozen})
    assert _tensor_bytes(hooks.states[(1, 1)]["model"]) == trained_bytes
    # Through a file, as a checkpoint travels; the resumed fold ends exactly as the uninterrupted one.
    torch.save(hooks.states[(1, 1)], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = fit_folds(config, [1], Folds(config, folds=(1,)), resume_state=state, log=None)[1]
    assert comparable(resumed) == {**comparable(uninterrupted), "resumed_from": [1]}


class SelectedWeights(Recorder):
    def on_model_selected(self, fold, result, weights_fn):
        self.selected = weights_fn()


@pytest.mark.slow  # four short trainings of one fold
def test_with_bf16_precision_the_best_copy_is_bf16_and_a_resumed_fold_tests_the_same_weights(tmp_path):
    # lr 1e-12: the validation UA cannot rise, so epoch 1 stays the best and epoch 2's checkpoint stores a copy.
    fp32 = tiny_config(**{"train.lr": 1e-12, "train.epochs": 2})
    hooks = Recorder()
    fit_folds(fp32, [1], Folds(fp32, folds=(1,)), hooks=hooks, log=None)
    assert {v.dtype for v in hooks.states[(1, 2)]["best"]["model"].values()} == {torch.float32}

    config = tiny_config(**{"train.lr": 1e-12, "train.epochs": 2, "train.precision": "bf16"})
    hooks = SelectedWeights()
    uninterrupted = fit_folds(config, [1], Folds(config, folds=(1,)), hooks=hooks, log=None)[1]
    assert uninterrupted.best_epoch == 1
    first, second = hooks.states[(1, 1)], hooks.states[(1, 2)]
    assert first["best"]["is_current"] and first["best"]["model"] is None  # epoch 1's own weights serve
    assert {v.dtype for v in first["model"].values() if v.is_floating_point()} == {torch.float32}  # resume: fp32
    best = second["best"]["model"]
    assert best.keys() == second["model"].keys()
    floating = [k for k, v in first["model"].items() if v.is_floating_point()]
    for key in floating:  # epoch 1's fp32 weights, rounded by torch itself
        assert best[key].dtype == torch.bfloat16 and torch.equal(best[key], first["model"][key].to(torch.bfloat16))
    assert _tensor_bytes({k: best[k] for k in floating}) * 2 == _tensor_bytes({k: second["model"][k] for k in floating})
    for key in floating:  # the test pass (and the model artifact) used the rounded weights
        torch.testing.assert_close(hooks.selected[key], best[key].float(), rtol=0, atol=0)
    # Resumed from either checkpoint (through a file, as they travel), the fold tests the same weights.
    for epoch in (1, 2):
        torch.save(hooks.states[(1, epoch)], tmp_path / f"state-{epoch}.pt")
        state = torch.load(tmp_path / f"state-{epoch}.pt", weights_only=True)
        resumed = fit_folds(config, [1], Folds(config, folds=(1,)), resume_state=state, log=None)[1]
        assert comparable(resumed) == {**comparable(uninterrupted), "resumed_from": [epoch]}


def test_checkpoint_frequency_saves_every_nth_epoch_and_the_last():
    config = tiny_config(**{"train.lr": 1e-12, "train.epochs": 5, "train.checkpoint_every": 2})
    hooks = Recorder()
    fit_folds(config, [1], Folds(config, folds=(1,)), hooks=hooks, log=None)
    assert sorted(epoch for (_, epoch) in hooks.states if epoch != "done") == [2, 4, 5]
    assert [e for e in hooks.events if e[0] == "epoch"] == [("epoch", 1, epoch) for epoch in range(1, 6)]
