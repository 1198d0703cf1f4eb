"""`python -m service`: serve the configured registry version with uvicorn.

``SEEDNET_WORKERS`` > 1 starts that many worker processes (uvicorn's supervisor), each
loading the model with ``cores // workers`` threads, and points Prometheus' multiprocess
mode at a fresh folder so ``/metrics`` sums every worker.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from service.app import create_app
from service.config import Settings
from service.frontends.http.server import uvicorn_config, uvicorn_options
from service.logging_setup import configure_logging
from service.metrics import MULTIPROC_ENV


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    if settings.workers == 1:
        uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
        return
    metrics_dir = tempfile.mkdtemp(prefix="seednet-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers, read at import
    try:
        uvicorn.run(
            "service.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings, workers=True),
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
