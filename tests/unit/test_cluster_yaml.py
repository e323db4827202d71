"""Offline checks of the cluster launcher configs in cluster/*.yaml.

Each config must pass the installed Ray's ``ray/autoscaler/ray-schema.json`` (jsonschema) and Ray's own
preparation (``prepare_config`` + ``validate_config``, what ``ray up`` runs before it calls a cloud API), and
this project's invariants: nothing but SSH open to the internet, the GPU worker type declares its GPUs, every
node installs the package, the head's MLflow server binds to a private address, token auth on head and
workers, object storage for artifacts and runs. Every invariant is also run on deliberately broken copies of
the configs, which it must reject: a check that cannot fail checks nothing.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
import ray.autoscaler

from ser_platform.cluster import is_object_storage, storage_scheme

from support import REPO

CLUSTER_DIR = REPO / "cluster"
CONFIG_PATHS = sorted(CLUSTER_DIR.glob("*.yaml"))
README = CLUSTER_DIR / "README.md"

# Object store each provider's configs must use for MLflow artifacts and Ray results.
PROVIDER_SCHEME = {"aws": "s3", "gcp": "gs"}

# GPUs per machine type, from the providers' instance-type pages. A GPU worker type not listed here fails the
# check until someone looks its count up: a wrong count makes the autoscaler start the wrong number of nodes.
GPUS_PER_MACHINE = {
    # AWS G6 (NVIDIA L4), G5 (NVIDIA A10G), P4d/P5
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1, "g6.16xlarge": 1,
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "p4d.24xlarge": 8, "p5.48xlarge": 8,
    # Google Cloud G2 (NVIDIA L4), A2 (NVIDIA A100)
    "g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1, "g2-standard-32": 1,
    "g2-standard-24": 2, "g2-standard-48": 4, "g2-standard-96": 8,
    "a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8,
    "a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4, "a2-ultragpu-8g": 8,
}
WILDCARD_CIDRS = ("0.0.0.0/0", "::/0")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "*", "")


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_schema() -> dict:
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def schema_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in validator.iter_errors(config)]


# ---- helpers over a config ---------------------------------------------------------------------------------


def node_types(config: dict) -> dict:
    return config.get("available_node_types", {})


def worker_types(config: dict) -> dict:
    return {name: nt for name, nt in node_types(config).items() if name != config.get("head_node_type")}


def machine_type(node_type: dict) -> str | None:
    node_config = node_type.get("node_config", {})
    return node_config.get("InstanceType") or node_config.get("machineType")


def head_commands(config: dict) -> list[str]:
    return [*config.get("setup_commands", []), *config.get("head_setup_commands", []),
            *config.get("head_start_ray_commands", [])]


def all_commands(config: dict) -> list[str]:
    commands = [*head_commands(config), *config.get("initialization_commands", []),
                *config.get("worker_setup_commands", []), *config.get("worker_start_ray_commands", [])]
    for nt in node_types(config).values():
        commands += nt.get("initialization_commands", []) + nt.get("worker_setup_commands", [])
    return commands


def repo_mounts(config: dict) -> list[str]:
    """Remote paths that file_mounts fills with the repository root (ray up runs from it)."""
    return [remote for remote, local in config.get("file_mounts", {}).items() if os.path.normpath(local) == "."]


def home_path(path: str) -> str:
    return re.sub(r"^(\$HOME|\$\{HOME\}|~)/", "~/", path)


def script_text(config: dict, command: str, repo: Path) -> tuple[str, str] | None:
    """(path, text) of a repository script that a command runs through a repository mount, if any."""
    for remote in repo_mounts(config):
        match = re.search(re.escape(remote.rstrip("/")) + r"/(\S+\.sh)\b", command)
        if match:
            path = repo / match.group(1)
            return str(path), path.read_text() if path.is_file() else ""
    return None


def joined_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def option_value(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def mlflow_server_invocations(config: dict, repo: Path) -> list[tuple[str, str, str]]:
    """(where, invocation line, whole text it sits in) for each `mlflow server` the head starts."""
    found = []
    for command in head_commands(config):
        if "mlflow server" in command:
            found.append(("config", command, command))
        script = script_text(config, command, repo)
        if script is not None:
            path, text = script
            found += [(path, line, text) for line in joined_lines(text)
                      if "mlflow server" in line and not line.lstrip().startswith("#")]
    return found


def artifacts_destinations(config: dict) -> list[str]:
    """The --artifacts-destination of each MLflow server the head starts, inline or through the script."""
    destinations = []
    for command in head_commands(config):
        args = shlex.split(command)
        if "mlflow" in args and "server" in args:
            value = option_value(args, "--artifacts-destination")
            destinations.append(value if value is not None else "./mlartifacts (MLflow's default)")
        for i, arg in enumerate(args):
            if arg.endswith("mlflow_server.sh"):
                destinations.append(args[i + 1] if i + 1 < len(args) else "<missing>")
    return destinations


# ---- invariants: each returns the problems it finds ([] = holds) --------------------------------------------


def open_ports_problems(config: dict) -> list[str]:
    """Nothing reachable from the internet but SSH (22)."""
    problems = []
    security_group = config.get("provider", {}).get("security_group", {})
    for rule in security_group.get("IpPermissions", []):
        to_all = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        tcp = str(rule.get("IpProtocol")).lower() in ("tcp", "6")
        ssh_only = tcp and rule.get("FromPort") == rule.get("ToPort") == 22
        if to_all and not ssh_only:
            problems.append(f"security group rule {rule} opens more than SSH (22) to the internet")
    for name, nt in node_types(config).items():
        if "SecurityGroupIds" in nt.get("node_config", {}):
            problems.append(f"node type {name} uses existing security groups, whose rules cannot be checked here")
    rest = copy.deepcopy(config)
    rest.get("provider", {}).pop("security_group", None)
    text = yaml.safe_dump(rest)
    for cidr in WILDCARD_CIDRS:
        if cidr in text:
            problems.append(f"{cidr} appears outside the security group rules (firewall range, command?)")
    for command in all_commands(config):
        host = option_value(shlex.split(command), "--dashboard-host")
        if host is not None and host in WILDCARD_HOSTS:
            problems.append(f"the Ray dashboard / job API listens on every interface: {command!r}")
    return problems


def gpu_worker_problems(config: dict) -> list[str]:
    """A CPU head, and GPU worker types that declare the GPUs their machine type has."""
    problems = []
    head = node_types(config).get(config.get("head_node_type"), {})
    if head.get("resources", {}).get("GPU", 0) or machine_type(head) in GPUS_PER_MACHINE:
        problems.append(f"the head ({machine_type(head)}) is a GPU machine or declares GPUs: it should be a CPU node")
    gpu_types = {name: nt for name, nt in worker_types(config).items() if nt.get("resources", {}).get("GPU", 0) >= 1}
    if not gpu_types:
        problems.append("no worker node type declares GPUs in `resources`")
    for name, nt in gpu_types.items():
        machine, declared = machine_type(nt), nt["resources"]["GPU"]
        if machine not in GPUS_PER_MACHINE:
            problems.append(f"{name}: GPU count of {machine!r} unknown here; add it to GPUS_PER_MACHINE")
        elif GPUS_PER_MACHINE[machine] != declared:
            problems.append(f"{name}: declares GPU {declared} but {machine} has {GPUS_PER_MACHINE[machine]}")
        low, high = nt.get("min_workers", 0), nt.get("max_workers")
        if high is None or high < 1 or low > high or high > config.get("max_workers", 0):
            problems.append(f"{name}: min_workers {low} / max_workers {high} / cluster max_workers "
                            f"{config.get('max_workers')} do not let the autoscaler add GPU nodes")
        if config["provider"]["type"] == "gcp":
            scheduling = nt["node_config"].get("scheduling", {})
            if scheduling.get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GCP GPU VMs need scheduling.onHostMaintenance TERMINATE")
            if scheduling.get("provisioningModel") == "SPOT" and scheduling.get("automaticRestart", True):
                problems.append(f"{name}: Spot VMs need scheduling.automaticRestart false (GCP refuses true)")
    return problems


def package_install_problems(config: dict) -> list[str]:
    """Every node pip-installs the repository that file_mounts syncs."""
    mounts = repo_mounts(config)
    if not mounts:
        return ["no file_mount syncs the repository root ('.')"]

    def installs(commands: list[str]) -> bool:
        targets = {m.rstrip("/") for m in mounts}
        for command in commands:
            args = shlex.split(command)
            if "pip" in args and "install" in args and targets & {a.rstrip("/") for a in args}:
                return True
        return False

    problems = []
    if not installs(config.get("setup_commands", [])):
        problems.append(f"setup_commands (run on every node) do not pip install the synced repository {mounts}")
    for name, nt in worker_types(config).items():
        # A node type's own worker_setup_commands replace the global setup_commands for it.
        if "worker_setup_commands" in nt and not installs(nt["worker_setup_commands"]):
            problems.append(f"{name}: its worker_setup_commands replace setup_commands and do not install the package")
    return problems


def mlflow_binding_problems(config: dict, repo: Path = REPO) -> list[str]:
    """The head starts an MLflow server bound to its private address: not 0.0.0.0, not the 127.0.0.1 default."""
    invocations = mlflow_server_invocations(config, repo)
    if not invocations:
        return ["the head starts no MLflow tracking server"]
    problems = []
    for where, line, text in invocations:
        host = option_value(shlex.split(line[line.index("mlflow server"):]), "--host", "-h")
        if host is None:
            problems.append(f"{where}: `mlflow server` without --host binds to 127.0.0.1, out of the workers' reach")
        elif host in WILDCARD_HOSTS:
            problems.append(f"{where}: `mlflow server --host {host}` listens on every interface")
        elif host.startswith("$"):
            variable = host.strip("${}")
            assigned = re.search(
                rf"(^|[\s;&]){re.escape(variable)}=\$\(python -c '[^']*ray\.util\.get_node_ip_address\(\)", text, re.M
            )
            if not assigned:
                problems.append(f"{where}: --host ${variable} is not set from ray.util.get_node_ip_address()")
        else:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                problems.append(f"{where}: --host {host!r} is neither an address nor a variable set to the node's")
                continue
            if not address.is_private or address.is_loopback or address.is_unspecified:
                problems.append(f"{where}: --host {host} is not a private address of the head")
    return problems


def token_auth_problems(config: dict) -> list[str]:
    """`ray start` on head and workers runs with RAY_AUTH_MODE=token and a token file that file_mounts syncs."""
    problems = []
    synced = {home_path(remote) for remote in config.get("file_mounts", {})}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if re.search(r"\bray start\b", c)]
        if not starts:
            problems.append(f"{key}: no `ray start`")
        for command in starts:
            before = command[: re.search(r"\bray start\b", command).start()]
            if not re.search(r"\bRAY_AUTH_MODE=token\b", before):
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token (token auth is off by default)")
            if re.search(r"\bRAY_AUTH_TOKEN=", before):
                problems.append(f"{key}: a literal RAY_AUTH_TOKEN in the config is a committed secret")
            token_path = re.search(r"\bRAY_AUTH_TOKEN_PATH=(\S+?)(;|\s|$)", before)
            if token_path is None:
                problems.append(f"{key}: `ray start` is given no token (RAY_AUTH_TOKEN_PATH to a synced file)")
            elif home_path(token_path.group(1)) not in synced:
                problems.append(f"{key}: RAY_AUTH_TOKEN_PATH={token_path.group(1)} is not a file_mounts target")
    for command in all_commands(config):
        if re.search(r"\bRAY_AUTH_MODE=(?!token\b)", command):
            problems.append(f"a command sets RAY_AUTH_MODE to something else than token: {command!r}")
    return problems


def storage_problems(config: dict) -> list[str]:
    """MLflow artifacts go to the provider's object store; every object-store URI is the provider's kind."""
    scheme = PROVIDER_SCHEME[config["provider"]["type"]]
    destinations = artifacts_destinations(config)
    problems = [] if destinations else ["no MLflow artifacts destination on the head"]
    for destination in destinations:
        try:
            kind = storage_scheme(destination)
        except ValueError as err:
            problems.append(str(err))
            continue
        if kind != scheme:
            problems.append(f"MLflow artifacts go to {destination!r}, not to {scheme}:// object storage")
    for command in all_commands(config):
        for uri in re.findall(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]*", command):
            try:
                kind = storage_scheme(uri)
            except ValueError:
                continue  # not storage (http://, ...)
            if kind != scheme:
                problems.append(f"{uri!r} is not {scheme}:// storage on a {config['provider']['type']} cluster")
    return problems


DB_HOME = "/home/ray/ser-db"  # SER_DB_HOME of cluster/postgres.sh inside the container (~/ser-db)


def database_problems(config: dict) -> list[str]:
    """The head starts cluster/postgres.sh (backed up to the bucket) before MLflow, MLflow's runs go to it, and its
    folder is a host folder mounted into the container (a re-created container keeps it)."""
    starts = head_commands(config)
    db = [i for i, c in enumerate(starts) if re.search(r"postgres\.sh start\b", c)]
    mlflow = [i for i, c in enumerate(starts) if "mlflow_server.sh" in c]
    problems = []
    if not db:
        problems.append("the head starts no PostgreSQL (cluster/postgres.sh start)")
    elif not re.search(r"\bSER_DB_BACKUP=\S+", starts[db[0]]):
        problems.append("cluster/postgres.sh runs without SER_DB_BACKUP: nothing survives the head")
    if db and mlflow and db[0] > mlflow[0]:
        problems.append("MLflow starts before its PostgreSQL")
    for i in mlflow:
        if not re.search(r"\bMLFLOW_BACKEND_STORE_URI=\$\(cat ~/ser-db/mlflow_uri\)", starts[i]):
            problems.append("the MLflow server's backend store is not the head's PostgreSQL (~/ser-db/mlflow_uri)")
    mounts = [option.split()[-1] for option in config.get("docker", {}).get("head_run_options", [])
              if option.startswith("-v ") or option.startswith("--volume ")]
    if not any(m.split(":")[1:2] == [DB_HOME] and m.startswith("/") for m in mounts):
        problems.append(f"no host folder mounted on {DB_HOME} (docker.head_run_options): the database would live "
                        "in the container and die with it")
    return problems


def constraints_problems(config: dict) -> list[str]:
    """Every pip install on a node resolves against cluster/constraints.txt from the synced checkout."""
    targets = {m.rstrip("/") + "/cluster/constraints.txt" for m in repo_mounts(config)}
    problems = []
    for command in [*config.get("setup_commands", []), *config.get("head_setup_commands", []),
                    *config.get("worker_setup_commands", [])]:
        args = shlex.split(command)
        if "pip" in args and "install" in args and option_value(args, "-c", "--constraint") not in targets:
            problems.append(f"pip install without -c {sorted(targets)}: {command!r}")
    return problems


def gpu_container_problems(config: dict) -> list[str]:
    """GPU containers get their GPUs by --gpus all, not by Ray's runtime detection, and a worker whose container
    sees no GPU does not join (it would advertise GPU: 1 from its node type)."""
    docker = config.get("docker", {})
    problems = []
    if not docker.get("disable_automatic_runtime_detection"):
        problems.append("Ray's runtime detection adds --runtime=nvidia only when Docker lists it: disable it")
    for name, nt in worker_types(config).items():
        if nt.get("resources", {}).get("GPU", 0) >= 1:
            options = nt.get("docker", {}).get("worker_run_options", docker.get("worker_run_options", []))
            if "--gpus all" not in options:
                problems.append(f"{name}: its container is started without --gpus all")
    checked = False
    for command in config.get("worker_start_ray_commands", []):
        if re.search(r"\bray start\b", command):
            break
        checked = checked or "torch.cuda.device_count()" in command
    if not checked:
        problems.append("worker_start_ray_commands start Ray without checking that the container sees a GPU")
    return problems


def service_account_problems(config: dict) -> list[str]:
    """GCP: no node runs as Ray's autoscaler account (project-wide Compute Admin and Storage Object Admin)."""
    if config["provider"]["type"] != "gcp":
        return []
    problems = []
    for name, nt in node_types(config).items():
        accounts = [a["email"] for a in nt["node_config"].get("serviceAccounts", [])]
        if not accounts:
            problems.append(f"{name}: no serviceAccounts, so Ray's ray-autoscaler-sa-v1 (the head) or the default "
                            "compute account (workers)")
        problems += [f"{name}: runs as {a}, which Ray grants project-wide admin roles" for a in accounts
                     if a.startswith("ray-autoscaler-sa-")]
    return problems


def invariant_problems(config: dict, repo: Path = REPO) -> list[str]:
    return (open_ports_problems(config) + gpu_worker_problems(config) + package_install_problems(config)
            + mlflow_binding_problems(config, repo) + token_auth_problems(config) + storage_problems(config)
            + database_problems(config) + constraints_problems(config) + gpu_container_problems(config)
            + service_account_problems(config))


# ---- the configs as shipped ---------------------------------------------------------------------------------


def test_both_clouds_have_a_config():
    assert {p.name for p in CONFIG_PATHS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}
    assert {load(p)["provider"]["type"] for p in CONFIG_PATHS} >= {"aws", "gcp"}


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_config_matches_installed_ray_schema(path):
    assert schema_errors(load(path)) == []


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_config_passes_ray_up_preparation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(path))
    validate_config(prepared)
    # Ray folds setup_commands into each side's list; the install must survive that for head and workers.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "ser_platform_src" in c for c in prepared[key]), key


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_config_holds_project_invariants(path):
    assert invariant_problems(load(path)) == []


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_image_runs_the_installed_ray_and_python(path):
    # Ray clients and clusters must run the same Ray and Python versions.
    docker = load(path)["docker"]
    expected = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
    assert docker["image"] == expected
    assert docker.get("head_image", expected) == expected and docker.get("worker_image", expected) == expected


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_config_files_it_names_exist(path):
    config = load(path)
    assert all((REPO / name).is_file() for name in config["rsync_filter"])
    scripts = [script_text(config, c, REPO) for c in head_commands(config)]
    assert any(s is not None and s[1] for s in scripts), "the head runs cluster/mlflow_server.sh from the checkout"


def readme_commands() -> list[str]:
    """Shell lines of README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_submits_with_object_storage_and_token():
    sweeps = [c for c in readme_commands() if "ray job submit" in c and "sweep_loss_weights.py" in c]
    assert sweeps, "README shows how to submit the sweep"
    schemes = set()
    for command in sweeps:
        args = shlex.split(command)
        assert args[0] == "RAY_AUTH_MODE=token", command  # the token alone is refused (tests/e2e/test_cluster_auth.py)
        for flag in ("--dataset", "--storage"):
            assert is_object_storage(option_value(args, flag)), (flag, command)
        schemes.add(storage_scheme(option_value(args, "--storage")))
    assert schemes == {"s3", "gs"}


def test_readme_gcp_firewall_opens_only_ssh_to_the_internet():
    rules = [c for c in readme_commands() if c.startswith("gcloud compute firewall-rules create")]
    assert len(rules) >= 2, "README creates the GCP firewall rules the gcp config relies on"
    for rule in rules:
        args = shlex.split(rule)
        sources = option_value(args, "--source-ranges") or ""
        if any(cidr in sources.split(",") for cidr in WILDCARD_CIDRS):
            assert option_value(args, "--allow") == "tcp:22", rule


# ---- deliberately broken configs: each check must reject them -----------------------------------------------


def _aws() -> dict:
    return load(CLUSTER_DIR / "aws-gpu.yaml")


PATH_IDS = dict(ids=lambda p: p.name)


def test_misspelled_top_level_key_fails_schema():
    config = _aws()
    config["max_worker"] = config.pop("max_workers")
    errors = schema_errors(config)
    assert any("max_worker" in e for e in errors), errors


def test_wrong_value_type_fails_schema():
    config = _aws()
    config["available_node_types"]["worker_gpu"]["resources"]["GPU"] = "one"
    assert schema_errors(config)


def test_dashboard_port_open_to_the_internet_is_rejected():
    config = _aws()
    config["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ]
    assert schema_errors(config) == []  # the schema is happy with it: only our check stands in the way
    assert open_ports_problems(config)


def test_ssh_open_to_the_internet_is_allowed_but_nothing_more():
    config = _aws()
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    config["provider"]["security_group"]["IpPermissions"] = [ssh]
    assert open_ports_problems(config) == []
    config["provider"]["security_group"]["IpPermissions"] = [dict(ssh, ToPort=8265)]
    assert open_ports_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_wildcard_range_anywhere_else_is_rejected(path):
    config = load(path)
    head = config["available_node_types"][config["head_node_type"]]
    head["node_config"]["labels"] = {"note": "0.0.0.0/0"}
    assert open_ports_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_dashboard_on_every_interface_is_rejected(path):
    config = load(path)
    config["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0") for c in config["head_start_ray_commands"]
    ]
    assert open_ports_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_gpu_worker_without_gpus_is_rejected(path):
    config = load(path)
    del config["available_node_types"]["worker_gpu"]["resources"]["GPU"]
    assert gpu_worker_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_wrong_gpu_count_is_rejected(path):
    config = load(path)
    config["available_node_types"]["worker_gpu"]["resources"]["GPU"] = 2
    assert any("has 1" in p for p in gpu_worker_problems(config))


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_gpu_workers_that_cannot_scale_up_are_rejected(path):
    config = load(path)
    config["available_node_types"]["worker_gpu"]["max_workers"] = 0
    assert gpu_worker_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_missing_install_is_rejected(path):
    config = load(path)
    config["setup_commands"] = [c for c in config["setup_commands"] if "pip install" not in c]
    assert package_install_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_install_on_the_head_only_is_rejected(path):
    config = load(path)
    install = [c for c in config["setup_commands"] if "pip install" in c]
    config["setup_commands"] = [c for c in config["setup_commands"] if "pip install" not in c]
    config["head_setup_commands"] = install + config["head_setup_commands"]
    assert package_install_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_node_type_setup_that_drops_the_install_is_rejected(path):
    config = load(path)
    config["available_node_types"]["worker_gpu"]["worker_setup_commands"] = ["echo no install"]
    assert package_install_problems(config)


def _replace_mlflow_start(config: dict, command: str) -> dict:
    config["head_start_ray_commands"] = [
        command if "mlflow_server.sh" in c else c for c in config["head_start_ray_commands"]
    ]
    return config


@pytest.mark.parametrize("host_option", ["--host 0.0.0.0", "--host=0.0.0.0", "-h ::", "", "--host 127.0.0.1",
                                         "--host $IP"])
def test_mlflow_on_every_interface_or_out_of_reach_is_rejected(host_option):
    config = _replace_mlflow_start(
        _aws(), f"nohup mlflow server {host_option} --port 5000 --artifacts-destination s3://b/a > log 2>&1 &"
    )
    assert mlflow_binding_problems(config)


def test_mlflow_on_the_node_address_inline_is_accepted():
    config = _replace_mlflow_start(
        _aws(),
        "IP=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())') && "
        "nohup mlflow server --host \"$IP\" --port 5000 --artifacts-destination s3://b/a > log 2>&1 &",
    )
    assert mlflow_binding_problems(config) == []


def test_no_mlflow_server_is_rejected():
    config = _replace_mlflow_start(_aws(), "echo no tracking server")
    assert mlflow_binding_problems(config) == ["the head starts no MLflow tracking server"]


def test_mlflow_script_bound_to_every_interface_is_rejected(tmp_path):
    script = (CLUSTER_DIR / "mlflow_server.sh").read_text()
    assert '--host "$host"' in script
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mlflow_server.sh").write_text(script.replace('--host "$host"', "--host 0.0.0.0"))
    assert mlflow_binding_problems(_aws(), repo=tmp_path)
    assert mlflow_binding_problems(_aws(), repo=REPO) == []


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_ray_start_without_token_auth_is_rejected(path, key):
    config = load(path)
    config[key] = [c.replace("RAY_AUTH_MODE=token", "") for c in config[key]]
    assert token_auth_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_token_file_that_is_not_synced_is_rejected(path):
    config = load(path)
    del config["file_mounts"]["~/ray_auth_token"]
    assert token_auth_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_artifacts_on_the_head_disk_are_rejected(path):
    config = load(path)
    config["head_start_ray_commands"] = [
        re.sub(r"(mlflow_server\.sh) \S+", r"\1 /home/ray/mlartifacts", c) for c in config["head_start_ray_commands"]
    ]
    assert storage_problems(config)


def test_the_other_clouds_object_store_is_rejected():
    config = _aws()
    config["head_start_ray_commands"] = [
        c.replace("s3://YOUR_BUCKET", "gs://YOUR_BUCKET") for c in config["head_start_ray_commands"]
    ]
    assert storage_problems(config)


# The head's MLflow start script, run here: tests/e2e/test_mlflow_server_script.py.


def _without(config: dict, key: str, pattern: str) -> dict:
    config[key] = [c for c in config[key] if not re.search(pattern, c)]
    return config


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
@pytest.mark.parametrize("change", [
    lambda c: _without(c, "head_start_ray_commands", r"postgres\.sh start"),
    lambda c: c.__setitem__("head_start_ray_commands", [re.sub(r"SER_DB_BACKUP=\S+ ", "", x)
                                                        for x in c["head_start_ray_commands"]]),
    lambda c: c.__setitem__("head_start_ray_commands", [re.sub(r"MLFLOW_BACKEND_STORE_URI=\S+ ", "", x)
                                                        for x in c["head_start_ray_commands"]]),
    lambda c: c["head_start_ray_commands"].reverse(),
    lambda c: c["docker"].pop("head_run_options"),
], ids=["no-database", "no-backup", "sqlite-backend", "mlflow-first", "database-in-the-container"])
def test_results_that_die_with_the_head_are_rejected(path, change):
    config = load(path)
    change(config)
    assert database_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
def test_install_without_the_constraints_is_rejected(path):
    config = load(path)
    config["setup_commands"] = [re.sub(r" -c \S+", "", c) for c in config["setup_commands"]]
    assert constraints_problems(config)


@pytest.mark.parametrize("path", CONFIG_PATHS, **PATH_IDS)
@pytest.mark.parametrize("change", [
    lambda c: c["docker"].pop("disable_automatic_runtime_detection"),
    lambda c: c["docker"].pop("worker_run_options"),
    lambda c: _without(c, "worker_start_ray_commands", r"torch\.cuda"),
], ids=["runtime-detection", "no-gpus-flag", "no-gpu-check"])
def test_gpu_workers_without_a_gpu_in_the_container_are_rejected(path, change):
    config = load(path)
    change(config)
    assert gpu_container_problems(config)


def test_gcp_nodes_as_rays_admin_account_are_rejected():
    config = load(CLUSTER_DIR / "gcp-gpu.yaml")
    for nt in node_types(config).values():
        nt["node_config"]["serviceAccounts"][0]["email"] = "ray-autoscaler-sa-v1@p.iam.gserviceaccount.com"
    assert len(service_account_problems(config)) == 2
    del node_types(config)["worker_gpu"]["node_config"]["serviceAccounts"]
    assert any("no serviceAccounts" in p for p in service_account_problems(config))


def test_gcp_spot_block_in_the_comment_is_valid_and_restart_true_is_rejected():
    text = (CLUSTER_DIR / "gcp-gpu.yaml").read_text()
    block = re.search(r"replace this block with:\n((?:\s*#\s{3,}.*\n)+)", text).group(1)
    spot = yaml.safe_load("\n".join(line.split("#", 1)[1][2:] for line in block.splitlines()))["scheduling"]
    config = load(CLUSTER_DIR / "gcp-gpu.yaml")
    config["available_node_types"]["worker_gpu"]["node_config"]["scheduling"] = spot
    assert spot["provisioningModel"] == "SPOT" and gpu_worker_problems(config) == []
    assert schema_errors(config) == []
    spot["automaticRestart"] = True
    assert any("automaticRestart" in p for p in gpu_worker_problems(config))


# ---- cluster/README.md: the commands a first sweep copies --------------------------------------------------


def test_readme_submits_the_paper_sweep_with_its_budget_and_a_name():
    sweeps = [shlex.split(c) for c in readme_commands() if "ray job submit" in c and "sweep_loss_weights.py" in c]
    assert sweeps
    for args in sweeps:
        assert option_value(args, "--trials") == "40", args  # the paper's sweep, not the preset's default budget
        assert option_value(args, "--name"), args  # what --resume finds the sweep by


def test_readme_tunnel_strips_the_carriage_return_of_ray_exec():
    captures = [c for c in readme_commands() if re.search(r"=\$\(ray exec ", c)]
    assert captures, "README captures the MLflow URI with ray exec"
    assert all(re.search(r"\|\s*tr -d '\\r'\s*\)", c) for c in captures), captures


def readme_policies() -> dict[str, dict]:
    """The IAM policy documents README writes with heredocs (`cat > /tmp/NAME.json <<EOF`), variables filled."""
    values = {"$BUCKET": "my-bucket", "$ACCOUNT": "123456789012", "$REGION": "us-west-2"}
    policies = {}
    for name, body in re.findall(r"cat > /tmp/([\w-]+)\.json <<'?EOF'?\n(.*?)\nEOF", README.read_text(), re.S):
        for variable, value in values.items():
            body = body.replace(variable, value)
        policies[name] = json.loads(body)
    return policies


def allowed(policy: dict, action: str, resource_kind: str = "") -> list[dict]:
    """The Allow statements of ``policy`` that name ``action`` (exactly or by wildcard) on such a resource."""
    found = []
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement.get("Resource", [])
        resources = resources if isinstance(resources, list) else [resources]
        if statement["Effect"] == "Allow" and any(re.fullmatch(a.replace("*", ".*"), action) for a in actions) \
                and any(resource_kind in r or r == "*" for r in resources):
            found.append(statement)
    return found


def ray_head_ec2_actions() -> set[str]:
    """The EC2 API calls of Ray's AWS node provider (what the autoscaler on the head does), as IAM actions."""
    source = (Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "node_provider.py").read_text()
    calls = set(re.findall(r"ec2\.meta\.client\.(\w+)", source))  # called, or kept to call (terminate)
    actions = {"ec2:" + "".join(part.title() for part in call.split("_")) for call in calls}
    if "create_instances(" in source:
        actions.add("ec2:RunInstances")
    if "instances.filter(" in source:
        actions.add("ec2:DescribeInstances")
    return actions


def test_readme_s3_policy_lets_multipart_uploads_be_aborted():
    bucket = readme_policies()["ser-bucket"]
    for action in ("s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"):
        assert allowed(bucket, action, "my-bucket/"), action
    assert allowed(bucket, "s3:ListBucket", "my-bucket")


def test_readme_head_policy_covers_rays_calls_and_no_more():
    head = readme_policies()["ser-head"]
    needed = ray_head_ec2_actions()
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"} <= needed
    for action in needed:
        assert allowed(head, action), f"Ray's autoscaler calls {action}; the head's policy does not allow it"
    assert not any(allowed(head, a) for a in ("ec2:DeleteVpc", "ec2:ModifyInstanceAttribute", "iam:CreateRole"))
    assert not [c for c in readme_commands() if "attach-role-policy" in c], "no managed policy (AmazonEC2FullAccess...)"
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:CreateTags"):
        for statement in allowed(head, action, ":instance/"):
            condition = json.dumps(statement.get("Condition", {}))
            assert "ray-cluster-name" in condition or "ec2:CreateAction" in condition, statement
    launch = allowed(head, "ec2:RunInstances", ":instance/")
    workers = {nt["node_config"]["InstanceType"] for nt in worker_types(_aws()).values()}
    assert [s["Condition"]["StringEquals"]["ec2:InstanceType"] for s in launch] == sorted(workers)
    assert {s["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] for s in launch} == {
        _aws()["cluster_name"]}


def test_readme_gcp_accounts_hold_the_bucket_and_the_head_no_more_than_instances():
    commands = [shlex.split(c) for c in readme_commands() if c.startswith("gcloud ") and "iam-policy-binding" in c]
    project_roles = {(option_value(a, "--member"), option_value(a, "--role")) for a in commands
                     if a[1:3] == ["projects", "add-iam-policy-binding"]}
    assert project_roles == {("serviceAccount:ser-ray-head@$PROJECT.iam.gserviceaccount.com",
                              "roles/compute.instanceAdmin.v1")}
    bucket_roles = {(option_value(a, "--member"), option_value(a, "--role")) for a in commands
                    if a[1:3] == ["storage", "buckets"]}
    assert {role for _, role in bucket_roles} == {"roles/storage.objectUser"}
    config = load(CLUSTER_DIR / "gcp-gpu.yaml")
    for nt in node_types(config).values():
        account = nt["node_config"]["serviceAccounts"][0]["email"].replace("YOUR_GCP_PROJECT", "$PROJECT")
        assert f"serviceAccount:{account}" in {member for member, _ in bucket_roles}, account


def test_readme_sweep_cost_arithmetic_holds():
    """Every 'a x b = c' and 'a / b / 3600 = c' of the paper sweep's cost section, to its printed precision."""
    text = README.read_text()
    section = text[text.index("### The paper sweep"):text.index("## One environment")]
    number = r"(\d+(?:\.\d+)?(?:e\d+)?)"
    products = re.findall(rf"{number} x {number} = {number}", section)
    quotients = re.findall(rf"{number} / {number} / 3600 = {number}", section)
    assert len(products) >= 6 and len(quotients) >= 2
    for a, b, c in products:
        assert float(a) * float(b) == pytest.approx(float(c), abs=0.6 * 10 ** -len(c.partition(".")[2])), (a, b, c)
    for a, b, c in quotients:
        assert float(a) / float(b) / 3600 == pytest.approx(float(c), abs=0.06), (a, b, c)
