"""Offline checks of the KubeRay manifests in cluster/kuberay/ and of the image they run (cluster/Dockerfile).

Structure: every object is validated against a structural schema kept here, a subset of what Kubernetes would
accept, written from KubeRay v1.7.0's CRDs (``ray-operator/config/crd/bases/ray.io_rayclusters.yaml`` and
``ray.io_rayjobs.yaml``: field names, types, enums and required fields of what the manifests use) and from the
core/v1 PodSpec for the pod templates. Every object level is closed (``additionalProperties: false``): a
misspelled field, which the API server would drop silently, fails here.

Rules, the same as tests/unit/test_cluster_yaml.py's for the launcher configs: nothing reachable from outside the
cluster (ClusterIP Services only, no Ingress, no host ports or host network), token authentication on, the image
built from the launcher configs' Ray image and the client's Ray version, a GPU worker group of 0-4, a
shared-memory volume, MLflow on PostgreSQL with artifacts in object storage, no secret in the files. Each rule is
also run on a deliberately broken copy, which it must reject.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
import tomllib

import jsonschema
import pytest
import ray
import yaml

from ser_platform.cluster import is_object_storage

from support import REPO

KUBERAY = REPO / "cluster" / "kuberay"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"

# ---- the structural schema (a subset; see the module docstring) ------------------------------------------------

STRING, INTEGER, BOOLEAN, NUMBER = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}]}  # x-kubernetes-int-or-string
STRING_MAP = {"type": "object", "additionalProperties": STRING}


def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


KEY_REF = closed({"name": STRING, "key": STRING, "optional": BOOLEAN}, ("key",))
ENV_VAR = closed({"name": STRING, "value": STRING,
                  "valueFrom": closed({"secretKeyRef": KEY_REF, "configMapKeyRef": KEY_REF})}, ("name",))
PROBE = closed({"exec": closed({"command": array(STRING)}),
                "httpGet": closed({"path": STRING, "port": QUANTITY}, ("port",)),
                "periodSeconds": INTEGER, "initialDelaySeconds": INTEGER, "failureThreshold": INTEGER})
CONTAINER = closed({
    "name": STRING, "image": STRING, "imagePullPolicy": STRING, "command": array(STRING), "args": array(STRING),
    "env": array(ENV_VAR),
    "ports": array(closed({"name": STRING, "containerPort": INTEGER, "hostPort": INTEGER, "protocol": STRING},
                          ("containerPort",))),
    "resources": closed({"requests": {"type": "object", "additionalProperties": QUANTITY},
                         "limits": {"type": "object", "additionalProperties": QUANTITY}}),
    "volumeMounts": array(closed({"name": STRING, "mountPath": STRING, "readOnly": BOOLEAN}, ("mountPath", "name"))),
    "readinessProbe": PROBE, "livenessProbe": PROBE,
}, ("name",))
VOLUME = closed({
    "name": STRING,
    "emptyDir": closed({"medium": STRING, "sizeLimit": QUANTITY}),
    "persistentVolumeClaim": closed({"claimName": STRING, "readOnly": BOOLEAN}, ("claimName",)),
    "configMap": closed({"name": STRING}),
    "secret": closed({"secretName": STRING}),
}, ("name",))
POD_TEMPLATE = closed({
    "metadata": closed({"labels": STRING_MAP, "annotations": STRING_MAP}),
    "spec": closed({
        "serviceAccountName": STRING, "nodeSelector": STRING_MAP, "hostNetwork": BOOLEAN, "restartPolicy": STRING,
        "tolerations": array(closed({"key": STRING, "operator": STRING, "value": STRING, "effect": STRING,
                                     "tolerationSeconds": INTEGER})),
        "containers": array(CONTAINER), "volumes": array(VOLUME),
    }, ("containers",)),
})
METADATA = closed({"name": STRING, "namespace": STRING, "labels": STRING_MAP, "annotations": STRING_MAP}, ("name",))


def resource(kind_schema: dict, api_version: str, kind: str, **more: dict) -> dict:
    return closed({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA,
                   **kind_schema, **more}, ("apiVersion", "kind", "metadata"))


RAY_CLUSTER_SPEC = closed({  # ray.io_rayclusters.yaml, v1, spec
    "rayVersion": STRING, "suspend": BOOLEAN, "enableInTreeAutoscaling": BOOLEAN,
    "authOptions": closed({"mode": {"type": "string", "enum": ["disabled", "token"]}, "secretName": STRING,
                           "enableK8sTokenAuth": BOOLEAN}),
    "autoscalerOptions": closed({"upscalingMode": {"type": "string", "enum": ["Default", "Aggressive",
                                                                             "Conservative"]},
                                 "idleTimeoutSeconds": INTEGER, "image": STRING, "env": array(ENV_VAR),
                                 "version": {"type": "string", "enum": ["v1", "v2"]}}),
    "headGroupSpec": closed({"serviceType": STRING, "enableIngress": BOOLEAN, "rayStartParams": STRING_MAP,
                             "template": POD_TEMPLATE}, ("template",)),
    "workerGroupSpecs": array(closed({
        "groupName": STRING, "replicas": INTEGER, "minReplicas": INTEGER, "maxReplicas": INTEGER,
        "idleTimeoutSeconds": INTEGER, "numOfHosts": INTEGER, "suspend": BOOLEAN, "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE}, ("groupName", "maxReplicas", "minReplicas", "template"))),
}, ("headGroupSpec",))
RAY_JOB_SPEC = closed({  # ray.io_rayjobs.yaml, v1, spec
    "entrypoint": STRING, "runtimeEnvYAML": STRING, "clusterSelector": STRING_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submissionMode": STRING,  # K8sJobMode (default), HTTPMode, InteractiveMode, SidecarMode: no enum in the CRD
    "entrypointNumCpus": NUMBER, "entrypointNumGpus": NUMBER, "backoffLimit": INTEGER,
    "activeDeadlineSeconds": INTEGER, "shutdownAfterJobFinishes": BOOLEAN, "ttlSecondsAfterFinished": INTEGER,
    "suspend": BOOLEAN,
})
LABEL_SELECTOR = closed({"matchLabels": STRING_MAP})
SCHEMAS = {
    "RayCluster": resource({"spec": RAY_CLUSTER_SPEC}, "ray.io/v1", "RayCluster"),
    "RayJob": resource({"spec": RAY_JOB_SPEC}, "ray.io/v1", "RayJob"),
    "Deployment": resource({"spec": closed({
        "replicas": INTEGER, "selector": LABEL_SELECTOR, "template": POD_TEMPLATE,
        "strategy": closed({"type": {"type": "string", "enum": ["Recreate", "RollingUpdate"]}})},
        ("selector", "template"))}, "apps/v1", "Deployment"),
    "Service": resource({"spec": closed({
        "type": STRING, "selector": STRING_MAP,
        "ports": array(closed({"name": STRING, "port": INTEGER, "targetPort": QUANTITY, "protocol": STRING,
                               "nodePort": INTEGER}, ("port",)))})}, "v1", "Service"),
    "PersistentVolumeClaim": resource({"spec": closed({
        "accessModes": array(STRING), "storageClassName": STRING,
        "resources": closed({"requests": {"type": "object", "additionalProperties": QUANTITY}})})},
        "v1", "PersistentVolumeClaim"),
    "ConfigMap": resource({"data": STRING_MAP}, "v1", "ConfigMap"),
    "NetworkPolicy": resource({"spec": closed({
        "podSelector": LABEL_SELECTOR, "policyTypes": array(STRING),
        "ingress": array(closed({"from": array(closed({"podSelector": LABEL_SELECTOR})),
                                 "ports": array(closed({"protocol": STRING, "port": QUANTITY}))}))},
        ("podSelector",))}, "networking.k8s.io/v1", "NetworkPolicy"),
}


def load_all() -> list[dict]:
    documents = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def schema_errors(documents: list[dict]) -> list[str]:
    errors = []
    for document in documents:
        kind, name = document.get("kind"), document.get("metadata", {}).get("name")
        if kind not in SCHEMAS:
            errors.append(f"{kind} {name}: no schema kept here for this kind (add one, or do not ship it)")
            continue
        validator = jsonschema.Draft7Validator(SCHEMAS[kind])
        errors += [f"{kind} {name}: {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
                   for e in validator.iter_errors(document)]
    return errors


# ---- helpers over the documents -----------------------------------------------------------------------------


def of_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d.get("kind") == kind]


def pod_templates(documents: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests start."""
    templates = []
    for cluster in of_kind(documents, "RayCluster"):
        name = cluster["metadata"]["name"]
        templates.append((f"{name} head", cluster["spec"]["headGroupSpec"]["template"]))
        templates += [(f"{name} {g['groupName']}", g["template"]) for g in cluster["spec"].get("workerGroupSpecs", [])]
    templates += [(d["metadata"]["name"], d["spec"]["template"]) for d in of_kind(documents, "Deployment")]
    return templates


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def ray_image() -> str:
    """The image of cluster/*.yaml, which the Dockerfile builds on."""
    images = {yaml.safe_load(p.read_text())["docker"]["image"] for p in sorted((REPO / "cluster").glob("*.yaml"))}
    assert len(images) == 1, images
    return images.pop()


def dockerfile_base() -> str:
    return re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)


def expected_image_tag() -> str:
    return f"{PROJECT_VERSION}-ray{ray.__version__}-{PYTHON_TAG}-gpu"


# ---- rules: each returns the problems it finds ([] = holds) ------------------------------------------------------


def exposure_problems(documents: list[dict]) -> list[str]:
    """Nothing reachable from outside the cluster: ClusterIP Services, no Ingress, no host ports or network."""
    problems = [f"{d['kind']} {d['metadata']['name']} exposes the cluster" for d in documents
                if d.get("kind") in ("Ingress", "Gateway", "HTTPRoute")]
    for service in of_kind(documents, "Service"):
        spec = service["spec"]
        if spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("externalIPs"):
            problems.append(f"Service {service['metadata']['name']} is of type {spec.get('type')}: use ClusterIP")
    for cluster in of_kind(documents, "RayCluster"):
        head = cluster["spec"]["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            problems.append(f"RayCluster {cluster['metadata']['name']}: the head service must be ClusterIP, no Ingress")
    for where, template in pod_templates(documents):
        if template["spec"].get("hostNetwork"):
            problems.append(f"{where}: hostNetwork puts the pod's ports on the node")
        for container in containers(template):
            if any("hostPort" in port for port in container.get("ports", [])):
                problems.append(f"{where}: a hostPort opens a port on the node")
    return problems


def auth_problems(documents: list[dict]) -> list[str]:
    """Token authentication on every RayCluster (and a RayJob's own cluster); no token or password in the files."""
    clusters = [c["spec"] for c in of_kind(documents, "RayCluster")]
    clusters += [j["spec"]["rayClusterSpec"] for j in of_kind(documents, "RayJob") if "rayClusterSpec" in j["spec"]]
    problems = [] if clusters else ["no RayCluster"]
    for spec in clusters:
        if spec.get("authOptions", {}).get("mode") != "token":
            problems.append("a Ray cluster without authOptions.mode: token (KubeRay leaves auth off without it)")
    problems += [f"Secret {d['metadata']['name']} committed with its data" for d in of_kind(documents, "Secret")]
    for where, template in pod_templates(documents):
        for container in containers(template):
            for env in container.get("env", []):
                if re.search(r"TOKEN|PASSWORD|SECRET|KEY", env["name"]) and "value" in env:
                    problems.append(f"{where}: {env['name']} set to a literal value; use a secretKeyRef")
                if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                    problems.append(f"{where}: RAY_AUTH_MODE={env.get('value')}")
    return problems


def version_problems(documents: list[dict]) -> list[str]:
    """The client's Ray everywhere; every container runs the image cluster/Dockerfile builds FROM cluster/*.yaml's."""
    problems = []
    if dockerfile_base() != ray_image():
        problems.append(f"cluster/Dockerfile builds FROM {dockerfile_base()}, the launcher configs run {ray_image()}")
    for cluster in of_kind(documents, "RayCluster"):
        if cluster["spec"].get("rayVersion") != ray.__version__:
            problems.append(f"rayVersion {cluster['spec'].get('rayVersion')!r}, the client runs {ray.__version__}")
    for where, template in pod_templates(documents):
        for container in containers(template):
            image = container["image"]
            if image.startswith("postgres:"):
                continue
            if not image.endswith(f"/ser-platform:{expected_image_tag()}"):
                problems.append(f"{where}: image {image} is not REGISTRY/ser-platform:{expected_image_tag()} "
                                "(cluster/Dockerfile, this project's and Ray's versions)")
    return problems


def gpu_group_problems(documents: list[dict]) -> list[str]:
    """An autoscaled GPU worker group of 0-4 pods of one GPU each, and /dev/shm in memory on every Ray pod."""
    problems = []
    for cluster in of_kind(documents, "RayCluster"):
        spec = cluster["spec"]
        if not spec.get("enableInTreeAutoscaling"):
            problems.append("enableInTreeAutoscaling is off: the GPU group never grows")
        groups = [g for g in spec.get("workerGroupSpecs", []) if any(
            str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1"
            for c in containers(g["template"]))]
        if len(groups) != 1:
            problems.append(f"expected one worker group of 1-GPU pods, found {len(groups)}")
        for group in groups:
            if (group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas", 0)) != (0, 4, 0):
                problems.append(f"group {group['groupName']}: replicas {group.get('replicas')}, min "
                                f"{group.get('minReplicas')}, max {group.get('maxReplicas')}; expected 0, 0-4")
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
        for template in templates:
            memory = {v["name"] for v in template["spec"].get("volumes", [])
                      if v.get("emptyDir", {}).get("medium") == "Memory"}
            if not any(m["name"] in memory and m["mountPath"] == "/dev/shm"
                       for c in containers(template) for m in c.get("volumeMounts", [])):
                problems.append("a Ray pod without /dev/shm in memory (Ray's object store; 64 MiB by default)")
    return problems


def tracking_problems(documents: list[dict]) -> list[str]:
    """MLflow on PostgreSQL (data on a volume claim), artifacts in object storage; Ray pods log to that server."""
    problems = []
    servers = [c for _, t in pod_templates(documents) for c in containers(t) if c.get("command", [])[:2] ==
               ["mlflow", "server"]]
    if len(servers) != 1:
        return [f"expected one `mlflow server`, found {len(servers)}"]
    command = servers[0]["command"]
    backend = command[command.index("--backend-store-uri") + 1] if "--backend-store-uri" in command else ""
    if not backend.startswith("postgresql://"):
        problems.append(f"MLflow's backend store is {backend!r}, not PostgreSQL")
    artifacts = command[command.index("--artifacts-destination") + 1] if "--artifacts-destination" in command else ""
    if not (artifacts and is_object_storage(artifacts)):
        problems.append(f"MLflow's artifacts go to {artifacts!r}, not to object storage")
    postgres = [t for _, t in pod_templates(documents)
                if any(c["image"].startswith("postgres:") for c in containers(t))]
    if not postgres or not any("persistentVolumeClaim" in v for v in postgres[0]["spec"].get("volumes", [])):
        problems.append("PostgreSQL's data is not on a PersistentVolumeClaim")
    for where, template in pod_templates(documents):
        if where.startswith("ser-platform "):
            uris = [e.get("value") for c in containers(template) for e in c.get("env", [])
                    if e["name"] == "MLFLOW_TRACKING_URI"]
            if uris != ["http://ser-mlflow:5000"]:
                problems.append(f"{where}: MLFLOW_TRACKING_URI is {uris}, not the ser-mlflow Service")
    return problems


def job_problems(documents: list[dict]) -> list[str]:
    """The RayJob runs the paper sweep (40 trials, a name to resume) on the RayCluster, data in object storage."""
    clusters = {c["metadata"]["name"] for c in of_kind(documents, "RayCluster")}
    jobs = of_kind(documents, "RayJob")
    problems = [] if jobs else ["no RayJob"]
    for job in jobs:
        spec = job["spec"]
        if "rayClusterSpec" not in spec and spec.get("clusterSelector", {}).get("ray.io/cluster") not in clusters:
            problems.append(f"RayJob {job['metadata']['name']} selects no RayCluster of these manifests")
        args = shlex.split(spec.get("entrypoint", ""))

        def value(flag: str) -> str | None:
            return args[args.index(flag) + 1] if flag in args[:-1] else None

        if value("--trials") != "40" or not value("--name"):
            problems.append(f"RayJob {job['metadata']['name']}: the paper sweep needs --trials 40 and a --name")
        for flag in ("--dataset", "--storage"):
            if not (value(flag) and is_object_storage(value(flag))):
                problems.append(f"RayJob {job['metadata']['name']}: {flag} {value(flag)!r} is not object storage")
    return problems


RULES = (exposure_problems, auth_problems, version_problems, gpu_group_problems, tracking_problems, job_problems)


# ---- the manifests as shipped -----------------------------------------------------------------------------


def test_manifests_exist():
    kinds = {d["kind"] for d in load_all()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds


def test_manifests_match_the_structural_schema():
    assert schema_errors(load_all()) == []


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_manifests_hold_the_rules(rule):
    assert rule(load_all()) == []


def test_dockerfile_installs_the_project_with_the_constraints():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install [^\n]*-r cluster/constraints\.txt", text)
    assert re.search(r"COPY [^\n]*cluster/constraints\.txt", text)
    assert re.search(r"pip install [^\n]*--no-deps \.", text), "the project itself, on top of the pinned closure"
    assert expected_image_tag() in text, "the build command names the tag the manifests run"


# ---- deliberately broken copies: each check must reject them -------------------------------------------------


def broken(change) -> list[dict]:
    documents = copy.deepcopy(load_all())
    change(documents)
    return documents


def cluster_spec(documents: list[dict]) -> dict:
    return of_kind(documents, "RayCluster")[0]["spec"]


def gpu_group(documents: list[dict]) -> dict:
    return cluster_spec(documents)["workerGroupSpecs"][0]


def test_misspelled_field_fails_the_schema():
    documents = broken(lambda d: gpu_group(d).__setitem__("maxReplica", gpu_group(d).pop("maxReplicas")))
    assert any("maxReplica" in e for e in schema_errors(documents))


def test_misspelled_auth_mode_fails_the_schema():
    documents = broken(lambda d: cluster_spec(d).__setitem__("authOptions", {"mode": "tokens"}))
    assert any("authOptions" in e for e in schema_errors(documents))


def test_misspelled_container_field_fails_the_schema():
    def change(documents):
        head = cluster_spec(documents)["headGroupSpec"]["template"]["spec"]["containers"][0]
        head["volumeMount"] = head.pop("volumeMounts")

    assert any("volumeMount" in e for e in schema_errors(broken(change)))


@pytest.mark.parametrize("change", [
    lambda d: of_kind(d, "Service")[0]["spec"].__setitem__("type", "LoadBalancer"),
    lambda d: cluster_spec(d)["headGroupSpec"].__setitem__("serviceType", "NodePort"),
    lambda d: cluster_spec(d)["headGroupSpec"].__setitem__("enableIngress", True),
    lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"].__setitem__("hostNetwork", True),
    lambda d: d.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "x"}}),
], ids=["load-balancer", "node-port", "ingress-flag", "host-network", "ingress"])
def test_exposure_is_rejected(change):
    assert exposure_problems(broken(change))


@pytest.mark.parametrize("change", [
    lambda d: cluster_spec(d).pop("authOptions"),
    lambda d: cluster_spec(d).__setitem__("authOptions", {"mode": "disabled"}),
    lambda d: of_kind(d, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "POSTGRES_PASSWORD", "value": "hunter2"}),
], ids=["no-auth", "auth-disabled", "literal-password"])
def test_auth_holes_are_rejected(change):
    assert auth_problems(broken(change))


@pytest.mark.parametrize("change", [
    lambda d: cluster_spec(d).__setitem__("rayVersion", "2.49.0"),
    lambda d: gpu_group(d)["template"]["spec"]["containers"][0].__setitem__("image", "rayproject/ray:2.60.0-py311-gpu"),
], ids=["ray-version", "image"])
def test_other_versions_are_rejected(change):
    assert version_problems(broken(change))


@pytest.mark.parametrize("change", [
    lambda d: gpu_group(d).__setitem__("maxReplicas", 8),
    lambda d: cluster_spec(d).__setitem__("enableInTreeAutoscaling", False),
    lambda d: gpu_group(d)["template"]["spec"].pop("volumes"),
], ids=["max-8", "no-autoscaler", "no-shm"])
def test_gpu_group_problems_are_rejected(change):
    assert gpu_group_problems(broken(change))


def _mlflow_command(documents: list[dict]) -> list[str]:
    return next(c["command"] for _, t in pod_templates(documents) for c in containers(t)
                if c.get("command", [])[:2] == ["mlflow", "server"])


@pytest.mark.parametrize("change", [
    lambda d: _mlflow_command(d).__setitem__(_mlflow_command(d).index("--backend-store-uri") + 1, "sqlite:///m.db"),
    lambda d: _mlflow_command(d).__setitem__(_mlflow_command(d).index("--artifacts-destination") + 1, "/mlartifacts"),
    lambda d: next(t for w, t in pod_templates(d) if w == "ser-postgres")["spec"]["volumes"].pop(0),
], ids=["sqlite", "local-artifacts", "no-volume"])
def test_tracking_problems_are_rejected(change):
    assert tracking_problems(broken(change))


def test_job_without_trials_is_rejected():
    def change(documents):
        job = of_kind(documents, "RayJob")[0]["spec"]
        job["entrypoint"] = job["entrypoint"].replace("--trials 40", "")

    assert job_problems(broken(change))
