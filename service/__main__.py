"""`python -m service`: serve the configured registry version with uvicorn."""

from __future__ import annotations

import logging
import warnings

import uvicorn

from service.app import create_app
from service.config import Settings
from service.server import uvicorn_config


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # (the ONNX exporter's INFO chatter is silenced where it runs: seednet.export)
    # TorchScript is an export format chosen on purpose; torch marks all of it deprecated.
    warnings.filterwarnings("ignore", r"`torch\.jit\..*` is deprecated", FutureWarning)


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()


if __name__ == "__main__":
    main()
