"""``cluster.check_no_shared_disk``: on a cluster of several nodes (or one an autoscaler grows) a local dataset, run
storage or MLflow file store is refused before anything is written, naming each and what to use instead; object
storage and a tracking server pass, and so does a user's word that every node mounts the paths. No Ray: the
shapes are built as ``resources.cluster_shape`` builds them. The same refusal on a real multi-node cluster:
tests/integration/test_multinode.py."""

from __future__ import annotations

import pytest

from ser_platform.cli import build_parser, build_config
from ser_platform.cluster import check_no_shared_disk
from ser_platform.config import ConfigError, load_config
from ser_platform.resources import ClusterShape, NodeType

ONE_NODE = ClusterShape.single_node(2)
THREE_NODES = ClusterShape((NodeType("head", {"CPU": 0.0}, 1), NodeType("w", {"CPU": 1.0}, 2)), "the nodes up")
AUTOSCALED_HEAD = ClusterShape((NodeType("head", {"CPU": 0.0}, 1), NodeType("w", {"CPU": 1.0}, 4)),
                               "the autoscaler's maximum", autoscaling=True, nodes_up=1)
REMOTE = {"data.dataset": "s3://bucket/iemocap.parquet", "tracking.storage": "gs://bucket/runs",
          "tracking.mlflow_uri": "http://10.0.0.2:5000"}


def test_local_paths_pass_on_one_node(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_no_shared_disk(load_config("demo"), ONE_NODE)
    check_no_shared_disk(load_config("demo", overrides={"data.dataset": str(tmp_path)}), ONE_NODE)


@pytest.mark.parametrize("shape", [THREE_NODES, AUTOSCALED_HEAD], ids=["three nodes up", "autoscaler"])
def test_every_local_location_is_named_with_what_to_use_instead(shape, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError) as err:
        check_no_shared_disk(load_config("demo"), shape)
    message = str(err.value)
    assert "\n" not in message
    for named in ("data.dataset=(the embedded demo dataset", "tracking.storage=runs",
                  "tracking.mlflow_uri=sqlite:///"):
        assert named in message
    for advice in ("s3://", "gs://", "http(s)://", "--shared-filesystem"):
        assert advice in message


@pytest.mark.parametrize("key, value", [("data.dataset", "/data/iemocap.parquet"),
                                        ("tracking.storage", "file:///shared/runs"),
                                        ("tracking.mlflow_uri", "sqlite:////tmp/mlflow.db"),
                                        ("tracking.mlflow_uri", "file:///tmp/mlruns")])
def test_one_local_location_among_remote_ones_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"^{key}="):
        check_no_shared_disk(load_config("demo", overrides={**REMOTE, key: value}), THREE_NODES)


def test_object_storage_a_tracking_server_or_a_database_server_pass():
    check_no_shared_disk(load_config("demo", overrides=REMOTE), THREE_NODES)
    database = {**REMOTE, "tracking.mlflow_uri": "postgresql://ser@db.internal/mlflow"}
    check_no_shared_disk(load_config("demo", overrides=database), AUTOSCALED_HEAD)


def test_the_user_vouches_for_a_shared_mount_by_key_or_flag(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_no_shared_disk(load_config("demo", overrides={"tracking.shared_filesystem": True}), THREE_NODES)
    args = build_parser().parse_args(["train", "--dataset", "/nfs/iemocap.parquet", "--shared-filesystem"])
    config = build_config(args)
    assert config.tracking.shared_filesystem is True
    check_no_shared_disk(config, THREE_NODES)
    assert build_config(build_parser().parse_args(["train"])).tracking.shared_filesystem is False
