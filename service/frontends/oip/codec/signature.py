"""What a SeedNet model accepts and returns, in protocol terms.

The protocol layer checks requests against this, the metadata endpoints and the
Triton model config are generated from it, so the three cannot drift apart. Shapes
here leave out the batch dimension (as Triton's model config does); on the wire
every tensor has the batch size ``N`` in front.

SeedNet has two alternative inputs and a request carries exactly one of them:

* ``images``: UINT8 ``[N, 3, 32, 32]``, pixels already at the model's resolution
  (the fast path: no decoding, no resizing);
* ``image_bytes``: BYTES ``[N, 1]`` (``[N]`` is accepted too), each element an
  encoded image file that the service's own preprocessing decodes.

Triton describes a batched one-element-per-item BYTES input as ``dims: [1]``
(metadata shape ``[-1, 1]``): perf_analyzer drops the batch dimension from the
metadata shape and refuses an input whose remaining shape is empty, so ``[-1]``
would not do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from seednet.constants import CIFAR10_CLASSES as CIFAR10_LABELS  # no torch: constants only


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, datatype and per-item dims (batch dimension left out).

    ``also_accepted`` lists further per-item dims a request may use for an input
    (``image_bytes`` takes ``[N]`` as well as ``[N, 1]``).
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    also_accepted: tuple[tuple[int, ...], ...] = ()

    @property
    def accepted_dims(self) -> tuple[tuple[int, ...], ...]:
        return (self.dims, *self.also_accepted)

    def wire_shape(self) -> str:
        """Human form of the accepted full shapes, for error messages: ``[N, 3, 32, 32]``."""
        return " or ".join("[" + ", ".join(["N", *map(str, d)]) + "]" for d in self.accepted_dims)


@dataclass(frozen=True)
class ModelSignature:
    """Inputs (alternatives: a request carries exactly one), outputs, class labels."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    #: The output whose last dimension is indexed by ``labels`` (classification labels).
    labelled_output: str = "probabilities"

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def seednet_signature(
    labels: Sequence[str] = CIFAR10_LABELS,
    attention_dims: Sequence[int] = (7, 2),
    ood: bool = False,
) -> ModelSignature:
    """SeedNet's signature; pass the served model's class names and attention dims, and
    ``ood`` for calibrated versions, whose graph also scores how unlike the training
    images each image is: ``ood_score`` FP32 ``[N]`` and ``out_of_distribution`` BOOL
    ``[N]`` (the score above the version's threshold)."""
    outputs = (
        TensorSpec("probabilities", "FP32", (len(labels),)),
        TensorSpec("attention", "FP32", tuple(attention_dims)),
    )
    if ood:
        outputs += (
            TensorSpec("ood_score", "FP32", ()),
            TensorSpec("out_of_distribution", "BOOL", ()),
        )
    return ModelSignature(
        inputs=(
            TensorSpec("images", "UINT8", (3, 32, 32)),
            TensorSpec("image_bytes", "BYTES", (1,), also_accepted=((),)),
        ),
        outputs=outputs,
        labels=tuple(labels),
    )


#: The signature of the published SeedNet models (10 CIFAR-10 classes, 7 blocks x 2 branches).
SEEDNET = seednet_signature()
