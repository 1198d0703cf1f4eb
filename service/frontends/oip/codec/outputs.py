"""From the model's result arrays to the output tensors a request asked for.

Shared by the REST and gRPC response builders: picks the requested outputs in the
requested order, casts them to the declared datatype and applies the
classification extension where asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from service.frontends.oip.codec.classification import classify
from service.frontends.oip.codec.request import InferRequest, RequestedOutput
from service.frontends.oip.codec.signature import ModelSignature
from service.frontends.oip.codec.tensors import numpy_dtype


@dataclass(frozen=True)
class OutputTensor:
    """One response tensor: ``data`` is a numpy array (object array of bytes for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    request: RequestedOutput


def output_tensors(
    request: InferRequest, results: Mapping[str, np.ndarray], signature: ModelSignature
) -> list[OutputTensor]:
    """The tensors to send back for ``request``, given every model output in ``results``.

    A missing or misshapen result is a server bug, not a client error: ValueError.
    """
    tensors = []
    n = request.batch_size
    for out in request.outputs:
        spec = signature.output(out.name)
        if spec is None or out.name not in results:
            raise ValueError(f"the model produced no output {out.name!r}")
        data = np.ascontiguousarray(results[out.name], dtype=numpy_dtype(spec.datatype))
        expected = (n, *spec.dims)  # -1: any size (varies per request)
        if len(data.shape) != len(expected) or any(
            want not in (-1, got) for got, want in zip(data.shape, expected, strict=True)
        ):
            raise ValueError(
                f"output {out.name!r} has shape {list(data.shape)}; expected {list(expected)}"
            )
        if out.classification:
            labels = signature.labels if out.name == signature.labelled_output else ()
            data = classify(data, out.classification, labels)
            tensors.append(OutputTensor(out.name, "BYTES", data.shape, data, out))
        else:
            tensors.append(OutputTensor(out.name, spec.datatype, data.shape, data, out))
    return tensors
