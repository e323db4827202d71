"""Where runs go: the tracking URI, a store that exists (or a server that answers) before anyone writes, and the
experiment every run of a command goes to.

Tracking URI precedence: ``config.tracking.mlflow_uri`` (or the ``--mlflow-uri`` flag) > ``$MLFLOW_TRACKING_URI``
> ``sqlite:///<cwd>/mlflow.db`` (what ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` opens). SQLite paths
are made absolute, because Ray workers run in other working directories. On a cluster the head exports
``MLFLOW_TRACKING_URI=http://<head>:5000`` (cluster/*.yaml).

Writers call :func:`ensure_store` once in the driver, before workers or trials start: a SQLite store's schema is
created there by one process (sixteen processes creating a fresh SQLite store at once all failed on these
machines: a migration race), and a server is probed with a short timeout so an unreachable one fails the command
at start, naming the URI. Readers (``ser tables``, ``ser predict``) call :func:`open_store`, which never creates
an empty store where a user mistyped a path.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

PROBE_TIMEOUT_S = 10.0  # an unreachable tracking server fails a command within this many seconds


class TrackingError(ValueError):
    """The tracking store cannot be used, or has no such experiment; the message names the URI and what to do."""


# --- the URI -----------------------------------------------------------------------------------------------

def tracking_uri(explicit: str | None = None) -> str:
    """The MLflow tracking URI: ``explicit`` (a flag or ``config.tracking.mlflow_uri``), else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; blank counts as unset at each level; relative
    SQLite paths are made absolute (four slashes: ``sqlite:////home/me/ser/mlflow.db``)."""
    for value in (explicit, os.environ.get("MLFLOW_TRACKING_URI")):
        if value is not None and value.strip():
            return _absolute_sqlite(value.strip())
    return f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"


def resolve_tracking_uri(config: Any = None, cli_value: str | None = None) -> str:
    """:func:`tracking_uri` of ``cli_value`` or else ``config.tracking.mlflow_uri``."""
    return tracking_uri(cli_value or (config.tracking.mlflow_uri if config is not None else None))


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///mlflow.db`` (relative to the cwd) -> ``sqlite:////abs/cwd/mlflow.db``; other URIs unchanged."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    return "sqlite:///" + str(path.resolve())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):])
    return None if path in ("", ":memory:") else Path(path)


def is_server(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() in ("http", "https")


# --- probing -------------------------------------------------------------------------------------------------

def check_tracking_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail early when an http(s) tracking URI does not lead to a live MLflow server.

    GETs ``<uri>/health``; an MLflow server answers ``200 OK`` with the body ``OK``. Anything else (refused
    connection, timeout, DNS failure, an HTTP error, another body) raises ``TrackingError`` naming the URI.
    Other schemes (sqlite, file, databricks, ...) have no server to ask and pass unchecked."""
    if not is_server(uri):
        return
    health = uri.rstrip("/") + "/health"
    hint = ("start it (on a cluster the head starts it: see cluster/README.md), tunnel to it, "
            "or pass another --mlflow-uri")
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            body = response.read(64).decode("utf-8", errors="replace").strip()
    except urllib.error.HTTPError as err:
        raise TrackingError(f"MLflow tracking server {uri!r} answered HTTP {err.code} to GET {health}: "
                            f"that is not an MLflow server; {hint}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri!r} is unreachable ({reason}); {hint}") from err
    if body != "OK":
        raise TrackingError(f"MLflow tracking server {uri!r} answered {body!r} to GET {health} instead of 'OK': "
                            f"that is not an MLflow server; {hint}")


@contextlib.contextmanager
def _http_limits(timeout_s: float) -> Iterator[None]:
    """No retries and a short timeout for one probe (mlflow reads these env vars at request time)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(timeout_s))))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _probe(uri: str, timeout_s: float) -> None:
    """One cheap request through MLflow's own client, no retries: the store answers, or ``TrackingError``."""
    from mlflow import MlflowClient

    check_tracking_server(uri, timeout=timeout_s)
    try:
        with _http_limits(timeout_s):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # mlflow raises MlflowException, requests' errors or sqlalchemy's: report them all
        hint = ("is `mlflow server` running there and reachable from this machine?" if is_server(uri)
                else "is the path writable?")
        first = str(err).splitlines()[0] if str(err) else ""
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be used ({type(err).__name__}: {first}); "
                            f"{hint}") from err


def ensure_store(uri: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Make the tracking store usable before training (module docstring): create a SQLite store once, or probe a
    server without retries. Returns ``uri``."""
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    _probe(uri, timeout_s)
    return uri


def ensure_store_started(uri: str) -> Callable[[], str]:
    """:func:`ensure_store` begun now, in a thread, when ``uri`` is a SQLite store not created yet (its schema is
    MLflow's migrations, ~5 s on 2 cores), so the caller works meanwhile; call the result to wait for it (it
    returns ``uri`` or raises as ``ensure_store`` does). Any other store: the result runs ``ensure_store``."""
    db = sqlite_path(uri)
    if db is None or db.exists():
        return lambda: ensure_store(uri)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="ser-store")
    future = pool.submit(ensure_store, uri)
    pool.shutdown(wait=False)
    return future.result


def open_store(uri: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """A store to read from: a SQLite file that exists (MLflow would create an empty one) or a server that
    answers within ``timeout_s``. Returns ``uri``; ``TrackingError`` says where it looked."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise TrackingError(f"no MLflow store at {uri} ({db.resolve()} does not exist); pass --mlflow-uri or run "
                            f"from the folder that holds mlflow.db")
    _probe(uri, timeout_s)
    return uri


# --- experiments ---------------------------------------------------------------------------------------------

def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if absent (concurrent creators tolerated).

    On a SQLite store the artifacts go beside the database (``<db dir>/mlruns/<id>``), an absolute path, so
    every process writes them to one place whatever its working directory."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlruns").resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it in between
        if found is None:
            raise
        return found.experiment_id


def existing_experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, which must exist (readers); ``TrackingError`` lists the ones there are."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment named {name!r} at {uri}; experiments there: {names}")
    return found.experiment_id


def quiet_logging() -> None:
    """MLflow's and Alembic's informational lines off (a user need not see them). MLflow sets its loggers'
    levels when it is imported, so it is imported first."""
    import logging

    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
