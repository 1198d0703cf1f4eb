"""Every mutant of scripts/mutation_check.py still applies: its snippet is in its file
exactly once (after code moves, a stale snippet would make the mutation check meaningless),
and every test it names exists."""

from __future__ import annotations

import importlib.util
import sys

from tests.conftest import REPO


def _mutants():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", REPO / "scripts/mutation_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_applies_to_the_code_it_names():
    for m in _mutants():
        text = (REPO / m.path).read_text()
        assert text.count(m.old) == 1, (
            f"{m.name}: its snippet is in {m.path} {text.count(m.old)} times"
        )
        for test in m.tests:
            path, _, name = test.partition("::")
            source = (REPO / path).read_text()
            assert not name or f"def {name}(" in source, f"{m.name}: no test {test}"
