"""cluster/ and the Dockerfile, checked for what a controller or `ray up` would reject and for the
pins they depend on: image tags against pyproject.toml and requirements.lock, GPU requests only in
the GPU group, pod identities instead of credentials, the same RayJob everywhere it is scheduled.

Pure parsing: nothing here talks to a cluster or builds an image.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
NAMESPACE = "restyle"
RAY_SERVICE_ACCOUNT = "restyle"
SCHEDULER_SERVICE_ACCOUNT = "restyle-scheduler"
ENTRYPOINT = "restyle run /configs/job.yaml"
MODEL_CACHE = {"HF_HOME": "/models/hf", "RESTYLE_CACHE": "/models/restyle"}

# What each file holds, in order: (apiVersion, kind).
EXPECTED_KINDS = {
    "rayjob.yaml": [("v1", "ServiceAccount"), ("ray.io/v1", "RayJob")],
    "raycluster.yaml": [("v1", "ServiceAccount"), ("ray.io/v1", "RayCluster")],
    "raycronjob.yaml": [("v1", "ServiceAccount"), ("ray.io/v1", "RayCronJob")],
    "cronjob.yaml": [
        ("v1", "ServiceAccount"),
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("v1", "ConfigMap"),
        ("batch/v1", "CronJob"),
    ],
}
LAUNCHER = "cluster-launcher.yaml"

# Fields of the KubeRay ray.io/v1 types these manifests may use. The API server prunes unknown
# fields of a custom resource, so a misspelt one would silently do nothing.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCLUSTER_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "upgradeStrategy",
    "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
    "replicas", "scaleStrategy", "suspend", "template",
}  # fmt: skip
AUTOSCALER_FIELDS = {
    "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "securityContext",
    "upscalingMode", "version", "volumeMounts",
}  # fmt: skip
# KubeRay 1.6's RayCronJob: no concurrencyPolicy, no timeZone.
RAYCRONJOB_FIELDS = {"jobTemplate", "schedule", "suspend"}

CREDENTIAL = re.compile(r"(?i)(secret_access_key|access_key_id|session_token|aws_secret|password)")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def locked_version(package: str) -> str:
    """The version requirements.lock pins for `package`."""
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if name.lower() == package:
            return version
    raise AssertionError(f"{package} is not pinned in requirements.lock")


RAY_VERSION = locked_version("ray")
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
RAY_BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def load(name: str) -> list[dict]:
    """Every YAML document of a file in cluster/."""
    return [document for document in yaml.safe_load_all((CLUSTER / name).read_text()) if document is not None]


MANIFESTS = {name: load(name) for name in EXPECTED_KINDS}


def single_document(name: str, kind: str) -> dict:
    """The one document of `kind` in a file."""
    found = [document for document in MANIFESTS[name] if document["kind"] == kind]
    assert len(found) == 1, f"{name} has {len(found)} {kind} documents"
    return found[0]


def embedded_rayjob() -> dict:
    """The RayJob the CronJob's pod creates, kept as a manifest in its ConfigMap."""
    return yaml.safe_load(single_document("cronjob.yaml", "ConfigMap")["data"]["rayjob.yaml"])


def rayjob_specs() -> dict[str, dict]:
    """Every RayJob spec a controller will see, by where it comes from."""
    return {
        "rayjob.yaml": single_document("rayjob.yaml", "RayJob")["spec"],
        "raycronjob.yaml": single_document("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"],
        "cronjob.yaml": embedded_rayjob()["spec"],
    }


def ray_cluster_specs() -> dict[str, dict]:
    """Every Ray cluster spec, by where it comes from."""
    specs = {name: spec["rayClusterSpec"] for name, spec in rayjob_specs().items()}
    specs["raycluster.yaml"] = single_document("raycluster.yaml", "RayCluster")["spec"]
    return specs


def longest_run_seconds(rayjob_spec: dict) -> int:
    """How long a RayJob can run: each attempt (the first and backoffLimit retries) has its own deadline."""
    return (rayjob_spec.get("backoffLimit", 0) + 1) * rayjob_spec["activeDeadlineSeconds"]


def worker_group(cluster: dict, name: str) -> dict:
    """The worker group called `name`; there must be exactly one."""
    groups = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == name]
    assert len(groups) == 1, f"expected one worker group {name!r}, got {len(groups)}"
    return groups[0]


def ray_pods(cluster: dict) -> dict[str, dict]:
    """The pod spec of the head and of each worker group."""
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({group["groupName"]: group["template"]["spec"] for group in cluster["workerGroupSpecs"]})
    return pods


def containers(pod: dict) -> list[dict]:
    """A pod's init containers and containers."""
    return pod.get("initContainers", []) + pod["containers"]


def walk(value, path: str = "") -> Iterator[tuple[str, object]]:
    """Every (path, leaf) in a parsed document, and every key (its path ends in `#key`); embedded
    YAML strings are parsed and walked too."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}#key", key
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")
    else:
        yield path, value
        if isinstance(value, str) and "\n" in value:
            try:
                embedded = list(yaml.safe_load_all(value))
            except yaml.YAMLError:
                return
            for document in embedded:
                if isinstance(document, dict | list):
                    yield from walk(document, f"{path}<yaml>")


def all_images() -> list[tuple[str, str]]:
    """(where, image) for every container image in every Kubernetes manifest and the launcher config."""
    images = []
    for name, documents in MANIFESTS.items():
        for document in documents:
            for path, value in walk(document):
                if path.endswith(".image") and isinstance(value, str):
                    images.append((f"{name}{path}", value))
    launcher = load(LAUNCHER)[0]
    for path, value in walk(launcher):
        if re.search(r"\.(image|head_image|worker_image)$", path):
            images.append((f"{LAUNCHER}{path}", value))
    return images


def test_cluster_folder_holds_the_known_files():
    assert sorted(path.name for path in CLUSTER.glob("*.y*ml")) == sorted([*EXPECTED_KINDS, LAUNCHER])


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_each_file_holds_its_kinds_in_one_namespace(name):
    documents = MANIFESTS[name]
    assert [(document["apiVersion"], document["kind"]) for document in documents] == EXPECTED_KINDS[name]
    for document in documents:
        metadata = document["metadata"]
        assert DNS_SUBDOMAIN.match(metadata["name"]), metadata["name"]
        assert metadata["namespace"] == NAMESPACE, metadata


def test_ray_is_the_locked_version_and_restyle_the_project_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", RAY_VERSION)
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT_VERSION)
    for where, cluster in ray_cluster_specs().items():
        assert cluster["rayVersion"] == RAY_VERSION, where
    images = all_images()
    assert len(images) >= 20
    for where, image in images:
        repository, _, tag = image.rpartition(":")
        if repository.endswith("/restyle"):
            assert repository == "ghcr.io/OWNER/restyle", where
            assert tag == PROJECT_VERSION, f"{where}: {image} is not the project version {PROJECT_VERSION}"
        if repository == "rayproject/ray":
            assert image == RAY_BASE_IMAGE, where


def test_every_image_is_pinned_by_tag():
    for where, image in all_images():
        repository, colon, tag = image.rpartition(":")
        assert colon and "/" not in tag and repository, f"{where}: {image!r} has no tag"
        assert tag != "latest", f"{where}: {image!r} is not pinned"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+[\w.-]*", tag), f"{where}: {image!r} has no version tag"


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"])
def test_rayjob_runs_restyle_and_deletes_its_cluster(where):
    spec = rayjob_specs()[where]
    assert set(spec) <= RAYJOB_FIELDS, set(spec) - RAYJOB_FIELDS
    assert spec["entrypoint"] == ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert "runtimeEnvYAML" not in spec  # credentials and settings live in the pod and the image


def test_scheduled_rayjobs_are_the_rayjob_of_rayjob_yaml():
    specs = rayjob_specs()
    assert specs["raycronjob.yaml"] == specs["rayjob.yaml"]
    assert specs["cronjob.yaml"] == specs["rayjob.yaml"]


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"])
def test_head_fetches_the_job_config_into_the_entrypoints_path(where):
    head = ray_pods(rayjob_specs()[where]["rayClusterSpec"])["head"]
    (fetch,) = head["initContainers"]
    source, target = fetch["command"][-2:]
    assert fetch["command"][:2] == ["python", "-c"]
    assert source.startswith("s3://") and source.endswith(".yaml")
    assert target == ENTRYPOINT.split()[-1]
    mount = next(mount for mount in fetch["volumeMounts"] if target.startswith(mount["mountPath"] + "/"))
    head_mounts = {mount["name"]: mount["mountPath"] for mount in head["containers"][0]["volumeMounts"]}
    assert head_mounts[mount["name"]] == mount["mountPath"]
    assert mount["name"] in {volume["name"] for volume in head["volumes"]}


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "raycluster.yaml"])
def test_ray_cluster_spec_is_what_kuberay_accepts(where):
    cluster = ray_cluster_specs()[where]
    assert set(cluster) <= RAYCLUSTER_FIELDS, set(cluster) - RAYCLUSTER_FIELDS
    assert cluster["enableInTreeAutoscaling"] is True
    assert set(cluster["autoscalerOptions"]) <= AUTOSCALER_FIELDS
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        # rayStartParams is a map of strings: a bare number is refused by the CRD's schema.
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(value, str) for value in group["rayStartParams"].values()), group["rayStartParams"]
    names = [group["groupName"] for group in cluster["workerGroupSpecs"]]
    assert sorted(names) == ["cpu", "gpu"]
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        counts = [group["minReplicas"], group["replicas"], group["maxReplicas"]]
        assert all(isinstance(count, int) and count >= 0 for count in counts), counts
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (group["groupName"], counts)
    # The head runs no tasks; reads and writes need CPUs that exist when the job starts.
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert worker_group(cluster, "cpu")["minReplicas"] >= 1
    assert worker_group(cluster, "gpu")["minReplicas"] == 0
    assert worker_group(cluster, "gpu")["maxReplicas"] >= 1


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "raycluster.yaml"])
def test_ray_containers_run_restyle_with_explicit_resources(where):
    for group, pod in ray_pods(ray_cluster_specs()[where]).items():
        ray_container = pod["containers"][0]  # KubeRay's Ray container is the first one
        assert ray_container["name"] == ("ray-head" if group == "head" else "ray-worker"), (where, group)
        assert ray_container["image"] == f"ghcr.io/OWNER/restyle:{PROJECT_VERSION}", (where, group)
        for container in containers(pod):
            assert DNS_LABEL.match(container["name"]), container["name"]
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), (where, group, container["name"])
            for variable in container.get("env", []):
                assert isinstance(variable.get("value", ""), str), (where, group, variable)


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "raycluster.yaml"])
def test_gpus_are_requested_by_the_gpu_group_only(where):
    cluster = ray_cluster_specs()[where]
    for group, pod in ray_pods(cluster).items():
        for container in containers(pod):
            resources = container["resources"]
            gpus = {
                section: resources.get(section, {}).get("nvidia.com/gpu")
                for section in ("limits", "requests")
                if "nvidia.com/gpu" in resources.get(section, {})
            }
            if group == "gpu" and container is pod["containers"][0]:
                assert gpus["limits"] == 1, (where, gpus)
                assert gpus.get("requests", 1) == 1, (where, gpus)
            else:
                assert gpus == {}, (where, group, container["name"])
    gpu_pod = ray_pods(cluster)["gpu"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "raycluster.yaml"])
def test_workers_share_a_model_cache_per_node(where):
    for group, pod in ray_pods(ray_cluster_specs()[where]).items():
        if group == "head":
            continue
        ray_container = pod["containers"][0]
        env = {variable["name"]: variable["value"] for variable in ray_container["env"]}
        assert {name: env.get(name) for name in MODEL_CACHE} == MODEL_CACHE, (where, group)
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for path in MODEL_CACHE.values():
            (mount,) = [m for m in ray_container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
            host_path = volumes[mount["name"]]["hostPath"]
            assert host_path == {"path": "/var/lib/restyle/models", "type": "DirectoryOrCreate"}, (where, group)


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "raycluster.yaml"])
def test_pods_that_touch_object_storage_use_the_pod_identity(name):
    accounts = {doc["metadata"]["name"]: doc for doc in MANIFESTS[name] if doc["kind"] == "ServiceAccount"}
    ray_account = accounts[RAY_SERVICE_ACCOUNT]
    assert re.fullmatch(
        r"arn:aws:iam::[A-Z0-9_]+:role/[\w+=,.@-]+",
        ray_account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
    )
    clusters = {where: spec for where, spec in ray_cluster_specs().items() if where == name}
    assert clusters, name
    for cluster in clusters.values():
        for group, pod in ray_pods(cluster).items():
            assert pod["serviceAccountName"] == RAY_SERVICE_ACCOUNT, (name, group)


@pytest.mark.parametrize("name", sorted([*EXPECTED_KINDS, LAUNCHER]))
def test_no_credentials_in_any_manifest(name):
    documents = MANIFESTS.get(name) or load(name)
    for document in documents:
        for path, value in walk(document):
            if isinstance(value, str):
                assert not CREDENTIAL.search(value), f"{name}{path}: {value!r} looks like a credential"
                assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", value), f"{name}{path} holds an access key id"
            if re.search(r"\.(env_vars|runtime_env|runtimeEnvYAML)#key$", path):
                raise AssertionError(f"{name}{path}: a runtime_env is shown in Ray's dashboard and logs")


def test_cronjob_creates_one_rayjob_per_run_never_two_at_once():
    cronjob = single_document("cronjob.yaml", "CronJob")["spec"]
    assert len(cronjob["schedule"].split()) == 5
    assert cronjob["concurrencyPolicy"] == "Forbid"
    job = cronjob["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert job["backoffLimit"] == 0  # a retried pod would start a second run
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == SCHEDULER_SERVICE_ACCOUNT
    (container,) = pod["containers"]
    assert container["image"].startswith("alpine/kubectl:")
    script = " ".join(container["command"] + container["args"])
    # generateName needs `kubectl create` (apply refuses it); the pod waits for the run to complete.
    (mount,) = container["volumeMounts"]
    assert f"kubectl create --filename={mount['mountPath']}/rayjob.yaml --output=name" in script
    assert "kubectl apply" not in script
    wait = re.search(
        r"kubectl wait \S+ --for=jsonpath='\{\.status\.jobDeploymentStatus\}'=Complete --timeout=(\d+)s", script
    )
    assert wait, script
    # The wait outlasts the RayJob's longest run (each attempt has its own deadline), and the Job the wait.
    assert longest_run_seconds(rayjob_specs()["cronjob.yaml"]) < int(wait.group(1)) < job["activeDeadlineSeconds"]
    volume = next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
    assert volume["configMap"]["name"] == single_document("cronjob.yaml", "ConfigMap")["metadata"]["name"]
    rayjob = embedded_rayjob()
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"].endswith("-")
    assert rayjob["metadata"]["namespace"] == NAMESPACE
    # The previous run's RayJob is found by its label.
    instance = rayjob["metadata"]["labels"]["app.kubernetes.io/instance"]
    assert f"kubectl delete rayjob --selector=app.kubernetes.io/instance={instance}" in script
    assert 'rayjob="$$(kubectl create' in script  # `$$(` is Kubernetes' escape for a literal `$(`


def test_cronjob_may_manage_rayjobs_and_nothing_else():
    role = single_document("cronjob.yaml", "Role")
    binding = single_document("cronjob.yaml", "RoleBinding")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get", "delete", "list", "watch"} <= set(rule["verbs"])
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SCHEDULER_SERVICE_ACCOUNT, "namespace": NAMESPACE}
    ]
    accounts = [doc["metadata"]["name"] for doc in MANIFESTS["cronjob.yaml"] if doc["kind"] == "ServiceAccount"]
    assert sorted(accounts) == sorted([RAY_SERVICE_ACCOUNT, SCHEDULER_SERVICE_ACCOUNT])


def test_raycronjob_uses_only_kuberay_fields_and_runs_end_before_the_next():
    spec = single_document("raycronjob.yaml", "RayCronJob")["spec"]
    assert set(spec) <= RAYCRONJOB_FIELDS, set(spec) - RAYCRONJOB_FIELDS
    assert spec["suspend"] is False
    # Daily ("M H * * *"): with no concurrencyPolicy, a run must end within the day.
    minute, hour, *rest = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"], spec["schedule"]
    assert longest_run_seconds(spec["jobTemplate"]) < 24 * 3600


def test_cluster_launcher_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = load(LAUNCHER)
    assert len(launcher) == 1
    config = launcher[0]
    validate_config(prepare_config(config))  # Ray's own schema and checks, as `ray up` runs them
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: node for name, node in node_types.items() if node["resources"].get("GPU", 0) >= 1}
    assert list(gpu_types) == ["gpu"]
    gpu = gpu_types["gpu"]
    assert gpu["resources"] == {"CPU": 4, "GPU": 1}
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert config["docker"]["image"] == f"ghcr.io/OWNER/restyle:{PROJECT_VERSION}"
    assert "--volume /opt/restyle/models:/models" in config["docker"]["run_options"]
    # Nothing is installed at start: the image pins everything.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key
    for command in config["initialization_commands"]:
        assert not re.search(r"\b(pip|apt|apt-get|conda|curl|wget)\b", command), command
    for name, node in node_types.items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def test_dockerfile_builds_on_the_locked_ray_image_from_the_lock():
    instructions = dockerfile_instructions()
    assert [args for keyword, args in instructions if keyword == "FROM"] == [RAY_BASE_IMAGE]
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    installs = [run for run in runs if "pip install" in run]
    assert len(installs) == 2
    assert all("-c requirements.lock" in run and "--no-cache-dir" in run for run in installs), installs
    assert installs[-1].endswith("pip install --no-cache-dir -c requirements.lock .")
    copies = [args for keyword, args in instructions if keyword in ("COPY", "ADD")]
    assert copies[0] == "--chown=ray:users pyproject.toml requirements.lock ./"
    # Dependencies are installed before the code is copied, so a code change reuses that layer.
    position = {args: index for index, (_, args) in enumerate(instructions)}
    assert position[copies[0]] < position[installs[0]] < position["--chown=ray:users jobs ./jobs"]
    copied = " ".join(copies)
    assert not re.search(r"safetensors|\.ckpt|\.bin\b|\.cache|huggingface|/models|models/", copied), copies
    assert ("ENV", "HF_HOME=/models/hf RESTYLE_CACHE=/models/restyle") in instructions
    assert ("VOLUME", "/models") in instructions
    assert [args for keyword, args in instructions if keyword == "USER"][-1] == "ray"
    assert not any(CREDENTIAL.search(args) for _, args in instructions)


def test_dockerignore_keeps_local_state_out_of_the_image():
    entries = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".cache", "outputs", ".pytest_cache", "**/*.safetensors"} <= entries
    needed = {"pyproject.toml", "requirements.lock", "README.md", "jobs", "operators", "configs"}
    assert not needed & entries
