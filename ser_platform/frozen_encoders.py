"""Frozen encoders served from a cache: compute their hidden states once for a dataset (``ser cache``), and
open the cache a config names (``data.encoder_cache``) for training.

    build_encoder_cache(config, dataset, layers=..., device=...)  -> entries written (data/encoder_cache.py layout)
    open_encoder_cache(config, dataset)                           -> {modality: entry path}, checked (fails fast)
    cached_collate(collate, entries)                              -> the collate that adds the cached states

The identity of an encoder's states (the cache key): name, **revision** and layer.

* revision: "tiny" (and any encoder built from its config with random weights): ``tiny-`` + a hash of its
  Hugging Face config and ``tiny_seed`` — a frozen random encoder draws its weights from ``tiny_seed`` alone
  (models/text.py, speech.py), so the hash names the weights. A Hub checkpoint: the commit its local snapshot
  came from (transformers 5 no longer keeps ``_commit_hash`` on configs; the snapshot path
  ``.../snapshots/<commit>/config.json`` holds the same hash); a local folder or an unresolved name: "unknown".
* everything else the states depend on is stored as ``settings`` and compared when the cache is opened: the
  tokenizer (class and a hash of its full serialisation) and ``data.max_text_tokens`` for text; the sample
  rate, ``data.max_audio_seconds`` in samples, the per-utterance waveform normalisation and how the speech
  encoder meets padding (``models.speech.padding_treatment``). Plus the dataset's fingerprint
  (``tracking.dataset_fingerprint``).

States are computed exactly as the model computes them in the loop: the same collate (cropping, tokenising),
the same encoder modules (``TextEncoder.layer_states``, ``SSLSpeechEncoder.layer_states``), frozen, eval mode,
float32. Rows are batched after sorting each pool of rows by length (less padding). A speech encoder whose
padding treatment is "layer" (a LayerNorm conv stack, "tiny" included) or "valid" (wav2vec2-base's GroupNorm
over each utterance's own frames, ``model.speech.group_norm``) gives the same valid states however a row is
padded; with "padded" (Hugging Face's recipe) its cached states are those of the cache's own batching, and the
treatment is part of the settings, so such a cache is never served to a model that treats padding otherwise.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ser_platform.cluster import is_local
from ser_platform.config import TINY_ENCODER, Config, ConfigError
from ser_platform.data.encoder_cache import (
    CachedStatesCollate,
    EncoderKey,
    EncoderStates,
    EntryRequest,
    EntryWriter,
    StaleCacheError,
    check_entry,
    default_cache_root,
)
from ser_platform.data.errors import DataError
from ser_platform.data.parquet import check_audio_length, conv_receptive_field

__all__ = ["build_encoder_cache", "cache_command", "cache_root", "cached_collate", "encoder_revision",
           "entry_requests", "modalities", "open_encoder_cache"]

WAVEFORM_NORMALISATION = "zero mean, unit variance over each utterance's valid samples"
POOL_BATCHES = 16  # batches sorted by length together


def cache_root(config: Config, dataset: str) -> str:
    """``data.encoder_cache``: "auto" = ``DATASET.cache`` beside the dataset, else the folder it names."""
    value = config.data.encoder_cache
    if not value:
        raise ConfigError("data.encoder_cache='': no encoder cache is configured")
    return default_cache_root(dataset) if value == "auto" else value


def modalities(config: Config) -> tuple[str, ...]:
    """The encoders the model builds (``model.fusion``): a single-modality baseline needs one cache entry."""
    return {"speech_only": ("speech",), "text_only": ("text",)}.get(config.model.fusion, ("text", "speech"))


# --- identity and settings ------------------------------------------------------------------------------------

def _hub_commit(name: str) -> str:
    """The commit of the local snapshot of a Hub checkpoint (resolving it may download its config.json)."""
    if Path(name).expanduser().exists():
        return "unknown"  # a local folder: no revision to read
    try:
        from transformers.utils.hub import cached_file, extract_commit_hash

        resolved = cached_file(name, "config.json")
        return extract_commit_hash(resolved, None) or "unknown"
    except Exception:  # no network and no local copy, a gated repo, ...: nothing to name it by
        return "unknown"


def encoder_revision(encoder_config: Any, hf_config: Any, *, pretrained: bool = True) -> str:
    """The revision part of the cache key (module docstring)."""
    if encoder_config.name == TINY_ENCODER or not pretrained:
        values = hf_config.to_dict()
        for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype"):
            values.pop(volatile, None)
        text = json.dumps(values, sort_keys=True, default=str) + f"\nseed={int(encoder_config.tiny_seed)}"
        return "tiny-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return _hub_commit(encoder_config.name)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Class and a hash of the tokenizer's full serialisation (vocabulary, merges, pre/post-processing)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return f"{type(tokenizer).__name__} {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def max_audio_samples(config: Config) -> int:
    return int(round(config.data.max_audio_seconds * config.data.sample_rate))


def _settings(config: Config, modality: str, *, tokenizer: Any = None, padding: str | None = None) -> dict:
    if modality == "text":
        return {"tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                "max_text_tokens": int(config.data.max_text_tokens)}
    return {"sample_rate": int(config.data.sample_rate), "max_audio_samples": max_audio_samples(config),
            "waveform_normalisation": WAVEFORM_NORMALISATION, "padding": padding}


def _dataset_fingerprint(dataset: str) -> str:
    from ser_platform.data.parquet import read_summary
    from ser_platform.tracking import dataset_fingerprint

    return dataset_fingerprint(dataset, read_summary(dataset))


def entry_requests(config: Config, dataset: str, *, layers: Mapping[str, Sequence[int]] | None = None,
                   fingerprint: str | None = None) -> dict[str, list[EntryRequest]]:
    """What the config asks of the cache, per modality the model builds: one request per layer
    (default: ``model.text.layer`` / ``model.speech.layer``). Reads configs and the tokenizer, not weights."""
    from ser_platform.models.speech import build_speech_encoder_config, padding_treatment
    from ser_platform.models.text import build_text_encoder_config, build_tokenizer

    fingerprint = fingerprint or _dataset_fingerprint(dataset)
    out: dict[str, list[EntryRequest]] = {}
    for modality in modalities(config):
        if modality == "text":
            encoder_config = config.model.text
            hf_config = build_text_encoder_config(encoder_config)
            settings = _settings(config, "text", tokenizer=build_tokenizer(encoder_config))
        else:
            encoder_config = config.model.speech
            hf_config = build_speech_encoder_config(encoder_config)
            settings = _settings(config, "speech",
                                 padding=padding_treatment(hf_config, encoder_config))
        revision = encoder_revision(encoder_config, hf_config)
        wanted = (layers or {}).get(modality) or (encoder_config.layer,)
        out[modality] = [EntryRequest(EncoderKey(modality, encoder_config.name, revision, int(layer)), fingerprint,
                                      settings) for layer in wanted]
    return out


def _hint(dataset: str, config: Config) -> str:
    return (f"run `ser cache --dataset {dataset} --text-encoder {config.model.text.name} --speech-encoder "
            f"{config.model.speech.name}` with the same config")


# --- opening ----------------------------------------------------------------------------------------------

def open_encoder_cache(config: Config, dataset: str, *, check_ids: bool = True) -> dict[str, str]:
    """Check the cache ``config.data.encoder_cache`` names against the config and ``dataset``; return the path
    of the entry per modality. Raises ``StaleCacheError`` naming what differs (module docstring), or
    ``DataError`` naming the dataset's ids an entry lacks (``check_ids``: reads the id columns only)."""
    if config.model.encoders != "frozen":
        raise ConfigError("data.encoder_cache needs model.encoders='frozen'")
    root = cache_root(config, dataset)
    entries = {}
    for modality, (request,) in entry_requests(config, dataset).items():
        path, _ = check_entry(root, request, hint=_hint(dataset, config))
        entries[modality] = path
    if check_ids:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dataset_ids = pq.read_table(dataset, columns=["id"]).column("id").to_pylist()
        for path in entries.values():
            cached = set(pq.read_table(path, columns=["id"], schema=pa.schema([("id", pa.string())]))
                         .column("id").to_pylist())
            missing = sorted(set(dataset_ids) - cached)
            if missing:
                raise StaleCacheError(path, f"lacks {len(missing)} of the dataset's {len(set(dataset_ids))} ids "
                                            f"(first: {missing[:5]}); {_hint(dataset, config)}")
    return entries


def load_encoder_states(entries: Mapping[str, str]) -> dict[str, EncoderStates]:
    return {modality: EncoderStates.load(path) for modality, path in entries.items()}


def cached_collate(collate: Any, entries: Mapping[str, str]) -> CachedStatesCollate:
    """``collate`` plus the states of the entries ``open_encoder_cache`` returned (loaded into memory here)."""
    states = load_encoder_states(entries)
    return CachedStatesCollate(collate, text=states.get("text"), speech=states.get("speech"))


# --- computing ----------------------------------------------------------------------------------------------

def _todo(root: str, requests: Mapping[str, Sequence[EntryRequest]], force: bool,
          log) -> tuple[dict[str, list[EntryRequest]], list[dict[str, Any]]]:
    """The entries to compute (stale, missing, or every one with ``force``) and the report of those kept."""
    todo: dict[str, list[EntryRequest]] = {}
    kept: list[dict[str, Any]] = []
    for modality, wanted in requests.items():
        for request in wanted:
            if not force:
                try:
                    path, metadata = check_entry(root, request)
                except StaleCacheError as err:
                    if log:
                        log(f"{request.key.modality} {request.key.describe()}: to compute ({err.problem})")
                else:
                    kept.append({"path": path, "status": "up to date", "rows": metadata["rows"], "seconds": 0.0})
                    continue
            todo.setdefault(modality, []).append(request)
    return todo, kept


def _encoders(config: Config, todo: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    from ser_platform.models.speech import SSLSpeechEncoder
    from ser_platform.models.text import TextEncoder

    built = {"text": lambda: TextEncoder(config.model.text, frozen=True),
             "speech": lambda: SSLSpeechEncoder(config.model.speech, frozen=True)}
    return {modality: built[modality]().to(device).eval() for modality in todo}


def _add_batch(batch: Mapping[str, Any], encoders: Mapping[str, Any], todo: Mapping[str, Sequence[EntryRequest]],
               writers: Mapping[tuple[str, int], EntryWriter], device: torch.device) -> None:
    """Every wanted layer of every encoder for one collated batch, each row's valid states to its writer."""
    for modality, encoder in encoders.items():
        wanted_layers = [r.key.layer for r in todo[modality]]
        if modality == "text":
            states, mask = encoder.layer_states(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                                wanted_layers)
            sources = mask.sum(dim=1).tolist()
        else:
            states, mask = encoder.layer_states(batch["input_values"].to(device), batch["audio_lengths"].to(device),
                                                wanted_layers)
            sources = batch["audio_lengths"].tolist()
        counts = mask.sum(dim=1).tolist()
        for layer, layer_states in zip(wanted_layers, states):
            values = layer_states.float().cpu().numpy()
            writer = writers[(modality, layer)]
            for i, row_id in enumerate(batch["ids"]):
                writer.add(row_id, values[i, :counts[i]], sources[i])


def _receptive_field(config: Config) -> int:
    """Samples the speech encoder's convolutions need for one frame (``parquet.conv_receptive_field``)."""
    from ser_platform.models.speech import build_speech_encoder_config

    hf_config = build_speech_encoder_config(config.model.speech)
    return conv_receptive_field(hf_config.conv_kernel, hf_config.conv_stride)


def _compute(config: Config, dataset: str, todo: Mapping[str, Sequence[EntryRequest]],
             writers: Mapping[tuple[str, int], EntryWriter], *, batch_size: int, device: torch.device,
             total: int, progress: bool) -> None:
    """Every utterance through the encoders, batched after sorting each pool of rows by length (less padding)."""
    from tqdm.auto import tqdm

    from ser_platform.data.features import FeatureParams
    from ser_platform.data.loader import iter_pools, make_collate
    from ser_platform.models.text import build_tokenizer

    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                           max_audio_samples=max_audio_samples(config),
                           feature_params=FeatureParams.from_speech_config(config.model.speech,
                                                                           config.data.sample_rate))
    encoders = _encoders(config, todo, device)
    min_samples = _receptive_field(config) if "speech" in todo else 0
    columns = ["id", "label", "mode", "transcript", "audio", "duration"]
    with tqdm(total=total, desc="ser cache", unit="utt", disable=not progress) as bar, torch.inference_mode():
        for pool in iter_pools(dataset, columns, POOL_BATCHES * batch_size):
            for row_id, audio in zip(pool["id"], pool["audio"]):  # before the encoder, which would crash on it
                check_audio_length(len(audio), f"{dataset}: row {row_id}", sample_rate=config.data.sample_rate,
                                   min_samples=min_samples)
            order = np.argsort(np.asarray(pool["duration"], dtype=np.float64), kind="stable")
            for start in range(0, len(order), batch_size):
                batch = collate({c: v[order[start:start + batch_size]] for c, v in pool.items()})
                _add_batch(batch, encoders, todo, writers, device)
                bar.update(len(batch["ids"]))


def build_encoder_cache(config: Config, dataset: str, *, root: str | None = None,
                        layers: Mapping[str, Sequence[int]] | None = None, batch_size: int = 16,
                        device: str | None = None, force: bool = False, progress: bool = True,
                        log=print) -> list[dict[str, Any]]:
    """Compute and store the frozen encoders' states of every utterance of ``dataset`` (a local folder).

    ``layers``: per modality the layers to store (default: the config's ``layer``); ``root``: the cache folder
    (default ``DATASET.cache``); ``device``: "cuda" when there is one, else "cpu". Entries already up to date
    (same key, settings and dataset fingerprint) are kept unless ``force``; a stale one is replaced, atomically.
    Returns one dict per entry: ``path``, ``status`` ("written" | "up to date"), ``rows``, ``seconds``.
    """
    from ser_platform.data.parquet import check_dataset

    if not is_local(dataset):
        raise StaleCacheError(dataset, "`ser cache` reads a local dataset and writes the cache beside it; copy both "
                                       "to object storage afterwards")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected >= 1")
    utterances = int(check_dataset(dataset)["utterances"])
    config = config.replace({"model.encoders": "frozen"})
    root = root or default_cache_root(dataset)
    if Path(root).resolve().is_relative_to(Path(dataset).resolve()):
        raise DataError(root, f"the cache folder lies inside the dataset {dataset}: its files would join the "
                              f"dataset's; pass another --out")
    todo, report = _todo(root, entry_requests(config, dataset, layers=layers), force, log)
    if not todo:
        return report
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    writers: dict[tuple[str, int], EntryWriter] = {}
    started = time.perf_counter()
    try:
        for modality, wanted in todo.items():  # inside the try: writers already open are aborted if one fails
            for request in wanted:
                writers[(modality, request.key.layer)] = EntryWriter(root, request.key)
        _compute(config, dataset, todo, writers, batch_size=batch_size, device=device, total=utterances,
                 progress=progress)
        seconds = time.perf_counter() - started
        provenance = {"dataset": str(Path(dataset).absolute()), "device": str(device), "batch_size": batch_size,
                      "batching": f"rows sorted by duration within pools of {POOL_BATCHES} batches",
                      "dtype": "float32", "torch": torch.__version__, "transformers": _transformers_version(),
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "seconds": round(seconds, 3)}
        for modality, wanted in todo.items():
            for request in wanted:
                writer = writers[(modality, request.key.layer)]
                if writer.count != utterances:
                    raise DataError(dataset, f"{request.key.describe()}: {writer.count} rows were read, the dataset "
                                             f"summary lists {utterances} utterances")
                path = writer.commit({**provenance, "dataset_fingerprint": request.dataset_fingerprint,
                                      "settings": dict(request.settings)})
                report.append({"path": str(path), "status": "written", "rows": writer.count, "seconds": seconds})
    finally:
        for writer in writers.values():
            if not writer.committed:
                writer.abort()
    return report


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def cache_command(config: Config, dataset: str, *, root: str | None = None,
                  layers: Mapping[str, Sequence[int]] | None = None, batch_size: int = 16, device: str | None = None,
                  force: bool = False) -> int:
    """``ser cache``: build the cache, print each entry and the settings that make training read it."""
    started = time.perf_counter()
    report = build_encoder_cache(config, dataset, root=root, layers=layers, batch_size=batch_size, device=device,
                                 force=force)
    for entry in report:
        print(f"{entry['status']:>10}: {entry['path']} ({entry['rows']} rows)")
    where = "auto" if root is None else root
    print(f"done in {time.perf_counter() - started:.1f} s; train on it with --set model.encoders=frozen "
          f"--set data.encoder_cache={where} (and the same encoder, layer and data settings)")
    return 0
