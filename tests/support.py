"""Helpers that test modules of more than one tier share (imported as ``support``: pyproject.toml puts tests/ on
``pythonpath``). Test modules never import each other; what they share lives here or in a conftest.py fixture.

* the repository root and the tiny model sizes of the training tests;
* random rows in the dataset's column form, split by a fold's speakers (``loader.LocalFolds`` reads them);
* the tiny ``SERModel`` the model tests build, its inputs and the metric-loss gradient check;
* a sweep's parent and trial runs logged the way ``sweep.run_trial`` logs them, without Ray;
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

    def __init__(self, backend: str, workdir: Path, *, artifacts: Path | None = None, port: int | None = None,
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
