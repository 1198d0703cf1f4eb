"""The typed manifest: committed schema-1 versions load unchanged; new ones are schema 2,
or 3 when they share a file with an earlier version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import IntegrityError, Manifest, Registry
from registry.manifest import SCHEMA_VERSION, SCHEMA_WITHOUT_SHARED_FILES, WEIGHTS_FILE
from tests.conftest import REPO
from tests.registry.test_registry import _publish


@pytest.mark.parametrize("name", ["seednet", "seednet-small"])
def test_committed_versions_read_as_schema_1(name: str) -> None:
    raw = json.loads((REPO / "models" / name / "1" / "manifest.json").read_text())
    m = Manifest.from_dict(raw)
    assert m.schema_version == 1 and "schema_version" not in raw
    assert m.ref == f"{name}@1"
    assert m.input.size == (32, 32) == tuple(raw["input_size"])
    assert m.class_names[3] == "cat" and len(m.class_names) == 10
    assert m.files[WEIGHTS_FILE].size == raw["files"][WEIGHTS_FILE]["size"]
    assert m.model.config == raw["model"]["config"]
    assert m.metrics.test_accuracy == raw["metrics"]["test_accuracy"]
    # nothing of the file is lost in the typed form, except the duplicated input size
    again = m.to_dict()
    assert {k for k in raw if k != "input_size"} | {"schema_version"} == set(again)


def test_new_versions_are_written_as_schema_2_and_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv = _publish(reg)
    raw = json.loads((mv.path / "manifest.json").read_text())
    # No shared file: schema 2, which readers that predate schema 3 still read.
    assert raw["schema_version"] == SCHEMA_WITHOUT_SHARED_FILES == 2 < SCHEMA_VERSION
    assert "input_size" not in raw
    assert Manifest.from_dict(raw) == mv.manifest == reg.get(mv.ref).manifest
    assert Manifest.from_dict(mv.manifest.to_dict()).to_dict() == raw


def test_unknown_keys_survive_a_round_trip(tmp_path: Path) -> None:
    raw = json.loads((_publish(Registry(tmp_path)).path / "manifest.json").read_text())
    raw["added_by_a_newer_writer"] = {"x": 1}
    assert Manifest.from_dict(raw).to_dict()["added_by_a_newer_writer"] == {"x": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("class_names"), "class_names"),
        (lambda m: m.update(schema_version=99), "schema_version 99"),
        (lambda m: m.update(files=[]), "files is not an object"),
        (lambda m: m["files"].update(x={"sha256": "ab"}), "malformed checksum entry"),
        (lambda m: m.update(name=7), "name must be a string"),
        (lambda m: m.update(model={"arch": "x"}), "architecture"),
    ],
)
def test_an_invalid_manifest_is_an_integrity_error(tmp_path: Path, change, message) -> None:
    raw = json.loads((_publish(Registry(tmp_path)).path / "manifest.json").read_text())
    change(raw)
    with pytest.raises(IntegrityError, match=message):
        Manifest.from_dict(raw)


def test_a_version_with_a_broken_manifest_is_listed_but_never_loaded(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv = _publish(reg)
    # Unsealed, as versions published before manifest.sha256: parsing still catches it.
    (mv.path / "manifest.sha256").unlink()
    (mv.path / "manifest.json").write_text('{"name": "seednet"}')
    [listed] = reg.versions("seednet")
    assert listed.problem and "not a valid manifest" in listed.problem
    with pytest.raises(IntegrityError):
        listed.manifest  # noqa: B018
    with pytest.raises(IntegrityError):
        reg.get("seednet@1")
    assert any("manifest.json" in p for p in reg.verify("seednet@1"))
