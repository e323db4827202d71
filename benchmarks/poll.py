"""What Ray Train's poll interval costs a local run: ``ser train`` with one TorchTrainer per fold, at Ray's default
poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2``) and at the interval ``init_ray`` sets for a local Ray (0.5 s).

Ray Train V2's controller takes its workers' reports, and sees that they finished, only when it polls them; after a
trainer's last report the run waits for the next poll with nothing to do. Each run is ``ser train --folds 1,2
--epochs 1 --set train.trainer_scope=fold`` (two trainers, the embedded corpus, a new empty folder each time, so
each run writes the corpus first as a new user's does), the two settings interleaved ``--repeats`` times; prints each
wall time, the medians and their ratio, measured in one run.

    python benchmarks/poll.py                # 2 repeats of each (about 4 minutes on 2 cores)
    python benchmarks/poll.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ser_platform.ray_train import LOCAL_POLL_INTERVAL_S, POLL_INTERVAL_ENV  # noqa: E402
from ser_platform.tracking import git_commit  # noqa: E402

from prepare import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: scripts run as python benchmarks/x.py)

COMMAND = ["-m", "ser_platform.cli", "train", "--folds", "1,2", "--epochs", "1", "--set", "train.trainer_scope=fold"]


def timed_run(interval: float | None) -> float:
    """Wall seconds of the command in a new empty folder; ``interval`` None leaves the variable to ``init_ray``."""
    env = {k: v for k, v in os.environ.items() if k != POLL_INTERVAL_ENV} | {"PYTHONPATH": str(REPO)}
    if interval is not None:
        env[POLL_INTERVAL_ENV] = str(interval)
    with tempfile.TemporaryDirectory(prefix="ser-bench-poll-") as folder:
        started = time.perf_counter()
        run = subprocess.run([sys.executable, *COMMAND], cwd=folder, env=env, capture_output=True,
                             text=True)
        wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"poll.py: `ser train` with {POLL_INTERVAL_ENV}={interval} exited {run.returncode}:\n"
                         f"{run.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, interleaved (default 2)")
    args = parser.parse_args()
    print(f"device: CPU ({cpu_name()}), {os.cpu_count()} logical CPUs; git {git_commit()}")
    print(f"command: ser {' '.join(COMMAND[2:])}")
    walls: dict[str, list[float]] = {"default": [], "local": []}
    for repeat in range(args.repeats):
        for label, interval in (("default", 2.0), ("local", None)):
            walls[label].append(timed_run(interval))
            print(f"  run {repeat + 1}, poll {'2' if interval else f'{LOCAL_POLL_INTERVAL_S:g}'} s: "
                  f"{walls[label][-1]:6.1f} s", flush=True)
    before, now = statistics.median(walls["default"]), statistics.median(walls["local"])
    print(f"median wall: poll 2 s (Ray's default) {before:.1f} s, poll {LOCAL_POLL_INTERVAL_S:g} s (init_ray's, "
          f"local) {now:.1f} s; now / before: {now / before:.3f}x")


if __name__ == "__main__":
    main()
