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

Outputs are of two kinds: ``outputs`` are returned when a request names none (and are
what metadata and config list); ``on_request`` outputs only when named, because they
cost more than the forward pass: the ``explain`` extension's maps (Grad-CAM per block,
per-branch maps; docs/explanations.md). A dimension of ``-1`` in an output varies per
request (the number of blocks asked for).

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
    """Inputs (alternatives: a request carries exactly one), outputs (returned by default),
    outputs returned only when named (``on_request``), class labels."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    #: The output whose last dimension is indexed by ``labels`` (classification labels).
    labelled_output: str = "probabilities"
    on_request: tuple[TensorSpec, ...] = ()

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in (*self.outputs, *self.on_request) if t.name == name), None)

    @property
    def on_request_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.on_request)

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
        on_request=explain_outputs(attention_dims[-1]),
    )


#: The explain extension's outputs, by what the explanation worker calls them.
EXPLAIN_SOURCES = {"explained_class": "target"}
#: The explain extension's request parameters.
EXPLAIN_PARAMETERS = {
    "target": "the class to explain: index or label (default: each image's predicted class)",
    "blocks": 'block numbers, e.g. "6,7" (default: all), in increasing order along the '
    "maps' -1 dimension",
}


def explain_outputs(branches: int = 2) -> tuple[TensorSpec, ...]:
    """The ``explain`` extension: maps in [0, 1] over the 32x32 input, B = the blocks asked
    for (request parameter ``blocks``), for the class ``target`` (default: predicted)."""
    maps, b = (32, 32), -1
    return (
        TensorSpec("explained_class", "INT64", ()),
        TensorSpec("gradcam", "FP32", (b, *maps)),
        TensorSpec("macro_gradcam", "FP32", (b, *maps)),
        TensorSpec("branch_gradcam", "FP32", (b, branches, *maps)),
        TensorSpec("branch_gradcam_share", "FP32", (b, branches)),
        TensorSpec("branch_strength", "FP32", (b, branches, *maps)),
        TensorSpec("branch_strength_share", "FP32", (b, branches)),
    )


#: The signature of the published SeedNet models (10 CIFAR-10 classes, 7 blocks x 2 branches).
SEEDNET = seednet_signature()
