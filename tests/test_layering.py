"""The layers import only downwards (docs/architecture.md):

    service ─┐          training ─┐
             ├─> seednet (core) ──┴─> registry
             └────────────────────────>

- ``registry``: standard library and ``filelock`` only (no torch, no FastAPI);
- ``seednet`` (core): never FastAPI/Starlette/uvicorn, never ``training`` or ``service``;
- ``training`` never imports ``service``; ``service`` never imports ``training``.

Every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import shutil
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
REGISTRY_ALLOWED = set(sys.stdlib_module_names) | {"filelock", "registry", "__future__"}


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


def test_the_layers_import_only_downwards() -> None:
    assert violations(REPO) == []


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
