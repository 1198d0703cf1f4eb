"""Rollouts as registry state (registry.rollouts): the record, its compare-and-swap, the
decisions in the alias journal, verify and repair, and the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import ConflictError, InvalidRolloutError, MetadataError, NotFoundError, Registry
from registry.rollouts import Rule, Step, parse_steps, validate_steps
from tests.registry.test_registry import _cli, _publish

STEPS = (Step("shadow", 20.0), Step("canary", 10.0), Step("canary", 50.0))


def three_versions(root: Path) -> Registry:
    reg = Registry(root)
    for _ in range(3):
        _publish(reg)
    reg.set_alias("seednet", "production", "1")
    return reg


def files_of(root: Path) -> dict[str, bytes]:
    """Every registry file of the model but the logs: what a refused command must not touch."""
    return {
        p.name: p.read_bytes()
        for p in (root / "seednet").iterdir()
        if p.is_file() and p.suffix == ".json"
    }


def test_a_rollout_goes_through_its_steps_and_the_promote_moves_the_alias(tmp_path) -> None:
    reg = three_versions(tmp_path)
    rollout = reg.start_rollout("seednet", "2", STEPS, Rule(min_samples=10), by="test")
    state = reg.rollout_state("seednet")
    assert state.running == rollout and state.revision == 1
    assert (rollout.stable, rollout.candidate, rollout.step, rollout.checked) == ("1", "2", 0, True)
    assert reg.rollout_state_if_changed("seednet", state.token) is None  # nothing new to read

    evidence = {"agreement": 0.97, "samples": 10}
    after = reg.decide_rollout("seednet", rollout.id, "advance", "agreement 0.97", evidence)
    assert after.step == 1 and after.current_step == Step("canary", 10.0)
    changed = reg.rollout_state_if_changed("seednet", state.token)
    assert changed is not None and changed.revision == 2
    reg.decide_rollout("seednet", rollout.id, "advance", "canary 10 % passed")
    assert reg.aliases("seednet") == {"production": "1"}  # steps never move the alias
    done = reg.decide_rollout("seednet", rollout.id, "promote", "canary 50 % passed", evidence)
    assert done.state == "promoted" and done.finished
    assert reg.aliases("seednet") == {"production": "2"}
    assert reg.alias_history("seednet")["production"] == ["1", "2"]
    assert reg.rollout_state("seednet").running is None

    # every decision is in the alias journal, with its evidence
    notes = [e["note"] for e in reg.alias_journal("seednet") if "note" in e]
    assert [n["action"] for n in notes] == ["start", "advance", "advance", "promote"]
    assert notes[1]["evidence"] == evidence and notes[1]["rollout"] == rollout.id
    promote = next(
        e for e in reg.alias_journal("seednet") if e.get("note", {}).get("action") == "promote"
    )
    assert promote["aliases"] == {"production": "2"}  # the move and its reason, one entry
    assert [d.action for d in done.decisions] == ["start", "advance", "advance", "promote"]

    out = _cli(tmp_path, "rollout", "status", "seednet")
    assert out.returncode == 0, out.stderr
    assert f"rollout {rollout.id} promoted" in out.stdout and "agreement 0.97" in out.stdout


def test_two_processes_judging_the_same_step_write_one_decision(tmp_path) -> None:
    """Two workers (or replicas) that judged step 1 both try to advance it; one advance
    is written and the other is refused, so no step is skipped; the check set likewise."""
    reg = three_versions(tmp_path)
    check = {"folder": "/data/test", "min_accuracy": 0.5}
    rollout = reg.start_rollout("seednet", "2", STEPS, Rule.from_dict({"check": check}))
    assert not rollout.checked
    reg.decide_rollout("seednet", rollout.id, "check", "accuracy 0.9", by="a", step=0)
    with pytest.raises(ConflictError, match="passed already"):
        reg.decide_rollout("seednet", rollout.id, "check", "accuracy 0.9", by="b", step=0)
    reg.decide_rollout("seednet", rollout.id, "advance", "passed", by="a", step=0)
    before = files_of(tmp_path)
    with pytest.raises(ConflictError, match="at step 2, not 1"):
        reg.decide_rollout("seednet", rollout.id, "advance", "passed", by="b", step=0)
    assert files_of(tmp_path) == before
    running = reg.rollout_state("seednet").running
    assert running is not None and running.step == 1
    assert [d.action for d in running.decisions] == ["start", "check", "advance"]


def test_a_rollback_drops_the_candidate_and_leaves_the_alias(tmp_path) -> None:
    reg = three_versions(tmp_path)
    rollout = reg.start_rollout("seednet", "3", STEPS[:1], Rule())
    aliases = (tmp_path / "seednet/aliases.json").read_bytes()
    done = reg.decide_rollout("seednet", rollout.id, "rollback", "agreement 0.02 < 0.9", {"a": 1})
    assert done.state == "rolled_back"
    assert (tmp_path / "seednet/aliases.json").read_bytes() == aliases
    note = [e["note"] for e in reg.alias_journal("seednet") if "note" in e][-1]
    assert note["action"] == "rollback" and note["reason"] == "agreement 0.02 < 0.9"
    # a decided rollout takes no more decisions: whoever comes second changes nothing
    before = files_of(tmp_path)
    with pytest.raises(ConflictError, match="not running"):
        reg.decide_rollout("seednet", rollout.id, "promote", "late")
    assert files_of(tmp_path) == before
    # and the next rollout may start
    assert reg.start_rollout("seednet", "2", STEPS, Rule()).running


def test_a_promote_interrupted_between_its_two_writes_is_finished_by_the_next_reader(
    tmp_path, monkeypatch
) -> None:
    reg = three_versions(tmp_path)
    rollout = reg.start_rollout("seednet", "2", STEPS[:1], Rule())

    def dies(*args, **kwargs):
        raise OSError("the process died here")

    monkeypatch.setattr(Registry, "set_alias", dies)
    with pytest.raises(OSError):
        reg.decide_rollout("seednet", rollout.id, "promote", "passed")
    monkeypatch.undo()
    reread = Registry(tmp_path)  # a restarted process
    latest = reread.rollout_state("seednet").latest
    assert latest.state == "promoted" and reread.aliases("seednet")["production"] == "1"
    assert reread.finish_promotion("seednet", latest) is True
    assert reread.aliases("seednet")["production"] == "2"
    assert reread.finish_promotion("seednet", latest) is False  # idempotent


def test_the_alias_of_a_running_rollout_moves_only_through_it(tmp_path) -> None:
    reg = three_versions(tmp_path)
    rollout = reg.start_rollout("seednet", "2", STEPS, Rule())
    for move in (
        lambda: reg.set_alias("seednet", "production", "3"),
        lambda: reg.rollback("seednet"),
        lambda: reg.delete("seednet", "2"),
    ):
        before = files_of(tmp_path)
        with pytest.raises(ConflictError, match=rollout.id):
            move()
        assert files_of(tmp_path) == before
    reg.set_alias("seednet", "staging", "3")  # another alias is free to move
    reg.abort_rollout("seednet", "changed my mind")
    reg.set_alias("seednet", "production", "3")
    assert reg.aliases("seednet")["production"] == "3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ghost@2", "--shadow", "20"], "model 'ghost' not found"),
        (["seednet@9", "--shadow", "20"], "version 9 of 'seednet' not found"),
        (["seednet@1", "--shadow", "20"], "names already"),
        (["seednet", "--shadow", "20"], "name the candidate version"),
        (["seednet@2", "--alias", "staging", "--shadow", "20"], "alias 'staging'"),
        (["seednet@2"], "at least one step"),
        (["seednet@2", "--canary", "100"], "from 1 to 99"),
        (["seednet@2", "--canary", "0"], "from 1 to 99"),
        (["seednet@2", "--shadow", "120"], "from 1 to 100"),
        (["seednet@2", "--canary", "50,10"], "must grow"),
        (["seednet@2", "--canary", "10", "--then", "shadow", "5"], "shadow steps come before"),
        (["seednet@2", "--then", "mirror", "5"], "--then takes a mode"),
        (["seednet@2", "--canary", "ten"], "must be a number"),
        (["seednet@2", "--shadow", "20", "--rule", "missing.json"], "cannot read the rule"),
        (["seednet@2", "--shadow", "20", "--rule", "{not json"], "is not JSON"),
        (["seednet@2", "--shadow", "20", "--rule", '{"min_agreemnt": 0.9}'], "'min_agreemnt'"),
        (["seednet@2", "--shadow", "20", "--rule", '{"min_agreement": 2}'], "from 0 to 1"),
        (["seednet@2", "--shadow", "20", "--rule", '{"min_samples": 0.5}'], "whole number"),
        (["seednet@2", "--shadow", "20", "--rule", '{"check": {"min_accuracy": 0.5}}'], "folder"),
    ],
)
def test_every_invalid_start_is_a_clear_cli_error_that_changes_nothing(
    tmp_path, args, message
) -> None:
    three_versions(tmp_path / "reg")
    if "--rule" in args:  # the rule's text goes into a file named by the argument
        i = args.index("--rule") + 1
        if args[i] != "missing.json":
            (tmp_path / "rule.json").write_text(args[i])
            args = [*args[:i], str(tmp_path / "rule.json"), *args[i + 1 :]]
    before = files_of(tmp_path / "reg")
    out = _cli(tmp_path / "reg", "rollout", "start", *args)
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert files_of(tmp_path / "reg") == before
    assert not (tmp_path / "reg/seednet/rollouts.json").exists()


def test_the_cli_starts_shows_and_aborts_and_refuses_what_does_not_apply(tmp_path) -> None:
    reg = three_versions(tmp_path)
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"min_samples": 300, "min_agreement": 0.8}))
    out = _cli(tmp_path, "rollout", "start", "seednet@2", "--shadow", "20", "--then", "canary",
               "10,50", "--rule", str(rule))  # fmt: skip
    assert out.returncode == 0, out.stderr
    running = reg.rollout_state("seednet").running
    assert running.steps == STEPS and running.rule == Rule(min_samples=300, min_agreement=0.8)
    assert "shadow 20% (now), canary 10%, canary 50%, then production -> 2" in out.stdout

    before = files_of(tmp_path)
    again = _cli(tmp_path, "rollout", "start", "seednet@3", "--canary", "10")
    assert again.returncode == 1 and "running already" in again.stderr
    promote = _cli(tmp_path, "promote", "seednet", "3")
    assert promote.returncode == 1 and "rollout abort seednet" in promote.stderr
    assert files_of(tmp_path) == before

    status = _cli(tmp_path, "rollout", "status", "--json")
    assert json.loads(status.stdout)["seednet"]["rollouts"][0]["id"] == running.id
    out = _cli(tmp_path, "rollout", "abort", "seednet", "--reason", "not today")
    assert out.returncode == 0, out.stderr
    assert "production stays at seednet@1" in out.stdout
    latest = reg.rollout_state("seednet").latest
    assert latest.state == "aborted" and latest.decisions[-1].reason == "not today"

    before = files_of(tmp_path)
    out = _cli(tmp_path, "rollout", "abort", "seednet")
    assert out.returncode == 1 and "no rollout of 'seednet' is running" in out.stderr
    assert _cli(tmp_path, "rollout", "frobnicate").returncode == 2  # usage error
    assert _cli(tmp_path, "rollout", "start", "seednet@2", "--shadow").returncode == 2
    assert files_of(tmp_path) == before


def test_verify_checks_the_record_and_repair_restores_it_from_the_log(tmp_path) -> None:
    reg = three_versions(tmp_path)
    rollout = reg.start_rollout("seednet", "2", STEPS, Rule())
    reg.decide_rollout("seednet", rollout.id, "advance", "shadow passed")
    assert _cli(tmp_path, "verify", "seednet").returncode == 0

    record = tmp_path / "seednet/rollouts.json"
    good = record.read_bytes()
    record.write_bytes(good[: len(good) // 2])  # torn
    with pytest.raises(MetadataError, match="repair seednet"):
        reg.rollout_state("seednet")
    out = _cli(tmp_path, "verify", "seednet")
    assert out.returncode == 1 and "FAIL seednet: seednet/rollouts.json" in out.stdout
    out = _cli(tmp_path, "repair", "seednet")
    assert out.returncode == 0, out.stderr
    assert "rollouts.json restored from rollouts.log: 1 rollout(s)" in out.stdout
    restored = reg.rollout_state("seednet").running
    assert restored.id == rollout.id and restored.step == 1
    assert (tmp_path / "seednet/rollouts.json.corrupt").exists()

    # a running rollout whose candidate vanished (a folder removed by hand)
    (tmp_path / "seednet/2/manifest.json").unlink()
    out = _cli(tmp_path, "verify", "seednet")
    assert out.returncode == 1
    assert f"running rollout {rollout.id}: its candidate seednet@2 does not exist" in out.stdout


def test_the_record_is_checked_when_read() -> None:
    with pytest.raises(InvalidRolloutError, match="canary shares must grow"):
        parse_steps(None, [("canary", "10,10")])
    assert validate_steps([{"mode": "shadow", "percent": 100}]) == (Step("shadow", 100.0),)
    with pytest.raises(InvalidRolloutError, match="unknown field"):
        validate_steps([{"mode": "canary", "percent": 5, "pct": 5}])
    rule = Rule.from_dict({"check": {"folder": "/data/test", "min_accuracy": 0.6}})
    assert rule.check.per_class == 50 and Rule.from_dict(rule.to_dict()) == rule


def test_unknown_models_are_not_found(tmp_path) -> None:
    reg = three_versions(tmp_path)
    with pytest.raises(NotFoundError):
        reg.start_rollout("ghost", "2", STEPS, Rule())
    assert reg.rollout_state("seednet").rollouts == ()
