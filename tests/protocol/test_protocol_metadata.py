"""Server/model metadata and the Triton model config, held to what perf_analyzer reads."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor

from service.frontends.oip.codec.metadata import (
    EXTENSIONS,
    config_data_type,
    model_config,
    model_metadata,
    perf_analyzer_input_data,
    server_metadata,
)
from service.frontends.oip.codec.signature import SEEDNET, seednet_signature


def test_server_metadata():
    assert server_metadata("seednet", "0.1.0") == {
        "name": "seednet",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "classification", "model_configuration"],
    }
    # perf_analyzer asks for server-side statistics only when this is listed
    assert "statistics" not in EXTENSIONS


def test_model_metadata():
    assert model_metadata("seednet", [1, "2"], "onnxruntime_onnx") == {
        "name": "seednet",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "attention", "datatype": "FP32", "shape": [-1, 7, 2]},
        ],
    }


def test_model_config():
    assert model_config("seednet", "pytorch_libtorch", 64, 2000) == {
        "name": "seednet",
        "platform": "pytorch_libtorch",
        "max_batch_size": 64,
        "input": [
            {"name": "images", "data_type": "TYPE_UINT8", "dims": [3, 32, 32], "optional": True},
            {
                "name": "image_bytes",
                "data_type": "TYPE_STRING",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
        ],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]},
            {"name": "attention", "data_type": "TYPE_FP32", "dims": [7, 2]},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": 2000},
    }
    assert "dynamic_batching" not in model_config("seednet", "onnxruntime_onnx", 8, None)
    with pytest.raises(ValueError, match="max_batch_size"):
        model_config("seednet", "onnxruntime_onnx", 0, None)


@pytest.mark.parametrize("inputs", [None, ["images"], ["image_bytes"]])
def test_metadata_and_config_agree_the_way_perf_analyzer_needs(inputs):
    meta = model_metadata("m", ["1"], "pytorch_libtorch", inputs=inputs)
    config = model_config("m", "pytorch_libtorch", 16, 100, inputs=inputs)
    for kind, key in (("inputs", "input"), ("outputs", "output")):
        assert [t["name"] for t in meta[kind]] == [t["name"] for t in config[key]]
        for t, c in zip(meta[kind], config[key], strict=True):
            # max_batch_size > 0: perf_analyzer drops the first metadata dim, which
            # must be the batch (-1), and refuses an input whose remaining shape is empty
            assert t["shape"][0] == -1 and t["shape"][1:] == c["dims"] and c["dims"]
            assert c["data_type"] == config_data_type(t["datatype"])
    optional = [c.get("optional", False) for c in config["input"]]
    assert optional == [len(config["input"]) > 1] * len(config["input"])


def test_bad_input_view():
    with pytest.raises(ValueError, match="subset"):
        model_metadata("m", ["1"], "p", inputs=["pixels"])
    with pytest.raises(ValueError, match="subset"):
        model_config("m", "p", 4, None, inputs=[])


def test_data_types():
    assert config_data_type("BYTES") == "TYPE_STRING"
    assert config_data_type("UINT8") == "TYPE_UINT8"


def test_signature_follows_the_served_model():
    sig = seednet_signature(labels=["a", "b", "c"], attention_dims=(5, 3))
    meta = model_metadata("m", ["1"], "p", signature=sig)
    assert [o["shape"] for o in meta["outputs"]] == [[-1, 3], [-1, 5, 3]]
    assert SEEDNET.labels[0] == "airplane" and len(SEEDNET.labels) == 10


def test_perf_analyzer_input_data():
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3, 32, 32)
    data = perf_analyzer_input_data(images=pixels)["data"]
    assert len(data) == 2
    assert data[1]["images"]["shape"] == [3, 32, 32]
    assert data[1]["images"]["content"] == pixels[1].reshape(-1).tolist()

    files = [b"\xff\xd8 jpeg", b"\x89PNG png"]
    data = perf_analyzer_input_data(image_files=files)["data"]
    for step, f in zip(data, files, strict=True):
        tensor = step["image_bytes"]
        assert tensor["shape"] == [1]
        framed = base64.b64decode(tensor["content"]["b64"])  # BYTES: length-prefixed
        assert list(deserialize_bytes_tensor(framed)) == [f]

    with pytest.raises(ValueError, match="exactly one"):
        perf_analyzer_input_data()
