"""Render the kustomizations under deploy/ and validate every object, offline and strictly.

    .venv/bin/python -m deploy.validate [KUSTOMIZATION_DIR ...]   # default: all of ours

- Rendering: ``kubectl kustomize`` (kubectl's built-in kustomize v5; no cluster is
  contacted). scripts/install_kubectl.py puts a pinned kubectl in ``.venv/tools``.
- Kubernetes kinds: the OpenAPI-derived JSON schemas bundled by ``kubernetes-validate``,
  the strict variant (an unknown field fails), for the oldest Kubernetes these manifests
  support and the newest the package knows.
- Custom resources (KServe, KEDA, Prometheus operator): their CRDs vendored in
  ``deploy/k8s/crds``, read with the API server's structural-schema rules: a field the
  schema does not declare fails, unless the schema keeps unknown fields
  (``x-kubernetes-preserve-unknown-fields``) or is a map (``additionalProperties``).
- A kind with no schema at all fails too: nothing is waved through.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "deploy" / "k8s" / "crds"
# What a user applies; components are rendered through the overlays that use them.
KUSTOMIZATIONS = (
    "deploy/k8s/overlays/cpu",
    "deploy/k8s/overlays/gpu",
    "deploy/k8s/overlays/object-storage",
    "deploy/k8s/kserve",
    "deploy/observability",
)
# 1.30: the oldest release with the preStop `sleep` action on by default.
KUBERNETES_VERSIONS = ("1.30", "1.37")
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class ToolMissing(RuntimeError):
    """kubectl is not installed: rendering is impossible (not a manifest error)."""


def find_kubectl() -> str | None:
    """The project's pinned kubectl (beside this interpreter), else one on PATH."""
    pinned = Path(sys.prefix) / "tools" / "kubectl"
    if pinned.is_file():
        return str(pinned)
    return shutil.which("kubectl")


def render(kustomization: Path, kubectl: str | None = None) -> list[dict]:
    """The objects ``kubectl kustomize`` renders from ``kustomization`` (a folder)."""
    kubectl = kubectl or find_kubectl()
    if kubectl is None:
        raise ToolMissing("kubectl not found (install it with scripts/install_kubectl.py)")
    done = subprocess.run(
        [kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise ValueError(f"kustomize failed for {kustomization}:\n{done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def structural(node: dict) -> dict:
    """A CRD's OpenAPI v3 schema as the JSON Schema the API server effectively enforces.

    Structural schemas prune fields they do not declare; a manifest that relies on such a
    field is wrong, so here it is an error: every object schema without
    ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false``. ``nullable`` and ``x-kubernetes-int-or-string`` are
    translated; the other ``x-kubernetes-*`` markers carry no validation.
    """
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural(schema) for name, schema in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural(schema) for schema in value]
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@cache
def kubernetes_definitions(version: str) -> Resource:
    """kubernetes-validate's strict shared definitions (ObjectMeta and friends)."""
    folder = resources.files(kubernetes_validate) / "kubernetes-json-schema"
    (strict,) = [d for d in folder.iterdir() if d.name == f"v{version}.0-local-strict"]
    return Resource.from_contents(yaml.load(  # JSON is YAML; the C loader is fast
        (strict / "_definitions.json").read_text(), Loader=yaml.CSafeLoader
    ))  # fmt: skip


@dataclass(frozen=True)
class CustomKind:
    api_version: str
    kind: str
    schema: dict
    source: str


@cache
def custom_kinds(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], CustomKind]:
    """(apiVersion, kind) -> the structural schema of every served version of each CRD."""
    found = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = structural(version["schema"]["openAPIV3Schema"])
            # metadata is the API server's ObjectMeta, whatever the CRD says about it.
            schema.setdefault("properties", {})["metadata"] = {
                "$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{OBJECT_META}"
            }
            api_version = f"{group}/{version['name']}"
            found[(api_version, kind)] = CustomKind(api_version, kind, schema, path.name)
    return found


def describe(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def validate_object(obj: dict, version: str, crd_dir: Path = CRD_DIR) -> list[str]:
    """Every problem with ``obj`` against Kubernetes ``version`` (empty: valid)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    custom = custom_kinds(crd_dir).get(key)
    if custom is not None:
        registry = Registry().with_resource(
            "https://kubernetes.io/api/_definitions.json", kubernetes_definitions(version)
        )
        validator = jsonschema.Draft202012Validator(custom.schema, registry=registry)
        return [
            f"{describe(obj)}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            f" [{custom.source}]"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
        ]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.path)) or "(root)"
        return [f"{describe(obj)}: {path}: {e.message} [Kubernetes {version}, strict]"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{describe(obj)}: no schema: {e.message} (and no CRD in {crd_dir.name}/)"]
    return []


def validate_objects(objects: list[dict], crd_dir: Path = CRD_DIR) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            problems += validate_object(obj, version, crd_dir)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kustomizations", nargs="*", type=Path)
    args = parser.parse_args(argv)
    folders = args.kustomizations or [REPO / k for k in KUSTOMIZATIONS]
    failed = 0
    for folder in folders:
        objects = render(folder)
        problems = validate_objects(objects)
        kinds = ", ".join(sorted({o["kind"] for o in objects}))
        print(f"{'FAIL' if problems else 'ok  '} {folder} ({len(objects)} objects: {kinds})")
        for p in problems:
            print(f"     {p}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
