"""What one trial and its Ray Train workers hold: CPUs, GPUs, how many trials fit at once.

Ray schedules a Tune trial (``TRIAL_CPU``, it only waits on its trainer) and, beside it, the trainer's workers in
their own placement group (``worker_resources``: the ``ScalingConfig`` keyword arguments). ``train.cpus_per_worker
= 0`` ("auto") shares the cluster's CPUs among ``sweep.max_concurrent`` trials (``worker_cpus``), and
``max_concurrent_trials`` caps the sweep's concurrency by what fits.

Measured on these machines: two 1-CPU workers on 2 CPUs fed a *streaming* Ray Dataset hung silently (the Parquet
read tasks never got a CPU), so without materialised splits one CPU stays free for Ray Data.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# What a Tune trial holds for itself: it only waits on its TorchTrainer, whose workers get their own placement
# group (Tune refuses 0).
TRIAL_CPU = 0.01


def _check_quantity(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def worker_resources(use_gpu: bool, num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict:
    """Keyword arguments for ``ray.train.ScalingConfig``: ``use_gpu``, ``num_workers``, ``resources_per_worker``.

    ``cpus_per_worker`` may be fractional (0.5 leaves CPUs free for Ray Data's read tasks on a small machine,
    module docstring) or 0; ``gpus_per_worker`` must be > 0 with ``use_gpu`` and 0 without it (a GPU asked for by a
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


def worker_cpus(config: Any, cluster_cpus: float) -> float:
    """CPUs per Ray Train worker: ``config.train.cpus_per_worker``, lowered when the workers would otherwise
    take every CPU of the cluster while Ray Data still has read tasks to run (``data.materialize=False``).
    ``cpus_per_worker = 0`` ("auto") shares the cluster's CPUs among ``sweep.max_concurrent`` trials (each
    holding ``TRIAL_CPU`` for itself) and their workers. Streaming keeps one CPU free (module docstring);
    materialised splits need none during training."""
    wanted = float(config.train.cpus_per_worker)
    if wanted == 0:
        per_trial = cluster_cpus / config.sweep.max_concurrent - TRIAL_CPU
        wanted = max(int(per_trial / config.train.num_workers * 100) / 100, 0.01)
    if config.data.materialize:
        return wanted
    spare = max(cluster_cpus - 1.0, 0.0)
    fits = spare / config.train.num_workers
    if wanted <= fits:
        return wanted
    if fits < 0.01:
        raise ValueError(f"data.materialize=false streams Parquet during training and needs a CPU for Ray Data "
                         f"beside {config.train.num_workers} worker(s), but the cluster has {cluster_cpus:g} CPU(s); "
                         "set data.materialize=true or add CPUs")
    return round(int(fits * 100) / 100, 2)


def trainer_resources(config: Any, cluster_cpus: float) -> dict:
    """The ``ScalingConfig`` keyword arguments of a configuration's trainer (``worker_resources`` of the
    train config, with ``worker_cpus`` per worker)."""
    train = config.train
    return worker_resources(train.use_gpu, train.num_workers, worker_cpus(config, cluster_cpus),
                            train.gpus_per_worker if train.use_gpu else 0.0)


def max_concurrent_trials(config: Any, resources: Mapping[str, float], say=print) -> int:
    """How many trials fit at once: config.sweep.max_concurrent, capped by the cluster's CPUs (and GPUs) per
    trial. Without materialised datasets one CPU stays free for Ray Data's read tasks (module docstring)."""
    train = config.train
    spare_cpu = 0.0 if config.data.materialize else 1.0
    if train.cpus_per_worker == 0:  # auto: every trial's workers take their share of the CPUs (worker_cpus)
        cpu_per_trial = TRIAL_CPU + 0.01 * train.num_workers
        fit = config.sweep.max_concurrent if resources.get("CPU", 0.0) - spare_cpu >= cpu_per_trial else 0
    else:
        cpu_per_trial = train.num_workers * train.cpus_per_worker + TRIAL_CPU
        fit = math.floor((resources.get("CPU", 0.0) - spare_cpu) / cpu_per_trial)
    if train.use_gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / (train.num_workers * train.gpus_per_worker)))
    if fit < 1:
        say(f"note: one trial needs {cpu_per_trial:g} CPU"
            + (f" and {train.num_workers * train.gpus_per_worker:g} GPU" if train.use_gpu else "")
            + f"; the cluster has {dict(resources)}: trials wait for an autoscaler to add nodes")
        return 1
    if fit < config.sweep.max_concurrent:
        say(f"note: sweep.max_concurrent={config.sweep.max_concurrent} lowered to {fit}: that is what fits")
    return max(1, min(config.sweep.max_concurrent, fit))
