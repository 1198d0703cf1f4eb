"""tritonclient.http.InferenceServerClient against the REST codec behind a tiny server.

The server (stdlib http.server, scaffolding only) routes the v2 URLs to the protocol
functions; the client is the real one, so headers, body layout, metadata and config
are checked the way tritonclient reads them.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tritonclient.http as httpclient
from oip_helpers import MAX_BATCH, images
from tritonclient.utils import InferenceServerException

from service.errors import ProtocolError
from service.frontends.oip.codec.metadata import model_config, model_metadata, server_metadata
from service.frontends.oip.codec.rest import (
    INFERENCE_HEADER_CONTENT_LENGTH,
    build_rest_response,
    error_body,
    parse_header_length,
    parse_rest_request,
)


def _stand_in_model(pixels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(pixels)
    probs = np.full((n, 10), 0.05, np.float32)
    probs[np.arange(n), pixels.reshape(n, -1)[:, 0] % 10] = 0.55
    return {"probabilities": probs, "attention": np.full((n, 7, 2), 0.5, np.float32)}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, doc) -> None:
        self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def do_GET(self):
        if self.path == "/v2":
            self._json(server_metadata("seednet", "0.1.0"))
        elif self.path == "/v2/models/seednet":
            self._json(model_metadata("seednet", ["1"], "pytorch_libtorch"))
        elif self.path == "/v2/models/seednet/config":
            self._json(model_config("seednet", "pytorch_libtorch", MAX_BATCH, 2000))
        else:
            self._send(404, error_body("not found"), {"Content-Type": "application/json"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            length = parse_header_length(self.headers.get(INFERENCE_HEADER_CONTENT_LENGTH))
            req = parse_rest_request(body, length, max_batch_size=MAX_BATCH)
        except ProtocolError as exc:
            self._send(400, error_body(exc.message), {"Content-Type": "application/json"})
            return
        resp = build_rest_response(
            req, _stand_in_model(req.images), model_name="seednet", model_version="1"
        )
        self._send(200, resp.body, resp.headers)


@pytest.fixture(scope="module")
def client():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.server_address[1]}")
    yield c
    c.close()
    server.shutdown()


def test_metadata_and_config(client):
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("seednet")
    assert meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}
    config = client.get_model_config("seednet")
    assert config["max_batch_size"] == MAX_BATCH
    assert config["input"][0]["dims"] == [3, 32, 32]


@pytest.mark.parametrize("binary", [True, False])
def test_infer(client, rng, binary):
    pixels = images(rng, 4)
    i = httpclient.InferInput("images", list(pixels.shape), "UINT8")
    i.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2),
        httpclient.InferRequestedOutput("attention", binary_data=binary),
    ]
    result = client.infer("seednet", [i], outputs=outputs, request_id="h1")
    assert result.get_response()["id"] == "h1"
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 2)
    for row, px in zip(top, pixels, strict=True):
        first = row[0] if isinstance(row[0], str) else bytes(row[0]).decode()
        assert first.startswith(f"0.550000:{px.reshape(-1)[0] % 10}:")
    np.testing.assert_array_equal(result.as_numpy("attention"), np.full((4, 7, 2), 0.5, np.float32))


def test_refused_request_reaches_the_client_as_its_message(client, rng):
    i = httpclient.InferInput("images", [MAX_BATCH + 1, 3, 32, 32], "UINT8")
    i.set_data_from_numpy(images(rng, MAX_BATCH + 1))
    with pytest.raises(InferenceServerException, match=f"at most {MAX_BATCH} per request") as err:
        client.infer("seednet", [i])
    assert err.value.status() == "400"
