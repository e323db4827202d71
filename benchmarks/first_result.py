"""How long a new user waits for the embedded default's first result, and for all of it, as they run it.

Runs ``python experiments/sweep_loss_weights.py`` (plus any ``--set`` given) as a subprocess from an empty folder,
as a user does from a fresh copy (the synthetic corpus is written first), reads its console line by line and
stamps each with the seconds since the command started. Prints when Ray was up, when each trial started and
trained its first fold, when the first epoch line came (fold, epoch, loss, validation UA: issue 18 wants it
within 60 s), the wall time and the best trial's row of the printed table (val UA, WA, UA).

``--before KEY=VALUE`` (repeatable) first runs the same command with those overrides and prints both timelines
and the ratios, measured in one run; e.g. ``--before sweep.start_interval_s=0``: the three trials at once, as the
demo preset started them before it staggered them.

    python benchmarks/first_result.py                                      # the embedded default, timed
    python benchmarks/first_result.py --before sweep.start_interval_s=0    # against the trials started at once
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ser_platform.tracking import git_commit  # noqa: E402

from prepare import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: scripts run as python benchmarks/x.py)

RAY_UP = re.compile(r"Ray's own output")
EPOCH_LINE = re.compile(r"\| fold \d+ epoch 1/\d+ \| train loss .* val UA")
STARTED = re.compile(r"trial (\S+) \| started \(")
TRAINING = re.compile(r"trial (\S+) \| fold 1: training")
BEST_ROW = re.compile(r"±.*±.*±")  # the first table row with three mean ± std columns: the best trial


def run_command(overrides: list[str]) -> dict:
    """The embedded default in a new empty folder; each console line with its seconds since the start."""
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    with tempfile.TemporaryDirectory(prefix="ser-first-result-") as folder:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(REPO / "experiments" / "sweep_loss_weights.py"), *sets],
                                   cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
        code = process.wait()
        wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(line for _, line in lines[-20:])
        raise SystemExit(f"first_result.py: the command with {overrides or 'no overrides'} exited {code}:\n{tail}")
    return {"overrides": overrides, "lines": lines, "wall": wall}


def timeline(run: dict) -> dict:
    def matches(pattern: re.Pattern) -> list[tuple[float, re.Match]]:
        return [(at, m) for at, line in run["lines"] if (m := pattern.search(line))]

    def first(pattern: re.Pattern) -> float | None:
        return next((at for at, _ in matches(pattern)), None)

    best = next((m.string for _, m in matches(BEST_ROW)), "")
    ray, first_epoch = first(RAY_UP), first(EPOCH_LINE)
    for what, at, pattern in (("Ray's start", ray, RAY_UP), ("first epoch", first_epoch, EPOCH_LINE)):
        if at is None:  # the console changed: say which line, rather than fail formatting None below
            raise SystemExit(f"first_result.py: no {what} line (/{pattern.pattern}/) in the output of the command "
                             f"with {run['overrides'] or 'no overrides'}")
    return {"overrides": run["overrides"], "ray": ray, "first_epoch": first_epoch,
            "starts": [(at, m.group(1)) for at, m in matches(STARTED)],
            "training": {m.group(1): at for at, m in matches(TRAINING)},
            "wall": run["wall"], "best_row": " ".join(best.split())}


def report(label: str, t: dict) -> None:
    print(f"{label}: overrides {' '.join(t['overrides']) or '(none: the demo preset as it is)'}")
    print(f"  Ray up (its log line)           {t['ray']:7.1f} s")
    for at, trial in t["starts"]:
        trains = t["training"].get(trial)
        print(f"  trial {trial} started          {at:7.1f} s, fold 1 training at "
              + (f"{trains:.1f} s" if trains is not None else "?"))
    print(f"  first epoch line                {t['first_epoch']:7.1f} s")
    print(f"  wall                            {t['wall']:7.1f} s")
    print(f"  best trial (by val UA): {t['best_row']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the timed run (repeatable)")
    parser.add_argument("--before", action="append", default=[], metavar="KEY=VALUE",
                        help="first time the command with these overrides, and print the ratios (repeatable)")
    args = parser.parse_args()
    print(f"device: CPU ({cpu_name()}), {os.cpu_count()} logical CPUs; git {git_commit()}")
    before = timeline(run_command(args.before)) if args.before else None
    now = timeline(run_command(args.set))
    if before is not None:
        report("before", before)
    report("now", now)
    if before is not None:
        print(f"first epoch line now / before: {now['first_epoch'] / before['first_epoch']:.2f}x "
              f"({now['first_epoch']:.1f} s vs {before['first_epoch']:.1f} s); wall now / before: "
              f"{now['wall'] / before['wall']:.2f}x ({now['wall']:.1f} s vs {before['wall']:.1f} s)")


if __name__ == "__main__":
    main()
