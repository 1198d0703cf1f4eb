"""`python -m service.registry_cli ...`: the registry CLI with SeedNet's exporter plugged in.

Kept at this path so the README's commands and deployments keep working; the registry
itself lives in the ``registry`` package.
"""

from __future__ import annotations

from registry import ModelVersion, Registry
from registry.cli import main as _registry_main


def _materialize(registry: Registry, mv: ModelVersion) -> None:
    from seednet.export import materialize  # torch: only for the command that needs it

    materialize(registry, mv)


def main(argv: list[str] | None = None) -> int:
    return _registry_main(argv, materialize=_materialize)


if __name__ == "__main__":
    raise SystemExit(main())
