"""Typed, nested configuration: data, model, loss, train, sweep, tracking.

A config is built from a preset (``demo`` or ``paper``), then optionally a YAML file (data only, unknown keys
rejected), then dotted overrides (``{"loss.alpha": 0.5}``) — the same dotted keys the Tune search space uses.
Every dataclass validates itself in ``__post_init__`` and quotes the bad value in its error.

Validation at the edge, one ``ConfigError`` that quotes the key and the value:

* types are strict (``_check_fields``): a bool is not a number (``epochs: true`` is refused) and a number is not a
  bool (``focus_attention: 2``); every float is finite (no ``inf``, no ``nan``); an int takes an integral float
  (``epochs: 3.0``) but not ``3.5``; a string field takes a string (an empty ``--set KEY=`` is ``""``);
* ranges make sense: heads >= 1 and dividing their width, ``lr`` > 0, ``grad_clip`` >= 0 (0 = clipping off),
  GPUs and CPUs >= 0, seeds >= 0, folds within the protocol (``data.folds=3`` is the single fold 3),
  ``sweep.metric`` one of ``REPORTED_METRICS``;
* the preset is chosen by ``--preset`` alone: a ``preset`` key (YAML or ``--set``) must name that same preset
  (a resolved config saved from a run carries one), anything else is refused rather than relabelling a config;
* YAML: one document, a mapping, no key twice (PyYAML would keep the last one without a word), UTF-8.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ser_platform.data.errors import file_problem
from ser_platform.data.folds import num_folds
from ser_platform.data.transcripts import GOLD, is_text_source

PROTOCOLS = ("loso5", "loso10", "session5")
EMBEDDING_SPACES = ("fused", "speech", "text")
MINERS = ("all", "semihard", "hard")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
# How eq. (1)-(5) are read (models/focus_attention.py): "as_written" = each KEY K_i (projected) gets a centre over
# the query positions P_j, f^T added to the logits; "per_query" = each query gets a centre over the key positions,
# from the query-stream state (the reading of the model before the paper preset followed the paper).
FOCAL_READINGS = ("as_written", "per_query")
# wav2vec2-base's first conv layer normalises (GroupNorm) over the whole sequence: "valid" = over each utterance's
# own samples, as if it ran alone (scores independent of batch mates); "padded" = over the zero-padded batch,
# Hugging Face's recipe for such checkpoints (no attention mask). Encoders with per-frame LayerNorm ignore it.
GROUP_NORM_MODES = ("valid", "padded")
# How the two embedding networks meet (Table 4's runnable rows): the paper's crossmodal transformers; "early" =
# the pooled speech and text embeddings concatenated -> F(x); one modality alone (the other network not built).
FUSIONS = ("crossmodal", "early", "speech_only", "text_only")
TINY_ENCODER = "tiny"  # build a small randomly initialised encoder from its config class: no download
# What a trial reports to Tune (mean and spread over folds): the metrics sweep.metric may name.
REPORTED_METRICS = ("val_ua_mean", "val_ua_std", "val_wa_mean", "val_wa_std", "test_wa_mean", "test_wa_std",
                    "test_ua_mean", "test_ua_std")

# The embedding space the metric loss sits on in each of the paper's tables (None: the table varies it). Evidence
# (the paper's own figures): Table 1 A (.774/.777) and Table 4 "Ours" (.774/.777) equal Table 3's "Speech Embedding"
# row; Table 2's best row (alpha .5, beta 1: .771/.763) equals Table 3's "Speech + Text Embedding" row (fused);
# Table 1 B differs from A only by focus attention, C has no metric loss (any space: alpha = 0).
PAPER_TABLE_SPACES: dict[str, str | None] = {"1": "speech", "2": "fused", "3": None, "4": "speech"}


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key and quotes the value."""


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_fields(config: Any, prefix: str) -> None:
    """Every scalar field of the dataclass ``config`` has its default's type (module docstring); ints given for
    float fields become floats. Nested dataclasses and tuples check themselves."""
    for f in fields(config):
        default, value, key = f.default, getattr(config, f.name), prefix + f.name
        if default is MISSING:
            continue  # a nested dataclass (default_factory)
        if isinstance(default, bool):
            _check(isinstance(value, bool), key, value, "true or false")
        elif isinstance(default, int):
            _check(_is_int(value), key, value, "an integer")
            setattr(config, f.name, int(value))
        elif isinstance(default, float):
            _check(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value), key,
                   value, "a finite number")
            setattr(config, f.name, float(value))
        elif isinstance(default, str):
            _check(isinstance(value, str), key, value, "a string")


def _check_heads(prefix: str, width_key: str, width: int, heads_key: str, heads: int) -> None:
    _check(heads >= 1, prefix + heads_key, heads, ">= 1")
    _check(width >= 1 and width % heads == 0, prefix + width_key, width,
           f"a positive multiple of {prefix}{heads_key}={heads}")


@dataclass
class DataConfig:
    dataset: str = ""  # Parquet dataset (local path, file://, s3://, gs://); "" = the embedded synthetic default
    protocol: str = "loso5"  # leave-one-session-out, as in the paper
    folds: tuple[int, ...] = (1, 2, 3, 4, 5)  # which folds of the protocol to run
    sample_rate: int = 16_000
    max_audio_seconds: float = 15.0  # longer utterances are cropped (IEMOCAP's longest is ~35 s)
    max_text_tokens: int = 512  # RoBERTa's limit (§2.1.1)
    materialize: bool = True  # hold each fold's data in Ray's object store instead of re-reading Parquet each epoch
    bucket_by_length: bool = False  # sort into length buckets to cut padding
    eval_subset: str = "all"  # "all" | "improvised" | "scripted": which test utterances are scored
    # Frozen encoders' states computed once by `ser cache` (needs model.encoders="frozen"): "" = none, run the
    # encoders; "auto" = DATASET.cache beside the dataset; else that cache folder.
    encoder_cache: str = ""
    # Which text the text network reads (data/transcripts.py): "gold" = the corpus's transcripts; "asr" = the track
    # `ser transcribe` wrote for data.asr_model; "asr:NAME" or "asr:NAME@REVISION" = that model's track. Training and
    # validation read train_text_source, the test split test_text_source (e.g. train gold, test recognised).
    train_text_source: str = GOLD
    test_text_source: str = GOLD
    asr_model: str = "tiny"  # the recognition model "asr" stands for (NAME or NAME@REVISION); "tiny" = offline

    def __post_init__(self) -> None:
        _check_fields(self, "data.")
        folds = (self.folds,) if _is_int(self.folds) else self.folds
        _check(isinstance(folds, (tuple, list)) and all(_is_int(f) for f in folds), "data.folds", self.folds,
               "fold numbers, e.g. 1,2,3 or a single 3")
        self.folds = tuple(int(f) for f in folds)
        _check(self.protocol in PROTOCOLS, "data.protocol", self.protocol, f"one of {PROTOCOLS}")
        count = num_folds(self.protocol)
        _check(len(self.folds) > 0 and all(1 <= f <= count for f in self.folds), "data.folds", self.folds,
               f"fold numbers in 1..{count} (protocol {self.protocol!r} has {count} fold{'s' * (count > 1)})")
        _check(len(set(self.folds)) == len(self.folds), "data.folds", self.folds, "no repeated fold")
        _check(self.sample_rate > 0, "data.sample_rate", self.sample_rate, "a positive rate in Hz")
        _check(self.max_audio_seconds > 0, "data.max_audio_seconds", self.max_audio_seconds, "> 0")
        _check(self.max_text_tokens > 2, "data.max_text_tokens", self.max_text_tokens, "> 2")
        _check(self.eval_subset in ("all", "improvised", "scripted"), "data.eval_subset", self.eval_subset,
               "'all', 'improvised' or 'scripted'")
        source = "'gold', 'asr' (the track of data.asr_model) or 'asr:NAME' (a track of `ser transcribe --model NAME`)"
        _check(is_text_source(self.train_text_source), "data.train_text_source", self.train_text_source, source)
        _check(is_text_source(self.test_text_source), "data.test_text_source", self.test_text_source, source)
        _check(bool(self.asr_model.strip()), "data.asr_model", self.asr_model, "a model name or path, or 'tiny'")


def _check_tiny_sizes(config: Any, prefix: str) -> None:
    """The "tiny" encoder's sizes (text and speech alike): layers >= 1, heads dividing the width, seed >= 0,
    dropout in [0, 1)."""
    _check(config.tiny_num_layers >= 1, prefix + "tiny_num_layers", config.tiny_num_layers, ">= 1")
    _check_heads(prefix, "tiny_hidden_size", config.tiny_hidden_size, "tiny_num_heads", config.tiny_num_heads)
    _check(config.tiny_seed >= 0, prefix + "tiny_seed", config.tiny_seed, ">= 0")
    _check(0.0 <= config.tiny_dropout < 1.0, prefix + "tiny_dropout", config.tiny_dropout, "in [0, 1)")


@dataclass
class TextEncoderConfig:
    name: str = TINY_ENCODER  # Hugging Face checkpoint name or local path (paper: roberta-large); "tiny" = offline
    # Sizes of the "tiny" RoBERTa (ignored for real checkpoints, whose config is loaded with them).
    tiny_hidden_size: int = 32
    tiny_num_layers: int = 2
    tiny_num_heads: int = 2
    tiny_seed: int = 0  # seed of a frozen encoder's random weights ("tiny" or pretrained=False): one per cache
    tiny_dropout: float = 0.1  # the "tiny" RoBERTa's own hidden and attention dropout (Hugging Face's default)
    layer: int = -1  # states used: -1 = the encoder's output (last_hidden_state), L = hidden_states[L], 0 = embeddings

    def __post_init__(self) -> None:
        _check_fields(self, "model.text.")
        _check(bool(self.name.strip()), "model.text.name", self.name, "a checkpoint name, a local path or 'tiny'")
        _check(self.layer >= -1, "model.text.layer", self.layer, "-1 (the output) or a hidden-state index >= 0")
        _check_tiny_sizes(self, "model.text.")


@dataclass
class SpeechEncoderConfig:
    name: str = TINY_ENCODER  # Hugging Face checkpoint name or local path (paper: facebook/wav2vec2-base)
    tiny_hidden_size: int = 32
    tiny_num_layers: int = 2
    tiny_num_heads: int = 2
    tiny_conv_dim: int = 32
    tiny_seed: int = 0  # seed of a frozen encoder's random weights ("tiny" or pretrained=False): one per cache
    tiny_dropout: float = 0.1  # the "tiny" wav2vec2's own hidden, activation and attention dropout (as its default)
    layer: int = -1  # states used: -1 = the encoder's output (last_hidden_state), L = hidden_states[L], 0 = embeddings
    # Acoustic features (§3.2): 40-d HTK-mel MFCC and a spectrogram, 40 ms Hamming windows, 10 ms hop. The mel
    # bands under the MFCC are not stated (the paper names librosa, whose default is 128; the paper preset's).
    n_mfcc: int = 40
    n_mels: int = 40
    win_ms: float = 40.0
    hop_ms: float = 10.0
    cnn_channels: int = 32  # CNN of each acoustic feature encoder
    lstm_hidden: int = 32  # per direction, BiLSTM of each acoustic feature encoder
    # Hugging Face's freeze_feature_encoder(): wav2vec2's CNN over the waveform not trained (fine-tuned encoders).
    freeze_feature_encoder: bool = False
    mask_time_prob: float = 0.05  # wav2vec2's own SpecAugment in training (its checkpoints' value); 0 = off
    group_norm: str = "valid"  # one of GROUP_NORM_MODES (wav2vec2-base and other GroupNorm conv stacks)

    def __post_init__(self) -> None:
        _check_fields(self, "model.speech.")
        _check(bool(self.name.strip()), "model.speech.name", self.name, "a checkpoint name, a local path or 'tiny'")
        _check(0.0 <= self.mask_time_prob < 1.0, "model.speech.mask_time_prob", self.mask_time_prob, "in [0, 1)")
        _check(self.group_norm in GROUP_NORM_MODES, "model.speech.group_norm", self.group_norm,
               f"one of {GROUP_NORM_MODES}")
        _check(self.layer >= -1, "model.speech.layer", self.layer, "-1 (the output) or a hidden-state index >= 0")
        _check_tiny_sizes(self, "model.speech.")
        for key in ("n_mfcc", "n_mels", "cnn_channels", "lstm_hidden", "tiny_conv_dim"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value > 0, f"model.speech.{key}", value, "a positive integer")
        _check(self.n_mfcc <= self.n_mels, "model.speech.n_mfcc", self.n_mfcc,
               f"<= model.speech.n_mels={self.n_mels} (MFCCs are DCT coefficients of the mel bands)")
        _check(self.win_ms > 0, "model.speech.win_ms", self.win_ms, "> 0")
        _check(0 < self.hop_ms <= self.win_ms, "model.speech.hop_ms", self.hop_ms, f"in (0, win_ms={self.win_ms}]")


@dataclass
class ModelConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    speech: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    encoders: str = "finetune"  # "finetune" | "frozen" (frozen encoders can be served from a feature cache)
    # Crossmodal transformer; the paper is silent on its sizes: MulT's code defaults (30-d, 5 heads, 5 layers).
    # Dropouts per site as MulT's main.py (attention, ReLU, residual 0.1) and 0.25 on the embedded inputs; the
    # paper states one p = 0.25, which the paper preset uses at every site.
    embed_dim: int = 30
    num_heads: int = 5
    num_layers: int = 5
    attn_dropout: float = 0.1
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.25
    # MulT's self-attention transformer after each direction's crossmodal blocks (its "mem" networks); 0 = none.
    self_attention_layers: int = 0
    fusion: str = "crossmodal"  # one of FUSIONS; every other part unchanged (focus_attention: crossmodal only)
    focus_attention: bool = True  # False = Table 1 model B ("without FA"), every other part unchanged
    focal_reading: str = "per_query"  # one of FOCAL_READINGS: how eq. (1)-(5) are read
    sigma_min: float = 1.0  # floor added to the focal scope σ̃ (positions); 0 = eq. (4) as written
    attn_implementation: str = "sdpa"  # "eager" (reference) | "sdpa" (default) | "flex_attention" (CUDA only)
    embedding_dim: int = 64  # size of F(x), the fused embedding the metric loss sees
    dropout: float = 0.25  # §3.2's p = 0.25: head, acoustic encoders, guided attention
    num_classes: int = 4
    # Hugging Face activation checkpointing in the text and speech encoders when they are trained (not frozen):
    # less activation memory for a second forward pass per layer in backward; the same loss and gradients.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "model.")
        _check(self.encoders in ("finetune", "frozen"), "model.encoders", self.encoders, "'finetune' or 'frozen'")
        _check(self.fusion in FUSIONS, "model.fusion", self.fusion, f"one of {FUSIONS}")
        _check(self.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
               self.attn_implementation, f"one of {ATTN_IMPLEMENTATIONS}")
        _check_heads("model.", "embed_dim", self.embed_dim, "num_heads", self.num_heads)
        _check(self.num_layers >= 1, "model.num_layers", self.num_layers, ">= 1")
        _check(self.embedding_dim >= 1, "model.embedding_dim", self.embedding_dim, ">= 1")
        _check(self.sigma_min >= 0, "model.sigma_min", self.sigma_min, ">= 0")
        _check(self.focal_reading in FOCAL_READINGS, "model.focal_reading", self.focal_reading,
               f"one of {FOCAL_READINGS}")
        _check(self.self_attention_layers >= 0, "model.self_attention_layers", self.self_attention_layers, ">= 0")
        for key in ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout", "dropout"):
            value = getattr(self, key)
            _check(0.0 <= value < 1.0, f"model.{key}", value, "a probability in [0, 1)")
        _check(self.num_classes >= 2, "model.num_classes", self.num_classes, ">= 2")


@dataclass
class LossConfig:
    """L = alpha * L_triplet + beta * L_ce (eq. 9); alpha = 0 is Table 1 model C ("without metric loss")."""

    alpha: float = 0.5  # Table 2's best
    beta: float = 1.0
    margin: float = 0.3  # M of eq. (7)-(8); the paper does not state it
    # Where the triplet loss sits (Table 3): "fused" F(x) | "speech" | "text". The paper's full model (Tables 1, 4)
    # uses "speech", its Table 2 grid "fused" (PAPER_TABLE_SPACES); the paper preset is the full model.
    space: str = "fused"
    miner: str = "all"  # "all" = every valid triplet of the batch (Γ of eq. 8); "semihard" / "hard" are options

    def __post_init__(self) -> None:
        _check_fields(self, "loss.")
        _check(self.alpha >= 0, "loss.alpha", self.alpha, ">= 0")
        _check(self.beta >= 0, "loss.beta", self.beta, ">= 0")
        _check(self.alpha + self.beta > 0, "loss.alpha+loss.beta", self.alpha + self.beta, "> 0")
        _check(self.margin >= 0, "loss.margin", self.margin, ">= 0")
        _check(self.space in EMBEDDING_SPACES, "loss.space", self.space, f"one of {EMBEDDING_SPACES}")
        _check(self.miner in MINERS, "loss.miner", self.miner, f"one of {MINERS}")


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 32  # §3.2; per optimiser step, split across workers
    lr: float = 1e-5  # Adam, §3.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    patience: int = 0  # early stopping on validation UA; 0 = run all epochs, select the best
    samples_per_class: int = 4  # class-balanced batches (PML MPerClassSampler) so triplets exist; 0 = plain shuffle
    seed: int = 0
    seeds: int = 1  # run every fold with seed, seed+1, ..., seed+seeds-1; tables: mean ± std over folds × seeds
    num_workers: int = 1  # Ray Train workers (DDP ranks) per trial
    # CPUs per worker; 0 = "auto": the largest node's CPUs shared by the workers that must share such a node
    # (resources.py; on a 2-core laptop one worker gets ~2 CPUs and trains with 2 torch threads).
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, GPU)
    max_failures: int = 1  # Ray Train FailureConfig: worker failures tolerated per run
    # "trial": one TorchTrainer runs all the config's folds in turn (a fresh model per fold), paying Ray Train's
    # ~20 s start-up once; "fold": one TorchTrainer per fold (finer restart unit). See BENCHMARKS.md.
    trainer_scope: str = "trial"
    # Epochs between resume checkpoints (the last epoch and every fold's end always save one); 0 = fold ends only.
    # A checkpoint holds the trained weights, the optimizer and the best epoch's weights (see train.state_fn).
    checkpoint_every: int = 1
    # (fold, seed) units of one configuration trained at once; 0 = "auto": the worker groups the cluster (or its
    # autoscaler's maximum) holds for each trial (resources.py). trainer_scope "trial" deals a seed's folds into
    # that many lanes, one TorchTrainer each; "fold" runs a TorchTrainer per (fold, seed), that many at once.
    parallel_units: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, "train.")
        for key in ("epochs", "batch_size", "num_workers"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, f"train.{key}", value, "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 turns clipping off)")
        _check(self.seed >= 0, "train.seed", self.seed, ">= 0")
        _check(isinstance(self.seeds, int) and self.seeds >= 1, "train.seeds", self.seeds, "an integer >= 1")
        _check(self.patience >= 0, "train.patience", self.patience, ">= 0")
        _check(self.samples_per_class >= 0, "train.samples_per_class", self.samples_per_class, ">= 0")
        _check(self.cpus_per_worker >= 0, "train.cpus_per_worker", self.cpus_per_worker, ">= 0 (0 = auto)")
        _check(self.gpus_per_worker >= 0, "train.gpus_per_worker", self.gpus_per_worker, ">= 0")
        _check(self.gpus_per_worker > 0 or not self.use_gpu, "train.gpus_per_worker", self.gpus_per_worker,
               "> 0 with train.use_gpu=true")
        _check(self.precision in ("fp32", "bf16"), "train.precision", self.precision, "'fp32' or 'bf16'")
        _check(self.max_failures >= -1, "train.max_failures", self.max_failures, ">= -1 (-1 = unlimited)")
        _check(self.trainer_scope in ("trial", "fold"), "train.trainer_scope", self.trainer_scope, "'trial' or 'fold'")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, ">= 0 (0 = fold ends only)")
        _check(self.parallel_units >= 0, "train.parallel_units", self.parallel_units, ">= 0 (0 = auto)")


@dataclass
class SweepConfig:
    trials: int = 4
    max_concurrent: int = 1
    # The objective: mean over folds of VALIDATION UA (held-out training speakers), so the search never sees a
    # test session; test WA/UA are reported beside it.
    metric: str = "val_ua_mean"
    mode: str = "max"
    seed: int = 0  # Optuna TPE sampler seed
    grid: str = ""  # "" = Optuna search; "paper" = exactly Table 2's (alpha, beta) points
    # Tune restarts an errored trial this often (-1 = without limit); a restarted trial resumes its folds from
    # their checkpoints. Worker failures inside a fold are train.max_failures'.
    max_failures: int = 0
    # Seconds between the starts of the search's trials when several share one node (resources.resolve: 0 on
    # several nodes). Started together they share its CPUs through every trial's Ray Train start-up, and the first
    # epoch line waits for all of them; staggered, the first trial trains while the next ones start (the demo's).
    start_interval_s: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, "sweep.")
        _check(self.trials >= 1, "sweep.trials", self.trials, ">= 1")
        _check(self.max_concurrent >= 1, "sweep.max_concurrent", self.max_concurrent, ">= 1")
        _check(self.metric in REPORTED_METRICS, "sweep.metric", self.metric, f"one of {REPORTED_METRICS}")
        _check(self.mode in ("max", "min"), "sweep.mode", self.mode, "'max' or 'min'")
        _check(self.seed >= 0, "sweep.seed", self.seed, ">= 0")
        _check(self.grid in ("", "paper"), "sweep.grid", self.grid, "'' or 'paper'")
        _check(self.max_failures >= -1, "sweep.max_failures", self.max_failures, ">= -1 (-1 = without limit)")
        _check(self.start_interval_s >= 0, "sweep.start_interval_s", self.start_interval_s, ">= 0")


@dataclass
class TrackingConfig:
    mlflow_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "ser_platform"
    storage: str = ""  # Ray run storage (checkpoints, Tune state): local folder, s3:// or gs://; "" = ./runs
    # Each fold run keeps its selected weights + config as artifacts model/ for `ser predict`: 1.2 MB per fold for
    # the demo model, ~1.8 GB for the fine-tuned paper model (frozen encoders' weights are never stored).
    log_model: bool = True
    # Optuna's study (the search's history, what --resume continues): an SQLAlchemy URL, e.g. the head's
    # PostgreSQL on a cluster (postgresql+psycopg://...; cluster/README.md); "" = $SER_OPTUNA_STORAGE, else
    # optuna.db in the run storage (when that is s3:// or gs://, in the driver's ~/.cache/ser_platform: SQLite needs
    # a local file, and a job's working directory is for its logs only).
    optuna_storage: str = ""
    # On a cluster of several nodes, local paths (dataset, storage, an MLflow file store) are refused: a worker
    # on another node cannot read them (cluster.check_no_shared_disk). True vouches that every node mounts them.
    shared_filesystem: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "tracking.")
        _check(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "an experiment name")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preset: str = "demo"

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check(self.preset in PRESETS, "preset", self.preset, f"one of {sorted(PRESETS)}")
        # The metric loss needs its embedding space to exist: a single-modality model has no other modality's.
        missing = {"speech_only": "text", "text_only": "speech"}.get(self.model.fusion)
        if self.loss.space == missing:
            raise ConfigError(f"loss.space={self.loss.space!r} with model.fusion={self.model.fusion!r}: that model "
                              f"has no {missing} embedding; expected loss.space 'fused' (F(x)) or "
                              f"{'speech' if missing == 'text' else 'text'!r}")
        if self.data.encoder_cache and self.model.encoders != "frozen":
            raise ConfigError(f"data.encoder_cache={self.data.encoder_cache!r} with model.encoders="
                              f"{self.model.encoders!r}: cached states replace frozen encoders only; set "
                              "model.encoders=frozen or data.encoder_cache=''")
        recognised = any(s != GOLD for s in (self.data.train_text_source, self.data.test_text_source))
        if self.data.encoder_cache and recognised and self.model.fusion != "speech_only":
            raise ConfigError(f"data.encoder_cache={self.data.encoder_cache!r} with recognised text "
                              f"(data.train_text_source={self.data.train_text_source!r}, data.test_text_source="
                              f"{self.data.test_text_source!r}): the cache holds the text encoder's states of the "
                              "gold transcripts; run the text encoder (data.encoder_cache='') or use gold text")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"loss.alpha": 0.5}: what MLflow logs as params."""
        return _flatten(self.to_dict())

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A new config with dotted-key overrides applied and validated."""
        return apply_overrides(self, overrides)


# --- presets ---------------------------------------------------------------------------------------------

def _demo() -> Config:
    # Tiny encoders, synthetic corpus, a few epochs: the embedded default sweep (3 trials x 5 folds x 5 epochs)
    # in a few minutes on 2 CPU cores; `benchmarks/sweep.py --before` measures it against this preset as it was
    # (its DEMO_BEFORE; BENCHMARKS.md "Sweep overhead"). What makes it fast:
    # * the three trials at once, each worker a third of the node (cpus_per_worker=0: auto), i.e. one torch
    #   thread: the tiny model's small ops use a second thread poorly, and each trial's Ray Train start-up
    #   overlaps the other trials' work;
    # * audio cropped at 1.5 s (the synthetic utterances are 1-3 s), 16 channels in the tiny wav2vec2's
    #   convolutions and 16-wide acoustic CNN/BiLSTMs, no dropout (its random draws are not free on a CPU);
    #   the best trial's test UA is not lower for it (0.567 against 0.512, BENCHMARKS.md);
    # * the trials 20 s apart (sweep.start_interval_s): the first trial's Ray Train start-up took 16 s alone
    #   against 43-44 s with three at once, so the first epoch line came at 59.9 s instead of 94.3 s, for a
    #   wall time 1.05x (BENCHMARKS.md, "The first result");
    # * wav2vec2's convolutional feature encoder frozen, as in the paper preset: its backward over the raw
    #   waveform was about a third of a training step's backward (a torch profile of 14 demo steps: 3.9 s of
    #   backward with it trained, 2.5 s frozen); the best trial's test UA rose to 0.597 from 0.567;
    # * no dropout inside the tiny encoders either (model.{text,speech}.tiny_dropout; Hugging Face's 0.1 by
    #   default): its Bernoulli draws were ~14 % of a training step's time (forward + backward, 14 demo steps on
    #   one thread); the embedded default took 0.88x the wall time (229.7 s vs 261.7 s), the best trial's test UA
    #   0.549 against 0.611 with it (BENCHMARKS.md, "The first result"), which still meets issue 18's floor.
    return Config(
        preset="demo",
        data=DataConfig(bucket_by_length=True, max_audio_seconds=1.5),
        model=ModelConfig(embed_dim=32, num_heads=4, num_layers=2, embedding_dim=32,
                          text=TextEncoderConfig(tiny_dropout=0.0),
                          speech=SpeechEncoderConfig(tiny_conv_dim=16, cnn_channels=16, lstm_hidden=16,
                                                      freeze_feature_encoder=True, tiny_dropout=0.0),
                          attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0, embed_dropout=0.0, dropout=0.0),
        train=TrainConfig(epochs=5, batch_size=32, lr=3e-3, num_workers=1, cpus_per_worker=0.0),
        sweep=SweepConfig(trials=3, max_concurrent=3, start_interval_s=20.0),
    )


def _paper() -> Config:
    # What the paper states (§2-3.2): roberta-large (1024-d, 512 tokens), wav2vec2-base, a 40-d HTK-mel MFCC from
    # librosa, a 40 ms Hamming / 10 ms hop spectrogram, Adam lr 1e-5, batch 32, dropout p = 0.25, focus attention
    # as eq. (1)-(5) are written, and for the full model the metric loss on the speech embedding (Table 1 A =
    # Table 4 "Ours" = Table 3's "Speech Embedding" row; PAPER_TABLE_SPACES). Every other value is our choice;
    # README's choices table gives each one with its reason.
    return Config(
        preset="paper",
        # Length buckets: less padding per training batch (BENCHMARKS.md). The ASR text track: Whisper large-v3
        # (`ser transcribe --model openai/whisper-large-v3`), the largest Whisper and the usual choice for English.
        data=DataConfig(bucket_by_length=True, asr_model="openai/whisper-large-v3"),
        model=ModelConfig(
            text=TextEncoderConfig(name="roberta-large"),
            speech=SpeechEncoderConfig(name="facebook/wav2vec2-base", n_mels=128, cnn_channels=64, lstm_hidden=128,
                                       freeze_feature_encoder=True),
            encoders="finetune",
            attn_dropout=0.25, relu_dropout=0.25, res_dropout=0.25, embed_dropout=0.25, dropout=0.25,
            focal_reading="as_written", sigma_min=0.0, self_attention_layers=0,
            embedding_dim=128,
            # With the frozen feature encoder and bf16, what makes batch 32 of 15 s fit a 24 GB L4 (the cluster
            # configs' GPU) with 43-51 % left: benchmarks/memory.py, BENCHMARKS.md ("GPU memory").
            gradient_checkpointing=True,
        ),
        loss=LossConfig(alpha=0.5, beta=1.0, space="speech"),
        train=TrainConfig(epochs=30, batch_size=32, lr=1e-5, patience=5, num_workers=1, use_gpu=True,
                          precision="bf16"),
    )


PRESETS = {"demo": _demo, "paper": _paper}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --- YAML and dotted overrides ---------------------------------------------------------------------------

def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _coerce(key: str, value: Any, current: Any) -> Any:
    """A YAML/CLI value as the type of the field's current value: strings are parsed ("0.5" -> 0.5, "false" ->
    False, "1,3" -> (1, 3)), a single fold is a tuple of one, None is "" for a string; anything else of the wrong
    type is refused here (module docstring); finiteness and ranges are checked in ``__post_init__``."""
    if isinstance(current, bool):
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        _check(value is not None and all(_is_int(v) or isinstance(v, str) and v.strip() for v in items), key, value,
               "integers, e.g. 1,2,3 or a single 3")
        return tuple(_coerce(key, v, current[0]) if current else v for v in items)
    if isinstance(current, int):
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _check(_is_int(value), key, value, "an integer")
        return int(value)
    if isinstance(current, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        _check(isinstance(number, numbers.Real) and not isinstance(number, bool), key, value, "a number")
        return float(number)
    if isinstance(current, str):
        if value is None:
            return ""
        _check(isinstance(value, str) or _is_int(value), key, value, "a string")
        return str(value)
    return value


def _check_preset_key(value: Any, chosen: str) -> None:
    """A ``preset`` key in a YAML file or an override may only repeat the preset ``--preset`` chose."""
    if value != chosen:
        raise ConfigError(f"preset={value!r}: presets are chosen only by --preset (this command's is "
                          f"{chosen!r}); pass --preset {value} instead, or drop the key")


def apply_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Apply dotted-key overrides (``{"loss.alpha": 1.0, "model.focus_attention": False}``); unknown keys raise."""
    tree = config.to_dict()
    known = _flatten(tree)
    for key, value in overrides.items():
        if key not in known:
            near = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if key == "preset":
            _check_preset_key(value, config.preset)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = _coerce(key, value, known[key])
    return from_dict(tree)


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Build a Config from a nested dict (e.g. ``Config.to_dict()`` or parsed YAML); unknown keys raise."""
    return _build(Config, tree, "")


def _build(cls: type, tree: Mapping[str, Any] | None, prefix: str) -> Any:
    if tree is None:
        tree = {}  # a YAML section whose keys are all commented out
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {tree!r}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(tree) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; known: {sorted(names)}")
    defaults = cls()
    kwargs = {}
    for name, value in tree.items():
        current = getattr(defaults, name)
        if is_dataclass(current):
            kwargs[name] = _build(type(current), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, current)
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first != line:
                raise ConfigError(f"line {line}: key {key!r} given twice (first at line {first})")
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    problem = file_problem(path)
    if problem:
        raise ConfigError(f"{path}: cannot read config: {'file missing' if problem == 'missing' else problem}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except (yaml.YAMLError, ConfigError) as err:
        raise ConfigError(f"{path}: cannot read config: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    """A YAML error in one line: where, and what (PyYAML's own message spans lines, with a caret drawing)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        what = ", ".join(part for part in (err.context, err.problem) if part)
        return f"line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}: {what}"
    return str(err).splitlines()[0]


def load_config(preset_name: str = "demo", yaml_path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Preset, then YAML (data only; a ``preset`` key must repeat ``preset_name``), then dotted overrides."""
    config = preset(preset_name)
    if yaml_path is not None:
        path = Path(yaml_path)
        tree = _read_yaml(path)
        tree = {} if tree is None else tree
        if not isinstance(tree, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
        try:
            if "preset" in tree:
                _check_preset_key(tree["preset"], preset_name)
            config = from_dict(_deep_merge(config.to_dict(), tree))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if overrides:
        config = apply_overrides(config, overrides)
    return config


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.alpha=0.5"`` -> ``("loss.alpha", 0.5)``: the value read as YAML (so numbers and booleans work),
    except for string fields, which keep the text as written (``tracking.experiment=1.10`` stays "1.10")."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. loss.alpha=0.5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if isinstance(_DEFAULTS.get(key), str):
        return key, raw.strip()
    try:
        return key, yaml.load(raw, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, ConfigError) as err:
        raise ConfigError(f"{key}={raw!r}: not a value ({_one_line(err)}); quote it if it is text") from None


_DEFAULTS = _flatten(dataclasses.asdict(Config()))  # dotted key -> default value: which keys hold strings
