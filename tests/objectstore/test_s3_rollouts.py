"""Rollout records on a real S3 API server (moto's, on 127.0.0.1): the same compare-and-swap
as the aliases (ETags), a conditional GET to follow them, verify and repair."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from registry import ConflictError, Registry
from registry.rollouts import Step
from tests.objectstore.test_s3_registry import _cli, _objects, _publish, _s3fs

STEPS = (Step("shadow", 50.0), Step("canary", 20.0))


def test_a_rollout_on_s3_is_followed_decided_once_and_repaired(
    s3_env: dict[str, str], s3_root: str, cache_dir: Path
) -> None:
    reg = Registry(s3_root, cache_dir=cache_dir)
    for _ in range(3):
        _publish(reg, weights=os.urandom(100))
    reg.set_alias("seednet", "production", "1")
    empty = reg.rollout_state("seednet")
    assert (empty.rollouts, empty.token) == ((), "")
    assert reg.rollout_state_if_changed("seednet", empty.token) is None

    out = _cli(s3_env, s3_root, "rollout", "start", "seednet@2", "--shadow", "50", "--canary", "20")
    assert out.returncode == 0, out.stderr
    seen = reg.rollout_state_if_changed("seednet", empty.token)
    assert seen is not None and seen.running.steps == STEPS
    assert reg.rollout_state_if_changed("seednet", seen.token) is None  # 304: no body

    # two processes judge the same step at once: one decision is written, the other refused
    results: dict[str, BaseException | None] = {}
    barrier = threading.Barrier(2)

    def decide(action: str) -> None:
        mine = Registry(s3_root, cache_dir=cache_dir)
        barrier.wait()
        try:
            # (the step it judged, as the service's judges pass it: without it an advance
            # then a rollback are two valid decisions in a row, not a race)
            mine.decide_rollout(
                "seednet", seen.running.id, action, f"{action} by a judge", step=seen.running.step
            )
            results[action] = None
        except BaseException as e:
            results[action] = e

    threads = [threading.Thread(target=decide, args=(a,)) for a in ("advance", "rollback")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [a for a, e in results.items() if e is None]
    assert len(winners) == 1, results
    assert all(isinstance(e, ConflictError) for e in results.values() if e is not None), results
    latest = reg.rollout_state("seednet").latest
    assert [d.action for d in latest.decisions] == ["start", winners[0]]
    if latest.running:
        reg.decide_rollout("seednet", latest.id, "promote", "canary passed", {"samples": 9})
        assert reg.aliases("seednet")["production"] == "2"
    else:
        assert reg.aliases("seednet")["production"] == "1"
    note = [e["note"] for e in reg.alias_journal("seednet") if "note" in e][-1]
    assert note["rollout"] == latest.id

    assert _cli(s3_env, s3_root, "verify", "seednet").returncode == 0
    final = reg.rollout_state("seednet").latest
    fs = _s3fs(s3_env)
    fs.pipe_file(f"{s3_root.removeprefix('s3://')}/seednet/rollouts.json", b'{"rollouts": [')
    out = _cli(s3_env, s3_root, "verify", "seednet")
    assert out.returncode == 1 and "FAIL seednet: seednet/rollouts.json" in out.stdout
    out = _cli(s3_env, s3_root, "repair", "seednet")
    assert out.returncode == 0 and "restored from rollouts.log" in out.stdout, out.stderr
    assert reg.rollout_state("seednet").latest == final
    assert "seednet/rollouts.json.corrupt" in _objects(s3_env, s3_root)
