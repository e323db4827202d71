"""What the cluster can hold, and what a trial and its Ray Train workers ask of it: CPUs, GPUs, how many trials and
how many of a configuration's (fold, seed) units run at once.

The cluster's shape (``cluster_shape``) is read once, by the entry point, from the first of:

1. Ray's cluster config in the GCS (``ray._private.state.state.get_cluster_config()``): node types and their
   maximum counts, what Ray Train itself checks before it starts a worker group. Autoscalers newer than Ray 2.60
   and managed platforms report it; Ray 2.60's own autoscalers (v1 and v2) do not (checked: it stays None on a
   head whose autoscaler has started nodes);
2. the cluster launcher's autoscaler config on the head, ``~/ray_bootstrap_config.yaml``: ``ray up`` writes it
   there and the head's ``ray start --autoscaling-config`` reads it (cluster/*.yaml); a job's driver runs on the
   head;
3. the nodes that are up.

With 1 or 2 the shape is what the cluster can grow to: a sweep asks for the trials the user wants, and the
trials that wait are the resource demand that makes the autoscaler start nodes. With 3 it is what is there.

``resolve`` turns the config's "auto" values into numbers, per node, never from the cluster's sum:

* CPUs per worker (``train.cpus_per_worker = 0``): the largest node that can hold a worker, less one whole CPU
  left for Ray Data's read tasks when the splits are streamed (``data.materialize = false``), shared by the
  workers that must share such a node (a GPU node: one worker per ``gpus_per_worker``; CPU nodes: the
  configurations' workers spread over the nodes);
* every worker's bundle fits on some node, and one configuration's workers fit the cluster together, else
  ``ResourceError`` names the request and the largest node: Ray would wait for it forever ("No available node
  types can fulfill resource request");
* trials at once: ``sweep.max_concurrent``, capped by how many trials' workers the (maximum) cluster holds;
* (fold, seed) units at once (``train.parallel_units = 0``): the worker slots each trial has, capped by its units.
* the search's trials ``sweep.start_interval_s`` apart only when several share one node's CPUs, where their Ray
  Train start-ups would compete and the first epoch would wait for all of them; on several nodes they start at
  once (0).

A Tune trial holds no CPU (``TRIAL_RESOURCES``): it only waits on its trainers, so it sits on the head, beside the
job's driver, and never takes a CPU a worker or a read task needs (nor dies with a worker node). Ray Data: the
fold splits are read and materialised before any worker takes its CPUs (a sweep's driver does it once for all its
trials, ``ray_train.FoldData``), so a read never waits on CPUs that trials hold. Measured on these machines: two
1-CPU workers on 2 CPUs fed a *streaming* Ray Dataset hung silently (the read tasks never got a CPU); hence the
whole CPU left free when streaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

# What a Tune trial holds (``tune.with_resources``): no CPU (it only waits on its TorchTrainers, whose workers get
# their own placement groups) and a sliver of the head's own marker resource, which places it on the head. Tune
# refuses a request of nothing at all ("empty head and zero worker bundles").
HEAD_RESOURCE = "node:__internal_head__"
TRIAL_RESOURCES = {"cpu": 0, HEAD_RESOURCE: 0.001}
# Where `ray up` leaves the autoscaler config on the head (its head_start_ray_commands pass it to `ray start`).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
UNBOUNDED = 10**6  # a node type without a maximum count (-1 in Ray's cluster config)
# Node resources that are not asked for by trials or workers (memory is Ray's accounting, node:<ip> a label).
_IGNORED = ("memory", "object_store_memory")


class ResourceError(ValueError):
    """A request that no node of the cluster can hold (it would wait forever); the message names the request,
    the config keys behind it and the largest node."""


def _check_quantity(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


# --- the cluster's shape ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeType:
    """``count`` nodes with the same ``resources`` (CPU, GPU, custom): up now, or at most (an autoscaler's)."""

    name: str
    resources: Mapping[str, float]
    count: int

    def get(self, resource: str) -> float:
        return float(self.resources.get(resource, 0.0))


@dataclass(frozen=True)
class ClusterShape:
    """The node types a cluster has or can grow to (module docstring); ``source`` says which, ``nodes_up`` how
    many nodes are up now."""

    node_types: tuple[NodeType, ...]
    source: str
    autoscaling: bool = False
    nodes_up: int = 1

    @classmethod
    def single_node(cls, cpus: float, gpus: float = 0.0) -> "ClusterShape":
        """One node of ``cpus`` CPUs (and ``gpus`` GPUs): a laptop, or a benchmark's local Ray instance."""
        return cls((NodeType("local", {"CPU": float(cpus), "GPU": float(gpus)}, 1),), "one local node")

    @property
    def node_count(self) -> int:
        return sum(n.count for n in self.node_types)

    @property
    def multi_node(self) -> bool:
        """More than one node, or an autoscaler that may add some: the nodes share no disk."""
        return self.autoscaling or self.node_count > 1

    def largest(self, resource: str = "CPU") -> NodeType:
        return max(self.node_types, key=lambda n: (n.get(resource), n.get("GPU")))

    def describe(self) -> str:
        kinds = " + ".join(f"{'up to ' if self.autoscaling else ''}{n.count if n.count < UNBOUNDED else 'any'} x "
                           f"{_format(n.resources)}" for n in self.node_types)
        return f"{kinds} ({self.source})"


def _format(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}" if any(
        resources.values()) else "{no CPU}"


def _useful(resources: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items()
            if k not in _IGNORED and not k.startswith(("node:", "accelerator_type:"))}


def shape_from_cluster_config(config: Any, nodes_up: int) -> ClusterShape | None:
    """Ray's ``autoscaler_pb2.ClusterConfig`` (node groups with their maximum counts) as a shape."""
    groups = [NodeType(g.name or f"group{i}", _useful(dict(g.resources)), UNBOUNDED if g.max_count < 0 else
                       int(g.max_count)) for i, g in enumerate(config.node_group_configs)]
    groups = [g for g in groups if g.count > 0]
    if not groups:
        return None
    return ClusterShape(tuple(groups), "the autoscaler's maximum, Ray's cluster config", True, nodes_up)


def shape_from_launcher_config(config: Mapping[str, Any], nodes_up: int,
                               where: str = LAUNCHER_CONFIG) -> ClusterShape | None:
    """A cluster-launcher YAML (``available_node_types``, ``max_workers``) as a shape: the head type once, each
    worker type at its ``max_workers`` (capped by the cluster's). None when a type declares no ``resources``
    (the autoscaler then learns them from the cloud, and so cannot we)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", UNBOUNDED))
    shape = []
    for name, spec in sorted(types.items(), key=lambda item: item[0] != head):
        if "resources" not in (spec or {}):
            return None
        count = 1 if name == head else min(int(spec.get("max_workers", cap)), cap)
        if count > 0:
            shape.append(NodeType(name, _useful(spec["resources"]), count))
    if not shape:
        return None
    return ClusterShape(tuple(shape), f"the autoscaler's maximum, {where}", True, nodes_up)


def shape_from_nodes(nodes: list[Mapping[str, Any]]) -> ClusterShape:
    """The alive nodes of ``ray.nodes()``, nodes with the same resources counted together."""
    counts: dict[tuple, int] = {}
    for node in nodes:
        if node.get("Alive", True):
            key = tuple(sorted(_useful(node.get("Resources", {})).items()))
            counts[key] = counts.get(key, 0) + 1
    types = tuple(NodeType(f"nodes{i}", dict(key), count) for i, (key, count) in enumerate(sorted(counts.items())))
    return ClusterShape(types or (NodeType("none", {}, 0),), "the nodes that are up", False, sum(counts.values()))


def cluster_shape(launcher_config: str = LAUNCHER_CONFIG) -> ClusterShape:
    """The shape of the cluster this process is connected to (Ray initialised), from the first source of the
    module docstring that knows it."""
    import ray
    import yaml
    from ray._private.state import state

    nodes = ray.nodes()
    up = sum(1 for n in nodes if n.get("Alive"))
    reported = state.get_cluster_config()
    shape = shape_from_cluster_config(reported, up) if reported is not None else None
    path = Path(launcher_config).expanduser()
    if shape is None and path.is_file():
        shape = shape_from_launcher_config(yaml.safe_load(path.read_text()) or {}, up, str(path))
    return shape or shape_from_nodes(nodes)


# --- requests ------------------------------------------------------------------------------------------------

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


def worker_bundle(config: Any, cpus: float) -> dict[str, float]:
    """What one Ray Train worker of ``config`` asks for, with ``cpus`` CPUs."""
    train = config.train
    return worker_resources(train.use_gpu, train.num_workers, cpus,
                            train.gpus_per_worker if train.use_gpu else 0.0)["resources_per_worker"]


def trainer_resources(config: Any) -> dict:
    """The ``ScalingConfig`` keyword arguments of a configuration's trainer; its CPUs resolved (``resolve``)."""
    if config.train.cpus_per_worker == 0:
        raise ValueError("train.cpus_per_worker=0 (auto) reached a trainer unresolved: call resources.resolve "
                         "at the entry point")
    train = config.train
    return worker_resources(train.use_gpu, train.num_workers, train.cpus_per_worker,
                            train.gpus_per_worker if train.use_gpu else 0.0)


def _reserve(config: Any) -> float:
    """CPUs left free on a node beside workers: a whole one for the read tasks of streamed splits."""
    return 0.0 if config.data.materialize else 1.0


def _per_node(node: NodeType, bundle: Mapping[str, float], reserve: float = 0.0) -> int:
    """How many ``bundle``s one node of this type holds, with ``reserve`` CPUs kept free."""
    fits = []
    for resource, amount in bundle.items():
        if amount > 0:
            room = node.get(resource) - (reserve if resource == "CPU" else 0.0)
            fits.append(max(0, math.floor(room / amount + 1e-9)))
    return min(fits) if fits else UNBOUNDED


def _too_large(bundle: Mapping[str, float], shape: ClusterShape, what: str) -> ResourceError:
    largest = shape.largest("GPU" if bundle.get("GPU") else "CPU")
    return ResourceError(f"{what} asks {_format(bundle)}, more than any node of this cluster has: the largest is "
                         f"{_format(largest.resources)} ({shape.describe()}); Ray would wait for it forever")


# --- "auto" resolved, requests checked ----------------------------------------------------------------------

def worker_cpus(config: Any, cluster: ClusterShape | float, configurations: int | None = None) -> float:
    """CPUs per Ray Train worker (module docstring): ``config.train.cpus_per_worker``, or for 0 ("auto") a node's
    share. ``cluster``: the shape, or a number of CPUs for one local node; ``configurations``: how many
    configurations train at once (a sweep's trials; default ``sweep.max_concurrent``). Streamed splits keep a whole
    CPU free on the node: an explicit size that leaves none is lowered to the size that does."""
    shape = cluster if isinstance(cluster, ClusterShape) else ClusterShape.single_node(cluster)
    train = config.train
    configurations = config.sweep.max_concurrent if configurations is None else configurations
    reserve = _reserve(config)
    gpu = {"GPU": train.gpus_per_worker} if train.use_gpu else {}
    hosts = [n for n in shape.node_types if n.get("CPU") - reserve >= 0.01 and _per_node(n, gpu) >= 1]
    if not hosts:
        what = "a Ray Train worker" + (f" with {train.gpus_per_worker:g} GPU" if gpu else "")
        raise ResourceError(f"{what} and {reserve:g} CPU kept free beside it (data.materialize="
                            f"{config.data.materialize}) fit no node: {shape.describe()}")
    node = max(hosts, key=lambda n: n.get("CPU"))
    spread = math.ceil(configurations * train.num_workers / sum(n.count for n in hosts))
    sharing = max(1, _per_node(node, gpu) if gpu else spread)
    share = max(0.01, math.floor((node.get("CPU") - reserve) / sharing * 100 + 1e-6) / 100)
    wanted = float(train.cpus_per_worker)
    if wanted == 0 or (not config.data.materialize and wanted > share):
        return share
    return wanted


def group_capacity(config: Any, shape: ClusterShape, cpus: float) -> int:
    """How many configurations' worker groups (``num_workers`` workers of ``cpus`` CPUs each) the (maximum)
    cluster holds at once, node by node."""
    bundle = worker_bundle(config, cpus)
    slots = sum(n.count * _per_node(n, bundle, _reserve(config)) for n in shape.node_types)
    return min(slots // config.train.num_workers, UNBOUNDED)


def check_feasible(config: Any, shape: ClusterShape, cpus: float) -> int:
    """Raise ``ResourceError`` if a worker's bundle, or one configuration's workers together, fit no node of
    ``shape``; else the number of worker groups the cluster holds at once (``group_capacity``)."""
    bundle = worker_bundle(config, cpus)
    keys = f"train.cpus_per_worker={config.train.cpus_per_worker:g}" + (
        f", train.gpus_per_worker={config.train.gpus_per_worker:g}" if config.train.use_gpu else "")
    if not any(_per_node(n, bundle) >= 1 for n in shape.node_types):
        raise _too_large(bundle, shape, f"a Ray Train worker ({keys})")
    capacity = group_capacity(config, shape, cpus)
    if capacity < 1:
        raise ResourceError(f"{config.train.num_workers} Ray Train workers of {_format(bundle)} each "
                            f"(train.num_workers, {keys}) never fit at once on this cluster: {shape.describe()}; "
                            "lower train.num_workers or the CPUs per worker")
    return capacity


def resolve(config: Any, shape: ClusterShape, *, sweep: bool, trials: int | None = None,
            say: Callable[[str], None] = print) -> Any:
    """``config`` with its resources decided for ``shape`` (module docstring), and what was decided said in a few
    lines: ``sweep.max_concurrent`` (a sweep's trials at once; 1 for ``ser train``), ``train.cpus_per_worker`` and
    ``train.parallel_units`` as numbers. ``trials``: how many the sweep runs in all, when known (never more at
    once, so one trial of the demo's three-at-once preset gets the whole node). Raises ``ResourceError`` for a
    request no node can hold."""
    train = config.train
    asked = config.sweep.max_concurrent if sweep else 1
    wanted = min(asked, trials) if trials else asked
    cpus = worker_cpus(config, shape, wanted)
    capacity = check_feasible(config, shape, cpus)
    bundle = _format(worker_bundle(config, cpus))
    at_once = min(wanted, capacity)
    if sweep:
        of = f" for {trials} trial(s) in all" if trials and trials < asked else ""
        say(f"resources: {at_once} trial(s) at once (asked {asked}{of}; {shape.describe()} holds {capacity} "
            f"configuration(s) of {train.num_workers} worker(s) x {bundle})")
    units = len(config.data.folds) * train.seeds
    parallel = min(units, train.parallel_units or max(1, capacity // at_once))
    origin = "auto: a node's share" if train.cpus_per_worker == 0 else "train.cpus_per_worker"
    say(f"resources: {cpus:g} CPU per worker ({origin}); {parallel} of each configuration's {units} (fold, seed) "
        f"unit(s) at once" + ("" if train.parallel_units else " (train.parallel_units=0: auto)"))
    if shape.autoscaling:
        most = f"up to {shape.node_count}" if shape.node_count < UNBOUNDED else "no fixed maximum of"
        say(f"resources: {shape.nodes_up} node(s) up now, {most} node(s) in all; the autoscaler starts nodes for "
            "the work that waits")
    interval = config.sweep.start_interval_s if sweep and at_once > 1 and not shape.multi_node else 0.0
    if interval:
        say(f"resources: trials start {interval:g} s apart (sweep.start_interval_s): they share one node's CPUs, so "
            "the first trains while the next start")
    return config.replace({"sweep.max_concurrent": at_once, "train.cpus_per_worker": cpus,
                           "train.parallel_units": parallel, "sweep.start_interval_s": interval})
