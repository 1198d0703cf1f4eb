"""The FastAPI application: ``create_app(settings)``.

Nothing is loaded at import time. The lifespan resolves the configured registry
version, verifies its files, loads and warms the model up, and only then reports
ready; until then /predict answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.config import Settings
from service.errors import ApiError, install_error_handlers
from service.inference import Batcher, BatchStats, ServingModel
from service.metrics import Metrics
from service.preprocessing import ImageLimits
from service.registry import Registry

log = logging.getLogger("seednet.app")
PACKAGE_DIR = Path(__file__).parent


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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(
        settings=settings,
        registry=Registry(settings.registry_root),
        metrics=metrics,
        limits=ImageLimits(
            max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels
        ),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher = Batcher(
            lambda: state.require_model(),
            max_batch_size=settings.max_batch_size if settings.batching else 10**9,
            max_wait=settings.max_batch_wait_ms / 1000,
            enabled=settings.batching,
            stats=BatchStats(on_batch=metrics.on_batch, on_wait=metrics.on_wait),
        )
        state.batcher.start()
        await state.load(settings.model_ref)  # a failure here stops start-up, loudly
        yield
        await state.batcher.stop()

    app = FastAPI(
        title="SeedNet inference service",
        version="1.0",
        description=(
            "CIFAR-10 classification with per-block attention weights, served from the "
            "model registry. Upload images to `POST /predict`; open `/attention` in a "
            "browser to see what the model attends to."
        ),
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))
    install_error_handlers(app)

    from service.routes import attention, health, models, predict
    from service.routes.observability import install_request_metrics

    install_request_metrics(app, metrics)
    for module in (predict, attention, models, health):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")
    return app
