"""The Kubernetes manifests render, validate strictly offline, and agree with the service.

Rendering needs kubectl (its built-in kustomize), which scripts/setup.sh installs into
.venv/tools; without it these tests skip locally and fail under CI. Validation: the
Kubernetes schemas (kubernetes-validate, strict) and the vendored CRDs (deploy/k8s/crds).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deploy import validate
from service.config import Settings
from tests.conftest import REPO, missing

OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/object-storage")
# Settings with no place in the manifests, and why.
UNSET_SETTINGS = {
    "limit_concurrency": "admission is the queue's job (429/503 with Retry-After)",
    "max_queue_images": "derived from the deadline and the measured model speed",
}


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = validate.find_kubectl()
    if found is None:
        missing("kubectl not found: scripts/setup.sh dev installs it (scripts/install_kubectl.py)")
    return found


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {k: validate.render(REPO / k, kubectl) for k in validate.KUSTOMIZATIONS}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = by_kind(objects, kind)
    return found


def container_env(container: dict, objects: list[dict]) -> dict[str, str | None]:
    """The container's environment: its ConfigMaps' data, then its own env (literal
    values; None for values from the downward API or a Secret)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            (cm,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == name]
            env.update(cm["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def service_containers(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(pod spec, container) of the service in a Deployment or an InferenceService."""
    found = []
    for dep in by_kind(objects, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        found += [(pod, c) for c in pod["containers"]]
    for isvc in by_kind(objects, "InferenceService"):
        pod = isvc["spec"]["predictor"]
        found += [(pod, c) for c in pod["containers"]]
    return found


# ------------------------------------------------------------------ render and validate


@pytest.mark.parametrize("kustomization", validate.KUSTOMIZATIONS)
def test_renders_and_validates_strictly(rendered, kustomization) -> None:
    objects = rendered[kustomization]
    assert objects, f"{kustomization} rendered nothing"
    problems = validate.validate_objects(objects)
    assert not problems, "\n".join(problems)


def test_the_overlays_hold_what_a_deployment_needs(rendered) -> None:
    for overlay in OVERLAYS:
        objects = rendered[f"deploy/k8s/{overlay}"]
        kinds = sorted(o["kind"] for o in objects)
        assert kinds == [
            "ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "ScaledObject",
            "Service", "Service", "ServiceAccount",
        ], overlay  # fmt: skip
        names = {(o["kind"], o["metadata"]["name"]) for o in objects}
        deployment = one(objects, "Deployment")
        assert (
            "Deployment",
            one(objects, "ScaledObject")["spec"]["scaleTargetRef"]["name"],
        ) in names
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        for svc in by_kind(objects, "Service"):
            assert svc["spec"]["selector"].items() <= labels.items()
        services = {s["metadata"]["name"]: s["spec"] for s in by_kind(objects, "Service")}
        ports = {p["name"]: p for p in services["seednet"]["ports"]}
        assert (ports["http"]["port"], ports["grpc"]["port"]) == (8000, 8001)
        assert ports["grpc"]["appProtocol"] == "grpc"
        assert services["seednet-headless"]["clusterIP"] == "None"


def test_gpu_overlay_asks_for_one_gpu_and_cpu_overlays_for_none(rendered) -> None:
    for overlay in OVERLAYS:
        objects = rendered[f"deploy/k8s/{overlay}"]
        pod, container = service_containers(objects)[0]
        limits = container["resources"]["limits"]
        env = container_env(container, objects)
        if overlay.endswith("gpu"):
            assert limits["nvidia.com/gpu"] == 1 and env["SEEDNET_DEVICE"] == "cuda"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
        else:
            assert "nvidia.com/gpu" not in limits and env["SEEDNET_DEVICE"] == "cpu"


def test_object_storage_overlay_reads_the_bucket_with_credentials_from_a_secret(rendered) -> None:
    objects = rendered["deploy/k8s/overlays/object-storage"]
    _, container = service_containers(objects)[0]
    env = container_env(container, objects)
    assert env["SEEDNET_REGISTRY_ROOT"].startswith("s3://")
    assert float(env["SEEDNET_ALIAS_POLL_S"]) > 0
    assert {"secretRef": {"name": "seednet-registry-s3", "optional": True}} in container["envFrom"]
    text = "\n".join(yaml.safe_dump(o) for o in objects)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text.lower()


# ------------------------------------------------------------------ agree with the service


def test_every_seednet_variable_is_a_real_setting_with_a_valid_value(rendered, monkeypatch) -> None:
    """Settings ignores unknown SEEDNET_* variables: a misspelt one would be silently
    dropped. Every value must also pass the service's own validation."""
    fields = set(Settings.model_fields)
    for kustomization, objects in rendered.items():
        for _, container in service_containers(objects):
            env = container_env(container, objects)
            names = {k for k in env if k.startswith("SEEDNET_")}
            unknown = {n for n in names if n.removeprefix("SEEDNET_").lower() not in fields}
            assert not unknown, f"{kustomization}: not settings of the service: {unknown}"
            for name in [n for n in os.environ if n.startswith("SEEDNET_")]:
                monkeypatch.delenv(name)
            for name, value in env.items():
                if name.startswith("SEEDNET_") and value is not None:
                    monkeypatch.setenv(name, value)
            Settings()  # raises on a value the service would refuse at start


def test_every_setting_has_a_place_in_the_deployment(rendered) -> None:
    objects = rendered["deploy/k8s/overlays/cpu"]
    _, container = service_containers(objects)[0]
    env = container_env(container, objects)
    placed = {n.removeprefix("SEEDNET_").lower() for n in env if n.startswith("SEEDNET_")}
    absent = set(Settings.model_fields) - placed - set(UNSET_SETTINGS)
    assert not absent, (
        f"settings missing from deploy/k8s/base (settings.env or deployment.yaml): {absent}"
    )


def test_termination_grace_covers_the_preStop_pause_and_the_graceful_shutdown(rendered) -> None:
    for kustomization, objects in rendered.items():
        for pod, container in service_containers(objects):
            env = container_env(container, objects)
            pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            graceful = int(env["SEEDNET_TIMEOUT_GRACEFUL_SHUTDOWN"])
            # the rest: gRPC server and batcher stop after uvicorn's graceful period
            assert pod["terminationGracePeriodSeconds"] >= pause + graceful + 5, kustomization


def test_probes_and_ports_match_the_service(rendered) -> None:
    from service.app import create_app

    app = create_app(Settings(registry_root=REPO / "models"))  # nothing loads until start-up
    get_routes = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    for kustomization, objects in rendered.items():
        for _, container in service_containers(objects):
            env = container_env(container, objects)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            http = [p for n, p in ports.items() if n in ("http", "http1")]
            grpc = [p for n, p in ports.items() if n in ("grpc", "h2c")]
            assert http == [int(env["SEEDNET_PORT"])], kustomization
            assert grpc == [int(env["SEEDNET_GRPC_PORT"])], kustomization
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] in get_routes, (kustomization, probe, get["path"])
                assert get["port"] in ("http", int(env["SEEDNET_PORT"])), (kustomization, probe)
            assert "live" in container["livenessProbe"]["httpGet"]["path"]
            assert "ready" in container["readinessProbe"]["httpGet"]["path"]


def test_kserve_predictor_uses_kserves_ports_and_names(rendered) -> None:
    isvc = one(rendered["deploy/k8s/kserve"], "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("http1", 8080),
        ("h2c", 8081),
    ]


def test_runs_as_the_image_user_on_a_read_only_root(rendered) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = int(re.search(r"^ARG SEEDNET_UID=(\d+)", dockerfile, re.M).group(1))
    for kustomization, objects in rendered.items():
        for pod, container in service_containers(objects):
            assert pod["securityContext"]["runAsUser"] == uid, kustomization
            assert pod["securityContext"]["runAsNonRoot"] is True
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            env = container_env(container, objects)
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", env["HOME"]} <= mounts, kustomization
            volumes = {v["name"]: v for v in pod["volumes"]}
            for m in container["volumeMounts"]:
                assert "emptyDir" in volumes[m["name"]], (kustomization, m)


def test_the_operator_rule_is_the_plain_rules_file() -> None:
    plain = yaml.safe_load((REPO / "deploy/observability/prometheus-rules.yaml").read_text())
    operator = yaml.safe_load((REPO / "deploy/observability/prometheusrule.yaml").read_text())
    assert operator["spec"] == plain


# ------------------------------------------------------------------ the check can fail


def plant(tmp_path: Path, relative: str, old: str, new: str) -> Path:
    """A copy of deploy/ with ``old`` replaced by ``new`` in one file."""
    copy = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1))
    return copy


@pytest.mark.parametrize(
    ("where", "old", "new", "expected"),
    [
        (
            "k8s/base/deployment.yaml",
            "          livenessProbe:\n",
            "          livenessProbes:\n",
            "Deployment/seednet: spec.template.spec.containers.0: Additional properties "
            "are not allowed ('livenessProbes' was unexpected) [Kubernetes 1.30, strict]",
        ),
        (
            "k8s/base/poddisruptionbudget.yaml",
            "  maxUnavailable: 1\n",
            "  maxUnavailable: 1\n  minReady: 1\n",
            "PodDisruptionBudget/seednet: spec: Additional properties are not allowed "
            "('minReady' was unexpected) [Kubernetes 1.30, strict]",
        ),
        (
            "k8s/components/keda/scaledobject.yaml",
            "  maxReplicaCount: 20\n",
            "  maxReplicas: 20\n",
            "ScaledObject/seednet: spec: Additional properties are not allowed "
            "('maxReplicas' was unexpected) [scaledobjects.keda.sh.yaml]",
        ),
        (
            "k8s/kserve/inferenceservice.yaml",
            "        readinessProbe:\n",
            "        readinessProbes:\n",
            "InferenceService/seednet: spec.predictor.containers.0: Additional properties "
            "are not allowed ('readinessProbes' was unexpected) "
            "[inferenceservices.serving.kserve.io.yaml]",
        ),
        (
            "k8s/kserve/inferenceservice.yaml",
            "            containerPort: 8081\n",
            '            containerPort: "8081"\n',
            "InferenceService/seednet: spec.predictor.containers.0.ports.1.containerPort: "
            "'8081' is not of type 'integer' [inferenceservices.serving.kserve.io.yaml]",
        ),
        (
            "observability/prometheusrule.yaml",
            "  groups:\n",
            "  groupz: []\n  groups:\n",
            "PrometheusRule/seednet: spec: Additional properties are not allowed "
            "('groupz' was unexpected) [prometheusrules.monitoring.coreos.com.yaml]",
        ),
    ],
)
def test_validation_fails_on_a_planted_mistake(kubectl, tmp_path, where, old, new, expected):
    copy = plant(tmp_path, where, old, new)
    folder = (
        "observability"
        if where.startswith("observability")
        else ("k8s/kserve" if "kserve" in where else "k8s/overlays/cpu")
    )
    objects = validate.render(copy / folder, kubectl)
    problems = validate.validate_objects(objects, crd_dir=REPO / "deploy/k8s/crds")
    assert expected in problems, "\n".join(problems)


def test_the_hpa_component_renders_and_validates(kubectl, tmp_path) -> None:
    """components/hpa is in no overlay (components/keda is): render it on the base, from
    an overlay beside the others (kustomize refuses absolute paths)."""
    copy = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", copy, ignore=shutil.ignore_patterns("__pycache__"))
    overlay = copy / "k8s" / "overlays" / "hpa"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [../../base]\n"
        "components: [../../components/hpa]\n"
    )
    objects = validate.render(overlay, kubectl)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    assert not validate.validate_objects(objects)


def test_a_kind_without_any_schema_fails(kubectl, tmp_path) -> None:
    copy = plant(
        tmp_path,
        "k8s/components/keda/scaledobject.yaml",
        "apiVersion: keda.sh/v1alpha1",
        "apiVersion: keda.sh/v1beta9",
    )
    problems = validate.validate_objects(validate.render(copy / "k8s/overlays/cpu", kubectl))
    assert any(p.startswith("ScaledObject/seednet: no schema") for p in problems), problems
