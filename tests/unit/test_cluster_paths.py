"""On this machine: storage locations (ser_platform.cluster), the MLflow tracking URI and server check
(ser_platform.tracking.store), Ray Train worker resources (ser_platform.resources), and what
`ray job submit --working-dir .` leaves behind (.rayignore)."""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ser_platform.cluster import is_object_storage, join_storage, resolve_storage, storage_scheme
from ser_platform.resources import worker_resources
from ser_platform.tracking import TrackingError, check_tracking_server
from ser_platform.tracking import tracking_uri

from support import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- storage ----------------------------------------------------------------------------------------------


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = resolve_storage("runs/sweep")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert path == str(tmp_path / "runs" / "sweep")


def test_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_storage("~/runs")[1] == str(tmp_path / "runs")


def test_file_uri_is_local(tmp_path):
    filesystem, path = resolve_storage(f"file://{tmp_path}/runs")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/runs"


def test_local_round_trip_through_the_resolved_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = join_storage("runs", "trial=3", "fold=1")
    filesystem, path = resolve_storage(location)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/metrics.json") as out:
        out.write(b'{"ua": 0.71}')
    # Read back without pyarrow: the bytes are where a plain path says they are.
    assert (tmp_path / "runs" / "trial=3" / "fold=1" / "metrics.json").read_bytes() == b'{"ua": 0.71}'
    listing = filesystem.get_file_info(pafs.FileSelector(str(tmp_path / "runs"), recursive=True))
    assert sorted(Path(i.path).relative_to(tmp_path / "runs").as_posix() for i in listing) == [
        "trial=3", "trial=3/fold=1", "trial=3/fold=1/metrics.json"
    ]
    # The file:// spelling of the same location reaches the same bytes.
    file_filesystem, file_path = resolve_storage(f"file://{path}")
    with file_filesystem.open_input_stream(f"{file_path}/metrics.json") as f:
        assert f.read() == b'{"ua": 0.71}'


def test_s3_with_region_resolves_without_network():
    # With ?region= pyarrow does not ask S3 for the bucket's region, so this needs no network.
    filesystem, path = resolve_storage("s3://my-bucket/ray-results/sweep?region=eu-west-1")
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert filesystem.region == "eu-west-1"
    assert path == "my-bucket/ray-results/sweep"


def test_gs_resolves_without_network():
    filesystem, path = resolve_storage("gs://my-bucket/ray-results")
    assert isinstance(filesystem, pafs.GcsFileSystem)
    assert path == "my-bucket/ray-results"


@pytest.mark.parametrize(
    ("base", "parts", "joined"),
    [
        ("s3://b/runs", ("trial=3", "fold=1"), "s3://b/runs/trial=3/fold=1"),
        ("s3://b/runs/", ("trial=3/fold=1",), "s3://b/runs/trial=3/fold=1"),
        ("s3://b", ("runs",), "s3://b/runs"),
        ("gs://b/x", ("y/",), "gs://b/x/y"),
        ("s3://b/runs?region=eu-west-1", ("t",), "s3://b/runs/t?region=eu-west-1"),
        ("s3://b/runs?endpoint_override=localhost:9000&scheme=http", ("t",),
         "s3://b/runs/t?endpoint_override=localhost:9000&scheme=http"),
        ("file:///srv/runs", ("t",), "file:///srv/runs/t"),
        ("/srv/runs", ("t", "f"), "/srv/runs/t/f"),
        ("s3://b/runs", (), "s3://b/runs"),
    ],
)
def test_join_keeps_scheme_and_query(base, parts, joined):
    assert join_storage(base, *parts) == joined


def test_join_makes_local_base_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert join_storage("runs", "t") == f"{tmp_path}/runs/t"


@pytest.mark.parametrize("part", ["..", "a/../b", "", "/etc", "./x"])
def test_join_refuses_segments_that_leave_the_base(part):
    with pytest.raises(ValueError) as err:
        join_storage("s3://b/runs", part)
    assert repr(part) in str(err.value)


@pytest.mark.parametrize(
    ("location", "scheme", "object_storage"),
    [("s3://b/p", "s3", True), ("gs://b/p", "gs", True), ("GS://b/p", "gs", True),
     ("file:///p", "file", False), ("runs", "", False), ("/abs/runs", "", False)],
)
def test_scheme_and_object_storage(location, scheme, object_storage):
    assert storage_scheme(location) == scheme
    assert is_object_storage(location) is object_storage


@pytest.mark.parametrize("location", ["", "   ", "hdfs://nn/runs", "http://host/runs", "s3:///no-bucket", None])
def test_bad_storage_location_is_named(location):
    with pytest.raises(ValueError) as err:
        resolve_storage(location)
    assert repr(location) in str(err.value)


# ---- MLflow tracking URI ----------------------------------------------------------------------------------


def test_flag_wins_over_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert tracking_uri("http://10.0.0.9:5000") == "http://10.0.0.9:5000"


@pytest.mark.parametrize("flag", [None, "", "   "])
def test_environment_when_no_flag(monkeypatch, flag):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert tracking_uri(flag) == "http://10.0.0.5:5000"


@pytest.mark.parametrize("env_value", [None, "", "  "])
def test_default_is_sqlite_in_the_working_directory(monkeypatch, tmp_path, env_value):
    if env_value is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_value)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert uri.startswith("sqlite:////")  # absolute path: four slashes


def test_non_http_uris_have_no_server_to_check(tmp_path):
    check_tracking_server(f"sqlite:///{tmp_path}/nothing-here.db")
    check_tracking_server("databricks")


def test_closed_port_is_reported_with_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        check_tracking_server(uri, timeout=5)
    assert uri in str(err.value) and "unreachable" in str(err.value)
    assert time.monotonic() - started < 5  # refused at once, no waiting for the timeout


def test_server_that_never_answers_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts connections into the backlog, never answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingError, match="unreachable") as err:
            check_tracking_server(uri, timeout=1)
        assert uri in str(err.value)
        assert time.monotonic() - started < 10


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"hello" if self.path == "/health" else b"no"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_is_not_mlflow_is_reported():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(TrackingError, match="'hello'") as err:
            check_tracking_server(base)
        assert base in str(err.value)
        with pytest.raises(TrackingError, match="HTTP 404") as err:
            check_tracking_server(base + "/prefix")
        assert base + "/prefix" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


# ---- Ray Train worker resources ---------------------------------------------------------------------------


def test_gpu_workers():
    assert worker_resources(True, 2, 4, 1) == {
        "use_gpu": True, "num_workers": 2, "resources_per_worker": {"CPU": 4.0, "GPU": 1.0}
    }


def test_cpu_workers_ask_for_no_gpu():
    assert worker_resources(False, 2, 0.5, 0) == {
        "use_gpu": False, "num_workers": 2, "resources_per_worker": {"CPU": 0.5}
    }


@pytest.mark.parametrize("args", [(True, 2, 4, 1), (True, 1, 2, 0.5), (False, 2, 0.5, 0), (True, 1, 8, 4)])
def test_ray_train_accepts_the_kwargs(args):
    from ray.train import ScalingConfig

    kwargs = worker_resources(*args)
    config = ScalingConfig(**kwargs)
    assert config.num_workers == kwargs["num_workers"]
    assert config.use_gpu == kwargs["use_gpu"]
    assert config._resources_per_worker_not_none == kwargs["resources_per_worker"]


def test_ray_train_would_refuse_a_gpu_key_on_a_cpu_run():
    # Why worker_resources leaves "GPU" out when use_gpu is False.
    from ray.train import ScalingConfig

    with pytest.raises(ValueError):
        ScalingConfig(use_gpu=False, num_workers=1, resources_per_worker={"CPU": 1.0, "GPU": 1.0})


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        (("yes", 2, 1, 1), "got 'yes'"),
        ((True, 0, 1, 1), "got 0"),
        ((True, 2.0, 1, 1), "got 2.0"),
        ((True, True, 1, 1), "got True"),
        ((True, 2, -1, 1), "got -1"),
        ((True, 2, float("nan"), 1), "got nan"),
        ((True, 2, "4", 1), "got '4'"),
        ((True, 2, 1, 0), "got 0"),
        ((False, 2, 1, 1), "gpus_per_worker=1 with use_gpu=False"),
        ((True, 2, 1, 1.5), "got 1.5"),
        ((True, 2, 1, float("inf")), "got inf"),
    ],
)
def test_bad_worker_resources_quote_the_value(args, bad):
    with pytest.raises(ValueError) as err:
        worker_resources(*args)
    assert bad in str(err.value)


# ---- what `ray job submit --working-dir .` ships ----------------------------------------------------------


def test_rayignore_keeps_data_outputs_and_envs_out_of_job_uploads(tmp_path):
    """Ray's own packaging (the zip `ray job submit --working-dir .` uploads) over a checkout with everything
    a user accumulates, with .rayignore alone (no .gitignore): code ships, the rest stays."""
    from ray._private.runtime_env.packaging import _zip_files

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(REPO / ".rayignore", checkout / ".rayignore")
    kept = ["ser_platform/cluster.py", "experiments/sweep_loss_weights.py", "cluster/aws-gpu.yaml",
            "cluster/mlflow_server.sh", "tests/test_cluster_paths.py", "pyproject.toml", "README.md",
            "configs/paper.yaml"]
    left = ["data/IEMOCAP_full_release/Session1/sentences/wav/a.wav", "iemocap.parquet",
            "features/part-0.parquet", "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.png",
            "runs/sweep/trial=1/checkpoint.pt", "ray_results/x/result.json", "checkpoints/best.ckpt",
            "optuna.db", ".venv/bin/python", "venv/lib/x.py", ".git/HEAD", "ser_platform/__pycache__/x.pyc",
            ".pytest_cache/v/cache", "build/lib/x.py", "dist/x.whl", "ser_platform.egg-info/PKG-INFO",
            "corpus/IEMOCAP_full_release/Session1/x.txt", "cache/embeddings.npy", "auth_token", "key.pem"]
    for name in kept + left:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    package = tmp_path / "package.zip"
    _zip_files(str(checkout), [], str(package), include_gitignore=False)
    with zipfile.ZipFile(package) as zipped:
        shipped = {name for name in zipped.namelist() if not name.endswith("/")}
    assert set(kept) <= shipped
    assert shipped & set(left) == set()
