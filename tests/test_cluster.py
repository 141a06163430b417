"""Cluster configs: the launcher YAMLs and the KubeRay RayJob are complete and hold the paper-scale job.

No cluster starts here. Each config is read into the shapes of its nodes (CPUs, GPUs, role resource,
how many the autoscaler may start), and the job's actors and workers are packed onto those shapes.
Every check returns its problems as lines; the tests assert there are none, and that deliberately
broken or undersized copies of the real files are caught.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from packaging.version import Version

from drift_ray.config import Config, ConfigError, EngineKind, LossKind, LrSchedule, WeightMode, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
JOBS = ROOT / "jobs"
PAPER_JOB = JOBS / "qwen2.5-3b-metamath.yaml"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = CLUSTER / "kuberay-rayjob.yaml"
SHARED_DIR = "/mnt/shared"  # run_dir storage that every node mounts
ROLLOUT_ROLE = "rollout_gpu"  # custom resources naming a node's role, one unit per GPU
TRAIN_ROLE = "train_gpu"
ROLES = (ROLLOUT_ROLE, TRAIN_ROLE)
ENTRYPOINT_PREFIX = ["python", "-m", "drift_ray", "run", "--config"]
GPU_KEY = "nvidia.com/gpu"


@dataclass(frozen=True)
class NodeShape:
    """What one node (launcher) or pod (KubeRay) of a type offers Ray, and how many may be started."""

    name: str
    cpus: float
    gpus: float
    role_units: float
    max_nodes: int


def nodes_needed(shape: NodeShape, count: int, cpus_each: float, gpus_each: float, units_each: float = 0.0) -> int | None:
    """Nodes of `shape` holding `count` identical actors; None when one actor does not fit on a node."""
    asks = ((shape.gpus, gpus_each), (shape.cpus, cpus_each), (shape.role_units, units_each))
    fits = [math.floor(have / need) for have, need in asks if need > 0]
    per_node = min(fits, default=count)
    return math.ceil(count / per_node) if per_node >= 1 else None


def capacity_problems(shapes: dict[str, NodeShape], cfg: Config, max_total_nodes: int | None) -> list[str]:
    """Why the node types cannot hold the job's rollout/evaluation actors and its training workers."""
    problems = [f"no node type advertises {role!r}" for role in ROLES if role not in shapes]
    if problems:
        return problems
    rollout, train = cfg.rollout, cfg.train
    demands = {
        ROLLOUT_ROLE: ("rollout actor", max(rollout.num_actors, cfg.eval.num_actors), rollout.cpus_per_actor,
                       rollout.gpus_per_actor, rollout.resources),
        TRAIN_ROLE: ("training worker", train.num_workers, train.cpus_per_worker, float(train.use_gpu),
                     train.resources),
    }
    needed = {}
    for role, (what, count, cpus, gpus, resources) in demands.items():
        if resources.get(role, 0) <= 0:
            problems.append(f"{what}s ask for no {role!r} resource, so Ray may place them on any node type; "
                            f"set {'rollout' if role == ROLLOUT_ROLE else 'train'}.resources: {{{role}: 1}}")
        shape = shapes[role]
        if shape.role_units != shape.gpus:
            problems.append(f"{shape.name}: advertises {shape.role_units:g} {role!r} units for {shape.gpus:g} GPUs; "
                            "expected one unit per GPU")
        needed[role] = nodes_needed(shape, count, cpus, gpus, resources.get(role, 0.0))
        if needed[role] is None:
            problems.append(f"{shape.name}: one {what} needs CPU {cpus:g} and GPU {gpus:g}, "
                            f"a node has CPU {shape.cpus:g} and GPU {shape.gpus:g}")
        elif needed[role] > shape.max_nodes:
            problems.append(f"{shape.name}: {count} {what}s (CPU {cpus:g}, GPU {gpus:g} each) need {needed[role]} "
                            f"nodes, at most {shape.max_nodes} may start")
    # Rollout nodes stay up for the idle timeout after the rollouts, while training asks for its node.
    if max_total_nodes is not None and None not in needed.values() and sum(needed.values()) > max_total_nodes:
        problems.append(f"max_workers: {max_total_nodes} worker nodes in all, the job needs "
                        f"{needed[ROLLOUT_ROLE]} rollout + {needed[TRAIN_ROLE]} training nodes")
    return problems


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def set_path(path: str, value: Any) -> Callable[[Any], None]:
    """A mutation setting the dotted `path` (list items by index) of a parsed YAML document to `value`."""

    def mutate(document: Any) -> None:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


@pytest.fixture(scope="module")
def paper_job() -> Config:
    return load_config(PAPER_JOB)


# --- the job ----------------------------------------------------------------------------------------


def test_paper_job_is_the_authors_run(paper_job):
    cfg = paper_job
    assert (cfg.task.kind, cfg.task.name, cfg.task.num_train) == ("hub", "metamathqa", 1800)
    assert cfg.rollout.model == "Qwen/Qwen2.5-3B-Instruct" and cfg.rollout.engine is EngineKind.vllm
    assert (cfg.rollout.samples_per_prompt, cfg.episode.max_turns, cfg.rollout.max_new_tokens) == (16, 5, 512)
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
    assert cfg.episode.instruction == load_config().episode.instruction  # the default: answer in <answer>
    assert (cfg.weights.mode, cfg.weights.beta, cfg.weights.gamma) == (WeightMode.drift, 0.1, 0.9)
    train = cfg.train
    assert (train.zero_stage, train.lr, train.lr_schedule, train.warmup_ratio) == (3, 5e-6, LrSchedule.constant, 0.1)
    assert (train.epochs, train.global_batch_size, train.weight_decay, train.grad_clip) == (1, 128, 0.1, 1.0)
    assert train.bf16 and train.use_gpu and train.loss is LossKind.sample_mean
    from drift_ray.train import accumulation_steps  # imports torch: only here

    assert accumulation_steps(train.global_batch_size, train.micro_batch_size, train.num_workers) == 8
    assert cfg.rollout.gpus_per_actor == cfg.rollout.tensor_parallel_size  # vLLM spans exactly the actor's GPUs
    # The longest trajectory (T replies of max_new_tokens) fits in max_length with room for the prompt.
    assert train.max_length >= cfg.episode.max_turns * cfg.rollout.max_new_tokens + 512


# --- Ray cluster launcher ---------------------------------------------------------------------------


def launcher_problems(cluster: dict[str, Any]) -> list[str]:
    """Missing or inconsistent keys of a launcher config (beyond Ray's schema), one line each."""
    problems = [f"{key}: missing" for key in ("cluster_name", "provider", "max_workers", "idle_timeout_minutes")
                if key not in cluster]
    if cluster.get("provider", {}).get("type") in {"aws", "gcp", "azure"} and "ssh_user" not in cluster.get("auth", {}):
        problems.append("auth.ssh_user: missing (the launcher reaches cloud nodes over SSH)")
    node_types = cluster.get("available_node_types") or {}
    if not node_types:
        problems.append("available_node_types: missing or empty")
    head = cluster.get("head_node_type")
    if head not in node_types:
        problems.append(f"head_node_type: {head!r} is not one of {sorted(node_types)}")
    for name, node_type in node_types.items():
        where = f"available_node_types.{name}"
        problems += [f"{where}.{key}: missing" for key in ("resources", "node_config", "min_workers", "max_workers")
                     if key not in node_type]
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if not 0 <= low <= high:
            problems.append(f"{where}: min_workers {low} and max_workers {high}; expected 0 <= min <= max")
        if node_type.get("resources", {}).get("GPU", 0) and low != 0:
            problems.append(f"{where}.min_workers: {low}; GPU node types should autoscale from 0")
        mounts = node_type.get("initialization_commands", [])
        if name != head and not any("mount" in command and SHARED_DIR in command for command in mounts):
            problems.append(f"{where}.initialization_commands: no mount of {SHARED_DIR} (run_dir)")
        if cluster.get("provider", {}).get("type") == "gcp":
            problems += gcp_scheduling_problems(where, node_type)
            problems += gcp_disk_problems(where, node_type, cluster["provider"].get("availability_zone"))
    min_total = sum(node_type.get("min_workers", 0) for node_type in node_types.values())
    if cluster.get("max_workers", 0) < min_total:
        problems.append(f"max_workers: {cluster.get('max_workers')} is less than the sum of min_workers {min_total}")
    for role in ROLES:
        owners = sorted(name for name, node_type in node_types.items() if role in node_type.get("resources", {}))
        if len(owners) != 1:
            problems.append(f"available_node_types: {owners} advertise {role!r}; expected exactly one node type")
    docker = cluster.get("docker") or {}
    if docker and not any(f"{SHARED_DIR}:{SHARED_DIR}" in option for option in docker.get("run_options", [])):
        problems.append(f"docker.run_options: {SHARED_DIR} is not mounted into the container")
    return problems


def gcp_scheduling_problems(where: str, node_type: dict[str, Any]) -> list[str]:
    """GCE's instances.insert takes `scheduling` as one object; a VM with GPUs cannot live-migrate."""
    node_config = node_type.get("node_config") or {}
    if "scheduling" not in node_config:
        scheduling = {}
    elif isinstance(node_config["scheduling"], dict):
        scheduling = node_config["scheduling"]
    else:
        return [f"{where}.node_config.scheduling: a {type(node_config['scheduling']).__name__}; GCE takes a mapping "
                "(scheduling: {onHostMaintenance: TERMINATE}), not a list of one-key mappings"]
    if node_type.get("resources", {}).get("GPU", 0) and scheduling.get("onHostMaintenance") != "TERMINATE":
        return [f"{where}.node_config.scheduling.onHostMaintenance: {scheduling.get('onHostMaintenance')!r}; "
                "a VM with GPUs needs TERMINATE"]
    return []


def gcp_disk_problems(where: str, node_type: dict[str, Any], zone: str | None) -> list[str]:
    """A disk without a type gets GCE's pd-standard, which G2 machines (the rollout nodes) cannot attach."""
    problems = []
    for number, disk in enumerate((node_type.get("node_config") or {}).get("disks", []), 1):
        disk_type = disk.get("initializeParams", {}).get("diskType")
        if disk_type is None or not disk_type.startswith(f"zones/{zone}/diskTypes/") or disk_type.endswith("/pd-standard"):
            problems.append(f"{where}.node_config.disks, disk {number}: diskType {disk_type!r}; expected "
                            f"zones/{zone}/diskTypes/pd-balanced or another type than pd-standard, in the provider's zone")
    return problems


def launcher_shapes(cluster: dict[str, Any]) -> dict[str, NodeShape]:
    shapes = {}
    for name, node_type in cluster["available_node_types"].items():
        resources = node_type["resources"]
        for role in ROLES:
            if role in resources:
                shapes[role] = NodeShape(name, resources.get("CPU", 0), resources.get("GPU", 0), resources[role],
                                         node_type["max_workers"])
    return shapes


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_is_complete(name):
    assert launcher_problems(load_yaml(CLUSTER / name)) == []


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_rays_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    ray_spec = importlib.util.find_spec("ray")  # finds the schema file without importing Ray
    schema_path = Path(ray_spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip(f"the installed Ray ships no {schema_path}")
    jsonschema.validate(load_yaml(CLUSTER / name), json.loads(schema_path.read_text()))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_holds_the_paper_job(name, paper_job):
    cluster = load_yaml(CLUSTER / name)
    assert capacity_problems(launcher_shapes(cluster), paper_job, cluster["max_workers"]) == []


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (set_path("available_node_types.rollout_gpu.max_workers", 4),
         "8 rollout actors (CPU 4, GPU 1 each) need 8 nodes, at most 4 may start"),
        (set_path("available_node_types.rollout_gpu.resources", {"CPU": 8, "GPU": 0, ROLLOUT_ROLE: 0}),
         "one rollout actor needs CPU 4 and GPU 1, a node has CPU 8 and GPU 0"),
        (set_path("available_node_types.train_gpu.resources", {"CPU": 96, "GPU": 4, TRAIN_ROLE: 4}),
         "8 training workers (CPU 10, GPU 1 each) need 2 nodes, at most 1 may start"),
        (set_path("available_node_types.train_gpu.resources", {"CPU": 64, "GPU": 8, TRAIN_ROLE: 8}),
         "8 training workers (CPU 10, GPU 1 each) need 2 nodes"),
        (set_path("available_node_types.train_gpu.resources", {"CPU": 96, "GPU": 8, TRAIN_ROLE: 1}),
         "advertises 1 'train_gpu' units for 8 GPUs"),
        (set_path("max_workers", 5), "max_workers: 5 worker nodes in all, the job needs 8 rollout + 1 training nodes"),
    ],
)
@pytest.mark.parametrize("name", LAUNCHERS)
def test_undersized_launcher_fails_the_capacity_check(name, mutation, expected, paper_job):
    cluster = copy.deepcopy(load_yaml(CLUSTER / name))
    mutation(cluster)
    problems = capacity_problems(launcher_shapes(cluster), paper_job, cluster["max_workers"])
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(("section", "role"), [("rollout", ROLLOUT_ROLE), ("train", TRAIN_ROLE)])
def test_job_that_does_not_ask_for_its_node_type_is_reported(section, role, paper_job):
    cfg = paper_job.model_copy(deep=True)
    getattr(cfg, section).resources = {}
    cluster = load_yaml(CLUSTER / "aws.yaml")
    problems = capacity_problems(launcher_shapes(cluster), cfg, cluster["max_workers"])
    assert any(f"set {section}.resources: {{{role}: 1}}" in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (set_path("head_node_type", "head"), "head_node_type: 'head' is not one of"),
        (set_path("available_node_types.rollout_gpu.min_workers", 9), "min_workers 9 and max_workers 8"),
        (set_path("available_node_types.rollout_gpu.min_workers", 2), "GPU node types should autoscale from 0"),
        (set_path("available_node_types.head_cpu.min_workers", 10), "max_workers: 9 is less than the sum of min"),
        (set_path("available_node_types.head_cpu.resources", {"CPU": 8, TRAIN_ROLE: 0}), "advertise 'train_gpu'"),
        (set_path("available_node_types.train_gpu.initialization_commands", []), "no mount of /mnt/shared"),
        (set_path("docker.run_options", []), "/mnt/shared is not mounted into the container"),
        (set_path("auth", {}), "auth.ssh_user: missing"),
    ],
)
def test_broken_launcher_is_reported(mutation, expected):
    cluster = copy.deepcopy(load_yaml(CLUSTER / "aws.yaml"))
    mutation(cluster)
    problems = launcher_problems(cluster)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (set_path("available_node_types.rollout_gpu.node_config.scheduling", [{"onHostMaintenance": "TERMINATE"}]),
         "rollout_gpu.node_config.scheduling: a list; GCE takes a mapping"),
        (set_path("available_node_types.train_gpu.node_config.scheduling", [{"onHostMaintenance": "TERMINATE"}]),
         "train_gpu.node_config.scheduling: a list; GCE takes a mapping"),
        (set_path("available_node_types.train_gpu.node_config.scheduling", {"onHostMaintenance": "MIGRATE"}),
         "train_gpu.node_config.scheduling.onHostMaintenance: 'MIGRATE'; a VM with GPUs needs TERMINATE"),
        (set_path("available_node_types.rollout_gpu.node_config.disks", [{"boot": True, "initializeParams": {}}]),
         "rollout_gpu.node_config.disks, disk 1: diskType None"),
        (set_path("provider.availability_zone", "us-central1-b"),
         "head_cpu.node_config.disks, disk 1: diskType 'zones/us-central1-a/diskTypes/pd-balanced'"),
    ],
)
def test_broken_gcp_scheduling_is_reported(mutation, expected):
    cluster = copy.deepcopy(load_yaml(CLUSTER / "gcp.yaml"))
    for node_type in cluster["available_node_types"].values():  # the real file: mappings wherever present
        scheduling = node_type["node_config"].get("scheduling")
        assert scheduling is None or isinstance(scheduling, dict), scheduling
    mutation(cluster)
    problems = launcher_problems(cluster)
    assert any(expected in problem for problem in problems), problems


# --- KubeRay ----------------------------------------------------------------------------------------


def load_kuberay() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc]


def only_rayjob(documents: list[dict[str, Any]]) -> dict[str, Any]:
    rayjobs = [doc for doc in documents if doc.get("kind") == "RayJob"]
    assert len(rayjobs) == 1, f"{KUBERAY}: {len(rayjobs)} RayJob documents, expected one"
    return rayjobs[0]


def role_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources of a group: KubeRay wants a JSON object inside a JSON string."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return pod_spec["containers"][0]  # KubeRay runs Ray in the first container


def pod_specs(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = {group["groupName"]: group["template"]["spec"] for group in spec.get("workerGroupSpecs", [])}
    return {"head": spec["headGroupSpec"]["template"]["spec"], **groups}


def kuberay_problems(documents: list[dict[str, Any]]) -> list[str]:
    """Missing or inconsistent parts of the RayJob manifest, one line each."""
    rayjob = only_rayjob(documents)
    problems = []
    if rayjob.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: {rayjob.get('apiVersion')!r}, expected 'ray.io/v1'")
    spec = rayjob["spec"]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes: not true; the GPU pods would outlive the job")
    if "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML", "{}")):
        problems.append("spec.runtimeEnvYAML: no working_dir; the entrypoint's job config would be missing")
    cluster = spec["rayClusterSpec"]
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("spec.rayClusterSpec.enableInTreeAutoscaling: not true; worker groups would not autoscale")
    for group in cluster.get("workerGroupSpecs", []):
        where = f"workerGroupSpecs[{group.get('groupName')}]"
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if not low == 0 <= high:
            problems.append(f"{where}: minReplicas {low} and maxReplicas {high}; expected 0 = min <= max")
        resources = ray_container(group["template"]["spec"]).get("resources", {})
        requested, limited = resources.get("requests", {}).get(GPU_KEY), resources.get("limits", {}).get(GPU_KEY)
        if requested != limited:
            problems.append(f"{where}: requests {GPU_KEY} {requested} but limits {limited}; expected them equal")
        if limited and not group["template"]["spec"].get("nodeSelector"):
            problems.append(f"{where}: no nodeSelector; the cluster autoscaler may place its GPU pods on, or grow, "
                            "another group's GPU pool")
    for role in ROLES:
        groups = cluster.get("workerGroupSpecs", [])
        owners = [group["groupName"] for group in groups if role in role_resources(group)]
        if len(owners) != 1:
            problems.append(f"workerGroupSpecs: {owners} advertise {role!r}; expected exactly one group")
    claims = {doc["metadata"]["name"] for doc in documents if doc.get("kind") == "PersistentVolumeClaim"
              and "ReadWriteMany" in doc["spec"].get("accessModes", [])}
    for name, pod in pod_specs(rayjob).items():
        shared = {volume["name"] for volume in pod.get("volumes", [])
                  if volume.get("persistentVolumeClaim", {}).get("claimName") in claims}
        container = ray_container(pod)
        if not any(m["name"] in shared and m["mountPath"] == SHARED_DIR for m in container.get("volumeMounts", [])):
            problems.append(f"{name}: no ReadWriteMany claim of this file mounted at {SHARED_DIR} (run_dir)")
        if not container["image"].partition(":")[2].startswith(str(cluster.get("rayVersion"))):
            problems.append(f"{name}: image {container['image']} does not carry rayVersion {cluster.get('rayVersion')}")
        gpus = int(container.get("resources", {}).get("limits", {}).get(GPU_KEY, 0))
        if gpus and not any(m["mountPath"] == "/dev/shm" for m in container.get("volumeMounts", [])):
            problems.append(f"{name}: no memory volume at /dev/shm; NCCL and vLLM need more than the default 64 MB")
    return problems


def entrypoint_problems(rayjob: dict[str, Any]) -> tuple[list[str], Config | None]:
    """Problems of the entrypoint (a job config of jobs/ that loads, run_dir on shared storage) and its config."""
    words = shlex.split(rayjob["spec"].get("entrypoint", ""))
    if words[: len(ENTRYPOINT_PREFIX)] != ENTRYPOINT_PREFIX or len(words) == len(ENTRYPOINT_PREFIX):
        return [f"entrypoint: {words} does not start with {' '.join(ENTRYPOINT_PREFIX)} FILE"], None
    path, overrides = ROOT / words[len(ENTRYPOINT_PREFIX)], words[len(ENTRYPOINT_PREFIX) + 1 :]
    if path.parent != JOBS or not path.is_file():
        return [f"entrypoint: {path.relative_to(ROOT)} is not a file in jobs/"], None
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        return [f"entrypoint: {err}"], None
    if not cfg.run_dir.startswith(SHARED_DIR + "/"):
        return [f"entrypoint: run_dir {cfg.run_dir!r} is not under the shared mount {SHARED_DIR}"], cfg
    return [], cfg


def kuberay_shapes(rayjob: dict[str, Any]) -> dict[str, NodeShape]:
    shapes = {}
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = ray_container(group["template"]["spec"])["resources"]["limits"]
        for role, units in role_resources(group).items():
            shapes[role] = NodeShape(group["groupName"], cpu_quantity(limits.get("cpu", 0)),
                                     int(limits.get(GPU_KEY, 0)), units, group["maxReplicas"])
    return shapes


def test_kuberay_rayjob_is_complete():
    assert kuberay_problems(load_kuberay()) == []


def test_kuberay_runtime_env_is_accepted_by_ray():
    runtime_env = pytest.importorskip("ray.runtime_env")
    env = yaml.safe_load(only_rayjob(load_kuberay())["spec"]["runtimeEnvYAML"])
    parsed = runtime_env.RuntimeEnv(**env)  # raises on a malformed field, as `ray job submit` would
    # Every node installs the package (with vLLM) from the job's own working directory.
    assert parsed["pip"]["packages"] == [
        "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/cluster/gpu-constraints.txt",
        "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[vllm]",
    ]


def test_kuberay_entrypoint_runs_a_job_config_on_shared_storage():
    problems, cfg = entrypoint_problems(only_rayjob(load_kuberay()))
    assert problems == []
    # The paper job, with run_dir moved onto the shared volume.
    assert cfg.model_dump(exclude={"run_dir"}) == load_config(PAPER_JOB).model_dump(exclude={"run_dir"})


def test_kuberay_groups_hold_the_entrypoint_job():
    rayjob = only_rayjob(load_kuberay())
    _, cfg = entrypoint_problems(rayjob)
    assert capacity_problems(kuberay_shapes(rayjob), cfg, None) == []


def test_kuberay_gpu_groups_select_their_own_pools():
    groups = only_rayjob(load_kuberay())["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    selectors = {group["groupName"]: group["template"]["spec"].get("nodeSelector") for group in groups
                 if ray_container(group["template"]["spec"])["resources"].get("limits", {}).get(GPU_KEY)}
    assert len(selectors) == 2 and all(selectors.values()), selectors
    assert len({json.dumps(selector, sort_keys=True) for selector in selectors.values()}) == 2, selectors


TRAIN_GROUP = "spec.rayClusterSpec.workerGroupSpecs.1"
TRAIN_CONTAINER = f"{TRAIN_GROUP}.template.spec.containers.0"


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (set_path(f"{TRAIN_CONTAINER}.resources", {"requests": {"cpu": "88", GPU_KEY: "4"},
                                                    "limits": {"cpu": "88", GPU_KEY: "4"}}),
         "advertises 8 'train_gpu' units for 4 GPUs"),
        (set_path(f"{TRAIN_CONTAINER}.resources", {"requests": {"cpu": "88", GPU_KEY: "4"},
                                                    "limits": {"cpu": "88", GPU_KEY: "4"}}),
         "8 training workers (CPU 10, GPU 1 each) need 2 nodes, at most 1 may start"),
        (set_path(f"{TRAIN_CONTAINER}.resources", {"limits": {"cpu": "40", GPU_KEY: "8"}}), "need 2 nodes"),
        (set_path("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 2), "need 8 nodes, at most 2 may start"),
    ],
)
def test_undersized_kuberay_fails_the_capacity_check(mutation, expected):
    rayjob = copy.deepcopy(only_rayjob(load_kuberay()))
    mutation(rayjob)
    problems = capacity_problems(kuberay_shapes(rayjob), load_config(PAPER_JOB), None)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (set_path("spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes: not true"),
        (set_path("spec.rayClusterSpec.enableInTreeAutoscaling", False), "enableInTreeAutoscaling: not true"),
        (set_path("spec.runtimeEnvYAML", "pip: [x]"), "no working_dir"),
        (set_path(f"{TRAIN_GROUP}.minReplicas", 1), "minReplicas 1 and maxReplicas 1"),
        (set_path(f"{TRAIN_CONTAINER}.resources.requests", {"cpu": "88", GPU_KEY: "4"}),
         "requests nvidia.com/gpu 4 but limits 8"),
        (set_path(f"{TRAIN_GROUP}.rayStartParams", {}), "[] advertise 'train_gpu'"),
        (set_path(f"{TRAIN_CONTAINER}.volumeMounts", [{"name": "dshm", "mountPath": "/dev/shm"}]),
         "train-gpu: no ReadWriteMany claim of this file mounted at /mnt/shared"),
        (set_path(f"{TRAIN_CONTAINER}.volumeMounts", [{"name": "shared", "mountPath": SHARED_DIR}]),
         "train-gpu: no memory volume at /dev/shm"),
        (set_path(f"{TRAIN_CONTAINER}.image", "rayproject/ray:2.9.0-py311-gpu"), "does not carry rayVersion"),
        (set_path("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.nodeSelector", {}),
         "workerGroupSpecs[rollout-gpu]: no nodeSelector"),
        (set_path(f"{TRAIN_GROUP}.template.spec.nodeSelector", None), "workerGroupSpecs[train-gpu]: no nodeSelector"),
    ],
)
def test_broken_kuberay_is_reported(mutation, expected):
    documents = copy.deepcopy(load_kuberay())
    mutation(only_rayjob(documents))
    problems = kuberay_problems(documents)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        ("python -m drift_ray run --config jobs/missing.yaml", "jobs/missing.yaml is not a file in jobs/"),
        ("python -m drift_ray run --config cluster/aws.yaml", "cluster/aws.yaml is not a file in jobs/"),
        ("python train.py", "does not start with python -m drift_ray run --config FILE"),
        (f"python -m drift_ray run --config {PAPER_JOB.relative_to(ROOT)}", "run_dir 'runs/qwen2.5-3b-metamath'"),
        (f"python -m drift_ray run --config {PAPER_JOB.relative_to(ROOT)} rollout.num_actor=8",
         "did you mean 'rollout.num_actors'?"),
    ],
)
def test_broken_entrypoint_is_reported(entrypoint, expected):
    rayjob = copy.deepcopy(only_rayjob(load_kuberay()))
    rayjob["spec"]["entrypoint"] = entrypoint
    problems, _ = entrypoint_problems(rayjob)
    assert any(expected in problem for problem in problems), problems


# --- The GPU nodes' packages ------------------------------------------------------------------------

# The NVIDIA Linux driver each CUDA release needs for full compatibility (its toolkit's release notes).
MIN_DRIVER_FOR_CUDA = {(12, 8): 570, (12, 9): 575, (13, 0): 580}


def gpu_stack_problems(locked: dict[str, Version], gcp: dict[str, Any]) -> list[str]:
    """Where the locked GPU packages disagree with the clusters' Ray image and with the NVIDIA driver of the
    GCP nodes' image (the AWS image, "latest", names no driver). test_constraints.py checks them against
    pyproject.toml."""
    problems = []
    image_ray = Version(gcp["docker"]["image"].split(":")[1].split("-")[0])
    if locked.get("ray") != image_ray:
        problems.append(f"gpu-constraints.txt: ray=={locked.get('ray')}, but the clusters' image runs Ray {image_ray}")
    cuda = next((locked[name].release[:2] for name in ("nvidia-cuda-runtime-cu12", "cuda-toolkit") if name in locked), None)
    needs = MIN_DRIVER_FOR_CUDA.get(cuda)
    if needs is None:
        return problems + [f"gpu-constraints.txt: CUDA {cuda} is not in MIN_DRIVER_FOR_CUDA"]
    for name, node_type in gcp["available_node_types"].items():
        if not node_type["resources"].get("GPU"):
            continue
        for disk in node_type["node_config"]["disks"]:
            family = disk["initializeParams"]["sourceImage"].rsplit("/", 1)[1]
            driver = int(family.rsplit("nvidia-", 1)[1]) if "nvidia-" in family else None
            if driver is None or driver < needs:
                problems.append(f"gcp.yaml: {name}'s image {family} has NVIDIA driver {driver}; the locked torch "
                                f"(CUDA {'.'.join(map(str, cuda))}) needs {needs} or newer")
    return problems


def test_gpu_lock_meets_the_image_and_the_driver():
    from tests.test_constraints import GPU_LOCK, pins  # needs tomllib: Python 3.11

    assert gpu_stack_problems(pins(GPU_LOCK), load_yaml(CLUSTER / "gcp.yaml")) == []


@pytest.mark.parametrize(
    ("lock_edit", "expected"),
    [
        (lambda text: text.replace("ray==2.60.0", "ray==2.59.0"), "ray==2.59.0, but the clusters' image runs Ray 2.60.0"),
        (lambda text: text.replace("nvidia-cuda-runtime-cu12==12.8.90", "cuda-toolkit==13.0.3"),
         "common-cu128-ubuntu-2204-nvidia-570 has NVIDIA driver 570; the locked torch (CUDA 13.0) needs 580"),
    ],
)
def test_a_lock_that_the_clusters_cannot_run_is_reported(lock_edit, expected, tmp_path):
    from tests.test_constraints import GPU_LOCK, pins

    text = GPU_LOCK.read_text()
    edited = tmp_path / GPU_LOCK.name
    edited.write_text(lock_edit(text))
    assert edited.read_text() != text
    problems = gpu_stack_problems(pins(edited), load_yaml(CLUSTER / "gcp.yaml"))
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_node_installs_the_locked_packages(name):
    installs = [command for command in load_yaml(CLUSTER / name)["setup_commands"] if "pip install" in command]
    assert installs == ['pip install -q -c "$HOME/drift-ray/cluster/gpu-constraints.txt" -e "$HOME/drift-ray[vllm]"']
