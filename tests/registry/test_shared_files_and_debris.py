"""Files stored once across versions, and leftovers of writers killed mid-write (local).

Real files in tmp_path, real processes killed with SIGKILL (no cleanup handler runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from registry import ConflictError, IntegrityError, Registry
from registry.manifest import SCHEMA_VERSION
from registry.store import SHARE_MIN_BYTES
from tests.registry.test_registry import REPO, _cli, _flip_byte, _spec

BIG_WEIGHTS = os.urandom(SHARE_MIN_BYTES + 123)
BIG_GOLDEN = os.urandom(SHARE_MIN_BYTES * 2)


def _v1_and_calibrated_v2(reg: Registry) -> tuple:
    """seednet@1, then seednet@2: the same weights and golden set plus a new file."""
    v1 = reg.publish(
        "seednet",
        {"weights.safetensors": BIG_WEIGHTS, "golden.safetensors": BIG_GOLDEN, "a.json": b"{}"},
        _spec(0.9),
    )
    v2 = reg.publish(
        "seednet",
        {
            "weights.safetensors": BIG_WEIGHTS,
            "golden.safetensors": BIG_GOLDEN,
            "a.json": b"{}",  # small: copied, sharing would tie versions for nothing
            "calibration.json": b'{"temperature": 1.5}',
        },
        _spec(0.9),
        parent="seednet@1",
        force=True,  # same weights: without it, publish returns seednet@1 (idempotency)
    )
    return v1, v2


def test_a_file_published_again_is_stored_once_and_verified_where_it_lives(
    tmp_path: Path,
) -> None:
    reg = Registry(tmp_path)
    v1, v2 = _v1_and_calibrated_v2(reg)
    files = v2.manifest.files
    assert files["weights.safetensors"].location == "1/weights.safetensors"
    assert files["golden.safetensors"].location == "1/golden.safetensors"
    assert files["a.json"].location is None and files["calibration.json"].location is None
    # One copy on disk: seednet/2 holds only what is new (and its manifest).
    assert sorted(p.name for p in v2.path.iterdir()) == [
        "a.json",
        "calibration.json",
        "manifest.json",
        "manifest.sha256",
    ]
    raw = json.loads((v2.path / "manifest.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 3
    assert raw["files"]["weights.safetensors"]["location"] == "1/weights.safetensors"
    assert "location" not in raw["files"]["a.json"]
    assert "location" not in json.loads((v1.path / "manifest.json").read_text())["files"]

    # Readers find the bytes where they live, checked.
    weights = reg.open_verified(v2, "weights.safetensors")
    assert weights == v1.path / "weights.safetensors" == v2.file("weights.safetensors")
    assert weights.read_bytes() == BIG_WEIGHTS
    assert reg.verify_all() == {"seednet@1": [], "seednet@2": []}
    out = _cli(tmp_path, "verify")
    assert out.returncode == 0 and "OK seednet@2" in out.stdout, out.stdout + out.stderr

    # Damage in the one copy shows in both versions, named where it lives.
    _flip_byte(v1.path / "weights.safetensors")
    [problem] = reg.verify("seednet@2")
    assert problem.startswith("weights.safetensors (stored once, in seednet@1): sha256 mismatch")
    with pytest.raises(IntegrityError, match=r"seednet@2: weights.safetensors .*seednet@1"):
        reg.open_verified(v2, "weights.safetensors")
    out = _cli(tmp_path, "verify", "seednet@2")
    assert out.returncode == 1 and "FAIL seednet@2: weights.safetensors" in out.stdout

    # A version is never tied to damaged bytes: a third publish stores a fresh copy.
    v3 = reg.publish("seednet", {"weights.safetensors": BIG_WEIGHTS}, _spec(), force=True)
    assert v3.manifest.files["weights.safetensors"].location is None
    assert reg.verify(v3) == []


def test_a_version_whose_files_are_shared_cannot_be_deleted_first(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _v1_and_calibrated_v2(reg)
    with pytest.raises(ConflictError) as info:
        reg.delete("seednet", "1")
    message = str(info.value)
    assert "golden.safetensors, weights.safetensors" in message and "seednet@2" in message
    out = _cli(tmp_path, "delete", "seednet", "1")
    assert out.returncode == 1 and "delete seednet@2 first" in out.stderr
    assert reg.verify_all() == {"seednet@1": [], "seednet@2": []}  # nothing was removed

    reg.delete("seednet", "2")
    reg.delete("seednet", "1")
    assert reg.names() == []


def test_sharing_can_be_turned_off_and_old_manifests_keep_schema_2(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.publish("seednet", {"weights.safetensors": BIG_WEIGHTS}, _spec())
    v2 = reg.publish(
        "seednet", {"weights.safetensors": BIG_WEIGHTS}, _spec(), force=True, share=False
    )
    assert (v2.path / "weights.safetensors").read_bytes() == BIG_WEIGHTS
    assert v1.manifest.schema_version == v2.manifest.schema_version == 2
    reg.delete("seednet", "1")  # nothing shared: allowed
    assert reg.verify_all() == {"seednet@2": []}


# ---------------------------------------------------------------- killed writers

_SLOW_DERIVED_WRITER = """
import sys, time
import registry.files as files
from registry import Registry

def slow(src):
    yield b"x" * 100_000
    print("writing", flush=True)
    time.sleep(120)  # killed here, half a file written
    yield b"y"

files._iter_source = slow
reg = Registry({root!r})
reg.add_derived(reg.get("seednet@1"), {{"model.ts": b"ignored"}}, {{}})
"""


def _kill_a_derived_writer_mid_file(root: Path) -> Path:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_DERIVED_WRITER.format(root=str(root))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    [leftover] = (root / "seednet" / "1").glob(".tmp-*")
    assert leftover.name.endswith("-model.ts") and leftover.stat().st_size == 100_000
    return leftover


@pytest.mark.parametrize("cleaner", ["repair", "publish"])
def test_a_killed_export_writer_leaves_debris_that_repair_or_publish_removes(
    tmp_path: Path, cleaner: str
) -> None:
    reg = Registry(tmp_path)
    reg.publish("seednet", {"weights.safetensors": b"w"}, _spec())
    leftover = _kill_a_derived_writer_mid_file(tmp_path)

    assert reg.derived(reg.get("seednet@1")) == {}  # never recorded, never served
    # Its writer is dead and the lock is free: verify says so at once, whatever its age.
    out = _cli(tmp_path, "verify")
    assert out.returncode == 0, out.stdout
    assert f"WARN seednet: seednet/1/{leftover.name}: stray temporary file" in out.stdout
    assert "removed by the next publish or `repair`" in out.stdout

    if cleaner == "repair":
        out = _cli(tmp_path, "repair", "seednet")
        assert out.returncode == 0 and f"removed seednet/1/{leftover.name}" in out.stdout
    else:
        reg.publish("seednet", {"weights.safetensors": b"w2"}, _spec())
    assert not leftover.exists()
    assert reg.check_model("seednet") == ([], [])
    assert all(not problems for problems in reg.verify_all().values())


_KILLED_MATERIALIZE = """
import os, sys
from registry import Registry
from seednet.export import materialize

reg = Registry({root!r})

def killed(*args, **kwargs):  # the exports are built and checked: die before recording
    print("built", flush=True)
    os._exit(9)

reg.add_derived = killed
materialize(reg, reg.get("tiny@1"))
"""


@pytest.mark.slow
def test_a_killed_materialize_leaves_its_scratch_in_the_registry_not_in_tmp(
    tmp_path: Path, tiny_run: Path
) -> None:
    from training.publish import publish_run

    root = tmp_path / "models"
    publish_run(tiny_run, "tiny", root, exports=False)
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MATERIALIZE.format(root=str(root))],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(system_tmp)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 9 and proc.stdout.strip() == "built", proc.stderr
    big = [p for p in system_tmp.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert big == []  # the exports were not built in the system temp folder
    [scratch] = [p for p in (root / "tiny").glob(".tmp-*") if p.is_dir()]
    assert {p.name for p in scratch.iterdir()} >= {"model.ts", "model.onnx"}

    out = _cli(root, "verify")
    assert f"WARN tiny: tiny/{scratch.name}: stray temporary folder" in out.stdout, out.stdout
    out = _cli(root, "repair", "tiny")
    assert out.returncode == 0 and f"removed tiny/{scratch.name}" in out.stdout, out.stderr
    assert not list((root / "tiny").glob(".tmp-*"))
    assert Registry(root).check_model("tiny") == ([], [])


def test_a_live_scratch_folder_is_never_cleaned(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.publish("seednet", {"weights.safetensors": b"w"}, _spec())
    with reg.scratch("seednet") as scratch:
        (scratch / "model.onnx").write_bytes(b"building")
        assert reg.repair("seednet") == []  # its owner lives: nothing removed
        _, warnings = reg.check_model("seednet")
        assert any("in use by a running writer" in w for w in warnings)
        reg.publish("seednet", {"weights.safetensors": b"w2"}, _spec())
        assert (scratch / "model.onnx").read_bytes() == b"building"
    assert not scratch.exists()
    assert reg.check_model("seednet") == ([], [])
