"""`ser predict` end to end: a tiny model trained here with the plain loop, its fold runs logged to a real sqlite
MLflow store through the fold logger Ray Train's rank 0 uses (``tracking.FoldLogger``, minus Ray), then
predictions through the command line.

Truths: a direct forward pass of the weights the training loop selected (taken from the hook, not from MLflow),
on inputs built here independently (soundfile + librosa's resampler, the tokenizer, AcousticFeatures);
probabilities that sum to 1; exit code 2 and the path in the message for a missing, corrupt or empty wav.
"""

from __future__ import annotations

import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
import torch
from torch.nn.utils.rnn import pad_sequence

from ser_platform import tracking
from ser_platform.cli import main
from ser_platform.config import load_config
from ser_platform.data.features import AcousticFeatures, FeatureParams
from ser_platform.data.folds import fold_spec
from ser_platform.data.iemocap import CLASSES
from ser_platform.data.loader import LocalFolds, make_collate
from ser_platform.models.ser_model import SERModel
from ser_platform.models.text import build_tokenizer
from ser_platform.train import Hooks, fit_folds

from support import TINY_SIZES, fold_rows

pytestmark = pytest.mark.slow  # every test reads the model `trained` trains first (two folds, MLflow)

TINY = {
    **TINY_SIZES,
    "train.batch_size": 8, "train.samples_per_class": 2, "train.lr": 3e-3, "train.epochs": 1, "train.seed": 5,
    "data.max_audio_seconds": 0.5, "tracking.experiment": "predict-tests",
}
TEXT = "oh no that is wonderful"


class LoggingHooks(Hooks):
    """What ray_train's hooks do on rank 0, without Ray: the same FoldLogger calls."""

    def __init__(self, logger: tracking.FoldLogger):
        self.logger = logger
        self.weights: dict[int, dict] = {}

    def on_fold_start(self, fold):
        self.logger.start(fold)

    def on_model_selected(self, fold, result, weights_fn):
        self.weights[fold] = weights_fn()
        self.logger.log_model(fold, result, self.weights[fold])

    def on_fold_end(self, fold, result, state_fn):
        self.logger.finish(fold, result)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("predict")
    uri = tracking.ensure_store(f"sqlite:///{tmp / 'mlflow.db'}")
    config = load_config("demo", overrides={**TINY, "tracking.mlflow_uri": uri})
    exp = tracking.experiment_id(uri, config.tracking.experiment)
    parent = tracking.open_train_run(uri, exp, "train-test", config, params={})
    specs = {k: fold_spec(k) for k in (1, 2)}
    logger = tracking.FoldLogger(config, tracking.FoldRunContext(
        tracking_uri=uri, experiment_id=exp, parent_run_id=parent.run_id, train_run="train-test",
        speakers={k: (sorted(s.test_speakers), sorted(s.val_speakers)) for k, s in specs.items()}))
    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=32, max_audio_samples=8000)
    local = {f: LocalFolds(fold_rows(f, (16, 16, 16)), config, collate) for f in (1, 2)}

    def batches(fold, split, epoch):
        return local[fold].batches_for(fold, split, epoch)

    hooks = LoggingHooks(logger)
    fit_folds(config, [1, 2], batches, hooks=hooks, log=None)
    parent.finish()

    rng = np.random.default_rng(0)
    t = np.arange(6400) / 16000
    wav16 = tmp / "voice16k.wav"
    soundfile.write(wav16, (0.2 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)), 16000,
                    subtype="FLOAT")
    t8 = np.arange(3000) / 8000
    wav8 = tmp / "voice8k.wav"
    soundfile.write(wav8, 0.3 * np.sin(2 * np.pi * 180 * t8) * np.hanning(t8.size), 8000, subtype="FLOAT")
    stereo = tmp / "stereo.wav"
    soundfile.write(stereo, np.stack([0.2 * np.sin(2 * np.pi * 300 * t), 0.1 * rng.standard_normal(t.size)], 1),
                    16000, subtype="FLOAT")
    yield {"config": config, "uri": uri, "parent": parent.run_id, "runs": {f: logger.runs[f].run_id for f in (1, 2)},
           "weights": hooks.weights, "tmp": tmp, "wav16": wav16, "wav8": wav8, "stereo": stereo}
    torch.set_num_threads(threads)


def direct_probabilities(config, weights, wav, text) -> np.ndarray:
    """The same weights, inputs built without ser_platform's predict/collate/load_audio code."""
    audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != 16000:
        audio = librosa.resample(audio, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    audio = torch.tensor(audio[: int(config.data.max_audio_seconds * 16000)], dtype=torch.float32)
    tokenizer = build_tokenizer(config.model.text)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    model = SERModel(config.model)
    model.load_state_dict(weights)
    model.eval()
    features = AcousticFeatures(FeatureParams.from_speech_config(config.model.speech))
    values, lengths = pad_sequence([audio], batch_first=True), torch.tensor([len(audio)])
    with torch.no_grad():
        mfcc, spectrogram, frames = features(values, lengths)
        logits = model(values, lengths, mfcc, spectrogram, frames, ids, torch.ones_like(ids, dtype=torch.bool)).logits
    return torch.softmax(logits, -1)[0].numpy()


def run_predict(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 and "--json" in args else None), captured.err


def probabilities(result: dict) -> list[np.ndarray]:
    return [np.array([p["probabilities"][c] for c in result["classes"]]) for p in result["predictions"]]


def test_the_fold_run_holds_the_selected_weights_and_config(trained):
    from mlflow import MlflowClient

    client = MlflowClient(trained["uri"])
    names = {a.path for a in client.list_artifacts(trained["runs"][1], "model")}
    assert names == {"model/state_dict.pt", "model/config.json", "model/info.json"}
    local = client.download_artifacts(trained["runs"][1], "model/info.json", str(trained["tmp"]))
    info = json.loads(Path(local).read_text())
    assert info["fold"] == 1 and info["classes"] == list(CLASSES) and info["weights_bytes"] > 0


@pytest.mark.parametrize("wav", ["wav16", "wav8"])
def test_probabilities_sum_to_one_and_equal_a_direct_forward_pass(trained, capsys, wav):
    code, result, _ = run_predict(capsys, "--run", trained["runs"][1], "--wav", trained[wav], "--text", TEXT,
                                  "--mlflow-uri", trained["uri"], "--json")
    assert code == 0 and result["classes"] == list(CLASSES) and result["fold"] == 1
    [got] = probabilities(result)
    assert got.sum() == pytest.approx(1.0, abs=1e-6) and np.all(got >= 0)
    expected = direct_probabilities(trained["config"], trained["weights"][1], trained[wav], TEXT)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_csv_scores_every_row_like_single_calls(trained, capsys):
    csv_path = trained["tmp"] / "batch.csv"
    csv_path.write_text(f"wav,text\nvoice16k.wav,{TEXT}\n{trained['wav8']},\"so sad, goodbye\"\nstereo.wav,\n")
    code, result, _ = run_predict(capsys, "--run", trained["runs"][2], "--csv", csv_path, "--mlflow-uri",
                                  trained["uri"], "--json")
    assert code == 0 and len(result["predictions"]) == 3
    for got, (wav, text) in zip(probabilities(result), [(trained["wav16"], TEXT), (trained["wav8"], "so sad, goodbye"),
                                                        (trained["stereo"], "")]):
        assert got.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(got, direct_probabilities(trained["config"], trained["weights"][2], wav, text),
                                   atol=1e-5)


def test_a_train_run_picks_the_first_fold_unless_told_and_says_so(trained, capsys):
    base = ("--wav", trained["wav16"], "--text", TEXT, "--mlflow-uri", trained["uri"], "--json")
    code, first, err = run_predict(capsys, "--run", trained["parent"], *base)
    assert code == 0 and first["run_id"] == trained["runs"][1] and "using its fold 1" in err
    code, second, _ = run_predict(capsys, "--run", trained["parent"], "--fold", 2, *base)
    assert code == 0 and second["run_id"] == trained["runs"][2]
    code, _, err = run_predict(capsys, "--run", trained["parent"], "--fold", 4, *base)
    assert code == 2 and "[1, 2]" in err


def test_the_table_output_names_the_classes_and_the_prediction(trained, capsys):
    code = main(["predict", "--run", trained["runs"][1], "--wav", str(trained["wav16"]), "--text", TEXT,
                 "--mlflow-uri", trained["uri"]])
    out = capsys.readouterr().out
    assert code == 0 and all(c in out for c in CLASSES) and "voice16k.wav" in out and "selected epoch 1" in out


@pytest.mark.parametrize("problem, content", [
    ("audio file missing", None),
    ("corrupt audio", b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not a wav header"),
    ("zero-length audio", "empty"),
])
def test_a_missing_corrupt_or_empty_wav_exits_2_naming_the_file(trained, capsys, problem, content):
    path = trained["tmp"] / f"bad-{problem.split()[0]}.wav"
    if content == "empty":
        soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif content is not None:
        path.write_bytes(content)
    code, _, err = run_predict(capsys, "--run", trained["runs"][1], "--wav", path, "--text", TEXT,
                               "--mlflow-uri", trained["uri"])
    assert code == 2 and str(path) in err and problem in err and "Traceback" not in err


def test_bad_runs_and_arguments_are_clear_errors(trained, capsys):
    code, _, err = run_predict(capsys, "--run", "0123456789abcdef", "--wav", trained["wav16"], "--text", TEXT,
                               "--mlflow-uri", trained["uri"])
    assert code == 2 and "no such MLflow run" in err
    code, _, err = run_predict(capsys, "--run", trained["runs"][1], "--wav", trained["wav16"],
                               "--mlflow-uri", trained["uri"])
    assert code == 2 and "--text" in err
    code, _, err = run_predict(capsys, "--run", trained["runs"][1], "--csv", trained["tmp"] / "none.csv",
                               "--mlflow-uri", trained["uri"])
    assert code == 2 and "none.csv" in err


def test_a_long_wav_is_cropped_as_in_training_and_predict_says_so(trained, capsys):
    long_wav = trained["tmp"] / "long.wav"
    soundfile.write(long_wav, 0.1 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000), 16000, subtype="FLOAT")
    code, result, err = run_predict(capsys, "--run", trained["runs"][1], "--wav", long_wav, "--text", TEXT,
                                    "--mlflow-uri", trained["uri"], "--json")
    assert code == 0 and f"note: {long_wav} is 1.0 s long; the model reads its first 0.5 s" in err
    [got] = probabilities(result)  # the cropped signal: the first 0.5 s alone give the same probabilities
    short = trained["tmp"] / "first-half.wav"
    soundfile.write(short, soundfile.read(long_wav, dtype="float32")[0][:8000], 16000, subtype="FLOAT")
    np.testing.assert_allclose(got, direct_probabilities(trained["config"], trained["weights"][1], short, TEXT),
                               atol=1e-5)


def test_without_text_the_wav_is_transcribed_and_the_transcript_printed(trained, capsys):
    from ser_platform.transcribe import Recognizer, RecognizerSpec, tiny_revision

    audio, rate = soundfile.read(trained["wav16"], dtype="float32")
    assert rate == 16000
    [heard] = Recognizer(RecognizerSpec("tiny", device="cpu")).transcribe([audio])
    code, result, _ = run_predict(capsys, "--run", trained["runs"][1], "--wav", trained["wav16"], "--asr", "tiny",
                                  "--mlflow-uri", trained["uri"], "--json")
    assert code == 0 and result["text_source"] == f"asr:tiny@{tiny_revision()}"
    [prediction] = result["predictions"]
    assert prediction["text"] == heard
    np.testing.assert_allclose(probabilities(result)[0],
                               direct_probabilities(trained["config"], trained["weights"][1], trained["wav16"], heard),
                               atol=1e-5)
    # A CSV with a wav column only: every row transcribed the same way; the table prints the transcript.
    csv_path = trained["tmp"] / "wav-only.csv"
    csv_path.write_text("wav\nvoice16k.wav\nstereo.wav\n")
    code, rows, _ = run_predict(capsys, "--run", trained["runs"][1], "--csv", csv_path, "--asr", "tiny",
                                "--mlflow-uri", trained["uri"], "--json")
    assert code == 0 and rows["predictions"][0]["text"] == heard and len(rows["predictions"]) == 2
    code = main(["predict", "--run", trained["runs"][1], "--wav", str(trained["wav16"]), "--asr", "tiny",
                 "--mlflow-uri", trained["uri"]])
    out = capsys.readouterr().out
    assert code == 0 and f"text: recognised by asr:tiny@{tiny_revision()}" in out and heard[:37] in out


def test_a_run_tested_on_recognised_text_brings_its_recogniser(trained):
    from types import SimpleNamespace

    from ser_platform.predict import PredictError, recognizer_for
    from ser_platform.transcribe import tiny_revision

    ref = f"tiny@{tiny_revision()}"
    on_asr = trained["config"].replace({"data.test_text_source": "asr", "data.asr_model": ref})
    assert recognizer_for(SimpleNamespace(config=on_asr, run_id="r")).ref == ref
    named = trained["config"].replace({"data.test_text_source": f"asr:{ref}"})
    assert recognizer_for(SimpleNamespace(config=named, run_id="r")).ref == ref
    with pytest.raises(PredictError, match="tested on gold transcripts.*--asr MODEL"):
        recognizer_for(SimpleNamespace(config=trained["config"], run_id="r"))
