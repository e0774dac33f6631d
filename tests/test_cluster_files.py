"""The files in cluster/ are deployable as written: every YAML parses, the launcher config passes Ray's
own schema, the KubeRay manifests use ray.io/v1 fields, their entrypoints and serve import path name
scripts, recipes and modules of this repository, and the resources they ask for fit together (Ray's
view of a pod equals Kubernetes' view, and the recipe's workers fit in the cluster they run on).

Pure file checks: no Ray cluster, no Kubernetes. Run them after editing any file in cluster/:

    pytest -q tests/test_cluster_files.py
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from fastdraft.config import ServeConfig, load_recipe
from fastdraft.layout import RunLayout

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
SHARED_CLAIM, SHARED_MOUNT = "fastdraft-shared", "/mnt/shared"
GPU, HPU = "nvidia.com/gpu", "habana.ai/gaudi"  # device-plugin resources (NVIDIA; Intel Gaudi docs)

# ray.io/v1 spec fields (KubeRay v1.5: authOptions arrived in 1.5.1). A typo such as `rayClusterSpec`
# in a RayService is accepted by `kubectl apply` with a warning at best and silently ignored.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYSERVICE_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc",
    "rayClusterDeletionDelaySeconds",
}
RAYCLUSTER_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions",
}
GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "idleTimeoutSeconds", "suspend", "serviceType", "headService", "enableIngress",
}
# vCPUs and accelerators of the EC2 instance types cluster.yaml uses (AWS instance-type pages).
EC2_HARDWARE = {
    "m6i.4xlarge": {"CPU": 16},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "p4d.24xlarge": {"CPU": 96, "GPU": 8},
    "dl1.24xlarge": {"CPU": 96, "HPU": 8},
}
# The Python in Intel's Gaudi images, by Ubuntu release (Intel Gaudi support matrix 1.21).
GAUDI_IMAGE_PYTHON = {"ubuntu22.04": "310", "ubuntu24.04": "312"}


# --------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------
def pyproject_field(pattern: str) -> str | None:
    """A value from pyproject.toml by regex (tomllib is 3.11+, the project supports 3.10)."""
    found = re.search(pattern, (REPO / "pyproject.toml").read_text(), re.M)
    return found and found.group(1)


def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def kuberay_docs() -> list[tuple[str, dict]]:
    """(file name, document) for every RayJob / RayService in cluster/."""
    return [(p.name, d) for p in sorted(CLUSTER.glob("ray*.yaml")) for d in load_docs(p.name)]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """("head" or the worker group's name, group spec)."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the first container of the pod template.
    return group["template"]["spec"]["containers"][0]


def cpu_quantity(value: str | int) -> float:
    """A Kubernetes CPU quantity ("44", "500m") in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def custom_ray_resources(params: dict) -> dict:
    """The `resources` rayStartParam: KubeRay passes it to `ray start --resources` in shell quotes."""
    text = params.get("resources", "{}").strip()
    if text[:1] in "'\"" and text[-1:] == text[:1]:
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text)


def ray_view(group: dict) -> dict:
    """What Ray will think one pod of this group has: CPUs, GPUs, custom resources."""
    params = group["rayStartParams"]
    limits = ray_container(group)["resources"]["limits"]
    return {
        "CPU": float(params.get("num-cpus", cpu_quantity(limits["cpu"]))),
        "GPU": float(params.get("num-gpus", limits.get(GPU, 0))),
        **{k: float(v) for k, v in custom_ray_resources(params).items()},
    }


def cluster_capacity(spec: dict) -> dict:
    """Ray resources of the cluster at its largest (every worker group at maxReplicas)."""
    total: dict[str, float] = {}
    for name, group in groups(spec):
        count = 1 if name == "head" else group["maxReplicas"]
        for key, value in ray_view(group).items():
            total[key] = total.get(key, 0) + count * value
    return total


def job_commands(entrypoint: str) -> list[list[str]]:
    """The commands of an entrypoint such as `python a.py R && python b.py R --set k=v`."""
    return [shlex.split(part) for part in entrypoint.split("&&")]


def recipe_of(command: list[str]):
    """(script path, recipe) of a `python jobs/<x>.py RECIPE [--set k=v ...]` command."""
    assert command[0] == "python" and command[1].endswith(".py"), command
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    return REPO / command[1], load_recipe(REPO / command[2], overrides)


def serve_config() -> dict:
    (doc,) = load_docs("rayservice.yaml")
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def app_args() -> dict:
    (app,) = serve_config()["applications"]
    return app["args"]


# --------------------------------------------------------------------------------------------
# Consistency rules (each returns the problems it finds, so a test can also show they catch some)
# --------------------------------------------------------------------------------------------
def group_problems(name: str, group: dict) -> list[str]:
    """Kubernetes and Ray must agree on what a pod of this group has."""
    problems = []
    params, container = group["rayStartParams"], ray_container(group)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    problems += [f"{name}: rayStartParams.{k} must be a string" for k, v in params.items() if not isinstance(v, str)]
    for device in (GPU, HPU, "hugepages-2Mi"):
        if str(requests.get(device)) != str(limits.get(device)):
            problems.append(f"{name}: {device} requests {requests.get(device)} != limits {limits.get(device)}")
    view = ray_view(group)
    if view["GPU"] != float(limits.get(GPU, 0)):
        problems.append(f"{name}: Ray sees {view['GPU']} GPUs, the container gets {limits.get(GPU, 0)} {GPU}")
    if view.get("HPU", 0) != float(limits.get(HPU, 0)):
        problems.append(f"{name}: Ray sees {view.get('HPU', 0)} HPUs, the container gets {limits.get(HPU, 0)} {HPU}")
    if view["CPU"] > cpu_quantity(limits["cpu"]):
        problems.append(f"{name}: num-cpus {view['CPU']} exceeds the cpu limit {limits['cpu']}")
    if name != "head" and not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
        problems.append(f"{name}: replicas must lie in [minReplicas, maxReplicas]")
    return problems


def training_fit_problems(compute, capacity: dict, per_pod: dict) -> list[str]:
    """A Ray Train stage's workers must fit in the cluster, and each pod must hold whole workers."""
    need = {"cuda": ("GPU", compute.gpus_per_worker), "hpu": ("HPU", 1.0)}.get(compute.device)
    problems = []
    if need:
        key, per_worker = need
        if compute.num_workers * per_worker > capacity.get(key, 0):
            problems.append(f"{compute.num_workers} workers x {per_worker} {key} > cluster's {capacity.get(key, 0)}")
        workers_per_pod = per_pod.get(key, 0) // per_worker if per_worker else 0
        if workers_per_pod * compute.cpus_per_worker > per_pod["CPU"]:
            problems.append(f"{workers_per_pod} workers x {compute.cpus_per_worker} CPUs > a pod's {per_pod['CPU']}")
    return problems


def accelerator_group(spec: dict, key: str) -> dict:
    (group,) = [g for name, g in groups(spec) if name != "head" and ray_view(g).get(key, 0) > 0]
    return group


# --------------------------------------------------------------------------------------------
# Files and schemas
# --------------------------------------------------------------------------------------------
def test_every_cluster_file_exists_and_parses():
    expected = {"cluster.yaml", "storage.yaml", "rayjob-pipeline.yaml", "rayjob-pretrain-gaudi.yaml", "rayservice.yaml"}
    present = {p.name for p in CLUSTER.glob("*.yaml")}
    assert expected <= present
    for name in present:
        docs = load_docs(name)
        assert docs and all(isinstance(d, dict) for d in docs), name
    assert (CLUSTER / "README.md").is_file() and (CLUSTER / "Dockerfile").is_file()


def test_kuberay_manifests_use_ray_io_v1_fields():
    kinds = {}
    for name, doc in kuberay_docs():
        assert doc["apiVersion"] == "ray.io/v1", name
        kinds[name] = doc["kind"]
        spec = doc["spec"]
        allowed = RAYJOB_FIELDS if doc["kind"] == "RayJob" else RAYSERVICE_FIELDS
        assert set(spec) <= allowed, f"{name}: unknown spec fields {set(spec) - allowed}"
        ray_cluster = cluster_spec(doc)
        assert set(ray_cluster) <= RAYCLUSTER_FIELDS, f"{name}: unknown fields {set(ray_cluster) - RAYCLUSTER_FIELDS}"
        for group_name, group in groups(ray_cluster):
            assert set(group) <= GROUP_FIELDS, f"{name}/{group_name}: unknown fields {set(group) - GROUP_FIELDS}"
        assert ray_cluster["authOptions"] == {"mode": "token"}, f"{name}: Ray 2.61 makes token auth the default"
    assert kinds == {"rayjob-pipeline.yaml": "RayJob", "rayjob-pretrain-gaudi.yaml": "RayJob",
                     "rayservice.yaml": "RayService"}
    for name in ("rayjob-pipeline.yaml", "rayjob-pretrain-gaudi.yaml"):
        (doc,) = load_docs(name)
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["submissionMode"] == "K8sJobMode"  # the submitter uploads the local working_dir


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_docs("cluster.yaml")[0]
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks, defaults filled in


def test_launcher_has_cpu_head_gpu_and_gaudi_node_types_with_real_hardware():
    config = load_docs("cluster.yaml")[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not {"GPU", "HPU"} & set(head["resources"])
    by_device = {key: [n for n, t in types.items() if t["resources"].get(key, 0) > 0] for key in ("GPU", "HPU")}
    assert by_device["GPU"] and by_device["HPU"], by_device
    for name, node_type in types.items():
        hardware = EC2_HARDWARE[node_type["node_config"]["InstanceType"]]
        for key, value in node_type["resources"].items():
            assert value <= hardware.get(key, 0), f"{name}: declares {value} {key}, the instance has {hardware.get(key, 0)}"
        if name != config["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    capacity = {key: sum(t["resources"].get(key, 0) * t["max_workers"] for t in workers) for key in ("GPU", "HPU")}
    compute = load_recipe(REPO / "jobs/recipes/phi3-mini.yaml").pretrain.compute
    assert compute.num_workers * compute.gpus_per_worker <= capacity["GPU"]
    assert compute.num_workers <= capacity["HPU"]  # the same stage with --set pretrain.compute.device=hpu


def test_launcher_images_and_installs_share_one_ray_and_python():
    import ray

    config = load_docs("cluster.yaml")[0]
    types = config["available_node_types"]
    images = [config["docker"]["image"]] + [t["docker"]["worker_image"] for t in types.values() if "docker" in t]
    pythons = set()
    for image in images:
        if image.startswith("rayproject/ray:"):
            version, python, _ = image.split(":")[1].split("-")
            assert version == ray.__version__, image
            pythons.add(python.removeprefix("py"))
        else:
            assert image.startswith("vault.habana.ai/gaudi-docker/"), image
            pythons.add(GAUDI_IMAGE_PYTHON[image.split("/")[3]])
    assert len(pythons) == 1, f"Ray needs one Python on every node, the images have {pythons}"
    commands = " ".join(config["setup_commands"] + [c for t in types.values() for c in t.get("worker_setup_commands", [])])
    assert set(re.findall(r"ray\[[a-z,]+\]==([\d.]+)", commands)) == {ray.__version__}


def test_gpu_nodes_install_the_gpu_extra_and_gaudi_nodes_keep_intels_torch():
    config = load_docs("cluster.yaml")[0]
    for name, node_type in config["available_node_types"].items():
        setup = " ".join(node_type.get("worker_setup_commands", config["setup_commands"]))
        if node_type["resources"].get("GPU"):
            assert "fastdraft[gpu]" in setup and pyproject_field(r"^(gpu) = \[") == "gpu", name
        else:
            assert "[gpu]" not in setup, f"{name}: vLLM's torch pins must stay off non-GPU nodes"
        if node_type["resources"].get("HPU"):
            assert "-c /tmp/keep-torch.txt" in setup and "habana" in node_type["docker"]["worker_image"], name
            assert "--runtime=habana" in node_type["docker"]["worker_run_options"], name
    assert "fastdraft[gpu]" not in " ".join(config["setup_commands"] + config["head_setup_commands"])


# --------------------------------------------------------------------------------------------
# Entrypoints, recipes, code
# --------------------------------------------------------------------------------------------
def test_job_entrypoints_run_repository_scripts_on_valid_recipes():
    for name, doc in kuberay_docs():
        if doc["kind"] != "RayJob":
            continue
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == "/opt/fastdraft", f"{name}: the code is baked in there (cluster/Dockerfile)"
        for command in job_commands(doc["spec"]["entrypoint"]):
            script, recipe = recipe_of(command)  # load_recipe raises on a bad path, key or value
            assert script.is_file() and script.parent == REPO / "jobs", command
            assert Path(command[2]).parent == Path("jobs/recipes"), command
            assert recipe.name == "phi3-mini"
    (pipeline,) = load_docs("rayjob-pipeline.yaml")
    assert job_commands(pipeline["spec"]["entrypoint"]) == [["python", "jobs/pipeline.py", "jobs/recipes/phi3-mini.yaml"]]


def test_the_image_carries_the_code_the_jobs_and_service_run():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for path in ("fastdraft", "apps", "jobs"):
        assert re.search(rf"^COPY {path} /opt/fastdraft/{path}$", dockerfile, re.M), path
    version = pyproject_field(r'^version = "([^"]+)"')
    for name, doc in kuberay_docs():
        for group_name, group in groups(cluster_spec(doc)):
            image = ray_container(group)["image"]
            assert re.fullmatch(rf"[\w.\-/]+/fastdraft:{re.escape(version)}-(gpu|gaudi)", image), image
            assert image.endswith("-gaudi") == ("gaudi" in name), f"{name}/{group_name}: {image}"


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------
def test_ray_and_kubernetes_agree_on_every_pod():
    for name, doc in kuberay_docs():
        assert cluster_spec(doc)["rayVersion"] == __import__("ray").__version__, name
        for group_name, group in groups(cluster_spec(doc)):
            assert group_problems(group_name, group) == [], name


def test_the_consistency_rules_catch_mismatched_resources():
    (doc,) = load_docs("rayjob-pipeline.yaml")
    (gpu_group,) = cluster_spec(doc)["workerGroupSpecs"]
    wrong = copy.deepcopy(gpu_group)
    wrong["rayStartParams"]["num-gpus"] = "8"
    wrong["template"]["spec"]["containers"][0]["resources"]["requests"][GPU] = "2"
    wrong["replicas"] = wrong["maxReplicas"] + 1
    problems = " | ".join(group_problems("gpu", wrong))
    assert "Ray sees 8.0 GPUs" in problems and "requests 2 != limits 4" in problems and "replicas" in problems
    (gaudi_doc,) = load_docs("rayjob-pretrain-gaudi.yaml")
    gaudi = copy.deepcopy(cluster_spec(gaudi_doc)["workerGroupSpecs"][0])
    gaudi["rayStartParams"]["resources"] = '"{\\"HPU\\": 4}"'
    assert any("HPUs" in p for p in group_problems("gaudi", gaudi))


def test_the_pipeline_cluster_holds_the_recipes_gpu_workers():
    (doc,) = load_docs("rayjob-pipeline.yaml")
    spec = cluster_spec(doc)
    capacity, per_pod = cluster_capacity(spec), ray_view(accelerator_group(spec, "GPU"))
    (command,) = job_commands(doc["spec"]["entrypoint"])
    _, recipe = recipe_of(command)
    for stage in (recipe.pretrain, recipe.distill):
        assert stage.compute.device == "cuda"
        assert training_fit_problems(stage.compute, capacity, per_pod) == []
    assert recipe.generate.max_actors * recipe.generate.gpus_per_actor <= capacity["GPU"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_gaudi_job_requests_hpus_and_its_training_fits_them():
    (doc,) = load_docs("rayjob-pretrain-gaudi.yaml")
    spec = cluster_spec(doc)
    group = accelerator_group(spec, "HPU")
    pod = group["template"]["spec"]
    assert ray_container(group)["resources"]["limits"][HPU] == "8" and pod["hostIPC"] is True
    assert GPU not in ray_container(group)["resources"]["limits"]
    _, recipe = recipe_of(job_commands(doc["spec"]["entrypoint"])[-1])
    assert recipe.pretrain.compute.device == "hpu"
    assert training_fit_problems(recipe.pretrain.compute, cluster_capacity(spec), ray_view(group)) == []
    too_many = recipe.pretrain.compute.model_copy(update={"num_workers": 16})
    assert training_fit_problems(too_many, cluster_capacity(spec), ray_view(group)) != []


def test_every_pod_mounts_the_shared_volume_that_holds_the_recipes_paths():
    (claim,) = load_docs("storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == SHARED_CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # head and workers write at once
    for name, doc in kuberay_docs():
        for group_name, group in groups(cluster_spec(doc)):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in ray_container(group)["volumeMounts"]}
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == SHARED_CLAIM, group_name
    recipe = load_recipe(REPO / "jobs/recipes/phi3-mini.yaml")
    for path in (recipe.run_dir, Path(recipe.target.model)):
        assert path.is_relative_to(SHARED_MOUNT), path
    launcher = load_docs("cluster.yaml")[0]
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in launcher["docker"]["run_options"]


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------
def test_serve_config_is_a_valid_ray_serve_deploy_config_for_the_recipes_pair():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "apps.speculative:build_app"
    args = app["args"]
    assert set(args) - set(ServeConfig.model_fields) == {"target"}
    ServeConfig.model_validate({k: v for k, v in args.items() if k != "target"})
    recipe = load_recipe(REPO / "jobs/recipes/phi3-mini.yaml")
    assert args["target"] == recipe.target.model
    assert Path(args["draft"]) == RunLayout(recipe.run_dir).draft("FT")
    assert args["gamma"] == recipe.serve.gamma and args["device"] == "cuda"


def test_serve_import_path_points_at_build_app():
    module, attribute = serve_config()["applications"][0]["import_path"].split(":")
    path = REPO / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{path.relative_to(REPO)} (the RayService's import path) does not exist"
    # the builder may live in the library and be re-exported there (apps/speculative.py: fastdraft.serving.app)
    builder = getattr(importlib.import_module(module), attribute, None)
    assert callable(builder), f"{path} has no {attribute}()"
    path = Path(inspect.getsourcefile(builder))
    text = path.read_text()
    # An arg counts as read when the builder names it, or validates its args as a ServeConfig.
    via_config = "ServeConfig" in text
    for key in app_args():
        read = re.search(rf"\b{key}\b", text) or (via_config and key in ServeConfig.model_fields)
        assert read, f"{path} never reads the serve arg '{key}'"


def test_service_gpu_workers_fit_its_replicas_and_have_health_probes():
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    (doc,) = load_docs("rayservice.yaml")
    spec = cluster_spec(doc)
    group = accelerator_group(spec, "GPU")
    assert ray_view(group)["GPU"] == 1  # one replica of the pair per GPU
    assert app_args()["max_replicas"] <= cluster_capacity(spec)["GPU"]
    container = ray_container(group)
    port = serve_config()["http_options"]["port"]
    ready = " ".join(container["readinessProbe"]["exec"]["command"])
    alive = " ".join(container["livenessProbe"]["exec"]["command"])
    assert f"localhost:{DEFAULT_DASHBOARD_AGENT_LISTEN_PORT}/api/local_raylet_healthz" in ready
    assert f"localhost:{port}/-/healthz" in ready
    assert f"localhost:{port}" not in alive  # a slow model load must not get the pod restarted
    assert {"containerPort": port, "name": "serve"} in container["ports"]


# --------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------
def test_readme_has_a_section_per_file_and_names_every_placeholder():
    readme = (CLUSTER / "README.md").read_text()
    headings = re.findall(r"^#+ .*$", readme, re.M)
    for path in [*CLUSTER.glob("*.yaml"), CLUSTER / "Dockerfile"]:
        assert any(path.name in h for h in headings), f"cluster/README.md has no section for {path.name}"
    for path in CLUSTER.iterdir():
        for placeholder in set(re.findall(r"REPLACE_WITH_\w+|your-registry\.example\.com", path.read_text())):
            assert placeholder in readme, f"{path.name}: {placeholder} is not explained in cluster/README.md"
