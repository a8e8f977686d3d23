"""Multi-machine configs are valid before anyone runs them on a real cluster.

- `cluster_configs/ray_cluster_gpu.yaml` validates against the schema Ray ships (`ray/autoscaler/ray-schema.json`,
  the one `ray up` checks), its commands parse in bash, its `ray start` commands parse with Ray's own CLI, the head
  gets the autoscaling config, and `~` in `pip install` expands.
- The KubeRay manifests use only fields of the KubeRay CRDs (ray.io/v1). The field sets below are written down
  from KubeRay's API types (ray-operator/apis/ray/v1: rayjob_types.go, raycluster_types.go, rayservice_types.go;
  the same lists as https://ray-project.github.io/kuberay/reference/api/); for the pod templates, from the
  Kubernetes core/v1 API (PodTemplateSpec, PodSpec, Container, Volume, VolumeMount, PersistentVolumeClaim): only
  the fields a manifest may use here, not all of them. Beyond names: the image is the one the Dockerfile says how
  to build, the Ray version is the installed one, every mount has its volume, the entrypoint parses with raymoe's
  CLI and its config validates, and the RayService's Serve config validates with Ray Serve's schema and ServeArgs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "cluster_configs"
IMAGE_ROOT = "/home/ray/raymoe"  # WORKDIR of the Dockerfile: the repository inside the image

# -- KubeRay ray.io/v1 (json names of the Go struct fields) ----------------------------------------------------
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "serveService"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend"}
HEAD_GROUP_SPEC = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_SPEC = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                     "template", "scaleStrategy"}
# -- Kubernetes core/v1 (a subset: what these manifests may use) ------------------------------------------------
OBJECT = {"apiVersion", "kind", "metadata", "spec"}
OBJECT_META = {"name", "namespace", "labels", "annotations"}
POD_TEMPLATE = {"metadata", "spec"}
POD_SPEC = {"containers", "initContainers", "volumes", "nodeSelector", "tolerations", "affinity",
            "serviceAccountName", "imagePullSecrets", "securityContext", "restartPolicy",
            "terminationGracePeriodSeconds", "priorityClassName"}
CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "resources",
             "volumeMounts", "lifecycle", "livenessProbe", "readinessProbe", "securityContext", "workingDir"}
RESOURCES = {"limits", "requests"}
VOLUME = {"name", "persistentVolumeClaim", "emptyDir", "configMap", "secret", "hostPath", "nfs"}
PVC_SOURCE = {"claimName", "readOnly"}
VOLUME_MOUNT = {"name", "mountPath", "readOnly", "subPath"}
PVC_SPEC = {"accessModes", "storageClassName", "resources", "volumeName", "volumeMode", "selector", "dataSource"}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CONFIGS / name).read_text()) if d]


def _only(fields: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(fields) - allowed)
    assert not unknown, f"{where}: not a field of its type: {unknown} (allowed: {sorted(allowed)})"


def _dockerfile_image() -> str:
    """The image name the Dockerfile's comment builds (`docker build -t NAME .`)."""
    m = re.search(r"docker build -t (\S+) \.$", (REPO / "Dockerfile").read_text(), re.M)
    assert m, "the Dockerfile says how it is built: docker build -t NAME ."
    return m.group(1)


# -- the Ray cluster launcher -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CONFIGS / "ray_cluster_gpu.yaml").read_text())


def _commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cfg.get(k, [])]


def test_launcher_config_validates_against_rays_schema(launcher):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    bad = dict(launcher, head_start_ray_commands="ray start --head")  # the schema does catch mistakes
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_launcher_commands_parse(launcher):
    from ray.scripts.scripts import start

    for cmd in _commands(launcher):
        out = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, (cmd, out.stderr)
        for part in cmd.split(";"):
            args = shlex.split(part)
            if args[:2] == ["ray", "start"]:
                start.make_context("ray start", args[2:])  # raises on an unknown option or a bad value
    [head_start] = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start.split()


def test_launcher_pip_install_expands_the_home_directory(launcher):
    [pip] = [c for c in launcher["setup_commands"] if c.startswith("pip install")]
    words = subprocess.run(["bash", "-c", "printf '%s\\n' " + pip.removeprefix("pip install")],
                           env={"HOME": "/home/ubuntu", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                           timeout=30).stdout.split()
    assert words == ["-e", "/home/ubuntu/raymoe[serve]"]
    assert launcher["file_mounts"] == {"~/raymoe": "."}


# -- KubeRay ------------------------------------------------------------------------------------------------------
def _check_pod_template(tpl: dict, where: str) -> set[str]:
    """Check a pod template's fields; returns the mount paths of its containers."""
    _only(tpl, POD_TEMPLATE, where)
    spec = tpl["spec"]
    _only(spec, POD_SPEC, f"{where}.spec")
    volumes = {}
    for v in spec.get("volumes", []):
        _only(v, VOLUME, f"{where}.spec.volumes")
        if "persistentVolumeClaim" in v:
            _only(v["persistentVolumeClaim"], PVC_SOURCE, f"{where}.spec.volumes[].persistentVolumeClaim")
        volumes[v["name"]] = v
    mounts = set()
    for c in spec["containers"]:
        _only(c, CONTAINER, f"{where}.containers[{c['name']}]")
        _only(c.get("resources", {}), RESOURCES, f"{where}.containers[{c['name']}].resources")
        assert c["image"] == _dockerfile_image(), f"{where}: image {c['image']!r} is not the Dockerfile's"
        for m in c.get("volumeMounts", []):
            _only(m, VOLUME_MOUNT, f"{where}.volumeMounts")
            assert m["name"] in volumes, f"{where}: mount {m['name']!r} has no volume"
            mounts.add(m["mountPath"])
    return mounts


def _check_ray_cluster(spec: dict, where: str) -> list[set[str]]:
    """Check a RayClusterSpec; returns the mount paths of every pod group (head first)."""
    _only(spec, RAYCLUSTER_SPEC, where)
    assert spec["rayVersion"] == ray.__version__, "rayVersion must be the Ray raymoe is tested with"
    head = spec["headGroupSpec"]
    _only(head, HEAD_GROUP_SPEC, f"{where}.headGroupSpec")
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g['groupName']}]", g) for g in spec["workerGroupSpecs"]]
    mounts = []
    for name, group in groups:
        if group is not head:
            _only(group, WORKER_GROUP_SPEC, f"{where}.{name}")
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), \
            f"{where}.{name}.rayStartParams is map[string]string: quote every value"
        mounts.append(_check_pod_template(group["template"], f"{where}.{name}.template"))
    return mounts


def test_dockerfile_builds_the_image_the_manifests_use():
    text = (REPO / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in text  # the tested Ray version
    assert f"WORKDIR {IMAGE_ROOT}" in text and "cluster_configs" in text
    assert _dockerfile_image() == "raymoe:0.1.0"


def test_rayjob_fields_and_entrypoint():
    from raymoe.cli import _parser
    from raymoe.config import load_config

    [pvc] = _docs("kuberay_volume.yaml")
    [job] = _docs("kuberay_rayjob.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    _only(pvc, OBJECT, "PersistentVolumeClaim")
    _only(pvc["spec"], PVC_SPEC, "PersistentVolumeClaim.spec")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every pod writes checkpoints to it
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _only(job, OBJECT, "RayJob")
    _only(job["metadata"], OBJECT_META, "RayJob.metadata")
    spec = job["spec"]
    _only(spec, RAYJOB_SPEC, "RayJob.spec")
    # no working_dir: the code is in the image (a relative one resolves in the submitter pod)
    assert "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    mounts = _check_ray_cluster(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    for group in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]:
        [claim] = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]]
        assert claim == pvc["metadata"]["name"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "raymoe"
    args = _parser().parse_args(argv[1:])
    assert args.command == "train" and args.config.startswith(IMAGE_ROOT + "/")
    cfg = load_config(REPO / Path(args.config).relative_to(IMAGE_ROOT), args.overrides)
    assert cfg.cluster.mode == "ray" and cfg.checkpoint.resume is True
    # checkpoints on the shared volume, mounted at the same path in every pod
    assert all(any(cfg.run.output_dir.startswith(m + "/") for m in group) for group in mounts), mounts


def test_rayservice_fields_and_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raymoe.deployments.app import ServeArgs

    [svc] = _docs("kuberay_rayservice.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    _only(svc, OBJECT, "RayService")
    spec = svc["spec"]
    _only(spec, RAYSERVICE_SPEC, "RayService.spec")
    mounts = _check_ray_cluster(spec["rayClusterConfig"], "RayService.spec.rayClusterConfig")
    serve = yaml.safe_load(spec["serveConfigV2"])  # a YAML string, as KubeRay wants it
    ServeDeploySchema.model_validate(serve)
    [app] = serve["applications"]
    assert app["import_path"] == "raymoe.deployments.app:build_app"
    args = ServeArgs(**app["args"])
    assert args.engine.device == "cuda"
    [dep] = app["deployments"]
    assert dep["name"] == "OpenAIServer" and dep["ray_actor_options"]["num_gpus"] == 1
    for path in (args.checkpoint, dep["user_config"]["checkpoint"]):
        assert all(any(path.startswith(m + "/") for m in group) for group in mounts), path
    # the checkpoint the RayJob trains into (run.output_dir / run.name / checkpoints), on the same claim
    [job] = _docs("kuberay_rayjob.yaml")
    [pvc] = _docs("kuberay_volume.yaml")
    claims = {v["persistentVolumeClaim"]["claimName"]
              for v in spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert claims == {pvc["metadata"]["name"]} and "/mnt/raymoe/runs" in job["spec"]["entrypoint"]
    assert args.checkpoint == "/mnt/raymoe/runs/ep_gpu/checkpoints"
