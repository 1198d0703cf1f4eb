"""The typed manifest: committed schema-1 versions load unchanged; new plain ones are schema
2, and 3 when they share a file with an earlier version or are calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import IntegrityError, Manifest, Registry
from registry.manifest import PLAIN_SCHEMA, SCHEMA_VERSION, WEIGHTS_FILE
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
    # No shared file, no calibration: schema 2, which readers that predate 3 still read.
    assert raw["schema_version"] == PLAIN_SCHEMA == 2 < SCHEMA_VERSION
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


def _calibrated_spec(**overrides):
    from dataclasses import replace

    from registry.manifest import Calibration, Int8Gate, Metrics, OutOfDistribution
    from tests.registry.test_registry import _spec

    base = _spec(0.9)
    values = {
        "metrics": replace(
            base.metrics,
            ece=0.012,
            nll=0.25,
            brier=0.11,
            uncalibrated_ece=0.05,
            uncalibrated_nll=0.3,
            uncalibrated_brier=0.12,
            ece_bins=15,
            calibration_eval_images=5000,
        ),
        "calibration": Calibration("temperature", 0.78, {"half": "even"}, {"half": "odd"}),
        "ood": OutOfDistribution(
            "energy", -3.5, 0.95, kept=0.948, sets={"noise": {"auroc": 0.6, "fpr_at_95_tpr": 0.99}}
        ),
        "int8": Int8Gate(True, 0.92, 0.918, 10000, 0.5, file="int8.onnx"),
    } | overrides
    assert isinstance(values["metrics"], Metrics)
    return replace(base, **values)


def test_a_calibrated_version_is_schema_3_and_round_trips(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    files = {"weights.safetensors": b"w", "int8.onnx": b"int8"}
    mv = reg.publish("seednet", files, _calibrated_spec())
    raw = json.loads((mv.path / "manifest.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 3
    assert raw["calibration"]["temperature"] == 0.78 and raw["ood"]["threshold"] == -3.5
    assert raw["int8"]["passed"] is True and raw["metrics"]["ece"] == 0.012
    m = reg.get(mv.ref).manifest
    assert m == Manifest.from_dict(raw) and m.to_dict() == raw
    assert m.int8.drop_points == pytest.approx(0.2)
    # a plain version's file has none of these keys, not even as nulls
    plain = json.loads((_publish(reg).path / "manifest.json").read_text())
    assert not {"calibration", "ood", "int8", "ece"} & (set(plain) | set(plain["metrics"]))


def test_unknown_metrics_survive_a_round_trip(tmp_path: Path) -> None:
    raw = json.loads((_publish(Registry(tmp_path)).path / "manifest.json").read_text())
    raw["metrics"]["added_later"] = 0.5
    m = Manifest.from_dict(raw)
    assert m.metrics.extra == {"added_later": 0.5}
    assert m.to_dict()["metrics"]["added_later"] == 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["calibration"].update(temperature=0), "temperature must be positive"),
        (lambda m: m["calibration"].update(temperature="1"), "temperature must be a number"),
        (lambda m: m.pop("ood"), "calibration and ood come together"),
        (lambda m: m["ood"].update(threshold=None), "ood.threshold must be a number"),
        (lambda m: m["int8"].update(passed="yes"), "int8.passed must be true or false"),
        (lambda m: m.update(metrics="high"), "metrics is not an object"),
    ],
)
def test_an_invalid_calibrated_manifest_is_an_integrity_error(tmp_path: Path, change, message):
    reg = Registry(tmp_path)
    mv = reg.publish("seednet", {"weights.safetensors": b"w"}, _calibrated_spec(int8=None))
    raw = json.loads((mv.path / "manifest.json").read_text())
    raw.setdefault(
        "int8",
        {
            "passed": False,
            "fp32_accuracy": 0.9,
            "int8_accuracy": 0.8,
            "test_images": 10,
            "max_drop_points": 0.5,
        },
    )
    change(raw)
    with pytest.raises(IntegrityError, match=message):
        Manifest.from_dict(raw)
