"""Speech recognition into a dataset's ASR tracks (``ser transcribe``), and the recogniser ``ser predict`` uses
when it is given no transcript.

    Recognizer(RecognizerSpec(model, revision=..., device=...)).transcribe([audio, ...]) -> [text, ...]
    transcribe_dataset(dataset, spec, workers=0, ...) -> TrackInfo     recognise, score (WER), write the track
    ensure_text_tracks(config, sources=...) -> config                  the tracks a run reads exist; pinned

Recognition is ``transformers``' automatic-speech-recognition pipeline: a Whisper checkpoint by name (Hub) or
local path, every utterance in chunks of ``chunk_length_s`` seconds (the pipeline's chunking with its default
stride of a sixth of a chunk on each side; IEMOCAP's longest utterances exceed Whisper's 30 s window), English
forced on multilingual checkpoints (IEMOCAP is English; language detection on short emotional turns is a source
of errors of its own), greedy decoding. ``model = "tiny"`` builds a small Whisper from ``WhisperConfig`` with
random weights drawn from a fixed seed and an offline byte-level tokenizer (``whisper_tokenizer``): no download
ever, the same weights on every machine; its text is noise, for tests and the embedded default only.

Where it runs: in this process (``workers=0``, a laptop), or as Ray Data batch inference (``workers=N``):
``read_parquet(id, audio).map_batches(RecognitionActor, compute=ActorPoolStrategy(size=N), num_gpus=...)``, each
actor holding one model (on a GPU with ``gpus_per_worker``), the texts collected in the driver. Either way the
driver then computes the word error rate against the gold transcripts (``data.transcripts.wer_report``) and the
scripted overlap of the recognised text, and writes the track into the dataset as a whole
(``data.transcripts.TrackWriter``), its lock taken before recognition starts so a second writer of the same track
stops at once.

A track's revision: "tiny": ``tiny-`` + a hash of its sizes and seed; a Hub name: the commit of the snapshot the
pipeline loads (``--revision`` a branch, tag or commit); a local folder: ``local``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ser_platform.config import ConfigError
from ser_platform.data.errors import DataError
from ser_platform.data.transcripts import (ASR, GOLD_COLUMNS, TrackInfo, TrackWriter, find_track, format_wer,
                                           gold_rows, load_split_texts, run_text_overlap, split_model_ref, track_ref,
                                           wer_report, word_errors)

TINY_ASR = "tiny"
SAMPLE_RATE = 16_000  # Whisper's rate, and the dataset's (data.parquet.SAMPLE_RATE)
# The tiny Whisper: one encoder and one decoder layer of 32 dimensions over Whisper's own input (80 mel bins,
# 30 s windows); a short decoding budget, since random weights seldom emit end-of-text. Weights drawn 25x wider than
# Whisper's init_std (0.02), so the noise it writes depends on the audio (at 0.02 every utterance got the same
# text), and only lower-case letters and spaces are allowed, so its noise reads as words.
TINY_WHISPER = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                    max_source_positions=1500, max_target_positions=64, init_std=0.5)
TINY_SYMBOLS = "abcdefghijklmnopqrstuvwxyz "
TINY_SEED = 0
TINY_MAX_NEW_TOKENS = 16
# Whisper's special tokens (the subset its generation needs) after the 256 byte symbols.
WHISPER_SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                          "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")


@dataclass(frozen=True)
class RecognizerSpec:
    """What recognises: ``model`` (a Hub name, a local folder or "tiny"), ``revision`` (None = the Hub's default
    branch), ``device`` ("" = cuda when there is one), utterances per forward pass, the chunk length in seconds,
    the language forced on multilingual checkpoints ("" = Whisper detects it), and CPU threads (0 = torch's
    default; on a shared, loaded machine 1 thread was 12x faster than torch's default of 2, BENCHMARKS.md,
    "Transcription cost")."""

    model: str
    revision: str | None = None
    device: str = ""
    batch_size: int = 8
    chunk_length_s: float = 30.0
    language: str = "en"
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("--model: expected a Whisper checkpoint name, a local folder or 'tiny'")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size={self.batch_size!r}: expected >= 1")
        if not 1 <= self.chunk_length_s <= 30:
            raise ConfigError(f"--chunk-length={self.chunk_length_s!r}: expected 1 to 30 seconds (Whisper's window)")
        if self.threads < 0:
            raise ConfigError(f"--threads={self.threads!r}: expected >= 0 (0 = torch's default)")
        if self.device not in ("", "cpu", "cuda"):
            raise ConfigError(f"--device={self.device!r}: expected cpu or cuda")


# --- the models ------------------------------------------------------------------------------------------------

def whisper_tokenizer():
    """An offline Whisper tokenizer: GPT-2's 256-symbol byte alphabet with no merges (one token per byte), then
    ``WHISPER_SPECIAL_TOKENS``; built from nothing but those symbols (as ``models.text.byte_level_tokenizer``)."""
    from tokenizers import pre_tokenizers
    from transformers import WhisperTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    end = WHISPER_SPECIAL_TOKENS[0]
    tokenizer = WhisperTokenizer(vocab={t: i for i, t in enumerate(alphabet)}, merges=[], unk_token=end,
                                 bos_token=end, eos_token=end, pad_token=end)
    tokenizer.add_special_tokens({"additional_special_tokens": list(WHISPER_SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_revision(seed: int = TINY_SEED) -> str:
    """The tiny Whisper's revision: a hash of its sizes, its tokenizer's symbols and the seed of its weights."""
    text = json.dumps({"sizes": TINY_WHISPER, "special": WHISPER_SPECIAL_TOKENS, "symbols": TINY_SYMBOLS,
                       "max_length": TINY_MAX_NEW_TOKENS + 4, "seed": seed}, sort_keys=True)
    return "tiny-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_whisper(seed: int = TINY_SEED):
    """(model, tokenizer, feature extractor) of the tiny Whisper (module docstring), weights from ``seed``."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = whisper_tokenizer()
    ids = dict(zip(WHISPER_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(WHISPER_SPECIAL_TOKENS))))
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), pad_token_id=end, bos_token_id=end, eos_token_id=end,
                           decoder_start_token_id=start, **TINY_WHISPER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        max_length=TINY_MAX_NEW_TOKENS + 4, suppress_tokens=_suppressed(tokenizer))  # 4 prompt tokens
    return model, tokenizer, WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"])


def _suppressed(tokenizer) -> list[int]:
    """The byte symbols the tiny Whisper may not write: all but ``TINY_SYMBOLS`` (GPT-2 spells a space "Ġ")."""
    keep = set(tokenizer.convert_tokens_to_ids([c if c != " " else "\u0120" for c in TINY_SYMBOLS]))
    return [i for i in range(256) if i not in keep]


def checkpoint_revision(model: str, revision: str | None = None) -> str:
    """The revision a track of ``model`` is keyed by (module docstring); ``DataError`` naming the model when the
    Hub has no such model or revision and no local copy exists."""
    if model == TINY_ASR:
        if revision not in (None, tiny_revision()):
            raise DataError(f"model {model}", f"revision {revision!r}: the tiny Whisper is {tiny_revision()}")
        return tiny_revision()
    if Path(model).expanduser().is_dir():
        return "local"
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        resolved = cached_file(model, "config.json", revision=revision)
    except OSError as err:
        raise DataError(f"model {model}", f"cannot load its config (revision {revision or 'main'}): "
                                          f"{str(err).splitlines()[0]}") from None
    return extract_commit_hash(resolved, None) or revision or "unknown"


class Recognizer:
    """The automatic-speech-recognition pipeline of a ``RecognizerSpec``: ``transcribe(audio)`` -> texts."""

    def __init__(self, spec: RecognizerSpec):
        import torch
        from transformers import pipeline

        self.spec = spec
        self.revision = checkpoint_revision(spec.model, spec.revision)
        cuda = spec.device == "cuda" or (not spec.device and torch.cuda.is_available())
        options: dict[str, Any] = {"device": "cuda" if cuda else "cpu"}
        if spec.model == TINY_ASR:
            model, tokenizer, features = tiny_whisper()
            options.update(model=model, tokenizer=tokenizer, feature_extractor=features)
        else:
            options.update(model=spec.model, revision=None if self.revision == "local" else self.revision,
                           dtype=torch.float16 if cuda else torch.float32)
        self.pipeline = pipeline("automatic-speech-recognition", **options)
        self.generate_kwargs: dict[str, Any] = {}
        if spec.language and getattr(self.pipeline.model.generation_config, "is_multilingual", False):
            self.generate_kwargs = {"language": spec.language, "task": "transcribe"}

    @property
    def ref(self) -> str:
        return f"{self.spec.model}@{self.revision}"

    def transcribe(self, audio: Iterable[np.ndarray]) -> list[str]:
        """One text per mono 16 kHz float signal, in order, each run of white space made one space."""
        import torch

        inputs = [{"raw": np.asarray(a, dtype=np.float32), "sampling_rate": SAMPLE_RATE} for a in audio]
        if not inputs:
            return []
        threads = torch.get_num_threads()
        torch.set_num_threads(self.spec.threads or threads)
        try:
            out = self.pipeline(inputs, batch_size=self.spec.batch_size, chunk_length_s=self.spec.chunk_length_s,
                                ignore_warning=True, generate_kwargs=self.generate_kwargs)
        finally:
            torch.set_num_threads(threads)
        return [" ".join(str(o["text"]).split()) for o in out]


# --- a dataset, in process or on Ray Data -------------------------------------------------------------------------

class RecognitionActor:
    """Ray Data's stateful transform: one ``Recognizer`` per actor, ``{id, audio}`` batch -> ``{id, text,
    revision}`` (the revision lets the driver check that every actor loaded the same model)."""

    def __init__(self, spec: RecognizerSpec):
        self.recognizer = Recognizer(spec)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = self.recognizer.transcribe(list(batch["audio"]))
        return {"id": np.asarray(batch["id"], dtype=object), "text": np.asarray(texts, dtype=object),
                "revision": np.asarray([self.recognizer.revision] * len(texts), dtype=object)}


def _in_process(dataset: str, spec: RecognizerSpec, progress: bool) -> tuple[list[str], list[str]]:
    from tqdm.auto import tqdm

    from ser_platform.data.loader import iter_pools

    recognizer = Recognizer(spec)
    ids, texts = [], []
    pool_rows = 4 * spec.batch_size
    with tqdm(desc="transcribe", unit="utt", disable=not progress) as bar:
        for pool in iter_pools(dataset, ["id", "audio"], pool_rows):
            ids += [str(i) for i in pool["id"]]
            texts += recognizer.transcribe(pool["audio"])
            bar.update(len(pool["id"]))
    return ids, texts


def _on_ray(dataset: str, spec: RecognizerSpec, revision: str, workers: int,
            gpus_per_worker: float) -> tuple[list[str], list[str]]:
    import ray.data

    pinned = RecognizerSpec(**{**asdict(spec), "revision": None if revision == "local" else revision})
    recognised = ray.data.read_parquet(dataset).select_columns(["id", "audio"]).map_batches(
        RecognitionActor, fn_constructor_kwargs={"spec": pinned}, batch_size=4 * spec.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus_per_worker or None)
    rows = recognised.take_all()
    seen = sorted({str(r["revision"]) for r in rows})
    if seen and seen != [revision]:
        raise DataError(f"model {spec.model}", f"the Ray Data actors loaded revision(s) {seen}, the driver "
                                               f"{revision}: a checkpoint changed while loading")
    return [str(r["id"]) for r in rows], [str(r["text"]) for r in rows]


def _scores(gold: Mapping[str, list], ids: Sequence[str], texts: Sequence[str], ref: str) -> dict[str, Any]:
    """WER per session / speaker / fold, and the loso5 scripted overlap of gold->ASR and ASR->ASR text."""
    from ser_platform.data.transcripts import SplitTexts, TranscriptSwap

    by_id = dict(zip(ids, texts))
    missing = [i for i in gold["id"] if i not in by_id]
    if missing or len(by_id) != len(gold["id"]):
        raise DataError(f"model {ref}", f"recognition returned {len(by_id)} texts for {len(gold['id'])} "
                                        f"utterances (missing: {missing[:3]})")
    hypotheses = [by_id[i] for i in gold["id"]]
    swap = TranscriptSwap(by_id, f"asr:{ref}")
    return {"wer": wer_report(gold, word_errors(gold["transcript"], hypotheses)),
            "overlap": {"train gold, test asr": run_text_overlap(gold, SplitTexts(train=None, test=swap)),
                        "train asr, test asr": run_text_overlap(gold, SplitTexts(train=swap, test=swap))}}


def transcribe_dataset(dataset: str, spec: RecognizerSpec, *, workers: int = 0, gpus_per_worker: float = 0.0,
                       overwrite: bool = False, progress: bool = False) -> TrackInfo:
    """Recognise every utterance of the local dataset ``dataset`` (module docstring) and write the track; its
    metadata holds the settings, the cost and the scores."""
    from ser_platform.data.parquet import check_dataset

    if workers < 0 or gpus_per_worker < 0:
        raise ConfigError(f"--workers={workers!r}, --gpus-per-worker={gpus_per_worker!r}: expected >= 0")
    check_dataset(dataset)
    revision = checkpoint_revision(spec.model, spec.revision)
    with TrackWriter(dataset, spec.model, revision, overwrite=overwrite) as writer:  # locked before the work
        started = time.perf_counter()
        if workers:
            ids, texts = _on_ray(dataset, spec, revision, workers, gpus_per_worker)
        else:
            ids, texts = _in_process(dataset, spec, progress)
        wall = time.perf_counter() - started
        gold = gold_rows(dataset, GOLD_COLUMNS + ("duration",))
        seconds = float(sum(gold["duration"]))
        metadata = {**asdict(spec), "revision": revision, "workers": workers, "gpus_per_worker": gpus_per_worker,
                    "seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
                    "utterances_per_second": round(len(ids) / wall, 3) if wall > 0 else None,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **_scores(gold, ids, texts, f"{spec.model}@{revision}")}
        order = {i: n for n, i in enumerate(gold["id"])}  # the track in the dataset's row order
        pairs = sorted(zip(ids, texts), key=lambda pair: order[pair[0]])
        return writer.commit([i for i, _ in pairs], [t for _, t in pairs], metadata)


def format_track(track: TrackInfo) -> str:
    """What ``ser transcribe`` prints: where the track went, its cost, its WER and the overlap of its text."""
    from ser_platform.data.overlap import format_overlap

    m = track.metadata
    where = f"Ray Data, {m['workers']} actor(s)" if m["workers"] else "in process"
    lines = [f"ASR track asr:{track.ref} written to {track.path}",
             f"{m['utterances']} utterances, {m['seconds']:.1f} s of audio, recognised in {m['wall_seconds']:.1f} s "
             f"({m['utterances_per_second']} utterances/s, {where})"]
    lines += format_wer(m["wer"])
    for setting, overlap in m["overlap"].items():
        lines += [f"{setting}:"] + ["  " + line for line in format_overlap(overlap)]
    return "\n".join(lines)


def transcribe_command(dataset: str, spec: RecognizerSpec, *, workers: int | None = None,
                       gpus_per_worker: float = 0.0, overwrite: bool = False, ray_address: str | None = None,
                       as_json: bool = False, shared_filesystem: bool = False) -> int:
    """``ser transcribe``: in process, or on Ray Data with ``workers`` actors (default: one per GPU of the cluster,
    each holding one, when ``ray_address`` or $RAY_ADDRESS names a cluster; else in process)."""
    import os

    address = ray_address or os.environ.get("RAY_ADDRESS")
    if workers is None and address:
        gpus, nodes = _join_ray(address)
        workers, gpus_per_worker = max(1, int(gpus)), gpus_per_worker or (1.0 if gpus else 0.0)
    elif workers:
        gpus, nodes = _join_ray(address)
    if workers:
        check_reachable(dataset, nodes, shared_filesystem)
    track = transcribe_dataset(dataset, spec, workers=workers or 0, gpus_per_worker=gpus_per_worker,
                               overwrite=overwrite, progress=not as_json)
    print(json.dumps({"path": track.path, **track.metadata}, indent=1, sort_keys=True) if as_json
          else format_track(track))
    return 0


def _join_ray(address: str | None) -> tuple[float, int]:
    """Join the cluster at ``address`` (else start a local instance); its GPUs and live nodes."""
    import ray

    from ser_platform.ray_train import init_ray

    init_ray(address)
    return float(ray.cluster_resources().get("GPU", 0)), sum(1 for node in ray.nodes() if node.get("Alive"))


def check_reachable(dataset: str, nodes: int, shared_filesystem: bool = False) -> None:
    """The Ray Data actors read the dataset on whichever node holds them: with several nodes a local folder is
    refused (``ConfigError``) unless ``shared_filesystem`` vouches that every node mounts it (as for training,
    README "On a cluster")."""
    from ser_platform.cluster import is_local

    if nodes > 1 and is_local(dataset) and not shared_filesystem:
        raise ConfigError(f"--dataset {dataset}: local to this machine, but the recognition actors run on {nodes} "
                          "nodes, which cannot read it; write it to object storage (`ser prepare --out "
                          "s3://BUCKET/...`) or pass --shared-filesystem if every node mounts it")


# --- the tracks a run reads --------------------------------------------------------------------------------------

def ensure_text_tracks(config: Any, sources: Iterable[str] = (), *, say=None) -> Any:
    """Before a run starts: every ASR track its text sources (the config's, and ``sources``, e.g. a catalogue
    experiment's rows) read exists, and the config names it exactly (``data.asr_model`` and each ``asr:NAME``
    become ``NAME@REVISION``, so every run's params say which recognition they read). The embedded default's
    "tiny" track is written on first use, as the embedded dataset itself is; any other missing track is a
    ``DataError`` naming the ``ser transcribe`` command. Prints the scripted overlap of each text pairing the
    config reads. Returns the config (with ``data.dataset`` resolved when a track was needed)."""
    from ser_platform.cluster import resolve_dataset

    say = say or (lambda line: print(line, file=sys.stderr))
    data = config.data
    wanted = [data.train_text_source, data.test_text_source, *sources]
    refs = list(dict.fromkeys(r for r in (track_ref(s, data.asr_model) for s in wanted) if r))
    if not refs:
        return config
    dataset = resolve_dataset(data.dataset)
    pinned = {}
    for ref in refs:
        try:
            pinned[ref] = find_track(dataset, ref).ref
        except DataError:
            if data.dataset or split_model_ref(ref)[0] != TINY_ASR:
                raise
            say(f"writing the embedded default's ASR track ({TINY_ASR}: a random Whisper, its text is noise)")
            # One thread: the tiny model gains nothing from more, and on a loaded machine two were 12x slower
            # (BENCHMARKS.md, "Transcription cost").
            tiny = RecognizerSpec(TINY_ASR, device="cpu", threads=1)
            pinned[ref] = transcribe_dataset(dataset, tiny, progress=True).ref
    overrides = {"data.dataset": dataset}
    if data.asr_model in pinned:
        overrides["data.asr_model"] = pinned[data.asr_model]
    for key in ("train_text_source", "test_text_source"):
        source = getattr(data, key)
        if source.startswith(ASR + ":"):
            overrides[f"data.{key}"] = f"{ASR}:{pinned[source[len(ASR) + 1:]]}"
    config = config.replace(overrides)
    if track_ref(data.train_text_source, data.asr_model) or track_ref(data.test_text_source, data.asr_model):
        _say_overlap(config, dataset, say)
    return config


def _say_overlap(config: Any, dataset: str, say) -> None:
    from ser_platform.data.overlap import format_overlap

    data = config.data
    texts = load_split_texts(dataset, data.train_text_source, data.test_text_source, data.asr_model)
    overlap = run_text_overlap(gold_rows(dataset), texts, data.protocol)
    say(f"text: {describe_sources(config)}")
    for line in format_overlap(overlap):
        say(line)


def describe_sources(config: Any) -> str:
    """``train gold -> test asr:NAME@REV``: the text a run reads, with ``asr`` spelled out."""
    data = config.data
    named = [s if track_ref(s, data.asr_model) is None else f"{ASR}:{track_ref(s, data.asr_model)}"
             for s in (data.train_text_source, data.test_text_source)]
    return f"train {named[0]} -> test {named[1]}"
