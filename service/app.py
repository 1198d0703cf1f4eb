"""The FastAPI application: ``create_app(settings)``.

Nothing is loaded at import time. The lifespan starts the batcher (the model thread),
then resolves the configured registry version, verifies its files, builds missing exports,
loads and warms the model up on the model thread; uvicorn accepts connections only once
that is done, so /health/ready answers 200 from the first request on. Then, when
``SEEDNET_GRPC_PORT`` is set, it starts the gRPC server (KServe v2) in the same event
loop; on shutdown that server stops first, then the batcher.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from registry import Registry
from service.config import Settings
from service.dataplane.batching import Batcher, BatchStats
from service.dataplane.decoding import DecodePool
from service.dataplane.explaining import ExplainRunner, Explanations
from service.dataplane.images import ImageLimits
from service.dataplane.inference import DataPlane
from service.dataplane.shadow import ShadowLane
from service.frontends.api import attention, explain, health, models, predict, rollouts
from service.frontends.api.docs import install_docs
from service.frontends.http.metrics_middleware import install_request_metrics
from service.frontends.http.rendering import install_error_handlers
from service.frontends.http.security import SecurityHeadersMiddleware
from service.frontends.oip import v2
from service.frontends.oip.grpc import start_grpc_server, stop_grpc_server
from service.lifecycle.host import ModelHost
from service.lifecycle.rollout import RolloutController
from service.lifecycle.siblings import Siblings
from service.metrics import Metrics
from service.state import ServiceState

PAGE_DIR = Path(__file__).parent / "frontends" / "api"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(
        settings=settings, registry=Registry(settings.registry_root), metrics=metrics
    )
    limits = ImageLimits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(
            lambda: host.current(),
            max_batch_size=settings.max_batch_size,
            max_wait=settings.max_batch_wait_ms / 1000,
            enabled=settings.batching,
            stats=BatchStats(
                on_batch=metrics.on_batch,
                on_queue=metrics.on_queue,
                on_running=metrics.on_running,
                on_reject=metrics.on_reject,
            ),
            max_queue_images=settings.max_queue_images if settings.admission else None,
            queue_timeout=settings.queue_timeout_ms / 1000 if settings.admission else None,
        )
        batcher.start()
        host = ModelHost(settings, state.registry, metrics, batcher)
        decoder = DecodePool(settings.decode_threads())
        state.host = host
        state.plane = DataPlane(batcher, decoder, limits, metrics, host.current)
        shadow = ShadowLane(batcher, metrics, settings.shadow_queue_images)
        batcher.idle_work = state.plane.shadow = shadow
        siblings = Siblings(metrics)
        controller = RolloutController(
            settings, state.registry, metrics, host, state.plane, shadow, siblings, limits
        )
        state.rollout = controller
        state.explanations = explanations = build_explanations(settings, metrics, state.plane)
        host.on_swap(explanations.model_changed)
        await host.load(settings.model_ref)  # a failure here stops start-up, loudly
        tasks = [asyncio.create_task(controller.follow(settings.rollout_poll_s))]
        if settings.alias_poll_seconds:
            tasks.append(asyncio.create_task(host.follow_alias(settings.alias_poll_seconds)))

        def on_signal() -> None:  # a sibling worker changed the registry: look now
            host.check_now.set()
            controller.check_now.set()

        tasks.append(asyncio.create_task(siblings.watch(on_signal)))
        grpc_server = None
        if settings.grpc_port is not None:
            grpc_server = await start_grpc_server(state, settings.grpc_port)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if grpc_server is not None:
                await stop_grpc_server(state, grpc_server)
            await explanations.close()
            decoder.shutdown()
            await batcher.stop()
            metrics.worker_exited(os.getpid())

    app = FastAPI(
        title="SeedNet inference service",
        version="1.0",
        description=(
            "CIFAR-10 classification with per-block attention weights, served from the "
            "model registry. Upload images to `POST /predict`; open `/attention` in a "
            "browser to see what the model attends to. The same model answers the Open "
            "Inference Protocol v2 (KServe / Triton clients) under `/v2` and over gRPC."
        ),
        lifespan=lifespan,
        docs_url=None,  # install_docs serves /docs and /redoc without a CDN
        redoc_url=None,
        # A redirect to the slash-less route would be built from the Host header.
        redirect_slashes=False,
    )
    app.state.service = state
    app.state.templates = Jinja2Templates(directory=str(PAGE_DIR / "templates"))
    # Middleware order, innermost first: the catch-all 500 (installed with the error
    # handlers), request metrics (so they count that 500), security headers (on all).
    install_error_handlers(app)
    install_request_metrics(app, metrics)
    docs = {"/docs", "/redoc", app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=frozenset(p for p in docs if p))
    for module in (predict, explain, attention, models, rollouts, health, v2):
        app.include_router(module.router)
    install_docs(app)
    app.mount("/static", StaticFiles(directory=str(PAGE_DIR / "static")), name="static")
    return app


def build_explanations(settings: Settings, metrics: Metrics, plane: DataPlane) -> Explanations:
    """The explanation queue and worker (none when SEEDNET_EXPLAIN=off)."""
    runner = None
    if settings.explain != "off":
        runner = ExplainRunner(
            metrics, queue=settings.explain_queue, timeout=settings.explain_timeout_s
        )
    root = str(settings.registry_root)
    return Explanations(plane, runner, root, eager=settings.explain == "on")


def app_from_environment() -> FastAPI:
    """What each worker process runs (``uvicorn --factory``): settings from SEEDNET_*."""
    from service.frontends.http.server import worker_protocol_class
    from service.logging_setup import configure_logging

    settings = Settings()
    configure_logging(settings)
    worker_protocol_class(settings)  # this process's header deadline
    return create_app(settings)
