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
from service.logging_setup import configure_logging
from service.metrics import MULTIPROC_ENV


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 30,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    metrics_dir = tempfile.mkdtemp(prefix="seednet-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers, read at import
    try:
        uvicorn.run(
            "service.app:app_from_environment", factory=True, workers=settings.workers, **common
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
