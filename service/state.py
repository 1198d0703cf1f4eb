"""What the routes share: the settings, the registry, the metrics and the serving model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from registry import Registry
from service.config import Settings
from service.dataplane.batching import Batcher
from service.dataplane.decoding import DecodePool
from service.dataplane.images import ImageLimits
from service.lifecycle.prepare import ServingModel, prepare
from service.metrics import Metrics

log = logging.getLogger("seednet.state")


@dataclass
class ServiceState:
    """Everything the routes share, hung on ``app.state.service``."""

    settings: Settings
    registry: Registry
    metrics: Metrics
    limits: ImageLimits
    model: ServingModel | None = None
    batcher: Batcher | None = None
    decoder: DecodePool | None = None
    swap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: float = field(default_factory=time.time)
    #: The port the gRPC server listens on (None: not started); see service.frontends.oip.grpc.
    grpc_port: int | None = None

    @property
    def ready(self) -> bool:
        """A model is loaded and warmed up: the one answer of every readiness check."""
        return self.model is not None

    async def load(
        self, ref: str, name: str | None = None, commit: Callable[[], None] | None = None
    ) -> ServingModel:
        """Load ``name@ref`` next to the serving model, then swap it in atomically.

        Verification and export building run on a worker thread; opening the backend,
        graph capture and warm-up run on the model thread, between batches. Requests keep
        flowing to the old model meanwhile; a batch that started finishes on the model it
        started with, so no request fails. ``commit`` (e.g. moving an alias) runs just
        before the swap: if it raises, the old model keeps serving and nothing changed.
        """
        s = self.settings
        assert self.batcher is not None, "the batcher starts before any model loads"
        async with self.swap_lock:
            mv = self.registry.resolve(name or s.model_name, ref)
            prepared = await asyncio.to_thread(
                prepare, self.registry, mv, s.backend, s.device, s.materialize_exports
            )
            model = await self.batcher.run_in_model_thread(
                ServingModel.load, prepared, s.cuda_graphs
            )
            if commit is not None:
                commit()
            previous, self.model = self.model, model
            self.metrics.set_model(model.info)
            if previous is not None:
                self.metrics.model_swaps.inc()
            log.info("serving %s on %s/%s", mv.ref, model.info["backend"], model.info["device"])
            return model

    async def follow_alias(self, every: float) -> None:
        """Swap to whatever SEEDNET_MODEL_REF resolves to now, checked every ``every`` s.

        With several worker processes, a promote or reload reaches one of them; the others
        see the alias move here. A version that fails to load is logged and retried.
        """
        s = self.settings
        while True:
            await asyncio.sleep(every)
            try:
                target = self.registry.resolve(s.model_name, s.model_ref).version
                if self.model is not None and target != self.model.version.version:
                    await self.load(s.model_ref)
            except Exception as exc:  # keep serving the loaded model; say why once a cycle
                log.warning("following %s@%s: %s", s.model_name, s.model_ref, exc)
