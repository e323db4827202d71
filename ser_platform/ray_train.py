"""Ray Train around the plain-torch loop of ``train.py``: fold data in Ray Data, DDP workers, checkpoints, MLflow.

    train_folds(config, run_name=..., storage_path=...) -> TrialResult

1. In the driver: the tracking store is created/probed (fails fast), each fold's train/val/test splits are
   read from Parquet and filtered by speaker (``data/loader.fold_datasets``), the leakage guard runs on the
   actual rows, and the splits are materialised in Ray's object store (``config.data.materialize``), all before
   any worker takes its CPUs (``FoldData``; a sweep's driver prepares them once for all its trials).
   With ``data.encoder_cache`` the cache is checked here too (``frozen_encoders.open_encoder_cache``: a stale
   one stops the run before any trainer starts); each worker then loads its entries into memory, its collate
   adds the cached states to every batch, and the model is built without RoBERTa/wav2vec2.
2. The (fold, seed) units become Ray Train runs (``_units``): ``config.train.trainer_scope`` "trial" deals each
   seed's folds into ``train.parallel_units`` lanes, one ``TorchTrainer`` per lane running its folds in turn
   (datasets ``train_1, val_1, test_1, ...``), paying Ray Train's start-up once per lane; "fold" = one
   ``TorchTrainer`` per (fold, seed) (a finer unit of restart). At most ``train.parallel_units`` runs train at
   once (``run_at_most``, one driver thread each); the others queue, and on an autoscaling cluster the workers
   that wait are the demand that starts nodes. All run the same per-worker function over a list of folds.
3. On every worker: ``get_dataset_shard(...)`` -> batches (training split sharded over workers, reshuffled per
   epoch; evaluation splits read whole, each rank scoring every world_size-th batch), ``prepare_model`` (DDP:
   gloo on CPU, nccl on GPU), ``train.fit_folds``. Each epoch ends with a checkpoint (fold, epoch, model and
   optimizer state, best-so-far weights, finished folds' results) reported to ``RunConfig(storage_path)``
   (object storage on a cluster; its size and upload seconds go to the fold run, ``CHECKPOINT_MB`` and
   ``CHECKPOINT_SECONDS``); ``FailureConfig(max_failures)`` restarts failed workers (a lost node's too, on the
   nodes that remain), which continue from that checkpoint. Running ``train_folds`` again with the same
   ``run_name`` and ``storage_path`` continues an interrupted run too (Ray Train V2 restores a run of the same
   name from its storage).
4. Rank 0 logs to MLflow (``tracking.FoldLogger``): a run per (fold, seed) (found again, not duplicated, after a
   restart) nested under ``parent_run_id`` or under a run this function creates. Per-fold results come back
   through the train function's return value (``Result.return_value``: Ray Train V2 returns rank 0's value). At
   fold end the selected weights and the resolved config go to the fold run as artifacts ``model/`` (``ser
   predict``).
5. ``config.train.seeds`` > 1: every seed's runs (seed, seed+1, ...) under ``<run_name>/seed=S``, a fold run per
   (fold, seed); the summary is over every fold × seed run (``train.summarize_trial``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from ser_platform import tracking
from ser_platform.tracking import schema
from ser_platform.cluster import absolute_location, check_before_ray, prepare_run, resolve_dataset
from ser_platform.config import Config, from_dict
from ser_platform.console import Console, worker_lines
from ser_platform.environment import check_worker, versions
from ser_platform.resources import trainer_resources
from ser_platform.train import FoldResult, Hooks, TrialResult, summarize_trial

CHECKPOINT_FILE = "state.pt"
# Per-epoch metrics of a fold run: the checkpoint's size and the seconds Ray Train took to persist it (to object
# storage on a cluster), what an epoch costs in data moved besides training (benchmarks/cluster.py reads them).
CHECKPOINT_MB, CHECKPOINT_SECONDS = "checkpoint_mb", "checkpoint_seconds"
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller polls its workers (s)
LOCAL_POLL_INTERVAL_S = 0.5  # that poll on a local Ray (init_ray); Ray's default is 2 s
FAULT_ENV = "SER_TEST_KILL_WORKER"  # "FOLD:EPOCH:PID_FILE": tests only, see _FaultInjection

__all__ = ["FoldResult", "TrialResult", "format_result", "init_ray", "prepare_fold_data", "quiet_ray",
           "train_command", "train_folds"]


# --- Ray ---------------------------------------------------------------------------------------------------

def init_ray(address: str | None = None, console: Console | None = None, **kwargs: Any) -> str | None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, else start a fresh local instance ("local": never attach to
    some other process's cluster), quiet as ``console`` says. Does nothing when Ray is already initialised.
    Returns the folder of the session's logs when it started or joined Ray here."""
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")  # one copy of lines that every worker prints
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        # One machine has no node a spot reclaim could take: Ray Train's preemption watcher would be one more
        # process per trainer (the local Ray's workers inherit this environment) watching for nothing.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller takes reports, and sees a worker group finish, only when it polls (every 2 s by
        # default); here a poll is a local call, and the wait after each trainer's last report was idle time
        # (benchmarks/poll.py).
        os.environ.setdefault(POLL_INTERVAL_ENV, str(LOCAL_POLL_INTERVAL_S))
    options = {**(console.ray_init_kwargs() if console is not None else {}), **kwargs}
    context = ray.init(address=target, **options)
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    return f"{session}/logs" if session else None


def quiet_ray() -> None:
    """Readable output: no Ray Data progress bars or per-execution INFO lines (they would interleave with the
    per-epoch lines), no INFO from Ray Train (e.g. a line per ``report``)."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's one-time "progress bars disabled" notice
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Train V2 logs a line per report (the whole metrics dict) under a logger named by its file path, not its
    # module, so "ray.train" above does not reach it.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# --- fold data ---------------------------------------------------------------------------------------------

def _rows(ds: Any) -> dict[str, list]:
    table = ds.select_columns(["id", "speaker", "session"]).to_pandas()
    return {c: table[c].tolist() for c in ("id", "speaker", "session")}


def prepare_fold_data(dataset: str, specs: Mapping[int, Any], *, materialize: bool, progress: bool = True,
                      texts: Any = None) -> dict[int, dict[str, Any]]:
    """Each fold's ``{"train", "val", "test"}`` Ray Datasets, checked for leakage on their actual rows; ``texts``
    (``data.transcripts.SplitTexts``): the ASR text the splits read instead of the gold transcripts.

    Raises ``FoldLeakageError`` before any training if a test utterance, speaker or held-out session reaches
    training (``folds.assert_no_leakage``), or a validation speaker is also a training speaker; ``ValueError``
    if a fold has no training, validation or test rows.
    """
    from tqdm.auto import tqdm

    from ser_platform.data.folds import FoldLeakageError, assert_no_leakage
    from ser_platform.data.loader import fold_datasets, read_dataset

    base = read_dataset(dataset, materialize=materialize)
    out: dict[int, dict[str, Any]] = {}
    for fold, spec in tqdm(sorted(specs.items()), desc="fold data", unit="fold", disable=not progress):
        splits = fold_datasets(base, spec, materialize=materialize, texts=texts)
        rows = {name: _rows(ds) for name, ds in splits.items()}
        for name, split_rows in rows.items():
            if not split_rows["id"]:
                raise ValueError(f"{dataset}: fold {fold} ({spec.name}) has no {name} rows "
                                 f"(speakers {sorted(getattr(spec, name + '_speakers'))})")
        train_and_val = {c: rows["train"][c] + rows["val"][c] for c in rows["train"]}
        assert_no_leakage(train_and_val, rows["test"], spec)
        assert_no_leakage(rows["train"], rows["val"])
        overlap = sorted(set(rows["train"]["speaker"]) & set(rows["val"]["speaker"]))
        if overlap:
            raise FoldLeakageError(f"{spec.name}: validation speaker(s) {overlap} also in training")
        out[fold] = splits
    return out


# --- the per-worker function ---------------------------------------------------------------------------------

class _FaultInjection:
    """Tests only (env ``SER_TEST_KILL_WORKER=FOLD:EPOCH:PID_FILE``): at the start of that fold's epoch, rank 0
    writes its PID to PID_FILE once and waits to be killed there, so the kill lands mid-epoch, after the
    previous epoch's checkpoint. A restarted worker finds the file and trains on.

    Ray Train V2's controller collects a worker's reports when it polls the workers (every ``POLL_INTERVAL_ENV``
    seconds: 2 by default, 0.5 on a local Ray): a worker killed before that poll loses the reports
    since the last one, and the restart begins from the checkpoint before. So the worker waits 2.5 poll
    intervals before announcing itself, as a real epoch would have taken."""

    def __init__(self, spec: str | None):
        self.target = None
        if spec:
            fold, epoch, path = spec.split(":", 2)
            self.target = (int(fold), int(epoch), Path(path))

    def maybe_wait_for_kill(self, fold: int, epoch: int, rank: int) -> None:
        if self.target is None or rank != 0 or (fold, epoch) != self.target[:2] or self.target[2].exists():
            return
        time.sleep(2.5 * float(os.environ.get(POLL_INTERVAL_ENV, "2.0")))
        partial = self.target[2].with_suffix(".tmp")
        partial.write_text(str(os.getpid()))
        partial.rename(self.target[2])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.2)
        raise RuntimeError(f"{FAULT_ENV}: expected to be killed at fold {fold} epoch {epoch}")


class _RayHooks(Hooks):
    """Checkpoints to Ray Train storage at every epoch and fold end (all ranks report; rank 0 saves) and
    MLflow logging from rank 0 (``tracking.FoldLogger``)."""

    def __init__(self, *, rank: int, logger: tracking.FoldLogger | None, fault: _FaultInjection):
        self.rank = rank
        self.logger = logger
        self.fault = fault

    def on_fold_start(self, fold: int) -> None:
        if self.logger is not None:
            self.logger.start(fold)

    def on_epoch_start(self, fold: int, epoch: int) -> None:
        self.fault.maybe_wait_for_kill(fold, epoch, self.rank)

    def on_epoch_end(self, fold, epoch, metrics, state_fn) -> None:
        # Logged before the checkpoint: a restart redoes this epoch and logs it again, never leaves it out.
        if self.logger is not None:
            self.logger.epoch(fold, epoch, metrics)
        moved = self._report(dict(metrics), state_fn, f"fold{fold:02d}-epoch{epoch:03d}")
        if self.logger is not None and moved is not None:
            self.logger.epoch(fold, epoch, {CHECKPOINT_MB: moved[0] / 2**20, CHECKPOINT_SECONDS: moved[1]})

    def on_model_selected(self, fold, result, weights_fn) -> None:
        if self.logger is not None and self.logger.config.tracking.log_model:
            self.logger.log_model(fold, result, weights_fn())

    def on_fold_end(self, fold, result, state_fn) -> None:
        if self.logger is not None:
            self.logger.finish(fold, result)
        metrics = {"fold": float(fold), "epoch": float(result.epochs_run), "test_wa": result.test_wa,
                   "test_ua": result.test_ua, "val_ua": result.val_ua, "fold_done": 1.0}
        self._report(metrics, state_fn, f"fold{fold:02d}-done")

    def _report(self, metrics: dict, state_fn, name: str) -> tuple[int, float] | None:
        """Report ``metrics`` with a checkpoint (rank 0 writes it); rank 0 returns the checkpoint's bytes and the
        seconds ``report`` took to persist it to the run's storage (an upload, with object storage)."""
        import ray.train
        import torch

        if self.rank != 0 or state_fn is None:  # no checkpoint due (train.checkpoint_every), or not rank 0
            ray.train.report(metrics, checkpoint=None)  # a barrier: every rank reports as often as rank 0
            return None
        with tempfile.TemporaryDirectory(prefix="ser-ckpt-") as tmp:
            torch.save(state_fn(), Path(tmp) / CHECKPOINT_FILE)
            size = (Path(tmp) / CHECKPOINT_FILE).stat().st_size
            started = time.perf_counter()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            return size, time.perf_counter() - started


def _load_checkpoint_state(checkpoint: Any) -> dict | None:
    import torch

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _worker_collate(config: Config, encoder_cache: Mapping[str, str] | None) -> Any:
    """The collate of a worker: the training one, plus the cached frozen-encoder states when there is a cache."""
    from ser_platform.data.features import FeatureParams
    from ser_platform.data.loader import make_collate
    from ser_platform.models.text import build_tokenizer

    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                           max_audio_samples=int(round(config.data.max_audio_seconds * config.data.sample_rate)),
                           feature_params=FeatureParams.from_speech_config(config.model.speech,
                                                                           config.data.sample_rate))
    if encoder_cache:  # {modality: entry path}, checked by the driver
        from ser_platform.frozen_encoders import cached_collate

        collate = cached_collate(collate, encoder_cache)
    return collate


def _shard_batches(config: Config, collate: Any, rank: int, world_size: int):
    """``batches_for(fold, split, epoch)`` of ``train.fit_folds`` over this worker's Ray Data shards."""
    import ray.train

    from ser_platform.data.loader import eval_batches, train_batches
    from ser_platform.train import derive_seed

    per_worker_batch = max(1, config.train.batch_size // world_size)

    def batches_for(fold: int, split: str, epoch: int):
        shard = ray.train.get_dataset_shard(f"{split}_{fold}")
        if split == "train":
            return train_batches(shard, collate, batch_size=per_worker_batch,
                                 seed=derive_seed(config.train.seed, fold, epoch, rank),
                                 samples_per_class=config.train.samples_per_class,
                                 bucket_by_length=config.data.bucket_by_length)
        return eval_batches(shard, collate, batch_size=config.train.batch_size, rank=rank, world_size=world_size)

    return batches_for


def train_loop_per_worker(loop_config: dict) -> dict[int, dict]:
    """The Ray Train worker function: Ray Data shards -> ``train.fit_folds`` -> ``{fold: FoldResult dict}``."""
    import ray.train
    import ray.train.torch
    import torch

    from ser_platform.train import fit_folds

    quiet_ray()
    check_worker(loop_config.get("versions"))  # a node the autoscaler added after the driver's check
    # Ray sets OMP_NUM_THREADS from the integer part of a worker's CPUs (1 for 1.99): use what was granted.
    torch.set_num_threads(max(1, math.ceil(float(loop_config.get("cpus", 1.0)) - 0.05)))
    config = from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    collate = _worker_collate(config, loop_config.get("encoder_cache"))
    logger = tracking.FoldLogger(config, loop_config["runs"]) if rank == 0 else None
    hooks = _RayHooks(rank=rank, logger=logger, fault=_FaultInjection(loop_config.get("fault")))
    resume_state = _load_checkpoint_state(ray.train.get_checkpoint())
    folds = [int(f) for f in loop_config["folds"]]
    if resume_state is not None and logger is not None:
        for fold, values in resume_state.get("finished", {}).items():
            if int(fold) in folds:
                logger.ensure_finished(int(fold), FoldResult.from_dict(values))
    results = fit_folds(config, folds, _shard_batches(config, collate, rank, world_size),
                        device=ray.train.torch.get_device(), rank=rank, world_size=world_size,
                        wrap_model=ray.train.torch.prepare_model, hooks=hooks, resume_state=resume_state,
                        log=worker_lines(loop_config.get("progress"), loop_config.get("prefix", "")))
    return {fold: result.to_dict() for fold, result in results.items()}


# --- the driver ----------------------------------------------------------------------------------------------

def _fit(config: Config, *, name: str, storage_path: str, folds: list[int], datasets: dict[str, Any],
         loop_config: dict) -> dict[int, FoldResult]:
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = trainer_resources(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "folds": folds, "cpus": scaling["resources_per_worker"]["CPU"],
                           "versions": versions()},
        torch_config=TorchConfig(backend="nccl" if config.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            # The latest checkpoint carries everything a restart needs (best weights included).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        # Training splits are sharded over workers; evaluation splits go whole to every worker (each scores
        # its share of batches), in a fixed order so a seed gives the same batches every run. One worker reads
        # every split whole: a streaming split would start a coordinator actor (a process) per fold for nothing.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[k for k in datasets if k.startswith("train_")] if config.train.num_workers > 1 else [],
            execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    returned = result.return_value or {}
    missing = [f for f in folds if f not in returned]
    if missing:
        raise RuntimeError(f"Ray Train run {name!r} finished without results for fold(s) {missing}")
    return {f: FoldResult.from_dict(returned[f]) for f in folds}


def _inputs(config: Config, dataset: str) -> tuple[dict[str, str], dict[str, str] | None]:
    """Before any trainer starts: the provenance params of every fold run, and the encoder cache's entries (a
    stale or mismatched cache, or stored features computed with other settings, fail here naming what differs)."""
    from ser_platform.data.parquet import read_summary

    try:
        summary = read_summary(dataset)
    except (ImportError, ValueError, OSError):
        summary = None
    params = {"git_commit": tracking.git_commit(), "dataset_path": dataset,
              "dataset_fingerprint": tracking.dataset_fingerprint(dataset, summary)}
    if summary and summary.get("features") and summary.get("feature_params"):
        _check_feature_params(config, dataset, summary["feature_params"])
    encoder_cache = None
    if config.data.encoder_cache:
        from ser_platform.frozen_encoders import open_encoder_cache

        encoder_cache = open_encoder_cache(config, dataset)
    return params, encoder_cache


@dataclasses.dataclass
class FoldData:
    """Every fold's splits (``prepare_fold_data``), read and materialised once, before any worker takes its CPUs
    (``resources.py``): a sweep's driver prepares them for all its trials, whose configurations share the dataset,
    protocol and folds; ``for_config`` hands them to a trial that reads the same, None to one that does not."""

    key: tuple
    splits: dict[int, dict[str, Any]]
    seconds: float  # reading (from object storage too) and materialising, wall time

    @staticmethod
    def key_of(config: Config) -> tuple:
        data = config.data  # the text sources too: a trial reading other text (Table 5's rows) reads other splits
        return (data.dataset, data.protocol, tuple(data.folds), data.materialize, data.train_text_source,
                data.test_text_source, data.asr_model)

    @classmethod
    def prepare(cls, config: Config, dataset: str, *, progress: bool = True) -> "FoldData":
        from ser_platform.data.folds import fold_spec

        started = time.perf_counter()
        specs = {k: fold_spec(k, config.data.protocol) for k in config.data.folds}
        from ser_platform.data.transcripts import load_split_texts

        data = config.data
        texts = load_split_texts(dataset, data.train_text_source, data.test_text_source, data.asr_model)
        splits = prepare_fold_data(dataset, specs, materialize=data.materialize, progress=progress, texts=texts)
        return cls(cls.key_of(config.replace({"data.dataset": dataset})), splits, time.perf_counter() - started)

    def for_config(self, config: Config) -> dict[int, dict[str, Any]] | None:
        return self.splits if self.key_of(config) == self.key else None


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One Ray Train run: folds of one seed, trained in turn by one trainer; ``name`` is the run's folder under
    the storage, ``train_run`` the name its fold runs carry (one per seed, whatever the split into runs)."""

    seed: int
    folds: tuple[int, ...]
    name: str
    train_run: str


def _units(config: Config, run_name: str) -> list[_Unit]:
    """The configuration's Ray Train runs. ``trainer_scope = fold``: one per (fold, seed). ``trial``: each seed's
    folds dealt into ``train.parallel_units`` lanes (folds 1,3,5 and 2,4 for two), one run per lane training its
    folds in turn, so Ray Train's start-up (~20 s here) is paid once per lane, not per fold. Names as before lanes
    existed, so interrupted runs resume: ``NAME`` (one seed) or ``NAME/seed=S``, then ``/fold=K`` (a run per
    fold) or ``/folds=K,L`` (a lane of some of the folds)."""
    seeds = [config.train.seed + i for i in range(config.train.seeds)]
    folds = list(config.data.folds)
    per_fold = config.train.trainer_scope == "fold"
    lanes = len(folds) if per_fold else max(1, min(config.train.parallel_units, len(folds)))
    units = []
    for seed in seeds:
        seed_name = run_name if len(seeds) == 1 else f"{run_name}/seed={seed}"
        for lane in range(lanes):
            part = tuple(folds[lane::lanes])
            suffix = (f"/fold={part[0]}" if per_fold or len(part) == 1 else
                      "" if len(part) == len(folds) else "/folds=" + ",".join(map(str, part)))
            units.append(_Unit(seed, part, seed_name + suffix, seed_name))
    return units


def _run_unit(config: Config, unit: _Unit, *, storage: str, fold_data: Mapping[int, Mapping[str, Any]],
              loop_config: dict, runs: tracking.FoldRunContext) -> dict[int, FoldResult]:
    seeded = config if config.train.seeds == 1 else config.replace({"train.seed": unit.seed})
    unit_runs = dataclasses.replace(runs, train_run=unit.train_run, num_seeds=config.train.seeds)
    prefix = loop_config["prefix"] + (f"seed {unit.seed} | " if config.train.seeds > 1 else "")
    unit_loop = {**loop_config, "config": seeded.to_dict(), "runs": unit_runs, "prefix": prefix}
    datasets = {f"{split}_{k}": ds for k in unit.folds for split, ds in fold_data[k].items()}
    return _fit(seeded, name=unit.name, storage_path=storage, folds=list(unit.folds), datasets=datasets,
                loop_config=unit_loop)


def run_at_most(jobs: list[Any], run: Any, at_once: int) -> list[Any]:
    """``[run(job) for job in jobs]``, at most ``at_once`` at a time (each TorchTrainer's ``fit`` blocks its
    thread while Ray schedules its workers; those that find no room wait for it, and their placement groups are
    the demand an autoscaler answers). Daemon threads: Ctrl-C in the main thread ends the process, and with it
    the trainers it drives. After a failure no new job starts; the first error is raised once the running ones end."""
    if at_once <= 1 or len(jobs) <= 1:
        return [run(job) for job in jobs]
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    waiting = queue.Queue()
    for index in range(len(jobs)):
        waiting.put(index)

    def worker() -> None:
        while not errors:
            try:
                index = waiting.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = run(jobs[index])
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(err)

    threads = [threading.Thread(target=worker, daemon=True, name=f"ser-unit-{i}")
               for i in range(min(at_once, len(jobs)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # short waits: the main thread stays responsive to Ctrl-C
    if errors:
        raise errors[0]
    return results


def _resolved(config: Config) -> Config:
    """A config whose resources the entry point did not decide (a test or benchmark calling ``train_folds``
    directly): decided here for the cluster this process is connected to, silently."""
    if config.train.cpus_per_worker and config.train.parallel_units:
        return config
    from ser_platform.resources import cluster_shape, resolve

    return resolve(config, cluster_shape(), sweep=False, say=lambda _line: None)


def train_folds(config: Config, *, run_name: str, storage_path: str, parent_run_id: str | None = None,
                tags: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                progress: Any = None, fold_data: FoldData | None = None) -> TrialResult:
    """Train and test ``config`` on every fold of ``config.data.folds`` with Ray Train (module docstring).

    ``run_name`` names the Ray Train run(s) under ``storage_path`` (checkpoints; the same name continues an
    interrupted run) and tags the MLflow runs. MLflow: fold runs nest under ``parent_run_id`` when given (e.g.
    a Tune trial's run), else under a run created here (params: config, git commit, dataset fingerprint;
    metrics: the summary over folds). ``tags`` go on every fold run, ``labels`` (a sweep trial's UI keys,
    ``tracking.TrialIdentity.labels``; default: the config's protocol, folds and seeds) become their params.
    ``progress``: the console's channel (``console.Console.channel``) the workers' lines go to. ``fold_data``:
    splits a sweep's driver prepared (``FoldData``), used when they are this config's. Returns per-fold results
    and their mean/std.
    """
    from ser_platform.data.folds import fold_spec

    init_ray()
    quiet_ray()
    config = _resolved(config)
    dataset = config.data.dataset or resolve_dataset("")  # resolved by the entry point (cluster.resolve_locations)
    uri = tracking.ensure_store(tracking.resolve_tracking_uri(config))
    experiment_id = tracking.experiment_id(uri, config.tracking.experiment)
    params, encoder_cache = _inputs(config, dataset)
    params.update(labels or schema.labels(config))
    own_run = None
    if parent_run_id is None:
        own_run = tracking.open_train_run(uri, experiment_id, run_name, config, params, tags)
    try:
        specs = {k: fold_spec(k, config.data.protocol) for k in config.data.folds}
        splits = fold_data.for_config(config.replace({"data.dataset": dataset})) if fold_data else None
        splits = splits or FoldData.prepare(config, dataset).splits
        runs = tracking.FoldRunContext(
            tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id or own_run.run_id,
            train_run=run_name, tags=dict(tags or {}), params=params,
            speakers={k: (sorted(s.test_speakers), sorted(s.val_speakers)) for k, s in specs.items()})
        loop_config = {"fault": os.environ.get(FAULT_ENV) or None, "encoder_cache": encoder_cache,
                       "progress": progress, "prefix": f"{run_name.replace('=', ' ')} | " if parent_run_id else ""}
        units = _units(config, run_name)
        done = run_at_most(units, lambda unit: _run_unit(config, unit, storage=absolute_location(storage_path),
                                                         fold_data=splits, loop_config=loop_config, runs=runs),
                           config.train.parallel_units)
        per_seed: dict[int, dict[int, FoldResult]] = {}
        for unit, results in zip(units, done):
            per_seed.setdefault(unit.seed, {}).update(results)
        first = per_seed[config.train.seed]
        result = TrialResult(per_fold=first, summary=summarize_trial(first, per_seed), per_seed=per_seed)
    except BaseException:
        if own_run is not None:
            own_run.set_status("FAILED")
        raise
    if own_run is not None:
        own_run.log_metrics(result.summary)
        own_run.set_status("FINISHED")
    return result


def _check_feature_params(config: Config, dataset: str, stored: Mapping[str, Any]) -> None:
    from ser_platform.data.features import FeatureParams

    wanted = FeatureParams.from_speech_config(config.model.speech, config.data.sample_rate).to_dict()
    differ = {k: (stored.get(k), v) for k, v in wanted.items() if k in stored and stored.get(k) != v}
    if differ:
        raise ValueError(f"{dataset}: stored features were computed with other settings than the config asks "
                         f"for (stored, wanted): {differ}; re-run `ser prepare --features` or prepare without them")


def format_result(result: TrialResult) -> str:
    """A table of the folds (× seeds) and their mean ± std, for the terminal."""
    seeds = len(result.per_seed) > 1
    lines = [f"{'fold':>4}  " + (f"{'seed':>4}  " if seeds else "")
             + f"{'best ep':>7}  {'val UA':>6}  {'test WA':>7}  {'test UA':>7}  {'impro UA':>8}  {'script UA':>9}"]
    for (fold, seed), r in sorted(result.runs().items()):
        impro = r.subsets.get("improvised", {}).get("ua", float("nan"))
        script = r.subsets.get("scripted", {}).get("ua", float("nan"))
        lines.append(f"{fold:>4}  " + (f"{seed:>4}  " if seeds else "")
                     + f"{r.best_epoch:>7}  {r.val_ua:>6.3f}  {r.test_wa:>7.3f}  {r.test_ua:>7.3f}  "
                     f"{impro:>8.3f}  {script:>9.3f}")
    s = result.summary
    over = (f"{len(result.per_fold)} fold(s) × {len(result.per_seed)} seeds" if seeds
            else f"{len(result.per_fold)} fold(s), 1 seed")
    lines.append(f"mean ± std over {over}: test WA {s['test_wa_mean']:.3f} ± "
                 f"{s['test_wa_std']:.3f}, test UA {s['test_ua_mean']:.3f} ± {s['test_ua_std']:.3f} "
                 f"(val UA {s['val_ua_mean']:.3f} ± {s['val_ua_std']:.3f})")
    if seeds:
        spread = ", ".join(f"fold {f} {s[f'test_ua_seed_std_fold{f}']:.3f}" for f in sorted(result.per_fold))
        lines.append(f"spread over seeds (std of test UA within a fold): {spread}; mean {s['test_ua_seed_std']:.3f}")
    return "\n".join(lines)


def train_command(config: Config, ray_address: str | None = None, *, verbose: bool = False) -> int:
    """``ser train``: one configuration on ``config.data.folds``; prints what resources it decided, each epoch and
    fold as they end, then every fold and the mean ± std (``verbose``: Ray's own output too)."""
    console = Console(verbose)
    console.quiet_libraries()
    # A bad dataset or an unreachable tracking server fails before Ray starts (seconds, not minutes); a local store
    # is created only once the cluster is known to be one node (cluster.prepare_run).
    check_before_ray(config)
    run_name = "train-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    console.open(init_ray(ray_address, console))
    try:
        config = prepare_run(config, sweep=False, say=console.say)
        tracking.ensure_store(config.tracking.mlflow_uri)
        result = train_folds(config, run_name=run_name, storage_path=config.tracking.storage,
                             progress=console.channel)
    finally:
        console.close()
    print(format_result(result))
    print(f"{len(result.per_fold)} fold(s) in {time.perf_counter() - started:.0f} s; MLflow experiment "
          f"{config.tracking.experiment!r} at {config.tracking.mlflow_uri}, run {run_name!r}")
    return 0
