"""What the front ends share: the settings, the registry, the metrics, the model host and
the data plane (built by the app's lifespan, see ``service.app``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from registry import Registry
from service.config import Settings
from service.dataplane.explaining import Explanations
from service.dataplane.inference import DataPlane
from service.dataplane.served import ServingModel
from service.lifecycle.host import ModelHost
from service.lifecycle.rollout import RolloutController
from service.metrics import Metrics


@dataclass
class ServiceState:
    """Everything the front ends share, hung on ``app.state.service``."""

    settings: Settings
    registry: Registry
    metrics: Metrics
    host: ModelHost | None = None
    plane: DataPlane | None = None
    rollout: RolloutController | None = None
    #: Explanations (maps per block and branch), beside the data plane; built by the lifespan.
    explanations: Explanations | None = None
    started: float = field(default_factory=time.time)
    #: The port the gRPC server listens on (None: not started); see service.frontends.oip.grpc.
    grpc_port: int | None = None

    @property
    def model(self) -> ServingModel | None:
        return self.host.model if self.host is not None else None

    @property
    def candidate(self) -> ServingModel | None:
        """A rollout's candidate, loaded beside the serving model (None: no rollout)."""
        return self.host.candidate if self.host is not None else None

    @property
    def ready(self) -> bool:
        """A model is loaded and warmed up: the one answer of every readiness check."""
        return self.model is not None
