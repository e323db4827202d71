"""The code paths that differ between a laptop and a cloud cluster.

Three questions every entry point (CLI, experiment scripts, the sweep) asks before it starts Ray work:

- where do runs live?  ``resolve_storage`` / ``join_storage``: a local folder, ``file://``, ``s3://`` or
  ``gs://``, opened with ``pyarrow.fs`` (the same filesystem layer Ray Train and Tune use for
  ``RunConfig(storage_path=...)``);
- where does MLflow log?  ``mlflow_tracking_uri`` (flag > ``$MLFLOW_TRACKING_URI`` > a sqlite file in the
  working directory) and ``check_tracking_server``, which fails early, naming the URI, when the tracking
  server of a cluster (``cluster/*.yaml`` starts one on the head) cannot be reached;
- what does one Ray Train worker hold?  ``worker_resources`` builds the ``ScalingConfig`` keyword arguments,
  ``detect_gpu_count`` says how many GPUs there are to share out.

Nothing here parses arguments; bad values raise ``ValueError`` quoting them.
"""

from __future__ import annotations

import math
import os
import posixpath
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

OBJECT_STORE_SCHEMES = ("s3", "gs")
"""URI schemes of the object stores the cluster YAMLs use for data, Ray results and MLflow artifacts."""
# What a Tune trial holds for itself: it only waits on its TorchTrainer, whose workers get their own placement
# group (Tune refuses 0).
TRIAL_CPU = 0.01

_SUPPORTED_SCHEMES = ("file",) + OBJECT_STORE_SCHEMES


def storage_scheme(uri_or_path: str) -> str:
    """The scheme of a storage location: ``"s3"``, ``"gs"``, ``"file"``, or ``""`` for a plain local path.

    Pure string handling (no filesystem or network access). Raises ``ValueError`` for an empty location
    or a scheme this project does not store runs on (``hdfs://``, ``http://``, ...).
    """
    if not isinstance(uri_or_path, str) or not uri_or_path.strip():
        raise ValueError(f"storage location must be a non-empty path or URI, got {uri_or_path!r}")
    if "://" not in uri_or_path:
        return ""
    scheme = urlsplit(uri_or_path).scheme.lower()
    if scheme not in _SUPPORTED_SCHEMES:
        raise ValueError(
            f"unsupported storage URI {uri_or_path!r}: the scheme {scheme!r} is not one of "
            f"{', '.join(s + '://' for s in _SUPPORTED_SCHEMES)} (or a plain local path)"
        )
    if scheme in OBJECT_STORE_SCHEMES and not urlsplit(uri_or_path).netloc:
        raise ValueError(f"storage URI {uri_or_path!r} names no bucket (expected {scheme}://BUCKET/prefix)")
    return scheme


def is_object_storage(uri_or_path: str) -> bool:
    """True for ``s3://`` and ``gs://`` locations (shared by every node of a cluster), False for local ones."""
    return storage_scheme(uri_or_path) in OBJECT_STORE_SCHEMES


def _local_absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def resolve_storage(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    """Open a storage location: ``(filesystem, path inside it)``.

    ``s3://bucket/prefix`` and ``gs://bucket/prefix`` go through ``pyarrow.fs.FileSystem.from_uri``, which
    returns the path as ``bucket/prefix``; query parameters that pyarrow understands (``?region=...``,
    ``?endpoint_override=...`` for S3-compatible stores) are honoured. ``file:///abs/path`` and plain local
    paths give a ``LocalFileSystem`` and an absolute path (relative paths are taken from the current working
    directory, ``~`` is expanded). Nothing is created.

    For s3:// without ``?region=`` pyarrow asks S3 for the bucket's region, so that case needs the network;
    its failure is re-raised as ``RuntimeError`` naming the URI.
    """
    scheme = storage_scheme(uri_or_path)
    if scheme == "":
        return pafs.LocalFileSystem(), _local_absolute(uri_or_path)
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri_or_path)
    except (OSError, ValueError, TypeError) as err:
        raise RuntimeError(f"cannot open storage {uri_or_path!r}: {err}") from err
    return filesystem, path


def join_storage(base: str, *parts: str) -> str:
    """Append path segments to a storage location, keeping its scheme (and any ``?query``).

    ``join_storage("s3://b/runs", "trial=3", "fold=1") == "s3://b/runs/trial=3/fold=1"``. A plain local base
    is made absolute, like ``resolve_storage`` does, so the result can go straight to Ray's
    ``RunConfig(storage_path=...)``. Each part may hold several segments (``"a/b"``); empty parts, absolute
    parts and ``..`` segments are refused, so a joined location never leaves its base.
    """
    scheme = storage_scheme(base)
    segments: list[str] = []
    for part in parts:
        if not isinstance(part, str) or not part.strip("/"):
            raise ValueError(f"storage path segment must be a non-empty string, got {part!r} (base {base!r})")
        if part.startswith("/"):
            raise ValueError(f"storage path segment {part!r} is absolute; it would replace the base {base!r}")
        for segment in part.strip("/").split("/"):
            if segment in ("", ".", ".."):
                raise ValueError(f"storage path segment {part!r} contains {segment!r} (base {base!r})")
            segments.append(segment)
    if scheme == "":
        return posixpath.join(_local_absolute(base), *segments) if segments else _local_absolute(base)
    split = urlsplit(base)
    path = split.path.rstrip("/")
    if segments:
        path = path + "/" + "/".join(segments)
    return urlunsplit((split.scheme, split.netloc, path, split.query, split.fragment))


def mlflow_tracking_uri(cli_value: str | None) -> str:
    """The MLflow tracking URI to use: the flag, else ``$MLFLOW_TRACKING_URI``, else a sqlite file here.

    An empty or blank value counts as unset at each level. The default is ``sqlite:///<cwd>/mlflow.db`` with
    the absolute working directory, i.e. four slashes (``sqlite:////home/me/ser/mlflow.db``), so Ray workers
    started in other directories on the same machine log to the same file. On a cluster the head's
    ``ray start`` exports ``MLFLOW_TRACKING_URI=http://<head-private-ip>:5000`` (cluster/*.yaml), so jobs
    submitted there reach the head's tracking server without the flag.
    """
    if cli_value is not None and cli_value.strip():
        return cli_value.strip()
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"


def check_tracking_server(uri: str, timeout: float = 5) -> None:
    """Fail early when an http(s) tracking URI does not lead to a live MLflow server.

    GETs ``<uri>/health``; an MLflow server answers ``200 OK`` with the body ``OK``. Anything else (refused
    connection, timeout, DNS failure, an HTTP error, another body) raises ``RuntimeError`` naming the URI,
    so a sweep stops before its trials start instead of failing in every worker. Other schemes (sqlite,
    file, databricks, ...) have no server to ask and pass unchecked.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in ("http", "https"):
        return
    health = uri.rstrip("/") + "/health"
    hint = (
        "start it (on a cluster the head starts it: see cluster/README.md), tunnel to it, "
        "or pass another --mlflow-uri"
    )
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            body = response.read(64).decode("utf-8", errors="replace").strip()
    except urllib.error.HTTPError as err:
        raise RuntimeError(
            f"MLflow tracking server {uri!r} answered HTTP {err.code} to GET {health}: "
            f"that is not an MLflow server; {hint}"
        ) from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RuntimeError(f"MLflow tracking server {uri!r} is unreachable ({reason}); {hint}") from err
    if body != "OK":
        raise RuntimeError(
            f"MLflow tracking server {uri!r} answered {body!r} to GET {health} instead of 'OK': "
            f"that is not an MLflow server; {hint}"
        )


def _check_quantity(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def worker_resources(use_gpu: bool, num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict:
    """Keyword arguments for ``ray.train.ScalingConfig``: ``use_gpu``, ``num_workers``, ``resources_per_worker``.

    ``cpus_per_worker`` may be fractional (0.5 leaves CPUs free for Ray Data's read tasks on a small machine,
    see FACTS) or 0; ``gpus_per_worker`` must be > 0 with ``use_gpu`` and 0 without it (a GPU asked for by a
    CPU run would never be used and could keep the run from being scheduled). A worker shares one GPU
    (``gpus_per_worker < 1``) or holds whole GPUs, so 1.5 is refused. Errors quote the bad value.
    """
    if not isinstance(use_gpu, bool):
        raise ValueError(f"use_gpu must be True or False, got {use_gpu!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a whole number >= 1, got {num_workers!r}")
    cpus = _check_quantity("cpus_per_worker", cpus_per_worker)
    gpus = _check_quantity("gpus_per_worker", gpus_per_worker)
    if gpus > 1 and not gpus.is_integer():
        # A GPU is one device: a worker gets a share of one GPU or whole GPUs, never 1.5 devices.
        raise ValueError(f"gpus_per_worker above 1 must be a whole number of GPUs, got {gpus_per_worker!r}")
    if use_gpu and gpus == 0:
        raise ValueError(f"use_gpu=True needs gpus_per_worker > 0, got {gpus_per_worker!r}")
    if not use_gpu and gpus != 0:
        raise ValueError(f"gpus_per_worker={gpus_per_worker!r} with use_gpu=False: set use_gpu=True or use 0 GPUs")
    resources = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = gpus
    return {"use_gpu": use_gpu, "num_workers": num_workers, "resources_per_worker": resources}


def detect_gpu_count() -> int:
    """GPUs available: the Ray cluster's ``GPU`` total when Ray is initialised, else this machine's CUDA devices.

    With Ray up this counts every node's GPUs (what trials can be spread over), not only the local ones.
    """
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return int(torch.cuda.device_count())
