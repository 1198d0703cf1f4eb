"""Tests for the registry package: real files in tmp_path, real threads, processes and CLI runs."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from registry import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    MetadataError,
    ModelVersion,
    NotFoundError,
    Registry,
    StorageError,
    VersionSpec,
)
from registry.manifest import FileEntry, Metrics, ModelInfo, Normalization

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = b"\x00fake-safetensors" * 64


def _spec(acc: float | None = None) -> VersionSpec:
    return VersionSpec(
        model=ModelInfo(architecture="SeedNet", arch="test", config={}),
        class_names=("a", "b"),
        normalization=Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        metrics=Metrics(test_accuracy=acc),
    )


def _publish(reg: Registry, name: str = "seednet", acc: float = 0.9, **kw) -> ModelVersion:
    # The same bytes every time: force=True publishes them as a new version regardless
    # (without it, publish returns the version that already holds these weights).
    files = {"weights.safetensors": WEIGHTS, "summary.json": b'{"ok": true}'}
    return reg.publish(name, files, _spec(acc), **{"force": True, **kw})


def _flip_byte(path: Path, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.registry_cli", "--root", str(root), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _publish_in_process(args: tuple[str, int]) -> list[str]:
    # Module level so the spawn context can import it in the child.
    root, worker = args
    reg = Registry(Path(root))
    return [_publish(reg, acc=worker / 10).version for _ in range(3)]


# ---------------------------------------------------------------- publish and resolve


def test_publish_list_get_promote_rollback(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    assert reg.names() == []
    src = tmp_path / "w.bin"
    src.write_bytes(WEIGHTS)
    v1 = reg.publish("seednet", {"weights.safetensors": src}, _spec(0.8))
    v2 = _publish(reg, parent="seednet@1")
    v3 = _publish(reg)
    assert [v1.version, v2.version, v3.version] == ["1", "2", "3"]
    assert reg.names() == ["seednet"]
    assert [mv.version for mv in reg.versions("seednet")] == ["1", "2", "3"]

    m = reg.get("seednet@2").manifest
    assert (m.name, m.version, m.parent) == ("seednet", "2", "seednet@1")
    assert m.metrics == Metrics(test_accuracy=0.9)
    assert m.created.endswith("+00:00") and m.code_revision
    assert m.files["weights.safetensors"] == FileEntry(
        sha256=hashlib.sha256(WEIGHTS).hexdigest(), size=len(WEIGHTS)
    )
    assert reg.get("seednet@2").file("summary.json").read_bytes() == b'{"ok": true}'
    assert reg.get("seednet@1").manifest.parent is None

    # Bare name: latest until promoted, then production.
    assert reg.get("seednet").version == "3"
    reg.set_alias("seednet", "production", "1")
    assert reg.get("seednet").version == "1"
    reg.set_alias("seednet", "production", "3")
    reg.set_alias("seednet", "production", "3")  # no-op: must not add a rollback step
    reg.set_alias("seednet", "staging", "2")
    assert reg.get("seednet@production").version == "3"
    assert reg.resolve("seednet", "staging").version == "2"
    assert reg.aliases("seednet") == {"production": "3", "staging": "2"}
    assert reg.alias_history("seednet") == {"production": ["1", "3"], "staging": ["2"]}
    on_disk = json.loads((tmp_path / "models/seednet/aliases.json").read_text())
    assert on_disk["aliases"]["production"] == "3"

    assert reg.rollback("seednet") == "1"
    assert reg.get("seednet").version == "1"
    assert reg.alias_history("seednet")["production"] == ["1"]
    with pytest.raises(ConflictError, match="no previous target"):
        reg.rollback("seednet")
    assert reg.verify_all() == {"seednet@1": [], "seednet@2": [], "seednet@3": []}


def test_unknown_references_are_clear(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg)
    with pytest.raises(NotFoundError, match="models: seednet"):
        reg.get("nope")
    with pytest.raises(NotFoundError, match="versions: 1"):
        reg.get("seednet@7")
    with pytest.raises(NotFoundError, match="alias 'staging'"):
        reg.get("seednet@staging")
    with pytest.raises(NotFoundError):
        reg.set_alias("seednet", "production", "2")
    with pytest.raises(NotFoundError):
        reg.set_alias("ghost", "production", "1")
    assert not (tmp_path / "ghost").exists()  # a typo leaves no folder behind
    with pytest.raises(InvalidNameError):
        reg.set_alias("seednet", "42", "1")  # would be ambiguous with a version
    with pytest.raises(NotFoundError, match="not set"):
        reg.rollback("seednet")


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "", ".hidden", "x" * 100, "a..b", "x\n"])
def test_invalid_names_refused_without_side_effects(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "models"
    reg = Registry(root)
    with pytest.raises(InvalidNameError):
        reg.publish(bad, {"w": b"1"}, _spec())
    with pytest.raises(InvalidNameError):
        reg.publish("ok", {bad: b"1"}, _spec())
    with pytest.raises(InvalidNameError):
        reg.get(bad)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_reserved_file_names_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for reserved in ("manifest.json", "exports.json"):
        with pytest.raises(InvalidNameError):
            reg.publish("m", {reserved: b"{}"}, _spec())
    assert list(tmp_path.iterdir()) == []


def test_delete(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for _ in range(3):
        _publish(reg)
    reg.set_alias("seednet", "production", "2")
    with pytest.raises(ConflictError, match="production"):
        reg.delete("seednet", "2")
    reg.delete("seednet", "3")
    assert [mv.version for mv in reg.versions("seednet")] == ["1", "2"]
    assert not (tmp_path / "seednet/3").exists()
    # A deleted number is never handed out again: "3" would then mean two different models.
    assert _publish(reg).version == "4"
    with pytest.raises(NotFoundError):
        reg.delete("seednet", "3")
    with pytest.raises(InvalidNameError):
        reg.delete("seednet", "production")


# ---------------------------------------------------------------- concurrency and crashes


def test_concurrent_thread_publishes_get_distinct_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results.append(_publish(reg, acc=i / 10).version)
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=int) == [str(i) for i in range(1, 9)]
    assert all(not problems for problems in reg.verify_all().values())
    assert len(reg.verify_all()) == 8


def test_concurrent_process_publishes_get_distinct_versions(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        per_worker = pool.map(_publish_in_process, [(str(tmp_path), i) for i in range(4)])
    versions = [v for vs in per_worker for v in vs]
    assert sorted(versions, key=int) == [str(i) for i in range(1, 13)]
    reg = Registry(tmp_path)
    assert all(not problems for problems in reg.verify_all().values())
    assert len(reg.verify_all()) == 12


def test_failed_rename_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path)
    _publish(reg)

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(StorageError, match="disk on fire"):
        _publish(reg)
    monkeypatch.undo()
    assert [mv.version for mv in reg.versions("seednet")] == ["1"]
    assert not list((tmp_path / "seednet").glob(".tmp-*"))
    assert _publish(reg).version == "2"


def test_hard_crash_mid_publish_is_invisible_and_cleaned_up(tmp_path: Path) -> None:
    # A real process dies (no cleanup handlers) after copying, just before the commit rename.
    script = textwrap.dedent(
        f"""
        import os
        from registry import Registry
        from tests.registry.test_registry import _spec
        os.rename = lambda *a: os._exit(3)
        Registry({str(tmp_path)!r}).publish("seednet", {{"w.bin": b"x" * 1000}}, _spec())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60)
    assert proc.returncode == 3
    # its folder and the owner file it held locked
    leftovers = sorted((tmp_path / "seednet").glob(".tmp-*"))
    assert [p.suffix for p in leftovers] == ["", ".owner"]
    assert (leftovers[0] / "w.bin").exists()

    reg = Registry(tmp_path)
    assert reg.names() == []
    with pytest.raises(NotFoundError):
        reg.versions("seednet")
    # Its owner is dead (the kernel dropped its lock): verify says so, the next publish
    # removes it at once, whatever its age.
    _, warnings = reg.check_model("seednet")
    assert len(warnings) == 1 and "stray temporary folder" in warnings[0]
    assert str(tmp_path) not in warnings[0]
    assert _publish(reg).version == "1"
    assert not any(p.exists() for p in leftovers)
    assert reg.verify_all() == {"seednet@1": []}
    assert reg.check_model("seednet") == ([], [])


# ---------------------------------------------------------------- integrity and derived files


def test_corruption_is_reported_and_never_served(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv = _publish(reg)
    assert reg.verify(mv) == []
    assert reg.open_verified(mv, "weights.safetensors") == mv.path / "weights.safetensors"

    _flip_byte(mv.path / "weights.safetensors")
    problems = reg.verify("seednet@1")
    assert len(problems) == 1 and "weights.safetensors" in problems[0]
    assert "sha256" in problems[0]
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        reg.open_verified(mv, "weights.safetensors")
    assert reg.open_verified(mv, "summary.json").exists()  # other files still fine

    (mv.path / "summary.json").write_bytes(b"{}")
    (mv.path / "stray.pt").write_bytes(b"x")
    problems = reg.verify(mv)
    assert any("summary.json: size mismatch" in p for p in problems)
    assert any(p.startswith("stray.pt: unexpected") for p in problems)
    (mv.path / "summary.json").unlink()
    with pytest.raises(IntegrityError, match="summary.json: missing"):
        reg.open_verified(mv, "summary.json")
    with pytest.raises(NotFoundError):
        reg.open_verified(mv, "nothing.bin")
    assert reg.verify_all()["seednet@1"] == reg.verify(mv)


@pytest.mark.parametrize("gone", ["weights.safetensors", "summary.json", "model.onnx"])
def test_verify_reports_a_missing_file(tmp_path: Path, gone: str) -> None:
    """A published or derived file that disappeared is a failure, never skipped."""
    reg = Registry(tmp_path)
    mv = _publish(reg)
    reg.add_derived(mv, {"model.onnx": b"onnx" * 10}, {"opset": 18})
    assert reg.verify(mv) == []
    (mv.path / gone).unlink()
    assert reg.verify(mv) == [f"{gone}: missing"]
    assert reg.verify_all() == {"seednet@1": [f"{gone}: missing"]}
    out = _cli(tmp_path, "verify")
    assert out.returncode == 1, out.stdout
    assert f"FAIL seednet@1: {gone}: missing" in out.stdout


def test_derived_files(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv = _publish(reg)
    assert reg.derived(mv) == {}
    ts = tmp_path / "model.ts"
    ts.write_bytes(b"torchscript" * 10)
    reg.add_derived(mv, {"model.ts": ts}, {"torch": "2.x"})
    reg.add_derived(mv, {"model.onnx": b"onnx" * 10}, {"opset": 18})
    exports = reg.derived(mv)
    assert set(exports["files"]) == {"model.ts", "model.onnx"}  # earlier entries kept
    assert exports["torch"] == "2.x" and exports["opset"] == 18
    assert reg.verify(mv) == []
    assert reg.open_verified(mv, "model.onnx").read_bytes() == b"onnx" * 10

    # Derived files are rebuildable: replacing one is allowed and re-recorded.
    reg.add_derived(mv, {"model.ts": b"rebuilt"}, {})
    assert reg.open_verified(mv, "model.ts").read_bytes() == b"rebuilt"
    assert reg.verify(mv) == []

    _flip_byte(mv.path / "model.onnx")
    problems = reg.verify(mv)
    assert len(problems) == 1 and problems[0].startswith("model.onnx: sha256 mismatch")
    with pytest.raises(IntegrityError, match="model.onnx"):
        reg.open_verified(mv, "model.onnx")

    # Published files stay immutable.
    with pytest.raises(InvalidNameError):
        reg.add_derived(mv, {"weights.safetensors": b"evil"}, {})
    with pytest.raises(InvalidNameError):
        reg.add_derived(mv, {"manifest.json": b"{}"}, {})
    assert reg.open_verified(mv, "weights.safetensors").read_bytes() == WEIGHTS


# ---------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, acc=0.8123)
    _publish(reg, acc=0.9)

    out = _cli(tmp_path, "list")
    assert out.returncode == 0, out.stderr
    assert "81.23%" in out.stdout and "90.00%" in out.stdout
    assert out.stdout.splitlines()[0].split()[:2] == ["NAME", "VERSION"]

    out = _cli(tmp_path, "promote", "seednet", "1")
    assert out.returncode == 0, out.stderr
    assert "production -> 1" in out.stdout
    assert _cli(tmp_path, "promote", "seednet", "2").returncode == 0
    assert reg.aliases("seednet") == {"production": "2"}
    listed = [line.split() for line in _cli(tmp_path, "list").stdout.splitlines()[1:]]
    assert [row[:3] for row in listed] == [["seednet", "1", "-"], ["seednet", "2", "production"]]

    out = _cli(tmp_path, "show", "seednet")
    assert out.returncode == 0, out.stderr
    manifest_text = out.stdout[: out.stdout.index("\naliases:") + 1]
    assert json.loads(manifest_text)["version"] == "2"
    assert "aliases: production" in out.stdout and "derived files: none" in out.stdout

    out = _cli(tmp_path, "rollback", "seednet")
    assert out.returncode == 0, out.stderr
    assert reg.aliases("seednet") == {"production": "1"}
    assert reg.alias_history("seednet") == {"production": ["1"]}

    out = _cli(tmp_path, "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\n")[:2] == ["OK seednet@1", "OK seednet@2"]

    _flip_byte(tmp_path / "seednet/2/weights.safetensors")
    out = _cli(tmp_path, "verify", "seednet@2")
    assert out.returncode == 1
    assert "weights.safetensors" in out.stdout and "seednet@2" in out.stdout
    assert _cli(tmp_path, "verify", "seednet@1").returncode == 0

    out = _cli(tmp_path, "delete", "seednet", "1")
    assert out.returncode == 1 and "production" in out.stderr
    assert _cli(tmp_path, "delete", "seednet", "2").returncode == 0
    assert [mv.version for mv in reg.versions("seednet")] == ["1"]


def test_cli_errors(tmp_path: Path) -> None:
    _publish(Registry(tmp_path))
    out = _cli(tmp_path, "show", "ghost")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "ghost" in lines[0]
    assert "Traceback" not in out.stderr

    out = _cli(tmp_path, "rollback", "seednet")
    assert out.returncode == 1 and out.stderr.startswith("error: ")
    assert _cli(tmp_path, "frobnicate").returncode == 2
    assert _cli(tmp_path / "empty", "list").stdout.startswith("no models")


# ---------------------------------------------------------------- hardening (issue 15)


def test_the_manifest_is_covered_by_its_digest(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv = _publish(reg)
    manifest = mv.path / "manifest.json"
    digest = (mv.path / "manifest.sha256").read_text()
    assert digest == f"{hashlib.sha256(manifest.read_bytes()).hexdigest()}  manifest.json\n"
    assert reg.verify(mv) == [] and reg.warnings(mv) == []

    # One byte of a class name: "a" -> "c". Still a valid manifest, no longer the published one.
    manifest.write_bytes(manifest.read_bytes().replace(b'"a"', b'"c"', 1))
    with pytest.raises(IntegrityError, match="changed after publication"):
        reg.get("seednet@1")
    [listed] = reg.versions("seednet")
    assert listed.problem and "changed after publication" in listed.problem
    assert any("manifest.json" in p for p in reg.verify("seednet@1"))
    out = _cli(tmp_path, "verify")
    assert out.returncode == 1 and "FAIL seednet@1: manifest.json" in out.stdout


def test_seal_adds_the_digest_to_a_legacy_version_without_touching_it(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv = _publish(reg)
    (mv.path / "manifest.sha256").unlink()  # as published before digests existed
    before = (mv.path / "manifest.json").read_bytes()
    legacy = reg.get("seednet@1")
    assert not legacy.sealed and reg.verify(legacy) == []
    out = _cli(tmp_path, "verify")
    assert out.returncode == 0, out.stdout  # a warning, not a failure
    assert "WARN seednet@1: manifest.sha256: missing" in out.stdout

    _flip_byte(mv.path / "summary.json", 0)
    out = _cli(tmp_path, "seal")
    assert out.returncode == 1 and "not sealed" in out.stderr  # a bad version is not blessed
    _flip_byte(mv.path / "summary.json", 0)

    out = _cli(tmp_path, "seal", "seednet@1")
    assert out.returncode == 0 and "sealed seednet@1" in out.stdout
    assert (mv.path / "manifest.json").read_bytes() == before
    assert reg.get("seednet@1").sealed and reg.warnings(mv) == []
    assert "already sealed" in _cli(tmp_path, "seal").stdout


def test_the_committed_models_verify_clean_and_are_unchanged() -> None:
    out = _cli(REPO / "models", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout and "WARN" not in out.stdout, out.stdout
    # Never rewritten (sealing added manifest.sha256 beside them): the committed bytes.
    changed = subprocess.run(
        ["git", "diff", "--name-only", "HEAD", "--"]
        + ["models/*/*/manifest.json", "models/*/*/*.safetensors"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert changed.returncode != 0 or changed.stdout == "", changed.stdout


def test_republishing_the_same_weights_returns_the_existing_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    files = {"weights.safetensors": WEIGHTS, "summary.json": b"{}"}
    first = reg.publish("seednet", files, _spec())
    again = reg.publish("seednet", {**files, "summary.json": b'{"retry": 1}'}, _spec())
    assert (again.version, again.existing, first.existing) == ("1", True, False)
    assert [mv.version for mv in reg.versions("seednet")] == ["1"]
    assert not list((tmp_path / "seednet").glob(".tmp-*"))  # the retry's copy is gone
    forced = reg.publish("seednet", files, _spec(), force=True)
    assert (forced.version, forced.existing) == ("2", False)
    other = reg.publish("seednet", {"weights.safetensors": b"other"}, _spec())
    assert (other.version, other.existing) == ("3", False)

    # Concurrent retries of one run (e.g. a publisher killed after the rename, then
    # retried while the first retry still runs): one version between them.
    reg2 = Registry(tmp_path / "r2")
    results: list[ModelVersion] = []
    threads = [
        threading.Thread(target=lambda: results.append(reg2.publish("m", files, _spec())))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {mv.version for mv in results} == {"1"} and sum(not mv.existing for mv in results) == 1


def test_a_live_publisher_is_never_cleaned_up(tmp_path: Path) -> None:
    """A publisher still copying (its owner lock held) survives another publish's cleanup."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from registry import Registry
        from tests.registry.test_registry import _spec

        def slow():
            yield b"x" * 1000
            print("copying", flush=True)
            time.sleep(3)
            yield b"y"

        import registry.files as f
        f._iter_source = lambda src: slow()
        mv = Registry({str(tmp_path)!r}).publish("seednet", {{"w.bin": b"ignored"}}, _spec())
        print("published", mv.version, flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "copying"
    reg = Registry(tmp_path)
    _, warnings = reg.check_model("seednet")
    assert any("in use by a running writer" in w for w in warnings)
    assert reg.publish("seednet", {"weights.safetensors": b"w"}, _spec()).version == "1"
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "published 2"
    assert reg.verify_all() == {"seednet@1": [], "seednet@2": []}


BAD_ALIASES = {
    "truncated": b'{"aliases": {"production": "1"}, "hist',
    "garbage": b"\x00\xff garbage",
    "a list": b'["production", "1"]',
    "aliases a list": b'{"aliases": [["production", "1"]], "history": {}}',
    "target an object": b'{"aliases": {"production": {"v": 1}}, "history": {}}',
    "history a number": b'{"aliases": {"production": "1"}, "history": {"production": 5}}',
    "bad alias name": b'{"aliases": {"../x": "1"}, "history": {}}',
    "numeric alias": b'{"aliases": {"7": "1"}, "history": {}}',
}


@pytest.mark.parametrize("content", BAD_ALIASES.values(), ids=BAD_ALIASES.keys())
def test_a_corrupt_alias_file_is_diagnosed_and_repaired(tmp_path: Path, content: bytes) -> None:
    reg = Registry(tmp_path)
    _publish(reg)
    _publish(reg)
    reg.set_alias("seednet", "production", "1")
    reg.set_alias("seednet", "production", "2")
    reg.set_alias("seednet", "staging", "1")
    good = (tmp_path / "seednet" / "aliases.json").read_bytes()
    (tmp_path / "seednet" / "aliases.json").write_bytes(content)

    with pytest.raises(MetadataError) as info:
        reg.resolve("seednet", "production")
    message = str(info.value)
    assert "seednet/aliases.json" in message and "repair seednet" in message
    assert str(tmp_path) not in message
    assert reg.get("seednet@1").version == "1"  # versions by number still resolve

    out = _cli(tmp_path, "list")  # still lists, says what is wrong
    assert out.returncode == 0 and "Traceback" not in out.stderr and "aliases.json" in out.stderr
    out = _cli(tmp_path, "verify")
    assert out.returncode == 1 and "FAIL seednet: seednet/aliases.json" in out.stdout
    assert "Traceback" not in out.stderr
    out = _cli(tmp_path, "promote", "seednet", "1")  # refused, one line, nothing written
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "repair" in out.stderr

    out = _cli(tmp_path, "repair", "seednet")
    assert out.returncode == 0, out.stderr
    assert "from aliases.log" in out.stdout and "production -> 2" in out.stdout
    assert json.loads((tmp_path / "seednet" / "aliases.json").read_bytes()) == json.loads(good)
    assert (tmp_path / "seednet" / "aliases.json.corrupt").read_bytes() == content
    assert reg.aliases("seednet") == {"production": "2", "staging": "1"}
    assert reg.rollback("seednet") == "1"  # the history came back too
    assert _cli(tmp_path, "verify").returncode == 0
    assert "nothing to repair" in _cli(tmp_path, "repair", "seednet").stdout


def test_repair_without_a_usable_log_needs_an_explicit_reset(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg)
    reg.set_alias("seednet", "production", "1")
    (tmp_path / "seednet" / "aliases.log").write_text('{"aliases": {"production": "9"}}\n{"tor')
    (tmp_path / "seednet" / "aliases.json").write_text("{")
    out = _cli(tmp_path, "repair", "seednet")
    assert out.returncode == 1 and "--reset" in out.stderr
    out = _cli(tmp_path, "repair", "seednet", "--reset")
    assert out.returncode == 0 and "reset: no aliases" in out.stdout
    assert reg.aliases("seednet") == {}
    reg.set_alias("seednet", "production", "1")

    (tmp_path / "seednet" / "deleted.json").write_text('{"deleted": "x"}')
    assert any("deleted.json" in p for p in reg.check_model("seednet")[0])
    with pytest.raises(MetadataError, match="deleted.json"):
        _publish(reg)  # a number could be reused: refused until repaired
    # The numbers it held are unknown: every gap below the highest number ever seen
    # (aliases.log names 9) counts as deleted.
    out = _cli(tmp_path, "repair", "seednet")
    assert "deleted.json rebuilt: 2, 3, 4, 5, 6, 7, 8, 9" in out.stdout
    assert _publish(reg).version == "10"


def test_a_read_only_registry_fails_cleanly_and_changes_nothing(tmp_path: Path) -> None:
    from tests.conftest import read_only

    root = tmp_path / "models"
    reg = Registry(root)
    _publish(reg)
    _publish(reg)
    reg.set_alias("seednet", "production", "1")
    with read_only(root):
        for action in (
            lambda: reg.set_alias("seednet", "production", "2"),
            lambda: reg.rollback("seednet"),
            lambda: reg.delete("seednet", "2"),
            lambda: _publish(reg),
            lambda: reg.add_derived(reg.get("seednet@1"), {"model.ts": b"x"}, {}),
        ):
            with pytest.raises((StorageError, ConflictError)) as info:
                action()
            assert str(root) not in str(info.value) and str(tmp_path) not in str(info.value)
        with pytest.raises(StorageError, match="cannot write") as info:
            reg.set_alias("seednet", "production", "2")
        assert "Read-only file system" in str(info.value) or "Permission denied" in str(info.value)
        assert reg.aliases("seednet") == {"production": "1"}  # reads still work
    assert reg.aliases("seednet") == {"production": "1"}
    assert [mv.version for mv in reg.versions("seednet")] == ["1", "2"]
