"""`ser predict`: class probabilities for new utterances, from the selected weights of a finished fold run.

    load_fold_model(run_id, tracking_uri, fold=None) -> FoldModel   (model in eval mode, its config and info)
    predict_proba(fold_model, [(wav, text), ...])   -> (N, num_classes) numpy probabilities
    predict_command(run_id, wav=..., text=... | csv=..., fold=None, mlflow_uri=None, as_json=False, asr=None) -> 0

What is loaded: every fold run logs, at fold end, the weights that were selected on validation (the ones that
scored the test split) and the resolved config as artifacts ``model/state_dict.pt``, ``model/config.json`` and
``model/info.json`` (``tracking.log_model``, called by ``tracking.FoldLogger`` on Ray Train's rank 0). Frozen encoders' weights are not stored
(a pretrained checkpoint or a "tiny" encoder drawn from its seed): they are rebuilt from the config here, which
for a named checkpoint means a download from the Hugging Face hub, once.

Which run: ``run_id`` may name a fold run; or a ``ser train`` run or a sweep's trial run, whose fold runs are its
children: then ``fold`` picks one (default: the lowest fold number, with a note on stderr); or a sweep's parent
run, which stands for its best trial (tag ``best_trial_run_id``).

Preprocessing is training's own: the wav is decoded by ``data.parquet.load_audio`` (mono — channels averaged —,
resampled to ``data.sample_rate`` with soxr, DataError naming the file for a missing, empty or corrupt file), then
the training collate (crop to ``data.max_audio_seconds``, tokenizer, padding) and the same MFCC/spectrogram.

Without a transcript (``--wav`` alone, or a CSV with a ``wav`` column only) the utterances are transcribed first,
by the recognition model whose track the run was tested on (``data.test_text_source``: ``asr`` is the config's
``data.asr_model``, pinned to NAME@REVISION when the run started) or by ``asr`` (``--asr NAME``); the transcript
is printed beside the probabilities (``--json``: ``text`` and ``text_source``). A run tested on gold text has no
recognition model of its own: then ``--asr`` (or ``--text``) is required.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_platform.config import Config, from_dict

BATCH_SIZE = 16


class PredictError(ValueError):
    """The run cannot serve predictions (not found, no model logged, ...); the message says which and why."""


@dataclass
class FoldModel:
    """A fold's selected model, ready to score: ``model`` (eval mode, CPU), its ``config`` and ``info``."""

    run_id: str
    config: Config
    info: dict[str, Any]
    model: Any
    classes: tuple[str, ...]


# --- the model ----------------------------------------------------------------------------------------------

def load_fold_model(run_id: str, tracking_uri: str, fold: int | None = None, *, say=None) -> FoldModel:
    """Download the ``model/`` artifacts of the fold run ``run_id`` stands for (``tracking.find_fold_run``) and
    build the model from them."""
    import torch

    from ser_platform import tracking
    from ser_platform.models.ser_model import SERModel
    from ser_platform.tracking import schema

    record = tracking.find_fold_run(tracking.open_store(tracking_uri), run_id, fold, say=say)
    folder = schema.MODEL_ARTIFACT_DIR
    wanted = {f"{folder}/{name}" for name in (schema.MODEL_WEIGHTS_FILE, schema.MODEL_CONFIG_FILE)}
    if not wanted <= record.run.artifact_names(folder):
        raise PredictError(f"fold run {record.run.run_id} (status {record.status}) has no {sorted(wanted)} "
                           f"artifacts: its fold did not finish, it ran with tracking.log_model=false, or it was "
                           f"logged before fold runs kept their model")
    with tempfile.TemporaryDirectory(prefix="ser-predict-") as tmp:
        local = record.run.download(folder, tmp)
        config = from_dict(json.loads((local / schema.MODEL_CONFIG_FILE).read_text()))
        info_path = local / schema.MODEL_INFO_FILE
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        state = torch.load(local / schema.MODEL_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    frozen = config.model.encoders == "frozen"
    # Fine-tuned encoders: the architecture only, every weight comes from the artifact. Frozen ones: their own
    # weights (not stored), i.e. the checkpoint or the seeded "tiny" draw.
    model = SERModel(config.model, pretrained=frozen)
    result = model.load_state_dict(state, strict=False)
    allowed = set(tracking.frozen_encoder_keys(model.state_dict(), config))
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        raise PredictError(f"fold run {record.run.run_id}: the logged weights do not fit the logged config "
                           f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.eval()
    from ser_platform.data.iemocap import CLASSES

    classes = tuple(info.get("classes") or CLASSES)
    return FoldModel(run_id=record.run.run_id, config=config, info=info, model=model, classes=classes)


# --- scoring ------------------------------------------------------------------------------------------------

def load_signals(fold_model: FoldModel, paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Each wav as the model reads it: mono, at ``data.sample_rate`` (every file checked before any work), with a
    note on stderr for one longer than ``data.max_audio_seconds``."""
    from ser_platform.data.parquet import load_audio

    config = fold_model.config
    rate = config.data.sample_rate
    audio = [load_audio(path, rate, mix_channels=True)[0] for path in paths]
    for path, signal in zip(paths, audio):
        if len(signal) > config.data.max_audio_seconds * rate:  # as in training: the collate keeps the start
            print(f"note: {path} is {len(signal) / rate:.1f} s long; the model reads its first "
                  f"{config.data.max_audio_seconds:g} s (data.max_audio_seconds, as in training)", file=sys.stderr)
    return audio


def predict_proba(fold_model: FoldModel, items: Sequence[tuple[str | Path, str]], batch_size: int = BATCH_SIZE,
                  audio: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Softmax probabilities (N, num_classes) for ``(wav path, transcript)`` pairs, in order; ``audio``: the
    signals already loaded by :func:`load_signals`."""
    import torch

    from ser_platform.data.features import AcousticFeatures, FeatureParams
    from ser_platform.data.loader import make_collate
    from ser_platform.models.ser_model import reads_speech
    from ser_platform.models.text import build_tokenizer
    from ser_platform.train import model_inputs

    config = fold_model.config
    rate = config.data.sample_rate
    audio = load_signals(fold_model, [path for path, _ in items]) if audio is None else audio
    params = FeatureParams.from_speech_config(config.model.speech, rate)
    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                           max_audio_samples=int(round(config.data.max_audio_seconds * rate)), feature_params=params)
    features = AcousticFeatures(params) if reads_speech(config.model) else None
    out = []
    for start in range(0, len(items), batch_size):
        chunk = range(start, min(start + batch_size, len(items)))
        signals = np.empty(len(chunk), dtype=object)
        signals[:] = [audio[i] for i in chunk]
        batch = collate({
            "id": np.asarray([str(items[i][0]) for i in chunk], dtype=object),
            # The collate wants a label per row; an unknown utterance has none, and this one is never read.
            "label": np.asarray([fold_model.classes[0]] * len(chunk), dtype=object),
            "transcript": np.asarray([str(items[i][1]) for i in chunk], dtype=object),
            "audio": signals,
        })
        with torch.no_grad():
            logits = fold_model.model(**model_inputs(batch, features)).logits.float()
        out.append(torch.softmax(logits, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(fold_model.classes)), dtype=np.float32)


def read_csv_items(path: str | Path) -> list[tuple[Path, str | None]]:
    """``(wav, text)`` rows of a CSV with columns ``wav`` and ``text``, or ``wav`` alone (then every text is None:
    the utterances are transcribed); relative wav paths are taken relative to the CSV's folder. An empty text cell
    is an utterance without words; a row without a text cell at all (fewer cells than the header) is a mistake.
    ``DataError`` naming the file (and line) for a missing or non-UTF-8 file, missing columns, a missing or empty
    cell, or no rows."""
    from ser_platform.data.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "CSV file missing")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not UTF-8 text (byte {err.start}); save the CSV as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "wav" not in columns:
        raise DataError(path, f"expected columns 'wav' and 'text' (or 'wav' alone, to transcribe), found {columns}")
    has_text = "text" in columns
    items: list[tuple[Path, str | None]] = []
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        row = {k.strip(): v for k, v in row.items() if k is not None}
        wav = (row.get("wav") or "").strip()
        if not wav:
            raise DataError(where, "empty 'wav' cell")
        if has_text and row.get("text") is None:
            raise DataError(where, "no 'text' cell (write an empty one, `file.wav,`, for an utterance without words)")
        wav_path = Path(wav).expanduser()
        items.append((wav_path if wav_path.is_absolute() else path.parent / wav_path, row["text"] if has_text else None))
    if not items:
        raise DataError(path, "no rows")
    return items


def format_predictions(fold_model: FoldModel, items: Sequence[tuple[Any, str]], probs: np.ndarray, *,
                       text_source: str = "given") -> str:
    """A table: one line per utterance, a column per class, the predicted class last; ``text_source`` (``given``
    or ``asr:NAME@REVISION``) says where the text column comes from."""
    info = fold_model.info
    head = (f"fold run {fold_model.run_id}: fold {info.get('fold', '?')}, seed {info.get('seed', '?')}, selected "
            f"epoch {info.get('best_epoch', '?')} (val UA {info.get('val_ua', float('nan')):.3f}); "
            f"model.fusion={fold_model.config.model.fusion}; text: "
            + ("as given" if text_source == "given" else f"recognised by {text_source}"))
    names = [str(p) for p, _ in items]
    texts = [t if len(t) <= 40 else t[:37] + "..." for _, t in items]
    wav_w, text_w = max(4, *map(len, names)), max(4, *map(len, texts))
    widths = [max(6, len(c)) for c in fold_model.classes]
    lines = [head, "  ".join([f"{'wav':<{wav_w}}", f"{'text':<{text_w}}",
                              *(f"{c:>{w}}" for c, w in zip(fold_model.classes, widths)), "predicted"])]
    for name, text, row in zip(names, texts, probs):
        cells = [f"{p:>{w}.3f}" for p, w in zip(row, widths)]
        lines.append("  ".join([f"{name:<{wav_w}}", f"{text:<{text_w}}", *cells,
                                fold_model.classes[int(np.argmax(row))]]))
    return "\n".join(lines)


def recognizer_for(fold_model: FoldModel, asr: str | None = None):
    """The ``transcribe.Recognizer`` for utterances without text: ``asr`` (NAME or NAME@REVISION), else the model
    whose track the run was tested on; ``PredictError`` for a run tested on gold text and no ``asr``."""
    from ser_platform.data.transcripts import split_model_ref, track_ref
    from ser_platform.transcribe import Recognizer, RecognizerSpec

    data = fold_model.config.data
    ref = asr or track_ref(data.test_text_source, data.asr_model)
    if ref is None:
        raise PredictError(f"fold run {fold_model.run_id} was tested on gold transcripts (data.test_text_source="
                           f"{data.test_text_source!r}): it has no recognition model; pass --text, or --asr MODEL "
                           "to transcribe with one")
    name, revision = split_model_ref(ref)
    return Recognizer(RecognizerSpec(name, revision=revision))


def predict_command(run_id: str, *, wav: str | None = None, text: str | None = None, csv_path: str | None = None,
                    fold: int | None = None, mlflow_uri: str | None = None, as_json: bool = False,
                    asr: str | None = None) -> int:
    """``ser predict``: print the class probabilities of one wav (with its transcript, or transcribed), or of
    every row of a CSV."""
    from ser_platform.tracking import resolve_tracking_uri

    if (wav is None) == (csv_path is None):
        raise PredictError("pass either --wav FILE [--text TEXT], or --csv FILE (columns wav,text or wav)")
    if csv_path is not None and text is not None:
        raise PredictError("--text goes with --wav; a CSV carries its texts in a 'text' column")
    items = read_csv_items(csv_path) if csv_path is not None else [(Path(wav), text)]
    fold_model = load_fold_model(run_id, resolve_tracking_uri(cli_value=mlflow_uri), fold)
    audio = load_signals(fold_model, [path for path, _ in items])
    source = "given"
    if any(t is None for _, t in items):
        recognizer = recognizer_for(fold_model, asr)
        source = f"asr:{recognizer.ref}"
        heard = recognizer.transcribe(_at_recognizer_rate(fold_model, items, audio))
        items = [(path, said) for (path, _), said in zip(items, heard)]
    probs = predict_proba(fold_model, items, audio=audio)
    if as_json:
        print(json.dumps({"run_id": fold_model.run_id, "fold": fold_model.info.get("fold"),
                          "classes": list(fold_model.classes), "text_source": source,
                          "predictions": [{"wav": str(p), "text": t, "probabilities": dict(zip(fold_model.classes,
                                                                                                map(float, row))),
                                           "predicted": fold_model.classes[int(np.argmax(row))]}
                                          for (p, t), row in zip(items, probs)]}, indent=1))
    else:
        print(format_predictions(fold_model, items, probs, text_source=source))
    return 0


def _at_recognizer_rate(fold_model: FoldModel, items: Sequence[tuple[Any, Any]],
                        audio: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """The signals at the recogniser's 16 kHz (the model's own when ``data.sample_rate`` is 16 kHz)."""
    from ser_platform.data.parquet import load_audio
    from ser_platform.transcribe import SAMPLE_RATE

    if fold_model.config.data.sample_rate == SAMPLE_RATE:
        return audio
    return [load_audio(path, SAMPLE_RATE, mix_channels=True)[0] for path, _ in items]
