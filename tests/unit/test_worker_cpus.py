"""``resources``: the cluster's shape from each source Ray offers, "auto" sizes from a node (never the cluster's sum),
requests no node can hold refused, trials and (fold, seed) units at once. Computed, no Ray started; the shapes are
built the way ``cluster_shape`` builds them (Ray's own ClusterConfig message, the project's launcher YAML,
``ray.nodes()`` records)."""

from __future__ import annotations

import pytest
import yaml

from ser_platform.config import load_config
from ser_platform.resources import (UNBOUNDED, ClusterShape, NodeType, ResourceError, check_feasible, resolve,
                                    shape_from_cluster_config, shape_from_launcher_config, shape_from_nodes,
                                    worker_cpus)
from support import REPO

DEMO = load_config("demo")  # cpus_per_worker=0: auto
# The issue's topology: a head with no CPU for work, two worker nodes of 1 CPU each.
ISSUE = ClusterShape((NodeType("head", {"CPU": 0.0}, 1), NodeType("cpu1", {"CPU": 1.0}, 2)), "test")


def quiet(_line: str) -> None:
    pass


def test_auto_cpus_on_one_node_share_it_among_trials_and_workers():
    assert DEMO.train.cpus_per_worker == 0
    assert worker_cpus(DEMO, 2.0, 1) == 2.0  # one trial, one worker: the whole node (a trial holds no CPU)
    assert DEMO.sweep.max_concurrent == 3 and worker_cpus(DEMO, 2.0) == 0.66  # the demo's three trials at once
    two = DEMO.replace({"train.num_workers": 2, "sweep.max_concurrent": 2})
    assert worker_cpus(two, 8.0) == 2.0  # 4 workers on one 8-CPU node
    fixed = DEMO.replace({"train.cpus_per_worker": 1.0})
    assert worker_cpus(fixed, 2.0) == 1.0
    streaming = fixed.replace({"data.materialize": False, "train.num_workers": 2})
    assert worker_cpus(streaming, 2.0, 1) == 0.5  # one CPU stays free for Ray Data's read tasks


def test_auto_cpus_come_from_a_node_not_the_cluster_sum():
    # The issue's hang: auto asked one worker for the cluster's 2 CPUs minus 0.01, which no node has.
    assert worker_cpus(DEMO, ISSUE, 1) == 1.0
    assert worker_cpus(DEMO, ISSUE, 2) == 1.0  # two trials: one worker per node
    assert worker_cpus(DEMO, ISSUE, 4) == 0.5  # four: two per node
    gpu = DEMO.replace({"train.use_gpu": True, "train.gpus_per_worker": 0.5})
    gpu_nodes = ClusterShape((NodeType("head", {"CPU": 6.0}, 1), NodeType("g", {"CPU": 8.0, "GPU": 1.0}, 4)), "t")
    assert worker_cpus(gpu, gpu_nodes, 1) == 4.0  # two workers per GPU node share its 8 CPUs


def test_a_request_larger_than_every_node_fails_at_once_naming_it_and_the_largest_node():
    too_big = DEMO.replace({"train.cpus_per_worker": 1.99})  # what the old auto asked on the issue's cluster
    with pytest.raises(ResourceError) as err:
        check_feasible(too_big, ISSUE, 1.99)
    assert "{CPU: 1.99}" in str(err.value) and "the largest is {CPU: 1}" in str(err.value)
    four = DEMO.replace({"train.num_workers": 4, "train.cpus_per_worker": 1.0})
    with pytest.raises(ResourceError, match="never fit at once"):
        check_feasible(four, ISSUE, 1.0)  # each fits a node, four do not fit the two nodes together
    gpu = DEMO.replace({"train.use_gpu": True, "train.gpus_per_worker": 1.0})
    with pytest.raises(ResourceError, match="fit no node"):
        worker_cpus(gpu, ISSUE, 1)


def test_resolve_decides_trials_units_and_cpus_and_says_so():
    said: list[str] = []
    train = resolve(DEMO, ISSUE, sweep=False, say=said.append)
    assert (train.train.cpus_per_worker, train.train.parallel_units) == (1.0, 2)  # 5 folds, 2 at a time
    sweep = resolve(DEMO.replace({"sweep.max_concurrent": 3}), ISSUE, sweep=True, say=said.append)
    assert (sweep.sweep.max_concurrent, sweep.train.cpus_per_worker, sweep.train.parallel_units) == (3, 0.5, 1)
    whole = resolve(DEMO.replace({"sweep.max_concurrent": 3, "train.cpus_per_worker": 1.0}), ISSUE, sweep=True,
                    say=said.append)
    assert whole.sweep.max_concurrent == 2  # two nodes hold two 1-CPU workers
    assert any("2 trial(s) at once (asked 3" in line for line in said)
    assert resolve(DEMO.replace({"train.parallel_units": 1}), ISSUE, sweep=False, say=quiet).train.parallel_units == 1
    seeds = DEMO.replace({"train.seeds": 3, "data.folds": (1, 2)})
    wide = ClusterShape((NodeType("w", {"CPU": 1.0}, 10),), "t")
    assert resolve(seeds, wide, sweep=False, say=quiet).train.parallel_units == 6  # every (fold, seed) unit


def test_the_autoscalers_maximum_is_the_capacity_not_the_nodes_up():
    from ray.core.generated import autoscaler_pb2

    message = autoscaler_pb2.ClusterConfig()
    for name, cpus, count in (("head", 0, 1), ("cpu1", 1, 4)):
        group = autoscaler_pb2.NodeGroupConfig(name=name, max_count=count)
        group.resources["CPU"] = cpus
        message.node_group_configs.append(group)
    shape = shape_from_cluster_config(message, nodes_up=1)  # only the head is up
    assert shape.autoscaling and shape.node_count == 5
    said: list[str] = []
    config = resolve(DEMO.replace({"sweep.max_concurrent": 3}), shape, sweep=True, say=said.append)
    assert config.sweep.max_concurrent == 3  # what was asked: the nodes come when the trials wait
    assert any("1 node(s) up now, up to 5" in line for line in said)
    unbounded = autoscaler_pb2.ClusterConfig()
    unbounded.node_group_configs.append(autoscaler_pb2.NodeGroupConfig(name="w", max_count=-1))
    unbounded.node_group_configs[0].resources["CPU"] = 2
    assert shape_from_cluster_config(unbounded, 1).node_types[0].count == UNBOUNDED


def test_the_launcher_config_of_the_project_gives_its_gpu_maximum():
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    shape = shape_from_launcher_config(config, nodes_up=1)
    assert shape.autoscaling
    assert {(n.name, n.count) for n in shape.node_types} == {("head_cpu", 1), ("worker_gpu", 4)}
    gpu = load_config("paper")  # one GPU worker per trial
    assert resolve(gpu.replace({"sweep.max_concurrent": 8}), shape, sweep=True, say=quiet).sweep.max_concurrent == 4
    assert shape_from_launcher_config({"available_node_types": {"w": {"max_workers": 2}}}, 1) is None


def test_nodes_up_are_grouped_by_their_resources():
    nodes = [{"Alive": True, "Resources": {"CPU": 1.0, "memory": 5e9, "node:127.0.0.1": 1.0}},
             {"Alive": True, "Resources": {"CPU": 1.0, "object_store_memory": 1e8}},
             {"Alive": True, "Resources": {"node:__internal_head__": 1.0}},
             {"Alive": False, "Resources": {"CPU": 16.0}}]
    shape = shape_from_nodes(nodes)
    assert not shape.autoscaling and shape.nodes_up == 3 and shape.multi_node
    assert sorted((dict(n.resources).get("CPU", 0.0), n.count) for n in shape.node_types) == [(0.0, 1), (1.0, 2)]
    assert not ClusterShape.single_node(2).multi_node


def test_a_sweep_never_plans_more_trials_at_once_than_it_has():
    # The demo asks three at once; a sweep of one trial gets the whole node, and its units share what is left.
    said = []
    one = resolve(DEMO, ClusterShape.single_node(2.0), sweep=True, trials=1, say=said.append)
    assert (one.sweep.max_concurrent, one.train.cpus_per_worker) == (1, 2.0)
    assert said[0].startswith("resources: 1 trial(s) at once (asked 3 for 1 trial(s) in all;")
    two = resolve(DEMO, ISSUE, sweep=True, trials=1, say=quiet)  # one trial on two 1-CPU nodes: both units at once
    assert (two.sweep.max_concurrent, two.train.cpus_per_worker, two.train.parallel_units) == (1, 1.0, 2)
    assert resolve(DEMO, ClusterShape.single_node(2.0), sweep=True, trials=5, say=quiet).sweep.max_concurrent == 3


def test_trials_start_apart_only_where_they_share_one_node():
    # The demo's 20 s (sweep.start_interval_s) holds where its three trials share one node's CPUs; a single
    # trial, or trials on several nodes (each start-up on CPUs of its own), start at once.
    assert DEMO.sweep.start_interval_s == 20.0 and load_config("paper").sweep.start_interval_s == 0.0
    said: list[str] = []
    laptop = resolve(DEMO, ClusterShape.single_node(2.0), sweep=True, trials=3, say=said.append)
    assert (laptop.sweep.max_concurrent, laptop.sweep.start_interval_s) == (3, 20.0)
    assert said[-1] == ("resources: trials start 20 s apart (sweep.start_interval_s): they share one node's CPUs, so "
                        "the first trains while the next start")
    assert resolve(DEMO, ClusterShape.single_node(2.0), sweep=True, trials=1, say=quiet).sweep.start_interval_s == 0
    said.clear()
    spread = resolve(DEMO.replace({"train.cpus_per_worker": 0.5}), ISSUE, sweep=True, say=said.append)
    assert spread.sweep.max_concurrent > 1 and spread.sweep.start_interval_s == 0
    assert not any("apart" in line for line in said)
    assert resolve(DEMO, ClusterShape.single_node(2.0), sweep=False, say=quiet).sweep.start_interval_s == 0
