"""Explanations (seednet.explain) on a really trained tiny model and real CIFAR-10 images."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image

from registry import Registry
from seednet.constants import CIFAR10_CLASSES
from seednet.explain import OUTPUT_NAMES, Explainer
from seednet.graph import inference_model
from seednet.model import kaiming_init
from tests.conftest import REPO

CLASSES = ("cat", "ship", "frog")


@pytest.fixture(scope="module")
def tiny_model(tiny_run: Path):
    config = json.loads((tiny_run / "config.json").read_text())["model_config"]
    return inference_model(config, tiny_run / "model.safetensors")


@pytest.fixture(scope="module")
def explainer(tiny_model) -> Explainer:
    return Explainer(tiny_model)


@pytest.fixture(scope="module")
def images(cifar_dir: Path) -> np.ndarray:
    """Three real test images (JPEG files as stored), uint8 [3, 3, 32, 32]."""
    files = [sorted((cifar_dir / "test" / c).glob("*.jpg"))[0] for c in CLASSES]
    return np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])


@pytest.fixture(scope="module")
def result(explainer, images) -> dict[str, np.ndarray]:
    return explainer.explain(images)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel(), kind="stable"), kind="stable")
    rb = np.argsort(np.argsort(b.ravel(), kind="stable"), kind="stable")
    return float(np.corrcoef(ra, rb)[0, 1])


def test_outputs_have_the_documented_names_shapes_and_ranges(result, explainer):
    n, nb, nl = 3, explainer.num_blocks, explainer.num_branches
    assert (nb, nl) == (7, 2)
    expected = {
        "logits": (np.float32, (n, 10)),
        "probabilities": (np.float32, (n, 10)),
        "target": (np.int64, (n,)),
        "attention": (np.float32, (n, nb, nl)),
        "blocks": (np.int64, (nb,)),
        "gradcam": (np.float32, (n, nb, 32, 32)),
        "branch_gradcam": (np.float32, (n, nb, nl, 32, 32)),
        "branch_gradcam_share": (np.float32, (n, nb, nl)),
        "branch_strength": (np.float32, (n, nb, nl, 32, 32)),
        "branch_strength_share": (np.float32, (n, nb, nl)),
        "macro_blocks": (np.int64, (2, 2)),
        "macro_gradcam": (np.float32, (n, 2, 32, 32)),
    }
    assert tuple(result) == OUTPUT_NAMES == tuple(expected)
    for name, (dtype, shape) in expected.items():
        assert result[name].dtype == dtype, name
        assert result[name].shape == shape, name
        assert np.isfinite(result[name]).all(), name
    assert result["blocks"].tolist() == list(range(1, 8))
    assert result["macro_blocks"].tolist() == [[3, 4], [6, 7]]
    for name in ("gradcam", "branch_gradcam", "branch_strength", "macro_gradcam"):
        maps = result[name]
        assert maps.min() >= 0.0 and maps.max() <= 1.0, name
    # Each map scaled on its own peaks at exactly 1 (or is all zeros: no positive evidence).
    peaks = result["gradcam"].max(axis=(2, 3))
    assert np.all((peaks == 1.0) | (peaks == 0.0)) and (peaks == 1.0).mean() > 0.5
    # Branch maps of a block are scaled together: the block's strongest branch peaks at 1.
    assert np.allclose(result["branch_strength"].max(axis=(2, 3, 4)), 1.0)


def test_predictions_match_the_served_graph(result, tiny_model, images):
    with torch.no_grad():
        probabilities, attention = tiny_model(torch.from_numpy(images))
    np.testing.assert_allclose(result["probabilities"], probabilities.numpy(), atol=1e-5)
    np.testing.assert_allclose(result["attention"], attention.numpy(), atol=1e-5)


def test_default_target_is_the_predicted_class(result):
    assert result["target"].tolist() == result["logits"].argmax(1).tolist()


def test_another_class_changes_the_class_maps_but_not_the_strength(explainer, images, result):
    other = [int(np.argsort(row)[-2]) for row in result["logits"]]  # the runner-up
    asked = explainer.explain(images, target=other)
    assert asked["target"].tolist() == other
    for name in ("gradcam", "branch_gradcam", "macro_gradcam"):
        differences = np.abs(asked[name] - result[name]).reshape(3, -1).max(1)
        assert (differences > 0.05).all(), name
    # The strength maps do not depend on the class, by design.
    np.testing.assert_array_equal(asked["branch_strength"], result["branch_strength"])
    np.testing.assert_array_equal(asked["logits"], result["logits"])
    single = explainer.explain(images[:1], target=other[0])
    np.testing.assert_allclose(single["gradcam"][0], asked["gradcam"][0], atol=1e-4)


def test_branch_shares_sum_to_one_per_block(result):
    for name in ("branch_gradcam_share", "branch_strength_share"):
        shares = result[name]
        assert (shares >= 0).all() and (shares <= 1).all()
        np.testing.assert_allclose(shares.sum(axis=2), 1.0, atol=1e-6)


def test_branch_maps_decompose_the_block_gradcam(explainer, images):
    """Before the ReLU the branches' Grad-CAMs add up to the block's (one sum, L parts):
    where both branches are positive the block map is positive too."""
    r = explainer.explain(images, blocks=[3])
    block = r["gradcam"][:, 0]
    both = (r["branch_gradcam"][:, 0] > 0).all(axis=1)
    assert both.any() and (block[both] > 0).all()


def test_maps_equal_captum_layer_gradcam_layer_by_layer(explainer, images, result):
    net = explainer.model

    def forward(x):
        return net.model(x)[0]

    # The input needs gradients here: LayerGradCam also hooks the block's attention output.
    x = net.normalize(torch.from_numpy(images)).requires_grad_(True)
    target = torch.from_numpy(result["target"])

    def reference(layer, first_only: bool) -> np.ndarray:
        cam = LayerGradCam(forward, layer).attribute(x, target=target, relu_attributions=True)
        cam = cam[0] if first_only else cam
        up = LayerAttribution.interpolate(cam, (32, 32), "bilinear").detach()
        peak = up.amax(dim=(1, 2, 3), keepdim=True)
        return torch.where(peak > 0, up / peak.clamp_min(1e-30), up).numpy()

    for number in (1, 2, 5, 7):
        block = explainer._blocks[number - 1]
        expected = reference(block, first_only=True)[:, 0]
        np.testing.assert_allclose(result["gradcam"][:, number - 1], expected, atol=1e-4)
        per_branch = np.concatenate([reference(b, False) for b in block.branches], axis=1)
        # Branch maps are scaled per block, the reference per branch: compare shapes.
        ours = result["branch_gradcam"][:, number - 1]
        peak = ours.max(axis=(2, 3), keepdims=True)
        ours = np.where(peak > 0, ours / np.maximum(peak, 1e-30), ours)
        np.testing.assert_allclose(ours, per_branch, atol=1e-4)
    for m, (pool, _, _) in enumerate(explainer._macros):
        np.testing.assert_allclose(
            result["macro_gradcam"][:, m], reference(pool, False)[:, 0], atol=1e-4
        )


def test_chosen_blocks_give_the_same_maps_as_all(explainer, images, result):
    r = explainer.explain(images, blocks=[6, 2, 6], macro=False)
    assert r["blocks"].tolist() == [2, 6]
    assert r["gradcam"].shape == (3, 2, 32, 32) and r["macro_gradcam"].shape == (3, 0, 32, 32)
    assert r["macro_blocks"].shape == (0, 2)
    for i, number in enumerate((2, 6)):
        for name in ("gradcam", "branch_gradcam", "branch_strength"):
            np.testing.assert_allclose(r[name][:, i], result[name][:, number - 1], atol=1e-6)


def test_randomised_weights_change_the_maps(tiny_model, images, result):
    torch.manual_seed(0)
    randomised = Explainer(tiny_model)
    # Cascading randomisation from the top, as in the model-parameter randomisation test:
    # the classifier and the head first.
    kaiming_init(randomised.model.model.classifier)
    kaiming_init(randomised.model.model.head_conv)
    r = randomised.explain(images, target=result["target"].tolist())
    for block in (4, 7):
        rho = [
            spearman(r["gradcam"][i, block - 1], result["gradcam"][i, block - 1]) for i in range(3)
        ]
        assert np.mean(rho) < 0.9, (block, rho)
        assert not np.allclose(r["gradcam"][:, block - 1], result["gradcam"][:, block - 1])
    # The explainer works on its own copy: the original model is unchanged.
    again = Explainer(tiny_model).explain(images)
    np.testing.assert_array_equal(again["gradcam"], result["gradcam"])


def test_deterministic_and_safe_across_threads(explainer, images, result):
    outputs: list[dict] = []

    def call():
        outputs.append(explainer.explain(images))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == 3
    for out in outputs:
        for name in OUTPUT_NAMES:
            # equal up to float summation order (torch's thread count is per process and
            # other tests in the same process may change it)
            np.testing.assert_allclose(out[name], result[name], rtol=0, atol=1e-5)
    # No hook is left behind on the model.
    modules = list(explainer.model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_torch_input_and_chunks_give_the_same_maps(explainer, images, result, monkeypatch):
    monkeypatch.setattr("seednet.explain.CHUNK", 2)
    r = explainer.explain(torch.from_numpy(images))
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(r[name], result[name], atol=1e-4)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([0], "block 0 is out of range: this model has blocks 1 to 7"),
        ([8], "block 8 is out of range"),
        ([1, -1], "block -1 is out of range"),
        ([], "blocks is empty"),
        ([True], "block numbers are integers"),
        (["3"], "block numbers are integers"),
        ("3", "blocks must be a list"),
        (3, "blocks must be a list"),
    ],
)
def test_bad_blocks_are_a_clear_value_error(explainer, images, blocks, message):
    with pytest.raises(ValueError, match=message):
        explainer.explain(images, blocks=blocks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 10}, "target 10 is out of range: classes are 0 to 9"),
        ({"target": -1}, "target -1 is out of range"),
        ({"target": [1, 2]}, "target has 2 entries for 3 images"),
        ({"target": 1.5}, "target must be a class index"),
        ({"target": True}, "target must be a class index"),
    ],
)
def test_bad_target_is_a_clear_value_error(explainer, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        explainer.explain(images, **kwargs)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 3, 32, 32), np.float32), "images must be uint8"),
        (np.zeros((3, 32, 32), np.uint8), r"shape \[N, 3, 32, 32\]"),
        (np.zeros((1, 32, 32, 3), np.uint8), r"shape \[N, 3, 32, 32\]"),
        (np.zeros((0, 3, 32, 32), np.uint8), "N >= 1"),
        ([[1, 2]], "numpy array or a tensor"),
    ],
)
def test_bad_images_are_a_clear_value_error(explainer, images, message):
    with pytest.raises(ValueError, match=message):
        explainer.explain(images)


def test_from_registry_loads_the_verified_production_weights(images):
    registry = Registry(REPO / "models")
    explainer = Explainer.from_registry(registry, registry.resolve("seednet-small", "production"))
    r = explainer.explain(images[:1], blocks=[7])
    assert CIFAR10_CLASSES[int(r["target"][0])] == CLASSES[0]  # the trained model sees a cat
    assert r["gradcam"].shape == (1, 1, 32, 32) and r["gradcam"].max() == 1.0


def test_temperature_changes_probabilities_only(tiny_model, images, result):
    r = Explainer(tiny_model, temperature=2.0).explain(images)
    np.testing.assert_array_equal(r["gradcam"], result["gradcam"])
    np.testing.assert_allclose(
        r["probabilities"], torch.softmax(torch.from_numpy(result["logits"]) / 2, 1), atol=1e-6
    )
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Explainer(tiny_model, temperature=0)
