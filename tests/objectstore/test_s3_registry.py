"""The registry on a real S3 API server (moto's, on 127.0.0.1): s3fs, botocore, HTTP.

Everything the local tests prove, over an object store: publish (a really trained tiny
model, exports built), resolve, aliases, history, verify, repair, delete; plus what only
an object store can get wrong: a partial version seen by a reader, two promotes both
winning, a corrupt object served, a dead store hanging the caller.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from registry import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    Registry,
    RegistryError,
    StoreUnavailableError,
)
from registry.store import SHARE_MIN_BYTES
from tests.objectstore.conftest import S3Server, make_bucket
from tests.registry.test_registry import REPO, _spec

WEIGHTS = os.urandom(SHARE_MIN_BYTES + 7)
SECRET = "test-secret-key-never-logged"


def _s3fs(env: dict[str, str]):
    import fsspec

    return fsspec.get_filesystem_class("s3")(
        skip_instance_cache=True, use_listings_cache=False, endpoint_url=env["AWS_ENDPOINT_URL"]
    )


def _objects(env: dict[str, str], root: str) -> list[str]:
    """Every key under ``root``, relative to it."""
    base = root.removeprefix("s3://")
    return sorted(p[len(base) + 1 :] for p in _s3fs(env).find(base))


def _flip_object_byte(env: dict[str, str], root: str, key: str) -> None:
    fs = _s3fs(env)
    path = f"{root.removeprefix('s3://')}/{key}"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def _cli(env: dict[str, str], root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.registry_cli", "--root", root, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _publish(reg: Registry, weights: bytes = WEIGHTS, **kw):
    files = {"weights.safetensors": weights, "summary.json": b'{"ok": true}'}
    return reg.publish("seednet", files, _spec(0.9), **{"force": True, **kw})


# ---------------------------------------------------------------- a trained model


@pytest.mark.slow
def test_a_trained_model_published_to_s3_is_served_from_it(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path, tiny_run: Path, monkeypatch
) -> None:
    from training.publish import publish_run

    monkeypatch.setenv("SEEDNET_REGISTRY_CACHE", str(cache_dir))  # what publish_run uses
    mv = publish_run(tiny_run, "tiny", s3_root, alias="production")
    assert (mv.version, mv.existing) == ("1", False)
    keys = _objects(s3_env, s3_root)
    # The same layout as a local folder (plus nothing: the lease lock is gone).
    for name in ("manifest.json", "manifest.sha256", "weights.safetensors", "golden.safetensors"):
        assert f"tiny/1/{name}" in keys
    assert {"tiny/aliases.json", "tiny/aliases.log", "tiny/1/exports.json"} <= set(keys)
    assert {"tiny/1/model.ts", "tiny/1/model.onnx"} <= set(keys)
    assert not [k for k in keys if k.endswith(".lock") or "/.tmp-" in k]

    reg = Registry(s3_root, cache_dir=cache_dir)
    assert reg.names() == ["tiny"]
    assert reg.get("tiny@production").manifest == mv.manifest
    assert reg.alias_history("tiny") == {"production": ["1"]}
    assert reg.verify_all() == {"tiny@1": []}
    assert reg.check_model("tiny") == ([], [])
    assert publish_run(tiny_run, "tiny", s3_root).existing  # idempotent over S3 too

    # Files are handed out from the local cache, verified; they load as any other.
    from safetensors.torch import load_file

    weights = reg.open_verified(mv, "weights.safetensors")
    assert weights.is_relative_to(cache_dir)
    assert load_file(str(weights)).keys()
    export = reg.open_verified(mv, "model.ts")
    assert export.name == "model.ts" and export.stat().st_size == mv_size(reg, mv, "model.ts")

    # The CLI, pointed at the bucket.
    out = _cli(s3_env, s3_root, "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:3] == ["tiny", "1", "production"]
    out = _cli(s3_env, s3_root, "verify")
    assert out.returncode == 0 and out.stdout.splitlines() == ["OK tiny@1"], out.stdout
    out = _cli(s3_env, s3_root, "show", "tiny@production")
    assert out.returncode == 0 and "derived model.ts: ok" in out.stdout, out.stderr


def mv_size(reg: Registry, mv, filename: str) -> int:
    return reg.derived(mv)["files"][filename]["size"]


# ---------------------------------------------------------------- integrity


def test_a_flipped_byte_in_an_object_is_refused_never_served(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    mv = _publish(reg)
    _flip_object_byte(s3_env, s3_root, "seednet/1/weights.safetensors")

    with pytest.raises(IntegrityError) as info:
        reg.open_verified(mv, "weights.safetensors")
    assert str(info.value).startswith("seednet@1: weights.safetensors: sha256 mismatch")
    assert not list(cache_dir.rglob("weights.safetensors"))  # nothing of it kept
    assert reg.open_verified(mv, "summary.json").read_bytes() == b'{"ok": true}'
    [problem] = reg.verify(mv)
    assert problem.startswith("weights.safetensors: sha256 mismatch")
    out = _cli(s3_env, s3_root, "verify")
    assert out.returncode == 1 and "FAIL seednet@1: weights.safetensors" in out.stdout

    # The manifest is covered by its digest there too.
    fs = _s3fs(s3_env)
    manifest = f"{s3_root.removeprefix('s3://')}/seednet/1/manifest.json"
    fs.pipe_file(manifest, fs.cat_file(manifest).replace(b'"a"', b'"c"', 1))
    with pytest.raises(IntegrityError, match="changed after publication"):
        reg.get("seednet@1")


def test_a_damaged_cache_copy_is_fetched_again(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    mv = _publish(reg)
    cached = reg.open_verified(mv, "weights.safetensors")
    cached.write_bytes(b"tampered on this disk")
    again = reg.open_verified(mv, "weights.safetensors")
    assert again == cached and again.read_bytes() == WEIGHTS


def test_files_are_stored_once_on_s3_and_verified_where_they_live(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    _publish(reg)
    v2 = _publish(reg, parent="seednet@1")
    assert v2.manifest.files["weights.safetensors"].location == "1/weights.safetensors"
    keys = _objects(s3_env, s3_root)
    assert "seednet/2/weights.safetensors" not in keys and "seednet/2/summary.json" in keys
    assert reg.open_verified(v2, "weights.safetensors").read_bytes() == WEIGHTS
    assert reg.verify_all() == {"seednet@1": [], "seednet@2": []}

    _flip_object_byte(s3_env, s3_root, "seednet/1/weights.safetensors")
    [problem] = reg.verify(v2)
    assert problem.startswith("weights.safetensors (stored once, in seednet@1): sha256")
    with pytest.raises(ConflictError, match="delete seednet@2 first"):
        reg.delete("seednet", "1")
    reg.delete("seednet", "2")
    assert "seednet/2/summary.json" not in _objects(s3_env, s3_root)
    reg.delete("seednet", "1")
    assert reg.names() == []


# ---------------------------------------------------------------- aliases


def test_aliases_history_rollback_and_repair_over_s3(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    for _ in range(3):
        _publish(reg, weights=os.urandom(100))
    out = _cli(s3_env, s3_root, "promote", "seednet", "1")
    assert out.returncode == 0 and "production -> 1 (was unset)" in out.stdout, out.stderr
    reg.set_alias("seednet", "production", "3")
    reg.set_alias("seednet", "staging", "2")
    assert reg.get("seednet").version == "3"
    assert reg.alias_history("seednet") == {"production": ["1", "3"], "staging": ["2"]}
    assert _cli(s3_env, s3_root, "rollback", "seednet").returncode == 0
    assert reg.aliases("seednet") == {"production": "1", "staging": "2"}

    with pytest.raises(ConflictError, match="production"):
        reg.delete("seednet", "1")
    reg.delete("seednet", "3")
    assert _publish(reg).version == "4"  # a deleted number is never reused

    # A corrupt aliases.json is restored from the journal.
    fs = _s3fs(s3_env)
    fs.pipe_file(f"{s3_root.removeprefix('s3://')}/seednet/aliases.json", b'{"aliases": [')
    out = _cli(s3_env, s3_root, "verify")
    assert out.returncode == 1 and "FAIL seednet: seednet/aliases.json" in out.stdout
    out = _cli(s3_env, s3_root, "repair", "seednet")
    assert out.returncode == 0 and "from aliases.log" in out.stdout, out.stderr
    assert reg.aliases("seednet") == {"production": "1", "staging": "2"}
    assert "seednet/aliases.json.corrupt" in _objects(s3_env, s3_root)


def test_following_an_alias_costs_a_conditional_get(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    _publish(reg, weights=b"1")
    _publish(reg, weights=b"2")
    empty = reg.alias_state("seednet")
    assert (empty.aliases, empty.token) == ({}, "")
    assert reg.alias_state_if_changed("seednet", empty.token) is None
    reg.set_alias("seednet", "production", "1")
    first = reg.alias_state_if_changed("seednet", empty.token)
    assert first is not None and first.aliases == {"production": "1"} and first.token
    assert reg.alias_state_if_changed("seednet", first.token) is None  # 304: no body
    Registry(s3_root, cache_dir=cache_dir).set_alias("seednet", "production", "2")
    moved = reg.alias_state_if_changed("seednet", first.token)
    assert moved is not None and moved.aliases == {"production": "2"}
    assert moved.token != first.token


def test_two_promotes_from_the_same_state_one_wins(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    for i in range(3):
        _publish(reg, weights=bytes([i]))
    reg.set_alias("seednet", "production", "1")
    seen = reg.alias_state("seednet")
    results: dict[str, BaseException | None] = {}
    barrier = threading.Barrier(2)

    def promote(version: str) -> None:
        mine = Registry(s3_root, cache_dir=cache_dir)
        barrier.wait()
        try:
            mine.set_alias("seednet", "production", version, expected_token=seen.token)
            results[version] = None
        except BaseException as e:
            results[version] = e

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, e in results.items() if e is None]
    losers = [e for e in results.values() if e is not None]
    assert len(winners) == 1 and len(losers) == 1, results
    # refused either before writing (the winner's write came first: "changed since they
    # were read") or by the compare-and-swap of the write itself ("moved while promoting")
    assert isinstance(losers[0], ConflictError) and "nothing was changed" in str(losers[0])
    assert reg.aliases("seednet") == {"production": winners[0]}
    assert reg.alias_history("seednet") == {"production": ["1", winners[0]]}


def _promote_in_process(args: tuple) -> str:
    """Read the aliases, wait until the other process has read them too, then write."""
    root, cache, version, barrier, env = args
    os.environ.update(env)
    import registry.store as store

    read = store.Registry.alias_state

    def read_then_wait(self, name):
        state = read(self, name)
        barrier.wait(timeout=60)  # both have read the same ETag now
        return state

    store.Registry.alias_state = read_then_wait
    try:
        Registry(root, cache_dir=cache).set_alias("seednet", "production", version)
    except ConflictError as e:
        return f"conflict: {e}"
    return "won"


def test_concurrent_promotes_in_two_processes_exactly_one_wins(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    for i in range(3):
        _publish(reg, weights=bytes([i]))
    reg.set_alias("seednet", "production", "1")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        outcomes = pool.map(
            _promote_in_process,
            [(s3_root, str(cache_dir), v, barrier, s3_env) for v in ("2", "3")],
        )
    assert sorted(o.split(":")[0] for o in outcomes) == ["conflict", "won"], outcomes
    loser = next(o for o in outcomes if o.startswith("conflict"))
    assert "moved while promoting 'production'" in loser and "nothing was changed" in loser
    winner = ("2", "3")[outcomes.index("won")]
    assert reg.aliases("seednet") == {"production": winner}
    assert reg.alias_history("seednet") == {"production": ["1", winner]}


# ---------------------------------------------------------------- crashes and outages

_KILLED_PUBLISHER = """
import os, time
from registry import Registry
import registry.objectstore as objectstore
from tests.registry.test_registry import _spec

write_state = objectstore.ObjectStorage.write_state

def stall_at_the_manifest(self, key, data, expected):
    if key.endswith("/manifest.json"):
        print("files uploaded", flush=True)
        time.sleep(300)  # killed here: files uploaded, manifest and digest not
    return write_state(self, key, data, expected)

objectstore.ObjectStorage.write_state = stall_at_the_manifest
reg = Registry({root!r}, cache_dir={cache!r}, lock_lease_s=2)
files = {{"weights.safetensors": os.urandom(70000), "summary.json": b"{{}}"}}
reg.publish("seednet", files, _spec())
"""


def test_a_publisher_killed_mid_publish_leaves_no_visible_version(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUBLISHER.format(root=s3_root, cache=str(cache_dir))],
        cwd=REPO,
        env={**os.environ, **s3_env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "files uploaded"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert {"seednet/1/weights.safetensors", "seednet/.lock"} <= set(_objects(s3_env, s3_root))

    reg = Registry(s3_root, cache_dir=cache_dir)
    assert reg.names() == []  # files without manifest + digest: invisible
    with pytest.raises(NotFoundError):
        reg.get("seednet@1")
    _, warnings = reg.check_model("seednet")
    assert [w.split(":")[0] for w in warnings] == ["seednet/1/"]

    # repair waits out the dead writer's lease (2 s), then removes what it uploaded.
    started = time.monotonic()
    out = _cli(s3_env, s3_root, "repair", "seednet")
    assert out.returncode == 0 and "removed seednet/1/" in out.stdout, out.stdout + out.stderr
    assert time.monotonic() - started < 60
    assert _objects(s3_env, s3_root) == []
    assert reg.check_model("seednet") == ([], [])
    assert _publish(reg).version == "1"  # the number was never visible: free again
    assert reg.verify_all() == {"seednet@1": []}


def test_a_store_that_is_down_is_a_clear_error_not_a_hang(tmp_path: Path, monkeypatch) -> None:
    server = S3Server().start()
    env = server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = f"s3://{make_bucket(env)}/registry"
    reg = Registry(root, cache_dir=tmp_path / "cache")
    mv = _publish(reg)
    reg.set_alias("seednet", "production", "1")
    token = reg.alias_state("seednet").token
    cached = reg.open_verified(mv, "weights.safetensors")
    server.stop()

    for action in (
        reg.names,
        lambda: reg.get("seednet@production"),
        lambda: reg.alias_state_if_changed("seednet", token),
        lambda: reg.set_alias("seednet", "staging", "1"),
        lambda: _publish(reg),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            action()
        assert time.monotonic() - started < 30
        message = str(info.value)
        assert root in message and "unavailable" in message
        assert SECRET not in message and env["AWS_ACCESS_KEY_ID"] not in message
    assert info.value.code == "registry_unavailable"
    assert cached.read_bytes() == WEIGHTS  # what was fetched stays usable

    out = _cli(env, root, "list")
    assert out.returncode == 1 and out.stderr.startswith("error: registry s3://")
    assert "Traceback" not in out.stderr and SECRET not in out.stderr + out.stdout
    assert out.stderr.count("\n") == 1


def test_credentials_are_never_taken_from_the_url() -> None:
    for root in ("s3://key:secret@bucket/models", "s3://user@bucket", "s3://"):
        with pytest.raises(RegistryError, match="environment") as info:
            Registry(root)
        assert "secret" not in str(info.value)
    with pytest.raises(RegistryError, match="unsupported registry root"):
        Registry("gs://bucket/models")


def test_a_file_url_is_the_local_folder(tmp_path: Path) -> None:
    _publish(Registry(f"file://{tmp_path}"))
    local = Registry(tmp_path)
    assert local.names() == ["seednet"] and local.verify_all() == {"seednet@1": []}
    assert json.loads((tmp_path / "seednet/1/manifest.json").read_text())["version"] == "1"
