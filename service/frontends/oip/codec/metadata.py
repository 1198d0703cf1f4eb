"""Server metadata, model metadata and Triton model config, as plain dicts.

These answer ``GET /v2`` (server metadata), ``GET /v2/models/{m}[/versions/{v}]``
(model metadata) and ``GET /v2/models/{m}[/versions/{v}]/config`` (Triton's model
configuration extension); ``grpc_codec`` turns the first two into protobuf.

How perf_analyzer uses them (checked against perf_analyzer's model_parser.cc and
data_loader.cc): it reads the server extensions (and asks for server statistics only
if ``statistics`` is listed: it is not), then the model metadata for input/output
names, datatypes and shapes, dropping the first dimension because the config's
``max_batch_size`` is > 0, then the config for ``max_batch_size``, the scheduler
(``dynamic_batching``) and which inputs are ``optional``. Its inputs live in a map
sorted by name, and its ``random``/``zero`` data modes fill *every* input, so with
two alternative inputs those modes send both and the request is refused. Give it
data for one input instead; both inputs are ``optional`` in the config, so it sends
only the one its data names::

    # images.json: pixels for a few requests (perf_analyzer cycles through the steps)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    Path("images.json").write_text(json.dumps(perf_analyzer_input_data(images=pixels)))

    perf_analyzer -m seednet -u localhost:8000 -i http --input-data images.json \\
        -b 8 --concurrency-range 1:16

(``-b`` is the images per request; keep it within ``max_batch_size``.) A model view
that advertises only ``images`` (``inputs=["images"]`` below) would let random data
drive it as well. Over gRPC
perf_analyzer also calls Triton's ``ModelConfig`` rpc, which the KServe protocol does
not define; ``grpc_predict_v2.proto`` adds it (``grpc_codec.model_config_response``),
so ``-i grpc`` works too.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.frontends.oip.codec.signature import SEEDNET, ModelSignature, TensorSpec
from service.frontends.oip.codec.tensors import serialize_bytes

#: Protocol extensions this package implements (reported in server metadata).
EXTENSIONS: tuple[str, ...] = ("binary_tensor_data", "classification", "model_configuration")
#: Maps that say where the model looks, returned when named (``signature.explain_outputs``);
#: listed in server metadata when the server explains.
EXPLAIN_EXTENSION = "explain"


def config_data_type(datatype: str) -> str:
    """Protocol datatype -> Triton model-config ``data_type`` (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _select(signature: ModelSignature, inputs: Sequence[str] | None) -> list[TensorSpec]:
    if inputs is None:
        return list(signature.inputs)
    chosen = [signature.input(n) for n in inputs]
    if not chosen or None in chosen:
        raise ValueError(f"inputs must be a non-empty subset of {signature.input_names}")
    return chosen  # type: ignore[return-value]


def server_metadata(
    name: str, version: str, extensions: Sequence[str] = EXTENSIONS
) -> dict[str, Any]:
    """``GET /v2``: ``{"name", "version", "extensions"}``."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    signature: ModelSignature = SEEDNET,
    inputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: shapes with ``-1`` for the batch dimension.

    ``inputs`` restricts the advertised inputs (e.g. ``["images"]`` for a view that
    perf_analyzer's random data can drive); default: all, ``images`` first.
    """

    def tensor(t: TensorSpec) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.datatype, "shape": [-1, *t.dims]}

    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": [tensor(t) for t in _select(signature, inputs)],
        "outputs": [tensor(t) for t in signature.outputs],
    }


def model_config(
    name: str,
    platform: str,
    max_batch_size: int,
    max_queue_delay_microseconds: int | None,
    signature: ModelSignature = SEEDNET,
    inputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: Triton's model config, as much as clients read.

    ``dims`` leave out the batch dimension (``max_batch_size`` > 0). With several
    (alternative) inputs each is ``optional``. ``image_bytes`` is ``dims: [1]`` with
    ``reshape: {shape: []}``, Triton's spelling of "one element per batch item".
    ``max_queue_delay_microseconds`` None: no ``dynamic_batching`` section.
    """
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    chosen = _select(signature, inputs)
    config_inputs = []
    for t in chosen:
        entry: dict[str, Any] = {
            "name": t.name,
            "data_type": config_data_type(t.datatype),
            "dims": list(t.dims),
        }
        if () in t.also_accepted:
            entry["reshape"] = {"shape": []}
        if len(chosen) > 1:
            entry["optional"] = True
        config_inputs.append(entry)
    config: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": config_inputs,
        "output": [
            {"name": t.name, "data_type": config_data_type(t.datatype), "dims": list(t.dims)}
            for t in signature.outputs
        ],
    }
    if max_queue_delay_microseconds is not None:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(max_queue_delay_microseconds)
        }
    return config


def perf_analyzer_input_data(
    images: np.ndarray | None = None, image_files: Sequence[bytes] | None = None
) -> dict[str, Any]:
    """perf_analyzer ``--input-data`` JSON naming one input: one step per image.

    ``images``: UINT8 ``[K, 3, 32, 32]``; ``image_files``: K encoded image files (sent
    base64, framed as BYTES, which is what perf_analyzer expects for BYTES data).
    """
    if (images is None) == (image_files is None):
        raise ValueError("give exactly one of images, image_files")
    if images is not None:
        arr = np.asarray(images, dtype=np.uint8)
        return {
            "data": [
                {"images": {"content": img.reshape(-1).tolist(), "shape": list(img.shape)}}
                for img in arr
            ]
        }
    return {
        "data": [
            {
                "image_bytes": {
                    "content": {"b64": base64.b64encode(serialize_bytes([f])).decode()},
                    "shape": [1],
                }
            }
            for f in image_files  # type: ignore[union-attr]
        ]
    }
