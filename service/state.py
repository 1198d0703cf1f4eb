"""What the routes share: the settings, the registry, the metrics and the serving model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from registry import Registry
from service.batching import Batcher
from service.config import Settings
from service.decoding import DecodePool
from service.metrics import Metrics
from service.preprocessing import ImageLimits
from service.serving import ServingModel, prepare

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
