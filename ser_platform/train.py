"""The training loop of one worker, for a list of folds: plain torch, no Ray (testable and benchmarkable alone).

    fit_folds(config, folds, batches_for, device=..., rank=..., world_size=..., wrap_model=..., hooks=...)

runs each fold in turn with a fresh, seeded model: train for ``config.train.epochs`` epochs (or until
``config.train.patience`` epochs pass without a better validation UA), select the epoch with the best
validation UA (held-out training speaker: the test session is never looked at for any choice), then score
the test split once with those weights. Per fold it returns a :class:`FoldResult` (WA, UA, confusion, and the
same on the improvised / scripted subsets).

The caller supplies what differs between Ray and a plain process:

* ``batches_for(fold, split, epoch)`` -> iterable of collated batches (``ser_platform.data.loader``); for
  "train" this rank's shard, reshuffled per epoch; for "val"/"test" this rank's share, predictions are
  gathered over ranks with ``torch.distributed`` when ``world_size > 1``;
* ``wrap_model`` (e.g. ``ray.train.torch.prepare_model``: move to device, wrap in DDP);
* :class:`Hooks` called on every rank at fold/epoch boundaries with a function that builds the checkpoint
  state, so the caller can checkpoint and log (rank 0) and a restarted worker can pass that state back as
  ``resume_state`` to continue where it stopped.

Determinism: the model of fold k is initialised from seed (seed, k) and every epoch reseeds torch, numpy and
random from (seed, k, epoch, rank), so a run resumed from an epoch checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ser_platform.config import Config
from ser_platform.data.iemocap import CLASSES
from ser_platform.metrics import classification_scores, summarize_folds

MODEL_INPUTS = ("input_values", "audio_lengths", "mfcc", "spectrogram", "feature_lengths", "input_ids",
                "attention_mask")
CACHED_INPUTS = ("text_states", "speech_ssl_states")  # frozen-encoder states, when the collate adds them
SUBSETS = ("improvised", "scripted")
STATE_VERSION = 1

BatchesFor = Callable[[int, str, int], Iterable[Mapping[str, Any]]]


# --- results -----------------------------------------------------------------------------------------------

@dataclass
class FoldResult:
    """One fold: the selected (best-validation) epoch, its validation scores and the test scores with its
    weights. ``subsets`` holds ``{"improvised": {"wa", "ua", "n"}, "scripted": {...}}`` on the test split."""

    fold: int
    best_epoch: int
    val_wa: float
    val_ua: float
    test_wa: float
    test_ua: float
    confusion: list[list[int]]
    subsets: dict[str, dict[str, float]] = field(default_factory=dict)
    epochs_run: int = 0
    num_test: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch
    resumed_from: list[int] = field(default_factory=list)  # epochs whose checkpoint a restart continued from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FoldResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in values.items() if k in known})


@dataclass
class TrialResult:
    """All folds of one configuration and their summary (mean and std over folds, × seeds with ``train.seeds``).

    ``per_fold``: fold -> result of the first seed (``train.seed``); ``per_seed``: seed -> fold -> result for
    every seed (``ray_train.train_folds`` always fills it; empty in a result built elsewhere: one seed)."""

    per_fold: dict[int, FoldResult]
    summary: dict[str, float]
    per_seed: dict[int, dict[int, FoldResult]] = field(default_factory=dict)

    def runs(self) -> dict[tuple[int, int], FoldResult]:
        """(fold, seed) -> result, every run of the trial (seed 0 stands for the one seed of ``per_fold``
        when ``per_seed`` is empty): the keys ``comparison.paired_comparison`` pairs on."""
        if not self.per_seed:
            return {(fold, 0): r for fold, r in self.per_fold.items()}
        return {(fold, seed): r for seed, folds in self.per_seed.items() for fold, r in folds.items()}


def summarize_trial(per_fold: Mapping[int, FoldResult],
                    per_seed: Mapping[int, Mapping[int, FoldResult]] | None = None) -> dict[str, float]:
    """Mean and sample std (ddof=1, `metrics.summarize_folds`) over folds: ``val_ua_mean``, ``val_ua_std``,
    ``test_wa_mean``, ... and the same for each test subset (``test_ua_improvised_mean``, ...) present in every fold.

    With ``per_seed`` (seed -> fold -> result) of more than one seed, mean and std are over every fold × seed run,
    ``num_seeds`` counts the seeds, and the spread over seeds within a fold is given per fold
    (``test_ua_seed_std_fold<k>``, likewise ``test_wa``) and averaged over folds (``test_ua_seed_std``)."""
    if per_seed and len(per_seed) > 1:
        results = [per_seed[s][k] for s in sorted(per_seed) for k in sorted(per_seed[s])]
    else:
        results = [per_fold[k] for k in sorted(per_fold)]
    summary: dict[str, float] = {"num_folds": float(len({r.fold for r in results})),
                                 "num_seeds": float(len(per_seed) if per_seed else 1)}
    if per_seed and len(per_seed) > 1:
        for key in ("test_wa", "test_ua"):
            spreads = []
            for fold in sorted({r.fold for r in results}):
                values = [getattr(per_seed[s][fold], key) for s in sorted(per_seed) if fold in per_seed[s]]
                spreads.append(summarize_folds(values)["std"])
                summary[f"{key}_seed_std_fold{fold}"] = float(spreads[-1])
            summary[f"{key}_seed_std"] = float(np.mean(spreads))
    columns: dict[str, list[float]] = {
        "val_wa": [r.val_wa for r in results], "val_ua": [r.val_ua for r in results],
        "test_wa": [r.test_wa for r in results], "test_ua": [r.test_ua for r in results],
    }
    for subset in SUBSETS:
        if results and all(r.subsets.get(subset, {}).get("n", 0) > 0 for r in results):
            columns[f"test_wa_{subset}"] = [r.subsets[subset]["wa"] for r in results]
            columns[f"test_ua_{subset}"] = [r.subsets[subset]["ua"] for r in results]
    for name, values in columns.items():
        stats = summarize_folds(values)
        summary[f"{name}_mean"] = float(stats["mean"])
        summary[f"{name}_std"] = float(stats["std"])
    return summary


# --- hooks -------------------------------------------------------------------------------------------------

class Hooks:
    """Called on every rank at fold and epoch boundaries; the base class does nothing.

    ``state_fn()`` builds the checkpoint state (a dict of plain Python values and tensors, loadable with
    ``torch.load(weights_only=True)``); only call it where the state is saved (rank 0), as it copies weights.
    """

    def on_fold_start(self, fold: int) -> None:
        pass

    def on_epoch_start(self, fold: int, epoch: int) -> None:
        pass

    def on_epoch_end(self, fold: int, epoch: int, metrics: Mapping[str, float],
                     state_fn: Callable[[], dict] | None) -> None:
        """``state_fn`` is None when no checkpoint is due this epoch (``train.checkpoint_every``)."""

    def on_model_selected(self, fold: int, result: FoldResult, weights_fn: Callable[[], dict]) -> None:
        """Just before ``on_fold_end``: ``weights_fn()`` copies the selected (best-validation) weights that
        scored the test split, the plain model's state dict on the CPU (``ser predict`` loads them)."""

    def on_fold_end(self, fold: int, result: FoldResult, state_fn: Callable[[], dict]) -> None:
        pass


# --- seeds -------------------------------------------------------------------------------------------------

def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (e.g. (seed, fold, epoch, rank)) via numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- one batch ---------------------------------------------------------------------------------------------

def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device``; lists (ids, mode) and ``None`` pass through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: Mapping[str, Any], features: nn.Module | None) -> dict[str, Any]:
    """The keyword arguments of ``SERModel.forward``; MFCC/spectrogram computed on the batch's device with
    ``AcousticFeatures`` when the dataset did not store them (``features`` None: a model without a speech network,
    which never reads them); cached frozen-encoder states when the batch has them (``data.encoder_cache``)."""
    inputs = {k: batch.get(k) for k in MODEL_INPUTS}
    inputs.update({k: batch[k] for k in CACHED_INPUTS if batch.get(k) is not None})
    if inputs["mfcc"] is None and features is not None:
        with torch.no_grad():
            inputs["mfcc"], inputs["spectrogram"], inputs["feature_lengths"] = features(
                inputs["input_values"], inputs["audio_lengths"])
    return inputs


def autocast(config: Config, device: torch.device):
    """bf16 autocast on CUDA when ``train.precision = bf16``; a no-op context elsewhere."""
    enabled = config.train.precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _all_reduce_sum(values: Sequence[float], device: torch.device, world_size: int) -> list[float]:
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _gather_lists(local: list, world_size: int) -> list:
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return list(local)
    gathered: list[list] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def train_epoch(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Iterable[Mapping[str, Any]], *, config: Config, features: nn.Module | None,
                device: torch.device, world_size: int = 1, where: str = "") -> dict[str, float]:
    """One pass over this rank's training batches; returns the sample-weighted mean of each loss term
    (eq. 9 ``loss``, eq. 8 ``metric``, eq. 10 ``ce``) over all ranks, ``num_samples``, and ``step_time_s``:
    this rank's seconds in the steps themselves (device copy, forward, loss, backward, clipping, optimizer step,
    up to the loss values read back), i.e. the epoch's time minus waiting for the next batch."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, metric, ce (each * batch size), samples
    step_time = 0.0
    for step, batch in enumerate(batches):
        step_started = time.perf_counter()
        batch = to_device(batch, device)
        labels = batch["labels"]
        with autocast(config, device):
            output = model(**model_inputs(batch, features))
            losses = loss_fn(output, labels)
        if not torch.isfinite(losses.loss):
            raise FloatingPointError(f"{where} batch {step}: loss is {losses.loss.item()} "
                                     f"(first ids {list(batch['ids'])[:4]})")
        optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        optimizer.step()
        size = float(labels.shape[0])
        sums[0] += float(losses.loss.detach()) * size
        sums[1] += float(losses.metric.detach()) * size
        sums[2] += float(losses.ce.detach()) * size  # float(): waits for the device, so the step is timed whole
        sums[3] += size
        step_time += time.perf_counter() - step_started
    total = _all_reduce_sum(sums, device, world_size)
    count = max(total[3], 1.0)
    return {"loss": total[0] / count, "metric_loss": total[1] / count, "ce_loss": total[2] / count,
            "num_samples": total[3], "step_time_s": step_time}


@torch.no_grad()
def predict(model: nn.Module, loss_fn: nn.Module, batches: Iterable[Mapping[str, Any]], *, config: Config,
            features: nn.Module | None, device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """Predictions over an evaluation split, gathered from every rank: ``ids``, ``labels``, ``preds``,
    ``modes`` (lists in id order) and the sample-weighted mean ``loss`` / ``metric_loss`` / ``ce_loss``."""
    model.eval()
    rows: list[tuple[str, int, int, str]] = []
    sums = [0.0, 0.0, 0.0, 0.0]
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(config, device):
            output = model(**model_inputs(batch, features))
            losses = loss_fn(output, batch["labels"])
        preds = output.logits.float().argmax(dim=-1).tolist()
        size = float(len(preds))
        sums[0] += float(losses.loss) * size
        sums[1] += float(losses.metric) * size
        sums[2] += float(losses.ce) * size
        sums[3] += size
        rows.extend(zip(batch["ids"], batch["labels"].tolist(), preds, batch["mode"]))
    rows = sorted(_gather_lists(rows, world_size))
    total = _all_reduce_sum(sums, device, world_size)
    count = max(total[3], 1.0)
    return {"ids": [r[0] for r in rows], "labels": [r[1] for r in rows], "preds": [r[2] for r in rows],
            "modes": [r[3] for r in rows], "loss": total[0] / count, "metric_loss": total[1] / count,
            "ce_loss": total[2] / count}


def score(predictions: Mapping[str, Any], subset: str = "all", num_classes: int = len(CLASSES)) -> dict[str, Any]:
    """WA, UA and confusion of the predictions whose mode is ``subset`` ("all" = every row); ``n`` rows."""
    keep = [i for i, mode in enumerate(predictions["modes"]) if subset == "all" or mode == subset]
    if not keep:
        return {"wa": float("nan"), "ua": float("nan"), "confusion": [[0] * num_classes] * num_classes, "n": 0}
    y_true = np.asarray([predictions["labels"][i] for i in keep])
    y_pred = np.asarray([predictions["preds"][i] for i in keep])
    scores = classification_scores(y_true, y_pred, num_classes=num_classes)
    return {"wa": float(scores["wa"]), "ua": float(scores["ua"]),
            "confusion": [[int(v) for v in row] for row in scores["confusion"]], "n": len(keep)}


# --- the fold loop -----------------------------------------------------------------------------------------

def _cpu_copy(value: Any) -> Any:
    """A snapshot on the CPU: tensors copied, containers rebuilt (optimizer state is updated in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def _cpu_state(module: nn.Module, floating: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights a checkpoint and the best-so-far copy keep: every entry but frozen parameters (a pretrained
    checkpoint's, or a "tiny" encoder's drawn from its seed or the fold's: rebuilt exactly when the fold's model
    is rebuilt to resume), on the CPU; floating-point ones cast to ``floating`` in the same copy if given."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    kept = {k: v for k, v in module.state_dict().items() if k not in frozen}
    if floating is None:
        return _cpu_copy(kept)
    return {k: v.detach().to("cpu", dtype=floating, copy=True) if v.is_floating_point() else _cpu_copy(v)
            for k, v in kept.items()}


def _best_copy(module: nn.Module, config: Config) -> dict[str, torch.Tensor]:
    """The best-so-far weights the test pass will load: ``_cpu_state``, rounded to bf16 when ``train.precision``
    is bf16. Autocast computes every matmul with bf16 weights anyway, and a checkpoint that stores this copy (an
    epoch that is not the best so far) carries half its bytes. Rounded in memory too, not only when saved, so a
    fold resumed from a checkpoint tests exactly the weights an uninterrupted one does."""
    return _cpu_state(module, torch.bfloat16 if config.train.precision == "bf16" else None)


def _selected_weights(module: nn.Module, config: Config) -> dict[str, torch.Tensor]:
    """The selected model as its artifact keeps it (``Hooks.on_model_selected``), on the CPU: every weight the
    config does not rebuild (``rebuilt_weight_keys``). Unlike ``_cpu_state`` it keeps a frozen part of a
    fine-tuned encoder: `ser predict` builds the model without the fold's seed or the encoder's checkpoint."""
    from ser_platform.models.ser_model import rebuilt_weight_keys

    state = module.state_dict()
    rebuilt = set(rebuilt_weight_keys(state, config.model))
    return _cpu_copy({k: v for k, v in state.items() if k not in rebuilt})


def _load_kept_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load what ``_cpu_state`` kept; only frozen parameters may be missing."""
    result = module.load_state_dict(state, strict=False)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")


def _default_model(config: Config) -> nn.Module:
    from ser_platform.models.ser_model import SERModel

    # With data.encoder_cache the frozen encoders' states come with each batch: the encoders are not built.
    return SERModel(config.model, cached_encoder_states=bool(config.data.encoder_cache))


def _default_loss(config: Config) -> nn.Module:
    from ser_platform.losses import JointLoss

    return JointLoss(config.loss)


def fit_folds(config: Config, folds: Sequence[int], batches_for: BatchesFor, *, device: torch.device | str = "cpu",
              rank: int = 0, world_size: int = 1, wrap_model: Callable[[nn.Module], nn.Module] | None = None,
              hooks: Hooks | None = None, resume_state: Mapping[str, Any] | None = None,
              build_model: Callable[[Config], nn.Module] | None = None,
              build_loss: Callable[[Config], nn.Module] | None = None,
              log: Callable[[str], None] | None = print) -> dict[int, FoldResult]:
    """Train and evaluate ``folds`` in turn (fresh model per fold); see the module docstring.

    ``resume_state`` is a state built by a hook's ``state_fn`` (from a checkpoint): folds it lists as finished
    are returned as they were, the fold in progress continues after its last completed epoch.
    ``log`` prints one line per epoch on rank 0 (None = silent).
    """
    from ser_platform.data.features import AcousticFeatures, FeatureParams
    from ser_platform.models.ser_model import reads_speech

    device = torch.device(device)
    hooks = hooks or Hooks()
    wrap_model = wrap_model or (lambda m: m.to(device))
    build_model = build_model or _default_model
    build_loss = build_loss or _default_loss
    say = log if (log is not None and rank == 0) else (lambda _line: None)
    state = dict(resume_state) if resume_state else {}
    if state and state.get("version") != STATE_VERSION:
        raise ValueError(f"checkpoint state version {state.get('version')!r}: expected {STATE_VERSION}")
    finished: dict[int, dict] = {int(k): dict(v) for k, v in state.get("finished", {}).items()}
    features = None  # a text-only model: no acoustic features to compute (they were most of its step)
    if reads_speech(config.model):
        features = AcousticFeatures(FeatureParams.from_speech_config(config.model.speech, config.data.sample_rate))
        features = features.to(device)
    results: dict[int, FoldResult] = {}

    for fold in folds:
        fold = int(fold)
        if fold in finished:
            results[fold] = FoldResult.from_dict(finished[fold])
            say(f"fold {fold}: already finished in a previous attempt (test UA {results[fold].test_ua:.3f})")
            continue
        in_progress = state if state.get("fold") == fold else None
        result = _fit_fold(config, fold, batches_for, device=device, rank=rank, world_size=world_size,
                           wrap_model=wrap_model, hooks=hooks, in_progress=in_progress, build_model=build_model,
                           build_loss=build_loss, features=features, finished=finished, say=say)
        results[fold] = result
    return results


@dataclass
class _FoldState:
    """What a fold carries from epoch to epoch (and into its checkpoints)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_ua": -math.inf, "val_wa": float("nan"),
                                                          "model": None})
    resumed_from: list[int] = field(default_factory=list)

    def stopped(self, patience: int) -> bool:
        return patience > 0 and bool(self.history) and (len(self.history) - self.best["epoch"]) >= patience


def _epoch(config: Config, fold: int, epoch: int, batches_for: BatchesFor, wrapped: nn.Module, module: nn.Module,
           loss_fn: nn.Module, optimizer: torch.optim.Optimizer, features: nn.Module | None, *, device: torch.device,
           world_size: int, state: _FoldState) -> tuple[dict[str, float], bool]:
    """One epoch: train, score the validation split, keep the weights if validation UA improved. Returns the
    epoch's metrics and whether it improved."""
    where = f"fold {fold} epoch {epoch}"
    started = time.perf_counter()
    train = train_epoch(wrapped, loss_fn, optimizer, batches_for(fold, "train", epoch), config=config,
                        features=features, device=device, world_size=world_size, where=where)
    train_time = time.perf_counter() - started
    val_pred = predict(module, loss_fn, batches_for(fold, "val", epoch), config=config, features=features,
                       device=device, world_size=world_size)
    val = score(val_pred, config.data.eval_subset)
    if val["n"] == 0:
        raise ValueError(f"{where}: the validation split has no {config.data.eval_subset!r} utterance; "
                         "model selection needs at least one")
    improved = val["ua"] > state.best["val_ua"]
    if improved:
        state.best = {"epoch": epoch, "val_ua": val["ua"], "val_wa": val["wa"], "model": _best_copy(module, config)}
    metrics = {"train_loss": train["loss"], "train_metric_loss": train["metric_loss"],
               "train_ce_loss": train["ce_loss"], "val_loss": val_pred["loss"], "val_wa": val["wa"],
               "val_ua": val["ua"], "epoch_time_s": time.perf_counter() - started, "train_time_s": train_time,
               "train_step_time_s": train["step_time_s"], "train_samples": train["num_samples"]}
    state.history.append({"epoch": float(epoch), **metrics})
    return metrics, improved


def _test(config: Config, fold: int, batches_for: BatchesFor, module: nn.Module, loss_fn: nn.Module,
          features: nn.Module | None, *, device: torch.device, world_size: int, state: _FoldState) -> FoldResult:
    """Score the test split once, with the weights chosen on validation."""
    if state.best["model"] is None:
        raise ValueError(f"fold {fold}: no epoch was trained (train.epochs={config.train.epochs})")
    _load_kept_state(module, state.best["model"])
    test_pred = predict(module, loss_fn, batches_for(fold, "test", 0), config=config, features=features,
                        device=device, world_size=world_size)
    test = score(test_pred, config.data.eval_subset)
    subsets = {name: {k: v for k, v in score(test_pred, name).items() if k != "confusion"} for name in SUBSETS}
    best = state.best
    return FoldResult(fold=fold, best_epoch=int(best["epoch"]), val_wa=float(best["val_wa"]),
                      val_ua=float(best["val_ua"]), test_wa=test["wa"], test_ua=test["ua"],
                      confusion=test["confusion"], subsets=subsets, epochs_run=len(state.history),
                      num_test=test["n"], history=state.history, resumed_from=state.resumed_from)


def _resume(model: nn.Module, in_progress: Mapping[str, Any], config: Config) -> tuple[int, "_FoldState"]:
    """A fold's checkpoint taken up: its weights loaded into ``model``; the first epoch to run and the state."""
    _load_kept_state(model, in_progress["model"])
    best = dict(in_progress["best"])
    if best.pop("is_current", False):  # the checkpoint's own epoch was the best: one copy was stored
        best["model"] = _best_copy(model, config)
    state = _FoldState(history=[dict(h) for h in in_progress["history"]], best=best,
                       resumed_from=list(in_progress.get("resumed_from", [])) + [int(in_progress["epoch"])])
    return int(in_progress["epoch"]) + 1, state


def _fit_fold(config: Config, fold: int, batches_for: BatchesFor, *, device: torch.device, rank: int,
              world_size: int, wrap_model: Callable[[nn.Module], nn.Module], hooks: Hooks,
              in_progress: Mapping[str, Any] | None, build_model: Callable[[Config], nn.Module],
              build_loss: Callable[[Config], nn.Module], features: nn.Module | None, finished: dict[int, dict],
              say: Callable[[str], None]) -> FoldResult:
    train_cfg = config.train
    seed_everything(derive_seed(train_cfg.seed, fold))
    model = build_model(config)
    loss_fn = build_loss(config).to(device)
    start_epoch, state = 1, _FoldState()
    if in_progress is not None:
        start_epoch, state = _resume(model, in_progress, config)
        say(f"fold {fold}: resuming after epoch {in_progress['epoch']} from its checkpoint")
    wrapped = wrap_model(model)
    module = getattr(wrapped, "module", wrapped)  # the plain model inside DDP: state dicts and evaluation
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=train_cfg.lr,
                                 weight_decay=train_cfg.weight_decay)
    if in_progress is not None:
        optimizer.load_state_dict(in_progress["optimizer"])
    else:
        say(f"fold {fold}: training, {train_cfg.epochs} epoch(s)")
    hooks.on_fold_start(fold)

    def state_fn(epoch: int, include_training: bool = True) -> Callable[[], dict]:
        """The checkpoint of this moment: the finished folds' results, and while training the weights kept by
        ``_cpu_state``, the optimizer, the best epoch's weights (not stored twice when that epoch is this one),
        the history."""
        def build() -> dict:
            saved: dict[str, Any] = {"version": STATE_VERSION, "finished": copy.deepcopy(finished)}
            if include_training:
                best = dict(state.best)
                if best["epoch"] == epoch:
                    best.update(model=None, is_current=True)
                saved.update(fold=fold, epoch=epoch, model=_cpu_state(module),
                             optimizer=_cpu_copy(optimizer.state_dict()), best=best,
                             history=copy.deepcopy(state.history), resumed_from=list(state.resumed_from))
            return saved
        return build

    for epoch in range(start_epoch, train_cfg.epochs + 1):
        if state.stopped(train_cfg.patience):
            break
        seed_everything(derive_seed(train_cfg.seed, fold, epoch, rank))
        hooks.on_epoch_start(fold, epoch)
        metrics, improved = _epoch(config, fold, epoch, batches_for, wrapped, module, loss_fn, optimizer, features,
                                   device=device, world_size=world_size, state=state)
        say(f"fold {fold} epoch {epoch}/{train_cfg.epochs} | train loss {metrics['train_loss']:.4f} "
            f"(triplet {metrics['train_metric_loss']:.4f}, ce {metrics['train_ce_loss']:.4f}) | val UA "
            f"{metrics['val_ua']:.3f} WA {metrics['val_wa']:.3f} | {metrics['epoch_time_s']:.1f} s"
            f"{' *' if improved else ''}")
        due = train_cfg.checkpoint_every > 0 and (epoch % train_cfg.checkpoint_every == 0 or epoch == train_cfg.epochs)
        hooks.on_epoch_end(fold, epoch, {"fold": float(fold), "epoch": float(epoch), **metrics},
                           state_fn(epoch) if due else None)
        if state.stopped(train_cfg.patience) and epoch < train_cfg.epochs:
            say(f"fold {fold}: early stop after epoch {epoch} (no better validation UA for "
                f"{train_cfg.patience} epochs; best epoch {state.best['epoch']})")

    result = _test(config, fold, batches_for, module, loss_fn, features, device=device, world_size=world_size,
                   state=state)
    say(f"fold {fold}: best epoch {result.best_epoch} (val UA {result.val_ua:.3f}) -> test WA {result.test_wa:.3f} "
        f"UA {result.test_ua:.3f} on {result.num_test} utterances")
    finished[fold] = result.to_dict()
    hooks.on_model_selected(fold, result, lambda: _selected_weights(module, config))
    hooks.on_fold_end(fold, result, state_fn(len(state.history), include_training=False))
    return result
