"""What a user sees while a run goes: the project's own lines (per epoch, per fold, per trial), not Ray's.

By default Ray's processes (Tune trials, Train workers and controllers, Ray Data's coordinators) do not stream
their output to the console: ``ray.init(log_to_driver=False)`` leaves it in the session's log folder, which the
run names when it starts and when it ends. The lines this project writes on a worker travel instead through a
queue (``ray.util.queue.Queue``, an actor that holds no CPU) to the driver, whose printer thread prints them as
they come. Ray's own warnings and errors in the driver still show; MLflow's and Optuna's informational lines do
not. ``--verbose`` (``Console(verbose=True)``) brings everything back: Ray streams every process's output, the
queue is not used.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable



class Console:
    """The console of one command (module docstring). Use ``ray_init_kwargs`` when starting Ray, then ``open``
    (before work starts) and ``close`` (in a ``finally``); ``channel`` goes to the workers."""

    def __init__(self, verbose: bool = False, out: Any = None):
        self.verbose = verbose
        self.out = out or sys.stdout
        self.channel: Any = None
        self.logs: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ray_init_kwargs(self) -> dict[str, Any]:
        """Arguments of ``ray.init``: quiet unless verbose (the driver's errors from Ray still show)."""
        return {} if self.verbose else {"log_to_driver": False, "logging_level": logging.ERROR}

    def quiet_libraries(self) -> None:
        """In the driver, before they speak: MLflow's, Alembic's and Optuna's informational lines off, Ray Data's
        on the console too (the driver reads the splits; its log file keeps them), and Tune's own reporter silent
        (its status tables, result boxes and TensorBoard hint; the sweep prints a line per trial instead). Not
        when verbose."""
        if self.verbose:
            return
        import optuna
        import ray.data  # noqa: F401  (it configures its logger when imported: import first, then set)

        from ser_platform import tracking

        tracking.quiet_logging()
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):  # the console's, not the session's log file
                handler.setLevel(logging.WARNING)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's legacy reporter, which verbose=0 silences

    def open(self, logs: str | None = None) -> None:
        """Start relaying the workers' lines (not when verbose: Ray streams them) and say where Ray's logs are."""
        self.logs = logs
        if self.verbose:
            return
        from ray.util.queue import Queue

        self.channel = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._print_lines, name="ser-console", daemon=True)
        self._thread.start()
        if logs:
            self.say(f"Ray's own output: {logs} (--verbose shows it here)")

    def close(self) -> None:
        """Print what is still queued, stop relaying, and say again where Ray's logs are."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._drain()
            self._thread = None
        if self.channel is not None:
            try:
                self.channel.shutdown()
            except Exception:  # Ray already stopped: the queue actor went with it
                pass
            self.channel = None
        if self.logs and not self.verbose:
            self.say(f"Ray's own output of this run: {self.logs}")

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _drain(self) -> None:
        while True:
            try:
                lines = self.channel.get_nowait_batch(self.channel.qsize())
            except Exception:  # empty, or Ray stopped
                return
            if not lines:
                return
            for line in lines:
                self.say(line)

    def _print_lines(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.say(self.channel.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray stopped): nothing more will come
                return


def worker_lines(channel: Any, prefix: str = "", fallback: str = "ser_platform.train") -> Callable[[str], None]:
    """What a worker prints its lines with, each after ``prefix`` (which trial: concurrent trials interleave):
    into the console's channel (quiet runs), else through a logger, which Ray streams to the console
    (``--verbose``). A worker's ``print`` would be teed twice by Ray Train."""
    logger = logging.getLogger(fallback)

    def put(line: str) -> None:
        if channel is None:
            logger.info(prefix + line)
            return
        try:
            channel.put_nowait(prefix + line)
        except Exception:  # the driver has gone (its console closed): the line stays in MLflow's metrics
            logger.info(prefix + line)

    return put
