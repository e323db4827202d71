"""Helpers that test modules of more than one tier share (imported as ``support``: pyproject.toml puts tests/ on
``pythonpath``). Test modules never import each other; what they share lives here or in a conftest.py fixture.

* the repository root and the tiny model sizes of the training tests;
* random rows in the dataset's column form, split by a fold's speakers (``loader.LocalFolds`` reads them);
* the tiny ``SERModel`` the model tests build, its inputs and the metric-loss gradient check, and a
  wav2vec2-base-shaped speech encoder config (random weights, a few layers);
* a sweep's parent and trial runs logged the way ``sweep.run_trial`` logs them, without Ray;
* work a slow test starts ahead of time (``HeadStart``, the ``head_start`` marker);
* processes: free loopback ports, a Ray head started with `ray start --head --block` on its own ports, temp dir
  and HOME, and finding (to kill) whatever a test started. Linux (/proc).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from ser_platform.config import LossConfig, ModelConfig, SpeechEncoderConfig, TextEncoderConfig
from ser_platform.losses import JointLoss
from ser_platform.models.ser_model import SERModel

REPO = Path(__file__).resolve().parents[1]

# --- the tiny model of the training tests -------------------------------------------------------------------

# Config overrides: 8-d crossmodal, 16-d encoders, 4-channel acoustic encoders. The training, Ray and job tests
# each add their own batch, epoch and seed settings.
TINY_SIZES = {
    "model.embed_dim": 8, "model.num_heads": 2, "model.num_layers": 1, "model.embedding_dim": 8,
    "model.speech.tiny_hidden_size": 16, "model.speech.tiny_num_layers": 1, "model.speech.tiny_num_heads": 2,
    "model.speech.tiny_conv_dim": 8, "model.speech.cnn_channels": 4, "model.speech.lstm_hidden": 4,
    "model.text.tiny_hidden_size": 16, "model.text.tiny_num_layers": 1, "model.text.tiny_num_heads": 2,
}


# The frozen tiny encoders of the encoder-cache tests (tests/unit/test_encoder_cache.py and its Ray Train half,
# tests/integration/test_encoder_cache_ray.py).
CACHE_TINY = {
    **TINY_SIZES,
    "train.batch_size": 8, "train.samples_per_class": 2, "train.lr": 3e-3, "train.epochs": 1, "train.seed": 3,
    "data.max_audio_seconds": 1.0, "data.max_text_tokens": 64, "model.encoders": "frozen",
}


def comparable(result) -> dict:
    """A fold result (``train.FoldResult``) without its wall-clock timings, the only fields allowed to differ
    between two runs of the same config."""
    values = result.to_dict()
    values["history"] = [{k: v for k, v in h.items() if not k.endswith("_time_s")} for h in values["history"]]
    return values


# --- random rows in the dataset's column form ------------------------------------------------------------------

def make_rows(n: int, seed: int, prefix: str, speakers: list[str]) -> dict[str, np.ndarray]:
    """Random utterances in the dataset's column form (audio 0.2-0.6 s; cropped to 0.5 s by the collate), spoken
    in turn by ``speakers``."""
    from ser_platform.data.iemocap import CLASSES

    rng = np.random.default_rng(seed)
    audio = np.empty(n, dtype=object)
    audio[:] = [rng.standard_normal(int(rng.integers(3200, 9600))).astype(np.float32) * 0.1 for _ in range(n)]
    return {
        "id": np.asarray([f"{prefix}_{i:03d}" for i in range(n)], dtype=object),
        "speaker": np.asarray([speakers[i % len(speakers)] for i in range(n)], dtype=object),
        "label": np.asarray([CLASSES[i % 4] for i in range(n)], dtype=object),
        "mode": np.asarray(["improvised" if i % 3 else "scripted" for i in range(n)], dtype=object),
        "transcript": np.asarray([" ".join(rng.choice(["oh", "no", "yes", "fine", "great"], 4)) for _ in range(n)],
                                 dtype=object),
        "audio": audio,
        "duration": np.asarray([len(a) / 16000 for a in audio], dtype=np.float32),
    }


def fold_rows(fold: int, sizes: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """``sizes`` = (training, validation, test) random rows, spoken by the speakers of ``fold``'s splits (loso5):
    a table whose fold ``fold`` splits exactly so (``loader.LocalFolds``)."""
    from ser_platform.data.folds import fold_spec

    spec = fold_spec(fold)
    parts = [make_rows(n, 10 * fold + i, f"f{fold}{split[:2]}", sorted(getattr(spec, f"{split}_speakers")))
             for i, (split, n) in enumerate(zip(("train", "val", "test"), sizes))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- the tiny SERModel of the model tests -------------------------------------------------------------------




TINY_MODEL = ModelConfig(
    text=TextEncoderConfig(tiny_hidden_size=16, tiny_num_layers=1, tiny_num_heads=2),
    speech=SpeechEncoderConfig(tiny_hidden_size=16, tiny_num_layers=1, tiny_num_heads=2, tiny_conv_dim=8,
                               cnn_channels=8, lstm_hidden=6),
    embed_dim=8, num_heads=2, num_layers=1, embedding_dim=8,
)


def base_shaped_speech(folder: Path, num_layers: int = 2, **settings) -> SpeechEncoderConfig:
    """A speech encoder config naming a local folder that holds wav2vec2-base's published config (its 7-layer
    GroupNorm conv stack, 768-d, 12 heads) with ``num_layers`` transformer layers: built with random weights
    (``pretrained=False``), no download. ``settings``: other SpeechEncoderConfig fields."""
    from transformers import Wav2Vec2Config

    from ser_platform.models.speech import KNOWN_SPEECH_CONFIGS

    Wav2Vec2Config(**{**KNOWN_SPEECH_CONFIGS["facebook/wav2vec2-base"], "num_hidden_layers": num_layers}
                   ).save_pretrained(folder)
    return SpeechEncoderConfig(name=str(folder), cnn_channels=8, lstm_hidden=6, **settings)


def make_model(config: ModelConfig = TINY_MODEL, seed: int = 0) -> SERModel:
    torch.manual_seed(seed)
    np.random.seed(seed)  # wav2vec2's SpecAugment time masks (training mode) draw from numpy's global generator
    return SERModel(config)


def make_batch(seconds: list[float], tokens: list[int], seed: int = 0) -> dict:
    """Zero-padded model inputs for utterances of the given lengths (random audio, features and token ids)."""
    generator = torch.Generator().manual_seed(seed)
    samples = [int(s * 16000) for s in seconds]
    frames = [1 + n // 160 for n in samples]  # 10 ms hop, centred frames
    batch = len(samples)
    inputs = {
        "input_values": torch.zeros(batch, max(samples)),
        "audio_lengths": torch.tensor(samples),
        "mfcc": torch.zeros(batch, max(frames), 40),
        "spectrogram": torch.zeros(batch, max(frames), 321),
        "feature_lengths": torch.tensor(frames),
        "input_ids": torch.ones(batch, max(tokens) + 2, dtype=torch.long),  # <pad> = 1
        "attention_mask": torch.zeros(batch, max(tokens) + 2, dtype=torch.bool),
    }
    for b, (n, t, k) in enumerate(zip(samples, frames, tokens)):
        inputs["input_values"][b, :n] = 0.1 * torch.randn(n, generator=generator)
        inputs["mfcc"][b, :t] = torch.randn(t, 40, generator=generator)
        inputs["spectrogram"][b, :t] = torch.randn(t, 321, generator=generator)
        inputs["input_ids"][b, : k + 2] = torch.cat((torch.tensor([0]), torch.randint(5, 261, (k,), generator=generator),
                                                    torch.tensor([2])))
        inputs["attention_mask"][b, : k + 2] = True
    return inputs


def take(inputs: dict, index: int) -> dict:
    """Sample ``index`` alone, cropped to its own lengths (no padding)."""
    n, t = int(inputs["audio_lengths"][index]), int(inputs["feature_lengths"][index])
    k = int(inputs["attention_mask"][index].sum())
    return {
        "input_values": inputs["input_values"][index:index + 1, :n], "audio_lengths": inputs["audio_lengths"][index:index + 1],
        "mfcc": inputs["mfcc"][index:index + 1, :t], "spectrogram": inputs["spectrogram"][index:index + 1, :t],
        "feature_lengths": inputs["feature_lengths"][index:index + 1], "input_ids": inputs["input_ids"][index:index + 1, :k],
        "attention_mask": inputs["attention_mask"][index:index + 1, :k],
    }


def multihead_reference(attention) -> torch.nn.MultiheadAttention:
    """``torch.nn.MultiheadAttention`` (an independent implementation of multi-head attention) holding the
    projections of one of our FocusAttention modules; eval mode, sequence-first (T, B, D) like MulT."""
    reference = torch.nn.MultiheadAttention(attention.embed_dim, attention.num_heads).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                                                  attention.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        reference.out_proj.weight.copy_(attention.out_proj.weight)
        reference.out_proj.bias.copy_(attention.out_proj.bias)
    return reference


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def check_metric_loss_routing(model, space: str, reached, untouched) -> None:
    """Backward of the triplet term alone on ``space``: gradients reach the parts in ``reached``, none the others.
    beta = 0 isolates the triplet term; a large margin keeps every hinge active."""
    batch = make_batch([0.5, 0.6, 0.55, 0.7, 0.5, 0.65], [4, 6, 5, 3, 7, 4], seed=2)
    loss = JointLoss(LossConfig(alpha=1.0, beta=0.0, margin=100.0, space=space))
    loss(model(**batch), torch.tensor([0, 0, 1, 1, 2, 2])).loss.backward()
    for part in reached:
        assert grad_norm(getattr(model, part)) > 0, part
    for part in untouched:
        assert grad_norm(getattr(model, part)) == 0, part


# --- ASR tracks ------------------------------------------------------------------------------------------------

def copy_with_track(dataset: str, out: Path, hear, metadata=None) -> tuple[Path, dict, list[str]]:
    """A copy of ``dataset`` at ``out`` with a hand-made ASR track ``fake@r1``: ``hear(gold transcript, id)`` is
    each utterance's text; ``metadata(gold columns, texts)`` the track's (default: no WER). Returns (the copy,
    its gold columns id/session/speaker/mode/transcript, the texts in row order)."""
    import shutil

    import pyarrow.parquet as pq

    from ser_platform.data.transcripts import GOLD_COLUMNS, TrackWriter

    shutil.copytree(dataset, out)
    gold = pq.read_table(out, columns=list(GOLD_COLUMNS)).to_pydict()
    texts = [hear(t, i) for t, i in zip(gold["transcript"], gold["id"])]
    with TrackWriter(out, "fake", "r1") as writer:
        writer.commit(gold["id"], texts, metadata(gold, texts) if metadata else {"wer": {}})
    return out, gold, texts


# --- sweeps logged without Ray -------------------------------------------------------------------------------

def open_sweep(uri: str, experiment_id: str, experiment, name: str, config):
    """A sweep's parent run for ``experiment`` (a catalogue entry); the ``TrialContext`` its trials log under."""
    from ser_platform import tracking
    from ser_platform.sweep import TrialContext

    parent = tracking.open_sweep_run(uri, experiment_id, name, kind=experiment.key, table=experiment.table,
                                     variants=list(experiment.variants), varied=experiment.varied_keys,
                                     config=config)
    return TrialContext(base_config=config.to_dict(), experiment=experiment, sweep_name=name, mlflow_uri=uri,
                        mlflow_experiment_id=experiment_id, parent_run_id=parent.run_id, train_storage="unused")


def log_trial(ctx, trial_id: str, params: dict, config, result=None, status: str | None = None) -> str:
    """One trial as ``sweep.run_trial`` logs it: its run, then ``result`` (a TrialResult-shaped object), or left
    unfinished with ``result=None`` (``status`` then sets its state). Returns the run id."""
    from ser_platform import tracking
    from ser_platform.catalogue import trial_overrides

    variant, overrides = trial_overrides(ctx.experiment, params)
    run = tracking.open_trial_run(ctx.mlflow_uri, ctx.mlflow_experiment_id, ctx.identity(trial_id, variant),
                                  config.replace(overrides))
    if result is not None:
        tracking.log_trial_result(run, result)
    elif status:
        run.set_status(status)
    return run.run_id


# --- processes ----------------------------------------------------------------------------------------------

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, so no two are the same)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env(home: Path, **extra: str) -> dict:
    """This process's environment without any Ray auth or address settings of the user, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.update(extra)
    return env


def processes_mentioning(text: str) -> list[int]:
    """Processes other than this one whose command line contains ``text`` (e.g. a head's temp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            state, _parent, group = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(group) == pgid and state != "Z":
                members.append(int(entry))
    return members


def head_command(temp_dir: Path, num_cpus: int) -> tuple[list[str], int]:
    """``ray start --head --block`` on 127.0.0.1 with every port its own free one (so it never meets another
    instance) and its temp dir at ``temp_dir``; returns the command and the dashboard port."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    return RAY_CLI + [
        "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        "--min-worker-port=0", "--max-worker-port=0", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ], dashboard


# --- a real MLflow tracking server -----------------------------------------------------------------------------

class MlflowServer:
    """`mlflow server` on 127.0.0.1 (a free port unless given), in its own session so that stopping it stops its
    whole process group (uvicorn workers, MLflow's job consumers); ``stop`` then ``start`` again is a server that
    went away and came back on the same port and store."""

    def __init__(self, backend: str, workdir: Path, *, artifacts: Path | str | None = None, port: int | None = None,
                 env: dict | None = None):
        import subprocess

        self.backend, self.workdir, self.artifacts = backend, Path(workdir), artifacts
        self.port = port or free_ports(1)[0]
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> str:
        import subprocess
        import time
        import urllib.request

        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", self.backend, "--workers", "1"]
        if self.artifacts is not None:
            command += ["--artifacts-destination", str(self.artifacts)]
        log = open(self.workdir / "server.log", "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=self.workdir, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                    if response.read() == b"OK":
                        return self.uri
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 20) -> None:
        import signal
        import subprocess

        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in group_members(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait()
        self.process = None


# --- a sweep whose trials train nothing -------------------------------------------------------------------------

SWEEP_CALLS_ENV = "SER_TEST_SWEEP_CALLS"  # file the stand-in appends each call's trial id to
SWEEP_BLOCK_ENV = "SER_TEST_SWEEP_BLOCK"  # set: the stand-in hangs on the second trial (to be killed there)


def standin_scores(alpha: float, beta: float, fold: int) -> dict[str, float]:
    """Per-fold scores as a known formula of the configuration, so the tables can be checked against it."""
    test_ua = 0.40 + 0.20 * alpha - 0.05 * beta + 0.01 * fold
    return {"val_wa": test_ua + 0.03, "val_ua": test_ua + 0.02, "test_wa": test_ua + 0.01, "test_ua": test_ua}


def standin_train_folds(config, *, run_name, storage_path, parent_run_id=None, tags=None, labels=None,
                        progress=None):
    """``ray_train.train_folds``'s signature and logging, numbers from ``standin_scores``: Tune's and MLflow's
    bookkeeping of a sweep in seconds. ``$SER_TEST_SWEEP_CALLS`` records each call; with ``$SER_TEST_SWEEP_BLOCK``
    the second trial hangs (a test kills the driver there)."""
    import time
    from types import SimpleNamespace

    from mlflow import MlflowClient

    trial_id = (tags or {}).get("ser.trial_id", run_name)
    calls = os.environ.get(SWEEP_CALLS_ENV)
    if calls:
        with open(calls, "a") as handle:
            handle.write(trial_id + "\n")
        seen = Path(calls).read_text().split()
        if os.environ.get(SWEEP_BLOCK_ENV) and len(set(seen)) >= 2:
            time.sleep(600)  # the test kills the sweep's driver here
    client = MlflowClient(config.tracking.mlflow_uri)
    experiment_id = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    per_fold = {}
    for fold in config.data.folds:
        scores = standin_scores(config.loss.alpha, config.loss.beta, fold)
        per_fold[fold] = SimpleNamespace(fold=fold, best_epoch=1, confusion=[[1]], **scores)
        # Like train_folds: a restarted trial finds its fold runs again by their tags instead of adding runs.
        found = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                                     f"tags.`ser.fold` = '{fold}'")
        run = found[0] if found else client.create_run(experiment_id, run_name=f"fold={fold}", tags={
            "mlflow.parentRunId": parent_run_id, "ser.fold": str(fold), "ser.role": "fold", **(tags or {})})
        client.log_metric(run.info.run_id, "test_ua", scores["test_ua"])
        client.set_terminated(run.info.run_id)
    summary = {}
    for key in ("val_wa", "val_ua", "test_wa", "test_ua"):
        values = np.array([getattr(per_fold[f], key) for f in per_fold])
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(values.mean()), float(values.std())
    return SimpleNamespace(per_fold=per_fold, summary=summary)


def tune_trials(sweep_dir: Path) -> dict[str, str]:
    """trial id -> status, from Tune's experiment state file (what a restore will read)."""
    import json

    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return {}
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


SWEEP_DRIVER = """
import json, os, sys
import ray
sys.path.insert(0, {tests_dir!r})
import support
from ser_platform.config import from_dict
from ser_platform.sweep import run_sweep

address = {address!r}
if address:  # a cluster that is up; its workers do not see this process's environment: hand the switches over
    env_vars = {{k: v for k, v in os.environ.items() if k in ({calls_env!r}, {block_env!r})}}
    ray.init(address=address, log_to_driver=False, runtime_env={{"env_vars": env_vars}})
ray.cloudpickle.register_pickle_by_value(support)  # Ray's workers cannot import the tests' helpers
config = from_dict(json.loads(open({config!r}).read()))
result = run_sweep(config, name={name!r}, resume={resume}, train_fn=support.standin_train_folds, verbose=False)
print("RESULT " + json.dumps({{"status": result.status, "parent": result.parent_run_id,
                               "trials": [t["trial_id"] for t in result.trials]}}))
"""


def sweep_driver(tmp: Path, config_file: Path, *, name: str, resume: bool, env: dict,
                 address: str | None = None):
    """A sweep's driver in a subprocess (so a test can kill it): on the cluster at ``address``, or (None) on a
    local Ray of its own (run_sweep starts it), with the stand-in trials; it prints ``RESULT {json}`` at the end."""
    import subprocess

    script = tmp / f"driver_{name}_{int(resume)}.py"
    script.write_text(SWEEP_DRIVER.format(tests_dir=str(REPO / "tests"), address=address or "",
                                          config=str(config_file), name=name, resume=resume,
                                          calls_env=SWEEP_CALLS_ENV, block_env=SWEEP_BLOCK_ENV))
    return subprocess.Popen([sys.executable, str(script)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# --- work started ahead of its test (the ``head_start`` marker, tests/conftest.py) -----------------------------

def _run_ahead(function, args: tuple, workdir: str, result: str) -> None:
    """The background process: a session of its own (so ``HeadStart.stop`` ends whatever it spawns, as its
    process group), the lowest CPU priority for it and its children, killed with the suite's process however that
    ends; then ``function(workdir, *args)``; the value or the traceback is pickled to ``result`` (renamed into
    place: a half-written result is never read).

    Where the kernel groups each session's processes for CPU fairness (``sched_autogroup``, on here), a process's
    nice value ranks it only within its session's group: the servers and heads the tests start in sessions of
    their own (``start_new_session``) each got as much CPU as the whole group holding this process (they ran
    1.4-3.3x slower than alone). So this process's session's group is given nice 19 as well."""
    import ctypes
    import pickle
    import signal
    import time
    import traceback

    os.setsid()
    os.nice(19)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("19")
    except OSError:  # no autogroups here: nice alone ranks it
        pass
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: do not outlive the suite's process
    except (OSError, AttributeError):
        pass
    started = time.monotonic()
    try:
        outcome = ("value", function(workdir, *args))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        outcome = ("error", traceback.format_exc())
    with open(result + ".part", "wb") as f:
        pickle.dump((*outcome, time.monotonic() - started), f)
    os.replace(result + ".part", result)


class HeadStart:
    """``function(workdir, *args)`` running in a spawned process at nice 19, from the moment the suite's
    collection ends: it takes the CPU the tests before it leave idle (waiting on servers, heads and sleeps), and
    slows them only through what the cores share in hardware (~1.2x while it runs, measured), not through the
    scheduler. ``result()`` waits for it and returns its value (or raises with its traceback); ``stop()`` kills
    it and its children and removes ``workdir``."""

    def __init__(self, function, args: tuple = ()):
        import multiprocessing
        import tempfile
        import time

        self.name = getattr(function, "__qualname__", repr(function))
        self.workdir = Path(tempfile.mkdtemp(prefix="ser-head-start-"))
        self._result = self.workdir / "result.pickle"
        self.started = time.monotonic()
        # Not a daemon: the function may start processes of its own (daemonic processes may not).
        self.process = multiprocessing.get_context("spawn").Process(
            target=_run_ahead, args=(function, tuple(args), str(self.workdir), str(self._result)), daemon=False)
        self.process.start()

    def result(self, timeout: float):
        """The function's value; raises if it failed, died or has not finished within ``timeout`` seconds."""
        import pickle
        import time

        waited = time.monotonic()
        self.process.join(timeout)
        if self.process.is_alive():
            raise TimeoutError(f"{self.name} (started ahead) did not finish within {timeout:.0f} s of its test")
        if not self._result.exists():
            raise RuntimeError(f"{self.name} (started ahead) died with exit code {self.process.exitcode}")
        with open(self._result, "rb") as f:
            kind, value, ran = pickle.load(f)
        if kind == "error":
            raise RuntimeError(f"{self.name} (started ahead) failed:\n{value}")
        self.timing = (f"{self.name} ran {ran:.0f} s in the background, started "
                       f"{waited - self.started:.0f} s before its test, which waited {time.monotonic() - waited:.0f} s")
        return value

    def stop(self) -> None:
        import shutil
        import signal

        # Its group outlives it if it died first; before its setsid the group is empty and it is killed alone.
        for pid in {*group_members(self.process.pid), *([self.process.pid] if self.process.is_alive() else [])}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.join(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- servers and local multi-node clusters ----------------------------------------------------------------------

def short_tempdir(prefix: str):
    """A context: a new folder directly under /tmp (Ray's socket paths under it must fit in 107 bytes, which
    pytest's folders do not), removed with everything in it afterwards."""
    import contextlib
    import shutil
    import tempfile

    @contextlib.contextmanager
    def folder():
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    return folder()


def stop_group(process, timeout: float = 30) -> None:
    """SIGTERM to a process started in its own session (``start_new_session=True``) and its whole group, then
    SIGKILL to whatever of the group is left after ``timeout`` seconds."""
    import signal
    import subprocess

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for pid in group_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.wait()


def wait_until(ready, process, log: Path, what: str, timeout: float = 90) -> None:
    """Poll ``ready()`` (True when the server answers) every 0.5 s; raise naming ``what`` with the end of its log
    if ``process`` exits first or ``timeout`` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {process.returncode}" if process.poll() is not None else f"{timeout:.0f} s passed"
            raise RuntimeError(f"{what} did not start ({state}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def answers(url: str, expected: bytes | None = None) -> bool:
    """Whether ``url`` answers HTTP (any status; with ``expected``, a 200 whose body is exactly that)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return expected is None or response.read() == expected
    except urllib.error.HTTPError:
        return expected is None
    except OSError:
        return False


class MotoS3:
    """An S3-compatible server on 127.0.0.1 (moto's server mode) for one test module: ``with MotoS3(folder) as
    s3:``; ``s3.env`` holds what a client needs (``AWS_ENDPOINT_URL`` for boto3 and pyarrow,
    ``MLFLOW_S3_ENDPOINT_URL`` for MLflow's artifact client, dummy keys), ``s3.create_bucket(name)`` makes a
    bucket. Started in its own session and stopped with its group; the start waits at most 60 s."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
                    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.process = None

    def __enter__(self) -> "MotoS3":
        import subprocess

        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "moto.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env})
        try:
            wait_until(lambda: answers(self.endpoint + "/moto-api/"), self.process, log, "moto S3 server", 60)
        except BaseException:
            stop_group(self.process)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.process)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """``{key: size}`` of every object under ``prefix``."""
        found = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found


def _node_ports() -> list[str]:
    node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
    return [f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            "--min-worker-port=0", "--max-worker-port=0"]


class LocalCluster:
    """A Ray cluster of several nodes on this machine, as `ray start` builds one on real machines: a head
    (``ray start --head --block``, ``head_cpus`` CPUs for work: 0 keeps Train workers off it) and one
    ``ray start --address=HEAD --block`` per worker node, each its own process group, all on 127.0.0.1 with
    their own free ports, the cluster's own temp dir and HOME (no other Ray instance, no ~/.ray/auth_token of
    the user). ``env``: extra settings of every node and client (token auth, S3 endpoint); ``autoscaling``: an
    autoscaler config (``fake_autoscaler_config``), then worker nodes come from Ray's fake multi-node provider,
    not from ``worker_cpus``. Stopped (SIGTERM to each `ray start --block`, then SIGKILL to anything that names
    the temp dir) on exit, also after a failed start."""

    def __init__(self, root: Path, *, head_cpus: int = 0, worker_cpus: tuple = (1, 1), env: dict | None = None,
                 autoscaling: dict | None = None, object_store_mb: int = 300):
        self.root = Path(root)
        self.home = self.root / "home"
        self.temp_dir = self.root / "ray"
        self.head_cpus, self.worker_cpus, self.autoscaling = head_cpus, tuple(worker_cpus), autoscaling
        self.object_store = str(object_store_mb * 2**20)
        self.env = clean_env(self.home, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **(env or {}))
        self.head = None
        self.workers: list = []
        self.address = self.dashboard = ""

    def __enter__(self) -> "LocalCluster":
        try:
            self._start_head()
            self.wait_for_nodes(1)
            for cpus in ([] if self.autoscaling else self.worker_cpus):
                self.add_worker(cpus)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_head(self) -> None:
        import json
        import subprocess

        self.home.mkdir(parents=True, exist_ok=True)
        command, port = head_command(self.temp_dir, num_cpus=self.head_cpus)
        command.append(f"--object-store-memory={self.object_store}")
        env = dict(self.env)
        if self.autoscaling is not None:
            # Where `ray up` puts the launcher's config on a head, and how its head start command passes it.
            config = self.home / "ray_bootstrap_config.yaml"
            config.write_text(json.dumps(self.autoscaling(next(a for a in command if a.startswith("--port="))
                                                          .split("=")[1])))
            command.append(f"--autoscaling-config={config}")
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.address = "127.0.0.1:" + next(a for a in command if a.startswith("--port=")).split("=")[1]
        self.dashboard = f"http://127.0.0.1:{port}"
        log = self.root / "head.log"
        self.head = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(lambda: answers(self.dashboard + "/api/version"), self.head, log, "Ray head", 120)

    def add_worker(self, cpus: float = 1, resources: dict | None = None, attempts: int = 3) -> int:
        """Start one more worker node and wait until it is alive; its index (for ``stop_worker``). On a loaded
        machine a raylet can miss Ray's fixed 30 s registration window (`ray start` then exits): it is started
        again, up to ``attempts`` times."""
        import json
        import subprocess

        index, alive = len(self.workers), len(self.nodes())
        command = RAY_CLI + ["start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                             f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={self.object_store}",
                             "--disable-usage-stats"] + ([f"--resources={json.dumps(resources)}"] if resources else [])
        for attempt in range(attempts):
            log = self.root / f"worker{index}-{attempt}.log"
            process = subprocess.Popen(command + _node_ports(), env=self.env, stdout=open(log, "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
            if attempt == 0:
                self.workers.append(process)
            self.workers[index] = process
            try:
                self.wait_for_nodes(alive + 1, process=process)
                return index
            except ChildProcessError:
                stop_group(process)
        raise RuntimeError(f"worker node {index} did not start in {attempts} attempts; logs in {self.root}")

    def stop_worker(self, index: int) -> None:
        """A worker node lost: SIGKILL to its whole process group (raylet, its workers), nothing drained."""
        import signal

        for pid in group_members(self.workers[index].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.workers[index].wait()

    def nodes(self) -> list[dict]:
        """The alive nodes as the dashboard's state API lists them."""
        import json
        import urllib.request

        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"} if "RAY_AUTH_TOKEN" in self.env else {}
        request = urllib.request.Request(self.dashboard + "/api/v0/nodes?limit=100&detail=true", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return [n for n in json.loads(response.read())["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180, process=None) -> list[dict]:
        """Until ``count`` nodes are alive; ``ChildProcessError`` if ``process`` (a node's `ray start`) exits
        first, ``RuntimeError`` after ``timeout`` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = self.nodes()
            except OSError:
                alive = []
            if len(alive) >= count:
                return alive
            if process is not None and process.poll() is not None:
                raise ChildProcessError(f"`ray start` exited with {process.returncode} before its node was alive")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(alive)} of {count} Ray nodes alive after {timeout:.0f} s; logs in "
                                   f"{self.root}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        import signal

        for process in [*self.workers, self.head]:
            if process is not None:
                stop_group(process, timeout=20)
        for pid in processes_mentioning(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def fake_autoscaler_config(node_type: str, resources: dict, max_workers: int, idle_minutes: float = 0.5):
    """A function of the head's GCS port giving an autoscaler config for Ray's fake multi-node provider (worker
    nodes started as local processes on demand) with one worker type: ``max_workers`` nodes of ``resources``.
    The provider is named as an external module: the wheel lacks the example.yaml its own type reads."""
    def config(gcs_port: str) -> dict:
        return {
            "cluster_name": "ser-test", "max_workers": max_workers, "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_minutes, "head_node_type": "ray.head.default",
            "provider": {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                         "FakeMultiNodeProvider", "gcs_address": f"127.0.0.1:{gcs_port}",
                         "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                node_type: {"resources": dict(resources), "node_config": {}, "min_workers": 0,
                            "max_workers": max_workers}},
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}
    return config


def node_holding(cluster: "LocalCluster", pid: int) -> int:
    """The index of the worker node of ``cluster`` whose `ray start` started process ``pid`` (parents followed
    through /proc)."""
    starts = {process.pid: index for index, process in enumerate(cluster.workers)}
    current = pid
    while current > 1:
        group = os.getpgid(current) if os.path.exists(f"/proc/{current}") else 0
        if current in starts or group in starts:
            return starts.get(current, starts.get(group))
        with open(f"/proc/{current}/stat") as f:
            stat = f.read()
        current = int(stat[stat.rindex(")") + 2:].split()[1])
    raise LookupError(f"process {pid} was not started by a worker node of the cluster in {cluster.root}")
