"""SeedNet as the design report specifies it, and its config as data."""

from __future__ import annotations

import json

import pytest
import torch

from seednet.model import (
    ARCHITECTURES,
    BlockConfig,
    BranchConfig,
    IntermediateBlock,
    SeedNetConfig,
    build_model,
    count_macs,
    count_parameters,
)


def test_report_network_shape_and_size():
    cfg = ARCHITECTURES["seednet"]
    model = build_model(cfg).eval()
    assert count_parameters(model) == 10_223_006  # "about 10.2 M"
    assert 1.0e9 < count_macs(cfg) < 1.05e9  # "about 1 GMAC"
    assert cfg.num_blocks == 7 and cfg.branches_per_block == [2] * 7
    logits, attentions = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert [tuple(a.shape) for a in attentions] == [(3, 2)] * 7
    channels = [(b.c_in, b.c_out) for b in cfg.blocks]
    assert channels == [
        (3, 64),
        (64, 128),
        (128, 256),
        (256, 256),
        (256, 384),
        (384, 384),
        (384, 384),
    ]
    assert cfg.blocks[1].branches[0] == BranchConfig(kernel=5, padding=2, stride=2)


def test_small_variant_is_at_most_an_eighth_of_the_compute():
    assert count_macs(ARCHITECTURES["seednet-small"]) <= count_macs(ARCHITECTURES["seednet"]) / 8
    assert ARCHITECTURES["seednet-small"].num_blocks == 7


def test_attention_sums_to_one_and_gets_gradients():
    model = build_model(ARCHITECTURES["seednet-small"]).train()
    logits, attentions = model(torch.randn(4, 3, 32, 32))
    for a in attentions:
        assert torch.allclose(a.sum(1), torch.ones(4), atol=1e-6)
        assert (a > 0).all()
    logits.sum().backward()
    for block in [m for m in model.modules() if isinstance(m, IntermediateBlock)]:
        grad = block.attention.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_config_round_trips_through_json_and_rebuilds_the_same_model():
    cfg = ARCHITECTURES["seednet"]
    again = SeedNetConfig.from_json(json.dumps(json.loads(cfg.to_json())))
    assert again == cfg
    a, b = build_model(cfg).eval(), build_model(again, init=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    la, aa = a(x)
    lb, ab = b(x)
    assert torch.equal(la, lb) and all(torch.equal(p, q) for p, q in zip(aa, ab, strict=True))


def test_variants_need_no_code_mixed_kernels_and_more_branches():
    block = BlockConfig(
        16, 32, (BranchConfig(3, 1, 1), BranchConfig(5, 2, 1), BranchConfig(7, 3, 1))
    )
    ib = IntermediateBlock(block)
    out, a = ib(torch.randn(2, 16, 8, 8))
    assert out.shape == (2, 32, 8, 8) and a.shape == (2, 3)


def test_branches_that_disagree_on_output_shape_are_refused():
    with pytest.raises(ValueError, match="same output shape"):
        IntermediateBlock(BlockConfig(3, 8, (BranchConfig(3, 1, 1), BranchConfig(3, 0, 1))))


def test_inference_model_normalises_inside_the_graph():
    from seednet.constants import CIFAR10_MEAN, CIFAR10_STD
    from seednet.graph import InferenceModel, Normalize

    net = build_model(ARCHITECTURES["seednet-small"]).eval()
    wrapped = InferenceModel(net, CIFAR10_MEAN, CIFAR10_STD).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        probs, att = wrapped(images)
        logits, atts = net(Normalize()(images))
    assert torch.allclose(probs, logits.softmax(1), atol=1e-5)
    assert att.shape == (5, 7, 2)
    assert torch.allclose(att, torch.stack(atts, 1), atol=1e-6)
