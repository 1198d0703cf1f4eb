"""A loaded model as the data plane sees it: a backend to run, and what it answers with."""

from __future__ import annotations

from dataclasses import dataclass, field

from registry import ModelVersion
from service.dataplane.backends import Backend


@dataclass
class ServingModel:
    """A loaded, warmed-up model version (``service.lifecycle.loading`` makes them).

    ``output_dims``: each output's per-image shape, as the warm-up saw it (the inference
    protocol's metadata is built from it). ``seconds_per_image``: model time per image at
    a full batch, measured at load; admission control starts from it.
    """

    version: ModelVersion
    backend: Backend
    class_names: list[str]
    info: dict = field(default_factory=dict)
    output_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seconds_per_image: float = 0.0

    @property
    def ood_threshold(self) -> float | None:
        """``ood_score`` above this is ``out_of_distribution`` (calibrated versions only:
        chosen at publication to keep 95 % of held-out test images)."""
        ood = self.version.manifest.ood
        return ood.threshold if ood is not None and "ood_score" in self.output_dims else None

    @property
    def attention_dims(self) -> tuple[int, ...]:
        """Per-image shape of the attention output: (blocks, branches)."""
        return self.output_dims.get("attention", (7, 2))

    @property
    def ref(self) -> str:
        return self.version.ref
