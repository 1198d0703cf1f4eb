"""The layers import only downwards (docs/architecture.md):

    service ─┐          training ─┐
             ├─> seednet (core) ──┴─> registry
             └────────────────────────>

- ``registry``: standard library and ``filelock`` only (no torch, no FastAPI), plus
  ``fsspec`` for ``s3://`` roots, imported lazily so a local registry never loads it;
- ``seednet`` (core): never FastAPI/Starlette/uvicorn, never ``training`` or ``service``;
- ``training`` never imports ``service``; ``service`` never imports ``training``.

Inside ``service`` (docs/architecture.md, "The service's layers"): the wire front ends
call the data plane, which runs the model runtime, never the other way round::

    frontends ─> state ─> lifecycle ─> dataplane ─> errors, config, metrics

- ``service.dataplane`` imports no front end, no lifecycle, no web framework or gRPC;
- ``service.lifecycle`` imports no front end and no web framework or gRPC;
- ``service.errors``, ``service.config`` and ``service.metrics`` are the floor: no other
  service module, and ``errors`` no web framework or gRPC (it is rendered per protocol);
- a front end never touches the batcher or the decode pool: it calls
  ``service.dataplane.inference``.

Every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

WEB = {"fastapi", "starlette", "uvicorn", "pydantic_settings", "jinja2", "multipart"}
FORBIDDEN: dict[str, set[str]] = {
    "seednet": WEB | {"training", "service"},
    "training": WEB | {"service"},
    "service": {"training"},
}
# The registry is a whitelist: whatever is not stdlib, filelock or itself is a violation.
# fsspec (with s3fs behind it) reaches object stores; only registry/objectstore.py uses it,
# inside functions (test below).
REGISTRY_ALLOWED = set(sys.stdlib_module_names) | {"filelock", "registry", "__future__", "fsspec"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(root: Path) -> list[str]:
    found = []
    for package in ("registry", *FORBIDDEN):
        for path in sorted((root / package).rglob("*.py")):
            for name in sorted(imported_modules(path)):
                if package == "registry":
                    bad = name not in REGISTRY_ALLOWED
                else:
                    bad = name in FORBIDDEN[package]
                if bad:
                    found.append(f"{path.relative_to(root)} imports {name}")
    return found


WIRE = WEB | {"grpc", "python_multipart"}
FLOOR = ("service.errors", "service.config", "service.metrics")
#: service sub-layer -> module prefixes it must not import.
SERVICE_FORBIDDEN: dict[str, tuple[str, ...]] = {
    "service.dataplane": (
        "service.frontends",
        "service.lifecycle",
        "service.state",
        "service.app",
        *WIRE,
    ),
    "service.lifecycle": ("service.frontends", "service.state", "service.app", *WIRE),
    "service.frontends": ("service.dataplane.batching", "service.dataplane.decoding"),
    "service.errors": ("service", *WIRE),
    "service.config": ("service",),
    "service.metrics": ("service",),
}


def imported_full(path: Path) -> set[str]:
    """Full dotted names ``path`` imports (``from a import b`` names ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def service_violations(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "service").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        layer = next((layer for layer in SERVICE_FORBIDDEN if _under(module, layer)), None)
        if layer is None:
            continue
        for name in sorted(imported_full(path)):
            allowed = layer in FLOOR and any(_under(name, f) for f in FLOOR)
            bad = any(_under(name, p) for p in SERVICE_FORBIDDEN[layer])
            if bad and not allowed:
                found.append(f"{path.relative_to(root)} imports {name}")
    return found


def test_the_layers_import_only_downwards() -> None:
    assert violations(REPO) == []


def test_the_service_layers_import_only_downwards() -> None:
    assert service_violations(REPO) == []


def test_the_check_fails_on_planted_violations(tmp_path: Path) -> None:
    for package in ("registry", "seednet", "training", "service"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    with open(tmp_path / "training" / "cli.py", "a") as f:
        f.write("\nfrom service.app import create_app\n")
    with open(tmp_path / "registry" / "store.py", "a") as f:
        f.write("\ndef _lazy():\n    import torch\n")
    with open(tmp_path / "seednet" / "export.py", "a") as f:
        f.write("\nimport fastapi\n")
    with open(tmp_path / "service" / "app.py", "a") as f:
        f.write("\nimport training.train\n")
    assert violations(tmp_path) == [
        "registry/store.py imports torch",
        "seednet/export.py imports fastapi",
        "training/cli.py imports service",
        "service/app.py imports training",
    ]


def test_the_service_check_fails_on_planted_violations(tmp_path: Path) -> None:
    shutil.copytree(REPO / "service", tmp_path / "service", ignore=shutil.ignore_patterns("*.pyc"))
    plants = {
        "service/dataplane/batching.py": "from service.frontends.http.deps import State",
        "service/lifecycle/loading.py": "def _lazy():\n    import fastapi",
        "service/frontends/api/predict.py": "from service.dataplane.batching import Batcher",
        "service/errors.py": "import grpc",
        "service/metrics.py": "from service.state import ServiceState",
    }
    for name, line in plants.items():
        with open(tmp_path / name, "a") as f:
            f.write(f"\n{line}\n")
    assert service_violations(tmp_path) == [
        "service/dataplane/batching.py imports service.frontends.http.deps",
        "service/dataplane/batching.py imports service.frontends.http.deps.State",
        "service/errors.py imports grpc",
        "service/frontends/api/predict.py imports service.dataplane.batching",
        "service/frontends/api/predict.py imports service.dataplane.batching.Batcher",
        "service/lifecycle/loading.py imports fastapi",
        "service/metrics.py imports service.state",
        "service/metrics.py imports service.state.ServiceState",
    ]


def test_a_local_registry_loads_no_storage_library(tmp_path: Path) -> None:
    """fsspec/s3fs are imported only for an s3:// root; torch and FastAPI never."""
    script = (
        "import sys\n"
        "from registry import Registry\n"
        "from registry.cli import main\n"
        f"reg = Registry({str(tmp_path)!r})\n"
        "reg.publish('m', {'weights.safetensors': b'w' * 70000}, __import__('tests.registry."
        "test_registry', fromlist=['_spec'])._spec())\n"
        f"assert main(['--root', {str(tmp_path)!r}, 'verify']) == 0\n"
        "heavy = {'fsspec', 's3fs', 'botocore', 'aiobotocore', 'torch', 'fastapi'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
