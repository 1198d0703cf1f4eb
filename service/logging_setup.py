"""Logging of the service process (and of each worker process it starts)."""

from __future__ import annotations

import logging
import warnings

from service.config import Settings


def configure_logging(settings: Settings) -> None:
    """One line per start-up phase at INFO; third-party chatter stays out."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # (the ONNX exporter's INFO chatter is silenced where it runs: seednet.export)
    # TorchScript is an export format chosen on purpose; torch marks all of it deprecated.
    warnings.filterwarnings("ignore", r"`torch\.jit\..*` is deprecated", FutureWarning)
