"""The model a service process serves, and how it changes: load beside, then swap.

:class:`ModelHost` owns the serving model. A load verifies and exports on a worker thread
(``prepare``), then opens, captures and warms up on the model thread, between batches
(``load_model``); requests keep flowing to the old model meanwhile, and a batch that
started finishes on the model it started with, so no request fails. With several worker
processes, a promote reaches one of them; :meth:`ModelHost.follow_alias` makes the others
follow the alias (at once when a sibling worker signals a change, see
``service.lifecycle.siblings``).

A rollout's candidate is held here too (:meth:`ModelHost.open_candidate`): loaded beside
the serving model the same way, and swapped in without loading again when the alias
moves to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from registry import ModelVersion, Registry
from registry.errors import StorageError
from service.config import Settings
from service.dataplane.batching import Batcher
from service.dataplane.served import ServingModel
from service.errors import NotReady
from service.lifecycle.loading import load_model
from service.lifecycle.prepare import prepare
from service.metrics import Metrics

log = logging.getLogger("seednet.host")
#: What is kept of auto's measurement (per host, in the version's exports.json).
AUTO_RECORD = ("chosen", "candidates", "figures", "host", "measured_for", "measured_at", "seconds")


class ModelHost:
    """The serving model of this process (see the module docstring)."""

    def __init__(
        self, settings: Settings, registry: Registry, metrics: Metrics, batcher: Batcher
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.batcher = batcher
        self.model: ServingModel | None = None
        #: A rollout's candidate, loaded beside the serving model (None: no rollout).
        self.candidate: ServingModel | None = None
        self._swap_lock = asyncio.Lock()
        #: Set to check the alias now rather than at the next poll (a sibling moved it).
        self.check_now = asyncio.Event()
        self._on_swap: list[Callable[[ServingModel], None]] = []

    def on_swap(self, listener: Callable[[ServingModel], None]) -> None:
        """Call ``listener(model)`` each time a model starts serving (the first included),
        right after the swap: what keeps per-version state (explainers) in step."""
        self._on_swap.append(listener)

    def current(self) -> ServingModel:
        """The serving model; :class:`NotReady` (503) while none is loaded yet."""
        if self.model is None:
            raise NotReady()
        return self.model

    async def load(
        self, ref: str, name: str | None = None, commit: Callable[[], None] | None = None
    ) -> ServingModel:
        """Load ``name@ref`` next to the serving model, then swap it in atomically.

        ``commit`` (e.g. moving an alias) runs just before the swap: if it raises, the old
        model keeps serving and nothing changed.
        """
        async with self._swap_lock:
            model = await self.open_version(ref, name)
            if commit is not None:
                await asyncio.to_thread(commit)
            self._swap_in(model)
            return model

    async def open_version(self, ref: str, name: str | None = None) -> ServingModel:
        """``name@ref`` verified, exported, opened and warmed up beside the serving model
        (nothing is swapped); the candidate itself when it is that version."""
        s = self.settings
        mv = await asyncio.to_thread(self.registry.resolve, name or s.model_name, ref)
        candidate = self.candidate
        if candidate is not None and candidate.version == mv:
            return candidate  # loaded already: a promote never loads twice
        prepared = await asyncio.to_thread(
            prepare,
            self.registry,
            mv,
            s.backend,
            s.device,
            s.materialize_exports,
            s.threads_for,
            s.auto_remeasure,
        )
        model = await self.batcher.run_in_model_thread(load_model, prepared, s.cuda_graphs)
        auto = model.info.get("auto")
        if auto and auto.get("measured") and "reused_from" not in auto:
            await asyncio.to_thread(self._record_auto, model.version, auto)
        return model

    def _swap_in(self, model: ServingModel) -> None:
        previous, self.model = self.model, model
        if self.candidate is model:
            self.candidate = None  # the candidate is the serving model now
        self.metrics.set_model(model.info)
        if previous is not None and previous is not model:
            self.metrics.model_swaps.inc()
        log.info("serving %s on %s/%s", model.ref, model.info["backend"], model.info["device"])
        if previous is not model:
            for listener in self._on_swap:
                listener(model)

    async def swap(self, model: ServingModel) -> None:
        """Serve ``model`` (loaded already, e.g. the candidate) from the next batch on."""
        async with self._swap_lock:
            if self.model is not model:
                self._swap_in(model)

    async def open_candidate(self, version: str) -> ServingModel:
        """Load ``version`` of the served model beside it, as a rollout's candidate."""
        model = await self.open_version(version)
        self.candidate = model
        serving = self.model.ref if self.model is not None else "nothing"
        log.info(
            "loaded %s beside %s (rollout candidate) on %s/%s",
            model.ref,
            serving,
            model.info["backend"],
            model.info["device"],
        )
        return model

    def drop_candidate(self) -> None:
        """Forget the candidate (its memory goes once no running request holds it)."""
        if self.candidate is not None:
            log.info("dropped the rollout candidate %s", self.candidate.ref)
        self.candidate = None

    def _record_auto(self, mv: ModelVersion, auto: dict) -> None:
        """Keep auto's measurement for this host and version, so the next start serves the
        same backend without measuring (a registry that cannot be written only logs)."""
        record = {k: auto[k] for k in AUTO_RECORD if k in auto}
        try:
            recorded = dict(self.registry.derived(mv).get("auto", {}))
            recorded[auto["host_key"]] = record
            self.registry.add_derived(mv, {}, {"auto": recorded})
        except Exception as exc:  # a read-only registry (a baked image), or one to repair
            log.info(
                "auto: the choice for %s is kept for this process only (%s: the registry "
                "cannot be written); it is measured again at the next start",
                mv.ref,
                type(exc).__name__,
            )

    async def follow_alias(self, every: float) -> None:
        """Swap to whatever SEEDNET_MODEL_REF names now, checked every ``every`` s.

        Each check is one conditional read of the model's aliases (on an object store a
        GET with ``If-None-Match`` that downloads nothing while they are unchanged). A
        version that fails to load is retried at the next check; a store that cannot be
        reached is counted and logged once per outage, and the loaded model keeps serving.
        """
        s = self.settings
        token: str | None = None
        unreachable = False
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.check_now.wait(), every)
            self.check_now.clear()
            try:
                if token is None:
                    state = await asyncio.to_thread(self.registry.alias_state, s.model_name)
                else:
                    state = await asyncio.to_thread(
                        self.registry.alias_state_if_changed, s.model_name, token
                    )
                if unreachable:
                    log.info("the registry answers again; following %s", s.model_ref)
                    unreachable = False
                if state is None:
                    continue  # unchanged
                target = state.aliases.get(s.model_ref, s.model_ref)
                if self.model is not None and target != self.model.version.version:
                    await self.load(s.model_ref)
                token = state.token  # after a successful swap: a failed load retries
            except StorageError as exc:
                self.metrics.registry_errors.inc()
                if not unreachable:
                    log.warning("following %s@%s: %s", s.model_name, s.model_ref, exc)
                unreachable = True
            except Exception as exc:  # keep serving the loaded model; say why each check
                log.warning("following %s@%s: %s", s.model_name, s.model_ref, exc)
