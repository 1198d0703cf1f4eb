"""A serving process's side of a rollout: follow the record, hold the candidate, judge.

The rollout itself is registry state (``registry.rollouts``: ``<name>/rollouts.json``),
so every worker of every replica that serves the rollout's alias runs one
:class:`RolloutController`, which

- follows the record with one conditional read per check (``SEEDNET_ROLLOUT_POLL_S``,
  and at once when a sibling worker signals a change, ``service.lifecycle.siblings``);
- applies it: loads the candidate beside the serving model (``ModelHost.open_candidate``),
  computes its accuracy on the rule's check set before it gets any traffic, hands the
  data plane the step's split (``service.dataplane.traffic``), drops the candidate when
  the rollout ends, and serves it when it was promoted (no second load);
- judges: every check it reads the step's evidence from the metrics (all workers of
  the host, since the step began; ``service.lifecycle.judge``) and, once the rule has
  its samples, writes the decision (next step, promote, or rollback) with the evidence.
  A decision is a compare-and-swap of the record: when two processes judge the same
  step, one decision is written and the other process just applies it.

A process restarted in the middle reads the record like any other and carries on from
the step it says (the evidence of that step starts again from zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import datetime, timezone

from registry import Registry
from registry.errors import ConflictError, RegistryError, StorageError
from registry.rollouts import Rollout, RolloutState, Rule, Step
from service.config import Settings
from service.dataplane.images import ImageLimits
from service.dataplane.inference import DataPlane
from service.dataplane.shadow import ShadowLane
from service.dataplane.traffic import NO_SPLIT, Split
from service.lifecycle.checkset import accuracy, load_check_set
from service.lifecycle.host import ModelHost
from service.lifecycle.judge import Counts, evidence_of, judge, read_counts
from service.lifecycle.siblings import Siblings
from service.metrics import Metrics

log = logging.getLogger("seednet.rollout")


def _seconds_since(iso: str) -> float:
    try:
        started = datetime.fromisoformat(iso)
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(timezone.utc) - started).total_seconds())


class RolloutController:
    """This process's part in its model's rollouts (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        metrics: Metrics,
        host: ModelHost,
        plane: DataPlane,
        shadow: ShadowLane,
        siblings: Siblings,
        limits: ImageLimits,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.host = host
        self.plane = plane
        self.shadow = shadow
        self.siblings = siblings
        self.limits = limits
        self.state: RolloutState | None = None  # the record as last applied
        self.check_now = asyncio.Event()
        self.by = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = asyncio.Lock()
        self._baseline: tuple[str, int, Counts] | None = None  # (rollout, step, counts)
        self._token: str | None = None

    # -- what this process follows

    def _mine(self, rollout: Rollout | None) -> bool:
        s = self.settings
        return rollout is not None and (rollout.model, rollout.alias) == (
            s.model_name,
            s.model_ref,
        )

    @property
    def rollout(self) -> Rollout | None:
        """The latest rollout of the served alias (running or finished), if any."""
        latest = self.state.latest if self.state is not None else None
        return latest if self._mine(latest) else None

    # -- following

    async def follow(self, every: float) -> None:
        """Read the record every ``every`` s (or when signalled), apply it, judge."""
        unreachable = False
        while True:
            try:
                await self.refresh(full=self._token is None)
                await self.judge_now()
                if unreachable:
                    log.info("the registry answers again; following the rollouts")
                    unreachable = False
            except StorageError as exc:
                self.metrics.registry_errors.inc()
                if not unreachable:
                    log.warning("following the rollouts of %s: %s", self.settings.model_name, exc)
                unreachable = True
            except Exception as exc:  # keep serving; say why at each check
                log.warning("following the rollouts of %s: %s", self.settings.model_name, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.check_now.wait(), every)
            self.check_now.clear()

    async def refresh(self, full: bool = True) -> RolloutState | None:
        """Read the record (``full``: whatever the token) and apply it if it changed."""
        name = self.settings.model_name
        if full or self._token is None:
            state = await asyncio.to_thread(self.registry.rollout_state, name)
        else:
            state = await asyncio.to_thread(
                self.registry.rollout_state_if_changed, name, self._token
            )
        if state is not None:
            async with self._lock:
                await self._apply(state)
        return state

    async def _apply(self, state: RolloutState) -> None:
        """Make this process serve what ``state`` says (holding the lock). A decision
        taken here (the check set, a candidate that cannot load) is applied in turn."""
        while True:
            before = self.rollout
            self.state, self._token = state, state.token
            rollout = self.rollout
            if rollout is None or not rollout.running:
                if rollout is not None and rollout.state == "promoted":
                    was_running = before is not None and before.id == rollout.id and before.running
                    await self._serve_promoted(rollout, was_running)
                self._drop()
                self._report()
                return
            decided = await self._hold(rollout)
            if decided is None:
                self._report()
                return
            state = decided

    async def _hold(self, rollout: Rollout) -> RolloutState | None:
        """Load the candidate, check it, set the split; the new state if a decision
        was taken on the way (the candidate cannot load, or its check set)."""
        host = self.host
        candidate = host.candidate
        if candidate is None or candidate.info["version"] != rollout.candidate:
            self.plane.split = NO_SPLIT
            try:
                candidate = await host.open_candidate(rollout.candidate)
            except StorageError:
                raise  # the store is unreachable: try again at the next check
            except Exception as exc:
                reason = f"{rollout.model}@{rollout.candidate} cannot be loaded here: {exc}"
                return await self._decide(rollout, "rollback", reason, {"error": str(exc)})
        if not rollout.checked:
            self.plane.split = Split(candidate, "off", 0.0, rollout.id)
            return await self._check(rollout)
        step = rollout.current_step
        assert step is not None
        split = Split(candidate, step.mode, step.percent, rollout.id)
        if self.plane.split != split:
            if step.mode != "shadow":
                self.shadow.clear()
            # the step's evidence starts now, before its first request (not at the first
            # judgement, which would count what was answered meanwhile as before the step)
            counts = await asyncio.to_thread(self._counts, rollout)
            self._baseline = (rollout.id, rollout.step, counts)
            self.plane.split = split
            log.info(
                "rollout %s: %s@%s on %s of the traffic (step %d of %d)",
                rollout.id,
                rollout.model,
                rollout.candidate,
                step,
                rollout.step + 1,
                len(rollout.steps),
            )
        return None

    async def _check(self, rollout: Rollout) -> RolloutState | None:
        """The candidate's accuracy on the check set (stable's too, for comparison)."""
        check = rollout.rule.check
        assert check is not None
        candidate, stable = self.host.candidate, self.host.model
        assert candidate is not None
        try:
            images = await asyncio.to_thread(load_check_set, check, self.limits)
            found = await accuracy(candidate, images, self.host.batcher)
            base = await accuracy(stable, images, self.host.batcher) if stable else None
        except Exception as exc:
            reason = f"the check set cannot be evaluated here: {exc}"
            return await self._decide(rollout, "rollback", reason, {"error": str(exc)})
        evidence = {
            "check_set": check.to_dict(),
            "images": len(images.labels),
            "skipped": images.skipped,
            "candidate_accuracy": round(found, 4),
            "stable_accuracy": None if base is None else round(base, 4),
        }
        ok = found >= check.min_accuracy
        reason = (
            f"check set accuracy {found:.3f} {'>=' if ok else '<'} {check.min_accuracy:g} "
            f"over {len(images.labels)} images"
            + (f" (stable: {base:.3f})" if base is not None else "")
        )
        return await self._decide(rollout, "check" if ok else "rollback", reason, evidence)

    async def _serve_promoted(self, rollout: Rollout, was_running: bool) -> None:
        """The alias moved (or is about to: finish it) to the candidate: serve it."""
        moved = await asyncio.to_thread(self.registry.finish_promotion, rollout.model, rollout)
        if not (moved or was_running):
            return  # an old promote: what the alias names is served already
        s = self.settings
        target = await asyncio.to_thread(self.registry.resolve, s.model_name, s.model_ref)
        if self.host.model is None or self.host.model.version != target:
            await self.host.load(s.model_ref)  # the candidate, swapped in without loading

    def _drop(self) -> None:
        if self.plane.split is not NO_SPLIT or self.host.candidate is not None:
            self.plane.split = NO_SPLIT
            self.shadow.clear()
            self.host.drop_candidate()
        self._baseline = None

    def _report(self) -> None:
        rollout = self.rollout
        labels = None
        step_seconds = 0.0
        if rollout is not None:
            labels = {
                "name": rollout.model,
                "rollout": rollout.id,
                "stable": rollout.stable,
                "candidate": rollout.candidate,
                "step": str(rollout.step + 1) if rollout.running else "-",
                "state": rollout.state,
            }
            if rollout.running:
                step_seconds = _seconds_since(rollout.step_started)
        revision = self.state.revision if self.state is not None else 0
        self.metrics.set_rollout(labels, revision, step_seconds)

    # -- judging

    def _counts(self, rollout: Rollout) -> Counts:
        return read_counts(self.metrics.samples(), rollout.model, rollout.stable, rollout.candidate)

    async def judge_now(self) -> None:
        """Judge the running step on its evidence; write the decision when there is one."""
        async with self._lock:
            rollout = self.rollout
            if rollout is None or not rollout.serves_traffic or self.host.candidate is None:
                return
            counts = await asyncio.to_thread(self._counts, rollout)
            key = (rollout.id, rollout.step)
            if self._baseline is None or self._baseline[:2] != key:
                self._baseline = (*key, counts)  # this step's evidence starts now
            step = rollout.current_step
            assert step is not None
            seconds = _seconds_since(rollout.step_started)
            self.metrics.rollout_step_seconds.set(seconds)
            verdict = judge(
                rollout.rule,
                step,
                counts.minus(self._baseline[2]),
                rollout.stable,
                rollout.candidate,
                seconds,
            )
            if verdict.outcome == "wait":
                return
            if verdict.outcome == "fail":
                action = "rollback"
            else:
                action = "advance" if rollout.step + 1 < len(rollout.steps) else "promote"
            state = await self._decide(rollout, action, verdict.reason, verdict.evidence)
            if state is not None:
                await self._apply(state)

    async def _decide(
        self, rollout: Rollout, action: str, reason: str, evidence: dict
    ) -> RolloutState | None:
        """Write a decision; the record after it (None: another process decided first,
        the record as it is now is applied at the next check)."""
        try:
            await asyncio.to_thread(
                self.registry.decide_rollout,
                rollout.model,
                rollout.id,
                action,
                reason,
                evidence,
                self.by,
                rollout.step,
            )
        except ConflictError:
            log.info("rollout %s: another process decided first", rollout.id)
            self.check_now.set()
            return None
        except RegistryError as exc:
            log.warning(
                "rollout %s: the decision %s cannot be written: %s", rollout.id, action, exc
            )
            return None
        self.metrics.rollout_decisions.labels(action).inc()
        log.info("rollout %s: %s (%s)", rollout.id, action, reason)
        self.siblings.signal()
        return await asyncio.to_thread(self.registry.rollout_state, rollout.model)

    # -- what the admin routes do

    async def start(
        self, name: str, candidate: str, steps: tuple[Step, ...], rule: Rule, alias: str
    ) -> Rollout:
        rollout = await asyncio.to_thread(
            self.registry.start_rollout, name, candidate, steps, rule, alias, self.by
        )
        await self._after_change(name)
        return rollout

    async def abort(self, name: str, reason: str) -> Rollout:
        rollout = await asyncio.to_thread(self.registry.abort_rollout, name, reason, self.by)
        self.metrics.rollout_decisions.labels("abort").inc()
        await self._after_change(name)
        return rollout

    async def _after_change(self, name: str) -> None:
        self.siblings.signal()
        if name == self.settings.model_name:
            await self.refresh(full=True)

    def live_evidence(self) -> dict | None:
        """The running step's evidence so far, as the rule would see it (None: no
        rollout of the served alias is taking traffic here)."""
        rollout = self.rollout
        if rollout is None or not rollout.serves_traffic or self._baseline is None:
            return None
        step = rollout.current_step
        assert step is not None
        counts = self._counts(rollout)
        base = self._baseline[2] if self._baseline[:2] == (rollout.id, rollout.step) else counts
        seconds = _seconds_since(rollout.step_started)
        return evidence_of(step, counts.minus(base), rollout.stable, rollout.candidate, seconds)[3]
