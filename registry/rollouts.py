"""A rollout of a candidate version, as registry state: the record, the rule and the steps.

A rollout moves an alias (``production``) from the version it names now (``stable``) to a
``candidate`` in steps (shadow traffic, then canary shares, then the alias itself), each
step passed only when the live evidence passes a declared :class:`Rule`. The record lives
beside the aliases, in ``<name>/rollouts.json``, written by compare-and-swap like
``aliases.json`` (a local file lock + sha256 token, or an S3 ETag), journalled in
``<name>/rollouts.log``; every serving process reads it, so a rollout survives restarts
and every worker and replica follows the same one. This module is the data and its
rules (stdlib only); :class:`registry.store.Registry` reads and writes it.

::

    {"revision": 7,                       # +1 at every write: what workers report applied
     "rollouts": [                        # oldest first; the last is the current one
       {"id": "...", "model": "seednet", "alias": "production",
        "stable": "1", "candidate": "2",
        "steps": [{"mode": "shadow", "percent": 20}, {"mode": "canary", "percent": 10}],
        "rule": {"min_samples": 500, ...}, "state": "running", "step": 0,
        "checked": false, "started": ..., "step_started": ..., "finished": null,
        "decisions": [{"time", "step", "action", "reason", "evidence", "by"}, ...]}]}
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from registry.errors import InvalidRolloutError, MetadataError

ROLLOUTS = "rollouts.json"
ROLLOUTS_LOG = "rollouts.log"
MODES = ("shadow", "canary")
RUNNING = "running"
STATES = (RUNNING, "promoted", "rolled_back", "aborted")
#: What a decision does: the check set passed, the next step, the alias moved, the
#: candidate dropped (by the rule, or by a person).
ACTIONS = ("start", "check", "advance", "promote", "rollback", "abort")
#: Finished rollouts kept in rollouts.json (rollouts.log keeps every record ever written).
KEEP_FINISHED = 50


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _number(value: object, what: str, low: float, high: float, integer: bool = False) -> float:
    """``value`` as a number within [low, high] (InvalidRolloutError naming ``what``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer and not float(value).is_integer():
        ok = False
    if not ok or not math.isfinite(float(value)) or not low <= float(value) <= high:
        kind = "a whole number" if integer else "a number"
        raise InvalidRolloutError(f"{what} must be {kind} from {low:g} to {high:g}, got {value!r}")
    return int(value) if integer else float(value)


def _fields(data: object, allowed: Sequence[str], what: str) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise InvalidRolloutError(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidRolloutError(
            f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(allowed)}"
        )
    return data


@dataclass(frozen=True)
class Step:
    """One stage before the alias moves: ``shadow`` (the candidate also runs on that share
    of requests, off the request path; clients get the stable answer) or ``canary`` (the
    candidate answers that share)."""

    mode: str
    percent: float

    @classmethod
    def from_dict(cls, data: object, where: str = "step") -> Step:
        d = _fields(data, ("mode", "percent"), where)
        mode = d.get("mode")
        if mode not in MODES:
            raise InvalidRolloutError(
                f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}"
            )
        # a canary of 100 % is the promote itself: the last step is always the alias move
        high = 100.0 if mode == "shadow" else 99.0
        percent = _number(d.get("percent"), f"{where}: {mode} percent", 1, high)
        return cls(str(mode), percent)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "percent": self.percent}

    def __str__(self) -> str:
        return f"{self.mode} {self.percent:g}%"


def parse_steps(shadow: float | None, then: Sequence[tuple[str, str]]) -> tuple[Step, ...]:
    """Steps from the CLI's words: ``--shadow 20 --then canary 10,50`` ->
    shadow 20 %, canary 10 %, canary 50 %."""
    raw: list[dict] = []
    if shadow is not None:
        raw.append({"mode": "shadow", "percent": shadow})
    for mode, percents in then:
        for word in str(percents).split(","):
            try:
                value: object = float(word.strip().rstrip("%"))
            except ValueError:
                value = word.strip()
            raw.append({"mode": mode, "percent": value})
    return validate_steps(raw)


def validate_steps(raw: object) -> tuple[Step, ...]:
    """Steps in order: shadow steps first, then canary shares that grow."""
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise InvalidRolloutError(
            "a rollout needs at least one step, e.g. shadow 20 then canary 10,50 "
            "(the alias moves after the last step passes)"
        )
    if len(raw) > 20:
        raise InvalidRolloutError(f"a rollout has at most 20 steps, got {len(raw)}")
    steps = tuple(Step.from_dict(s, f"step {i + 1}") for i, s in enumerate(raw))
    canary = [s.percent for s in steps if s.mode == "canary"]
    first_canary = next((i for i, s in enumerate(steps) if s.mode == "canary"), len(steps))
    if any(s.mode == "shadow" for s in steps[first_canary:]):
        raise InvalidRolloutError("shadow steps come before canary steps")
    if any(b <= a for a, b in zip(canary, canary[1:], strict=False)):
        shares = ", ".join(f"{p:g}" for p in canary)
        raise InvalidRolloutError(f"canary shares must grow from step to step, got {shares}")
    return steps


@dataclass(frozen=True)
class CheckSet:
    """A labelled image folder (``<class name>/<image>``, e.g. a slice of the test set)
    on the serving host; the service computes the candidate's accuracy on it before any
    traffic reaches the candidate."""

    folder: str
    min_accuracy: float
    per_class: int = 50

    @classmethod
    def from_dict(cls, data: object) -> CheckSet:
        d = _fields(data, ("folder", "min_accuracy", "per_class"), "rule.check")
        folder = d.get("folder")
        if not isinstance(folder, str) or not folder.strip():
            raise InvalidRolloutError("rule.check.folder must name a folder of labelled images")
        return cls(
            folder=folder,
            min_accuracy=_number(d.get("min_accuracy"), "rule.check.min_accuracy", 0, 1),
            per_class=_number(d.get("per_class", 50), "rule.check.per_class", 1, 10_000, True),
        )

    def to_dict(self) -> dict:
        return {
            "folder": self.folder,
            "min_accuracy": self.min_accuracy,
            "per_class": self.per_class,
        }


@dataclass(frozen=True)
class Rule:
    """What the evidence of a step must show for the rollout to go on.

    Judged once the step has ``min_samples`` candidate samples (images compared in a
    shadow step, images the candidate answered in a canary step): the candidate's error
    rate at most ``max_error_rate_increase`` above stable's, (canary steps) its p99 model
    time at most ``max_p99_ratio`` times stable's, and (shadow steps) its top-1 agreement
    with stable at least ``min_agreement``. A step that has not gathered its samples after
    ``max_step_s`` (when set) fails too. ``check``: see :class:`CheckSet`.
    """

    min_samples: int = 500
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 1.5
    min_agreement: float = 0.9
    max_step_s: float | None = None
    check: CheckSet | None = None

    FIELDS = (
        "min_samples",
        "max_error_rate_increase",
        "max_p99_ratio",
        "min_agreement",
        "max_step_s",
        "check",
    )

    @classmethod
    def from_dict(cls, data: object) -> Rule:
        d = _fields(data if data is not None else {}, cls.FIELDS, "rule")
        base = cls()
        step_s = d.get("max_step_s")
        return cls(
            min_samples=_number(
                d.get("min_samples", base.min_samples), "rule.min_samples", 1, 10**9, True
            ),
            max_error_rate_increase=_number(
                d.get("max_error_rate_increase", base.max_error_rate_increase),
                "rule.max_error_rate_increase",
                0,
                1,
            ),
            max_p99_ratio=_number(
                d.get("max_p99_ratio", base.max_p99_ratio), "rule.max_p99_ratio", 1, 1000
            ),
            min_agreement=_number(
                d.get("min_agreement", base.min_agreement), "rule.min_agreement", 0, 1
            ),
            max_step_s=None if step_s is None else _number(step_s, "rule.max_step_s", 1, 10**8),
            check=None if d.get("check") is None else CheckSet.from_dict(d["check"]),
        )

    def to_dict(self) -> dict:
        out: dict = {
            "min_samples": self.min_samples,
            "max_error_rate_increase": self.max_error_rate_increase,
            "max_p99_ratio": self.max_p99_ratio,
            "min_agreement": self.min_agreement,
            "max_step_s": self.max_step_s,
        }
        if self.check is not None:
            out["check"] = self.check.to_dict()
        return out


@dataclass(frozen=True)
class Decision:
    """One decision of a rollout, with the evidence it was taken on."""

    time: str
    step: int
    action: str
    reason: str
    evidence: dict = field(default_factory=dict)
    by: str = ""

    def to_dict(self) -> dict:
        return {
            "time": self.time,
            "step": self.step,
            "action": self.action,
            "reason": self.reason,
            "evidence": self.evidence,
            "by": self.by,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Decision:
        if d.get("action") not in ACTIONS:
            raise ValueError(f"unknown action {d.get('action')!r}")
        evidence = d.get("evidence") or {}
        if not isinstance(evidence, dict):
            raise ValueError("evidence is not an object")
        return cls(
            str(d["time"]), int(d["step"]), str(d["action"]), str(d.get("reason", "")),
            evidence, str(d.get("by", "")),
        )  # fmt: skip


@dataclass(frozen=True)
class Rollout:
    """One rollout (see the module docstring). Changes return a new record."""

    id: str
    model: str
    alias: str
    stable: str
    candidate: str
    steps: tuple[Step, ...]
    rule: Rule
    state: str = RUNNING
    step: int = 0
    checked: bool = False
    started: str = ""
    step_started: str = ""
    finished: str | None = None
    decisions: tuple[Decision, ...] = ()

    @classmethod
    def new(
        cls,
        model: str,
        alias: str,
        stable: str,
        candidate: str,
        steps: tuple[Step, ...],
        rule: Rule,
        by: str = "",
    ) -> Rollout:
        now = now_iso()
        rollout_id = f"{now.replace(':', '').replace('-', '')[:15]}-{secrets.token_hex(3)}"
        start = Decision(
            now, 0, "start",
            f"{model}@{candidate} against {alias} -> {stable}: "
            + ", ".join(map(str, steps)) + ", then the alias",
            {"rule": rule.to_dict()}, by,
        )  # fmt: skip
        return cls(
            rollout_id, model, alias, stable, candidate, steps, rule,
            checked=rule.check is None, started=now, step_started=now, decisions=(start,),
        )  # fmt: skip

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def current_step(self) -> Step | None:
        """The step in force (None once finished)."""
        return self.steps[self.step] if self.running and self.step < len(self.steps) else None

    @property
    def serves_traffic(self) -> bool:
        """Whether the candidate gets traffic now (not before its check set passed)."""
        return self.running and self.checked

    def decided(
        self, action: str, reason: str, evidence: dict | None = None, by: str = ""
    ) -> Rollout:
        """This rollout after ``action`` (see :data:`ACTIONS`), with the decision recorded."""
        if not self.running:
            raise InvalidRolloutError(f"rollout {self.id} is {self.state}, not running")
        now = now_iso()
        decision = Decision(now, self.step, action, reason, evidence or {}, by)
        changed = replace(self, decisions=(*self.decisions, decision))
        if action == "check":
            return replace(changed, checked=True)
        if action == "advance":
            if self.step + 1 >= len(self.steps):
                raise InvalidRolloutError("the last step is followed by the promote, not a step")
            return replace(changed, step=self.step + 1, step_started=now)
        states = {"promote": "promoted", "rollback": "rolled_back", "abort": "aborted"}
        if action not in states:
            raise InvalidRolloutError(f"unknown decision {action!r}")
        return replace(changed, state=states[action], finished=now)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "alias": self.alias,
            "stable": self.stable,
            "candidate": self.candidate,
            "steps": [s.to_dict() for s in self.steps],
            "rule": self.rule.to_dict(),
            "state": self.state,
            "step": self.step,
            "checked": self.checked,
            "started": self.started,
            "step_started": self.step_started,
            "finished": self.finished,
            "decisions": [d.to_dict() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: object, where: str) -> Rollout:
        """A record as stored; MetadataError naming ``where`` if it is not one."""
        try:
            if not isinstance(d, Mapping):
                raise ValueError("not an object")
            rollout = cls(
                id=str(d["id"]),
                model=str(d["model"]),
                alias=str(d["alias"]),
                stable=str(d["stable"]),
                candidate=str(d["candidate"]),
                steps=validate_steps(d["steps"]),
                rule=Rule.from_dict(d["rule"]),
                state=str(d["state"]),
                step=int(d["step"]),
                checked=bool(d["checked"]),
                started=str(d.get("started") or ""),
                step_started=str(d.get("step_started") or ""),
                finished=None if d.get("finished") is None else str(d["finished"]),
                decisions=tuple(Decision.from_dict(x) for x in d.get("decisions") or ()),
            )
        except (KeyError, TypeError, ValueError, InvalidRolloutError) as e:
            raise MetadataError(f"{where}: a rollout record is malformed ({e})") from e
        if rollout.state not in STATES or not 0 <= rollout.step < len(rollout.steps):
            raise MetadataError(
                f"{where}: rollout {rollout.id} has state {rollout.state!r}, step {rollout.step}"
            )
        if not (rollout.stable.isdigit() and rollout.candidate.isdigit()):
            raise MetadataError(f"{where}: rollout {rollout.id} names a version that is no number")
        return rollout


@dataclass(frozen=True)
class RolloutState:
    """A model's rollouts.json: every kept rollout (oldest first), the revision and the
    compare-and-swap token (see :class:`registry.store.AliasState`)."""

    rollouts: tuple[Rollout, ...]
    revision: int
    token: str

    @property
    def latest(self) -> Rollout | None:
        return self.rollouts[-1] if self.rollouts else None

    @property
    def running(self) -> Rollout | None:
        """The rollout in progress, if any (at most one per model)."""
        latest = self.latest
        return latest if latest is not None and latest.running else None

    def to_dict(self) -> dict:
        return {"revision": self.revision, "rollouts": [r.to_dict() for r in self.rollouts]}

    def with_latest(self, rollout: Rollout) -> tuple[Rollout, ...]:
        """The kept rollouts with ``rollout`` replacing (same id) or following the latest."""
        kept = list(self.rollouts)
        if kept and kept[-1].id == rollout.id:
            kept[-1] = rollout
        else:
            kept.append(rollout)
        return tuple(kept[-KEEP_FINISHED:])


def parse_rollouts(data: object, where: str, token: str) -> RolloutState:
    """rollouts.json's content -> :class:`RolloutState`; MetadataError if it is odd."""
    if not isinstance(data, Mapping) or not isinstance(data.get("rollouts"), list):
        raise MetadataError(f"{where} is not {{'revision': N, 'rollouts': [...]}}")
    revision = data.get("revision", 0)
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise MetadataError(f"{where}: revision must be a whole number, got {revision!r}")
    rollouts = tuple(Rollout.from_dict(r, where) for r in data["rollouts"])
    if any(r.running for r in rollouts[:-1]):
        raise MetadataError(f"{where}: only the latest rollout may be running")
    return RolloutState(rollouts, revision, token)
