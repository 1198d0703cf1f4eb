"""The wire form of explanation maps: float16 base64 and colour-mapped PNG data URLs."""

from __future__ import annotations

import base64
import io
import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from seednet.explain import Explainer
from seednet.graph import InferenceModel
from seednet.heatmaps import (
    colormap_lut,
    encode_map,
    from_float16_base64,
    to_float16_base64,
    to_png,
    wire_explanation,
)
from seednet.model import ARCHITECTURES, build_model


def ramp() -> np.ndarray:
    return np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)


def png_pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_float16_round_trip_is_within_float16_precision():
    values = ramp()
    text = to_float16_base64(values)
    assert len(base64.b64decode(text)) == 2 * 32 * 32
    back = from_float16_base64(text)
    assert back.dtype == np.float32 and back.shape == (32, 32)
    np.testing.assert_allclose(back, values, atol=5e-4)
    # little-endian float16, row-major: the first value is 0, the last 1
    raw = np.frombuffer(base64.b64decode(text), dtype="<f2")
    assert raw[0] == 0.0 and raw[-1] == 1.0
    with pytest.raises(ValueError, match="do not hold"):
        from_float16_base64(text, (16, 16))


def test_png_is_the_map_through_the_colormap():
    values = ramp()
    opaque = png_pixels(to_png(values))
    assert opaque.format == "PNG" and opaque.size == (32, 32) and opaque.mode == "RGB"
    pixels = np.asarray(opaque)
    lut = colormap_lut("inferno")
    expected_ends = np.round(np.asarray(matplotlib.colormaps["inferno"]([0.0, 1.0]))[:, :3] * 255)
    np.testing.assert_array_equal(pixels[0, 0], expected_ends[0])
    np.testing.assert_array_equal(pixels[-1, -1], expected_ends[1])
    np.testing.assert_array_equal(pixels[0, 0], lut[0])
    overlay = png_pixels(to_png(values, cmap="viridis", overlay=True))
    assert overlay.mode == "RGBA"
    alpha = np.asarray(overlay)[..., 3]
    assert alpha[0, 0] == 0 and alpha[-1, -1] == 255 and (np.diff(alpha.ravel()) >= 0).all()
    # out-of-range and NaN values are clipped, not wrapped
    odd = np.array([[-1.0, np.nan], [2.0, 0.5]], dtype=np.float32)
    px = np.asarray(png_pixels(to_png(odd)))
    np.testing.assert_array_equal(px[0, 0], lut[0])
    np.testing.assert_array_equal(px[0, 1], lut[0])
    np.testing.assert_array_equal(px[1, 0], lut[255])


def test_bad_maps_and_options_are_value_errors():
    with pytest.raises(ValueError, match="2-D"):
        to_png(np.zeros((1, 32, 32)))
    with pytest.raises(ValueError, match="unknown colormap"):
        to_png(ramp(), cmap="no-such-map")
    with pytest.raises(ValueError, match="encodings"):
        encode_map(ramp(), ("jpeg",))


def test_encode_map_gives_data_urls_and_base64():
    encoded = encode_map(ramp())
    assert set(encoded) == {"png", "f16"}
    assert encoded["png"].startswith("data:image/png;base64,")
    png = base64.b64decode(encoded["png"].split(",", 1)[1])
    assert png_pixels(png).size == (32, 32)
    assert len(png) < 4000  # small enough for many maps per response
    np.testing.assert_allclose(from_float16_base64(encoded["f16"]), ramp(), atol=5e-4)


def test_wire_explanation_is_json_ready_and_complete():
    torch.manual_seed(0)
    explainer = Explainer(InferenceModel(build_model(ARCHITECTURES["seednet-small"]).eval()))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    result = explainer.explain(images, blocks=[2, 5])
    wire = wire_explanation(result, 1, branch_maps=("gradcam",))
    text = json.dumps(wire)  # plain data only
    assert json.loads(text) == wire
    assert wire["target"] == int(result["target"][1])
    assert wire["map_shape"] == [32, 32] and wire["encodings"] == ["png", "f16"]
    assert [b["block"] for b in wire["blocks"]] == [2, 5]
    block = wire["blocks"][1]
    assert block["attention"] == pytest.approx(result["attention"][1, 4].tolist())
    np.testing.assert_allclose(
        from_float16_base64(block["gradcam"]["f16"]), result["gradcam"][1, 1], atol=5e-4
    )
    branch = block["branches"][0]
    assert set(branch) == {"branch", "attention", "gradcam_share", "strength_share", "gradcam"}
    assert sum(b["gradcam_share"] for b in block["branches"]) == pytest.approx(1.0)
    np.testing.assert_allclose(
        from_float16_base64(branch["gradcam"]["f16"]),
        result["branch_gradcam"][1, 1, 0],
        atol=5e-4,
    )
    assert [m["blocks"] for m in wire["macro_blocks"]] == [[3, 4], [6, 7]]
    with pytest.raises(ValueError, match="branch_maps"):
        wire_explanation(result, 0, branch_maps=("shap",))
