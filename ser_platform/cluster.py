"""Where things live, resolved once at the entry point: the dataset, Ray's run storage and the tracking store.

Every command (``ser ...``, the experiment scripts) calls :func:`resolve_locations` before it starts Ray work;
what it returns is a config whose ``data.dataset`` and ``tracking.storage`` are absolute paths or URIs and whose
``tracking.mlflow_uri`` is explicit, so trials and workers (other working directories, other machines) read the
same places, and nothing below the entry point checks a path or a scheme again.

- a location is a local folder, ``file://``, ``s3://`` or ``gs://`` (``storage_scheme``), opened with
  ``pyarrow.fs`` (``resolve_storage``, the same filesystem layer Ray Train and Tune use for
  ``RunConfig(storage_path=...)``) and extended with ``join_storage``;
- ``data.dataset = ""`` is the embedded synthetic corpus (``demo.ensure_demo_dataset``, built once);
- the tracking URI's precedence and its probe belong to ``tracking.store``;
- no shared disk is assumed (``check_no_shared_disk``): on a cluster of several nodes, or one an autoscaler can
  grow, a worker on another machine cannot read the head's disk, so a local dataset, run storage or MLflow file
  store is refused at start, before anything is written, unless ``tracking.shared_filesystem`` vouches that every
  node mounts those paths. Object storage (``s3://``, ``gs://``; S3-compatible stores through
  ``AWS_ENDPOINT_URL``) and an ``http(s)://`` tracking server are what every node reaches.

Nothing here parses arguments; bad values raise ``ValueError`` quoting them.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

OBJECT_STORE_SCHEMES = ("s3", "gs")
"""URI schemes of the object stores the cluster YAMLs use for data, Ray results and MLflow artifacts."""
DEFAULT_STORAGE = "runs"  # Ray's run storage (Tune state, checkpoints) when tracking.storage is "": ./runs

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


def is_local(uri_or_path: str) -> bool:
    """A plain path or ``file://``: a place on this machine's disk."""
    return storage_scheme(uri_or_path) in ("", "file")


def absolute_location(uri_or_path: str) -> str:
    """A local path made absolute (``~`` expanded); URIs unchanged but for a trailing slash."""
    if storage_scheme(uri_or_path) == "":
        return _local_absolute(uri_or_path)
    return uri_or_path.rstrip("/")


def resolve_dataset(dataset: str) -> str:
    """``data.dataset`` as an absolute path or URI, checked (``data.parquet.check_dataset``: every part file's
    footer against the summary): the embedded synthetic dataset when ``""`` (built on first use), a local path that
    must exist, or an object-storage URI."""
    if not dataset:
        from ser_platform.demo import ensure_demo_dataset

        return ensure_demo_dataset()
    from ser_platform.data.parquet import check_dataset

    location = absolute_location(dataset)
    if is_local(location):
        path = Path(urlsplit(location).path if location.startswith("file://") else location)
        if not path.exists():
            raise FileNotFoundError(f"data.dataset={dataset!r}: {path} does not exist (make one with `ser prepare`)")
    check_dataset(location)  # corrupt, foreign or missing part files are named before any work starts
    return location


def _local_tracking(uri: str) -> bool:
    """An MLflow store on this machine's disk (``sqlite:///``, ``file:``, a folder), as opposed to a server or a
    database server every node reaches (``http(s)://``, ``postgresql://``, ...)."""
    scheme = urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""
    return scheme in ("", "file", "sqlite")


def check_no_shared_disk(config: Any, shape: Any) -> None:
    """Refuse local paths while workers run on other nodes (module docstring); ``shape``: the cluster's
    (``resources.ClusterShape``). One ``ConfigError`` naming every local location and what to use instead."""
    from ser_platform.config import ConfigError

    if not shape.multi_node or config.tracking.shared_filesystem:
        return
    local = []
    if not config.data.dataset or is_local(config.data.dataset):
        local.append(f"data.dataset={config.data.dataset or '(the embedded demo dataset, data/demo)'}")
    if not config.tracking.storage or is_local(config.tracking.storage):
        local.append(f"tracking.storage={config.tracking.storage or DEFAULT_STORAGE}")
    from ser_platform.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(config)  # "" means $MLFLOW_TRACKING_URI or ./mlflow.db: resolved, nothing written
    if _local_tracking(uri):
        local.append(f"tracking.mlflow_uri={uri}")
    if local:
        raise ConfigError(
            f"{', '.join(local)}: local to this machine, but workers run on other nodes ({shape.describe()}), which "
            "cannot read it; use s3://BUCKET/... or gs://BUCKET/... (--dataset, --storage) and an http(s):// MLflow "
            "tracking server (--mlflow-uri), or --shared-filesystem (tracking.shared_filesystem=true) if every node "
            "mounts these paths")


def resolve_locations(config: Any) -> Any:
    """The config with its dataset, run storage and tracking URI resolved (module docstring)."""
    from ser_platform.tracking.store import resolve_tracking_uri

    return config.replace({
        "data.dataset": resolve_dataset(config.data.dataset),
        "tracking.storage": absolute_location(config.tracking.storage or DEFAULT_STORAGE),
        "tracking.mlflow_uri": resolve_tracking_uri(config),
    })


def check_before_ray(config: Any) -> None:
    """What can fail in seconds, before Ray starts and without writing anything: a named dataset
    (``resolve_dataset``'s checks) and an http(s) tracking server (probed)."""
    from ser_platform.tracking.store import check_tracking_server, resolve_tracking_uri

    if config.data.dataset:
        resolve_dataset(config.data.dataset)
    check_tracking_server(resolve_tracking_uri(config))


def prepare_run(config: Any, *, sweep: bool, trials: int | None = None, say: Any = print) -> Any:
    """The entry point's one step once Ray is connected and before anything is written: every node's versions
    against the driver's (``environment.check_cluster``), the cluster's shape
    (``resources.cluster_shape``), local paths refused on a cluster of several nodes (``check_no_shared_disk``),
    the locations resolved (``resolve_locations``: the embedded dataset is built here, on one node only), and the
    resources decided (``resources.resolve``: trials and (fold, seed) units at once, CPUs per worker; what it
    decides is said through ``say``; ``trials``: a sweep's number of trials, when known)."""
    from ser_platform.environment import check_cluster
    from ser_platform.resources import cluster_shape, resolve

    check_cluster()  # a node with other versions fails here, before any work (environment.py)
    shape = cluster_shape()
    check_no_shared_disk(config, shape)
    resolved = resolve(resolve_locations(config), shape, sweep=sweep, trials=trials, say=say)
    _leave_job_package()
    return resolved


def _leave_job_package() -> None:
    """A job's driver steps out of its ``--working-dir`` package once every path is absolute. Ray's runtime-env
    agent unpacks a package afresh (delete, then unzip) when two workers on the node set it up at once, which
    leaves the driver in a deleted folder and fails Tune's path handling (FileNotFoundError from getcwd; seen with
    Ray 2.60 on several nodes). The package's modules stay importable: its path is on sys.path, not relative."""
    import tempfile

    try:
        inside = "/runtime_resources/working_dir_files/" in os.getcwd()
    except FileNotFoundError:
        inside = True
    if inside:
        os.chdir(tempfile.gettempdir())
