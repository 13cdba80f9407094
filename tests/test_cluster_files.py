"""The cluster definitions: cluster.yaml (`ray up`), Dockerfile and k8s/raycluster.yaml (KubeRay), offline.

cluster.yaml goes through the offline half of what `ray up` does to it (ray.autoscaler._private.commands.
_bootstrap_config): `prepare_config` (merge with the provider's defaults.yaml, docker and min/max-worker
fill-in) and then `validate_config` (Ray's JSON schema and cross-field rules). What follows in `ray up` needs
the cloud: resource detection by instance type and the provider's bootstrap (IAM, key pair, subnets, AMI).
Each rule below is a function returning problems, run on the committed files and on broken copies of them,
so that every check is shown to fail when what it guards is broken.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER, DOCKERFILE, MANIFEST = ROOT / "cluster.yaml", ROOT / "Dockerfile", ROOT / "k8s" / "raycluster.yaml"
DOCS = ROOT / "docs" / "cluster.md"
SHARED = "/mnt/geovq"  # the one path of the shared storage on every node
CREDENTIALS = re.compile(
    r"aws_access_key|aws_secret|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ssh_private_key\s*:"
    r"|(password|passwd|secret|token|api[_-]?key)\s*[:=]\s*\S", re.IGNORECASE)


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def load_manifest() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def prepared(config: dict) -> dict:
    """`ray up`'s offline preparation and validation of a cluster config (raises when Ray refuses it)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    ready = prepare_config(copy.deepcopy(config))
    validate_config(ready)
    return ready


def head_command(config: dict) -> str:
    return " ".join(config["head_start_ray_commands"])


def cluster_problems(config: dict) -> list[str]:
    """What makes a prepared cluster config unfit for a geovq GPU sweep."""
    types, head = config["available_node_types"], config["head_node_type"]
    problems = []
    if types[head]["resources"].get("GPU", 0) != 0:
        problems.append("the head node type declares GPUs")
    gpu_types = [name for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1]
    if not gpu_types:
        problems.append("no worker node type declares GPU resources")
    for name in gpu_types:
        lo, hi = types[name]["min_workers"], types[name]["max_workers"]
        if not 0 <= lo <= hi or hi < 1 or hi > config["max_workers"]:
            problems.append(f"{name}: autoscaling bounds min {lo}, max {hi} (cluster max {config['max_workers']})")
    if "--dashboard-host=127.0.0.1" not in head_command(config) or "0.0.0.0" in head_command(config):
        problems.append("the dashboard is not bound to localhost only")
    run_options = config.get("docker", {}).get("run_options", [])
    if f"-v {SHARED}:{SHARED}" not in run_options:
        problems.append(f"the container does not see the shared storage at {SHARED}")
    if not any(f" {SHARED}" in cmd and "mount " in cmd for cmd in config["initialization_commands"]):
        problems.append(f"no initialization command mounts the shared storage at {SHARED}")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        if any("pip install" in cmd for cmd in config[key]):  # e.g. Ray's AWS defaults, installing another Ray
            problems.append(f"{key} installs packages over the image's")
    return problems


def dockerfile_image(text: str) -> str:
    """The image the Dockerfile documents building: its `docker build -t IMAGE .` line."""
    (image,) = re.findall(r"docker build -t (\S+) \.", text)
    return image


def manifest_problems(docs: list[dict], image: str) -> list[str]:
    """What makes the KubeRay manifest unfit: no GPU worker group, another image, storage not shared."""
    clusters = [d for d in docs if d.get("kind") == "RayCluster" and d.get("apiVersion", "").startswith("ray.io/")]
    if len(clusters) != 1:
        return [f"expected one ray.io RayCluster, found {len(clusters)}"]
    spec = clusters[0]["spec"]
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"
              and "ReadWriteMany" in d["spec"]["accessModes"]}
    problems = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        if container["image"] != image:
            problems.append(f"{name}: image {container['image']} is not {image}")
        shared = {v["name"] for v in pod.get("volumes", [])
                  if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
        if not any(m["mountPath"] == SHARED and m["name"] in shared for m in container.get("volumeMounts", [])):
            problems.append(f"{name}: no ReadWriteMany claim of this file mounted at {SHARED}")
        gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if name == "head" and gpus:
            problems.append("the head group requests GPUs")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if name != "head" and gpus and not (0 <= lo <= hi and hi >= 1):
            problems.append(f"{name}: replicas min {lo}, max {hi}")
    if not any(int(g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
                   .get("nvidia.com/gpu", 0)) >= 1 for g in spec.get("workerGroupSpecs", [])):
        problems.append("no worker group requests nvidia.com/gpu")
    head = spec["headGroupSpec"]
    # the dashboard reaches the head's Service (a RayJob submits through it), which stays inside the cluster
    if head["rayStartParams"].get("dashboard-host") != "0.0.0.0":
        problems.append("the dashboard is not reachable through the head's Service")
    if head.get("serviceType") != "ClusterIP":
        problems.append(f"the head's Service is {head.get('serviceType', 'not declared')}, not ClusterIP")
    return problems


# -- the committed files ------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_preparation_and_validation():
    config = load_cluster()
    ready = prepared(config)
    assert cluster_problems(ready) == []
    # Every command list is the file's own: none of Ray's AWS defaults (which pip-install another Ray) merged in.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert ready[key] == config["setup_commands"] + config[key]
    assert ready["docker"]["image"] == config["docker"]["image"]
    # prepare_config sets the head type's bound to 0 workers: the head is the head, never autoscaled
    assert ready["available_node_types"][ready["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_node_types_and_bounds():
    types = prepared(load_cluster())["available_node_types"]
    assert types["head"]["resources"]["GPU"] == 0 and types["head"]["resources"]["CPU"] >= 1
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 2


def pyproject_field(pattern: str) -> str:
    (value,) = re.findall(pattern, (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return value


def test_one_image_everywhere_tagged_with_the_package_version():
    version = pyproject_field(r'^version = "([^"]+)"')
    text = DOCKERFILE.read_text()
    image = load_cluster()["docker"]["image"]
    assert image == dockerfile_image(text)
    assert image.rsplit(":", 1)[1] == version
    assert f'org.opencontainers.image.version="{version}"' in text
    assert manifest_problems(load_manifest(), image) == []
    assert image in DOCS.read_text()


def test_dockerfile_installs_this_checkout_on_cuda_torch_within_pyproject_range():
    from packaging.requirements import Requirement

    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.MULTILINE)
    (torch_line,) = [line for line in text.splitlines() if line.startswith("RUN pip install torch==")]
    args = shlex.split(torch_line[len("RUN "):])
    torch_version = next(a for a in args if a.startswith("torch==")).split("==")[1]
    index = args[args.index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index)
    torch_req = Requirement(pyproject_field(r'^\s*"(torch[<>=!~][^"]*)"'))
    assert torch_req.name == "torch" and torch_req.specifier.contains(torch_version)
    # the repository itself is copied in and installed (not a published package, not an editable link)
    assert re.search(r"^COPY \. (\S+)$", text, re.MULTILINE)
    target = re.search(r"^COPY \. (\S+)$", text, re.MULTILINE).group(1)
    assert re.search(rf"^RUN pip install {re.escape(target)} ", text, re.MULTILINE)


def test_kuberay_manifest_parses_with_a_gpu_worker_group_and_shared_storage():
    docs = load_manifest()
    assert {d["kind"] for d in docs} == {"RayCluster", "PersistentVolumeClaim"}
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    (gpu_group,) = cluster["spec"]["workerGroupSpecs"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("path", [CLUSTER, DOCKERFILE, MANIFEST, DOCS, ROOT / ".dockerignore"],
                         ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path):
    assert CREDENTIALS.findall(path.read_text()) == []


# -- the same checks on broken copies: each must be caught ---------------------------------------------------


def _without_gpu_type(c):
    del c["available_node_types"]["gpu_worker"]


def _gpu_resource_dropped(c):
    c["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 8}


def _gpu_on_head(c):
    c["available_node_types"]["head"]["resources"]["GPU"] = 1


def _inverted_bounds(c):
    c["available_node_types"]["gpu_worker"].update(min_workers=4, max_workers=2)


def _dashboard_public(c):
    c["head_start_ray_commands"] = [cmd.replace("127.0.0.1", "0.0.0.0") for cmd in c["head_start_ray_commands"]]


def _storage_not_in_container(c):
    c["docker"]["run_options"] = [o for o in c["docker"]["run_options"] if not o.startswith("-v ")]


def _storage_not_mounted(c):
    c["initialization_commands"] = [cmd for cmd in c["initialization_commands"] if "mount " not in cmd]


def _ray_defaults_merged(c):
    del c["setup_commands"], c["head_setup_commands"], c["worker_setup_commands"]


@pytest.mark.parametrize("breakage, expected", [
    (_without_gpu_type, "no worker node type declares GPU"),
    (_gpu_resource_dropped, "no worker node type declares GPU"),
    (_gpu_on_head, "head node type declares GPUs"), (_inverted_bounds, "gpu_worker: autoscaling bounds min 4, max 2"),
    (_dashboard_public, "dashboard is not bound to localhost"), (_storage_not_in_container, "container does not see"),
    (_storage_not_mounted, "no initialization command mounts"), (_ray_defaults_merged, "installs packages over"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_a_broken_cluster_yaml_is_caught(breakage, expected):
    config = load_cluster()
    breakage(config)
    assert any(expected in problem for problem in cluster_problems(prepared(config)))


def test_ray_refuses_min_workers_above_the_cluster_maximum():
    config = load_cluster()
    config["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        prepared(config)


def _manifest_broken(kind: str) -> list[dict]:
    docs = load_manifest()
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    if kind == "no gpu limit":
        for section in worker["containers"][0]["resources"].values():
            section.pop("nvidia.com/gpu")
    elif kind == "other image":
        worker["containers"][0]["image"] = "registry.example.com/geovq:0.0.9"
    elif kind == "no shared mount":
        worker["containers"][0]["volumeMounts"] = []
    elif kind == "claim not RWX":
        next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["spec"]["accessModes"] = ["ReadWriteOnce"]
    elif kind == "gpu on head":
        cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"] = 1
    elif kind == "no worker groups":
        cluster["spec"]["workerGroupSpecs"] = []
    elif kind == "exposed outside":
        cluster["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    elif kind == "dashboard on localhost":  # the Service could not reach it: no RayJob could submit
        cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "127.0.0.1"
    return docs


@pytest.mark.parametrize("kind, expected", [
    ("no gpu limit", "no worker group requests nvidia.com/gpu"), ("other image", "gpu: image"),
    ("no shared mount", "gpu: no ReadWriteMany claim"), ("claim not RWX", "head: no ReadWriteMany claim"),
    ("gpu on head", "head group requests GPUs"), ("no worker groups", "no worker group requests nvidia.com/gpu"),
    ("exposed outside", "the head's Service is LoadBalancer, not ClusterIP"),
    ("dashboard on localhost", "the dashboard is not reachable through the head's Service"),
])
def test_a_broken_manifest_is_caught(kind, expected):
    problems = manifest_problems(_manifest_broken(kind), load_cluster()["docker"]["image"])
    assert any(expected in problem for problem in problems)


@pytest.mark.parametrize("leak", ["aws_access_key_id: AKIAABCDEFGHIJKLMNOP", "password: hunter2",
                                  "GITHUB_TOKEN=ghp_x", "-----BEGIN RSA PRIVATE KEY-----",
                                  "ssh_private_key: ~/.ssh/key.pem"])
def test_the_credential_scan_finds_a_planted_secret(leak):
    assert CREDENTIALS.findall(CLUSTER.read_text() + "\n# " + leak)
