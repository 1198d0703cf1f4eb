"""What the routes share: the settings, the registry, the metrics and the serving model."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import Request

from service.config import Settings
from service.errors import ApiError
from service.inference import Batcher, ServingModel
from service.metrics import Metrics
from service.preprocessing import ImageLimits
from service.registry import Registry

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
    swap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: float = field(default_factory=time.time)

    def require_model(self) -> ServingModel:
        if self.model is None:
            raise ApiError(503, "not_ready", "the model is still loading; retry shortly")
        return self.model

    async def load(self, ref: str, name: str | None = None) -> ServingModel:
        """Load ``name@ref`` next to the serving model, then swap it in atomically.

        Requests keep flowing to the old model during the load; a batch that already
        started finishes on the model it started with, so no request fails.
        """
        s = self.settings
        async with self.swap_lock:
            mv = self.registry.resolve(name or s.model_name, ref)
            model = await asyncio.to_thread(
                ServingModel.load,
                self.registry,
                mv,
                s.backend,
                s.device,
                s.materialize_exports,
                s.cuda_graphs,
            )
            previous, self.model = self.model, model
            self.metrics.set_model(model.info)
            if previous is not None:
                self.metrics.model_swaps.inc()
            log.info(
                "serving %s@%s (%s on %s)",
                mv.name,
                mv.version,
                model.info["backend"],
                model.info["device"],
            )
            return model


def get_state(request: Request) -> ServiceState:
    return request.app.state.service
