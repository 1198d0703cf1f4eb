"""SeedNet: blocks of parallel convolutions mixed by a softmax attention vector.

The network is built entirely from :class:`SeedNetConfig`, which is plain data
(dataclasses that round-trip through JSON), so variants need no code and a
published version records the exact config it was built from.

``SeedNet.forward`` returns ``(logits, attentions)`` where ``attentions`` holds
one ``[B, L]`` tensor per intermediate block, in network order. Tensors in,
tensors out, so the module scripts with TorchScript and exports to ONNX.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BranchConfig:
    """One parallel branch: Conv2d -> BatchNorm2d -> ReLU."""

    kernel: int = 3
    padding: int = 1
    stride: int = 1


@dataclass(frozen=True)
class BlockConfig:
    """An intermediate block: parallel branches mixed by softmax attention."""

    c_in: int
    c_out: int
    branches: tuple[BranchConfig, ...]


@dataclass(frozen=True)
class StageConfig:
    """A step of the network: one block (``kind="block"``) or a residual macro block.

    A residual stage runs its blocks in sequence, adds a shortcut of its input
    (identity, or a 1x1 conv when channels differ) and max-pools by 2.
    """

    kind: str
    blocks: tuple[BlockConfig, ...]
    pool: int = 2


@dataclass(frozen=True)
class SeedNetConfig:
    """The whole network as data."""

    stages: tuple[StageConfig, ...]
    head_conv_channels: int = 256
    head_conv_kernel: int = 3
    head_conv_padding: int = 0
    hidden: int = 128
    dropout: float = 0.5
    num_classes: int = 10

    # ----- JSON round trip -------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict) -> SeedNetConfig:
        stages = tuple(
            StageConfig(
                kind=s["kind"],
                blocks=tuple(
                    BlockConfig(
                        b["c_in"], b["c_out"], tuple(BranchConfig(**br) for br in b["branches"])
                    )
                    for b in s["blocks"]
                ),
                pool=s.get("pool", 2),
            )
            for s in data["stages"]
        )
        rest = {k: v for k, v in data.items() if k != "stages"}
        return SeedNetConfig(stages=stages, **rest)

    @staticmethod
    def from_json(text: str) -> SeedNetConfig:
        return SeedNetConfig.from_dict(json.loads(text))

    # ----- derived facts ---------------------------------------------------
    @property
    def blocks(self) -> list[BlockConfig]:
        return [b for s in self.stages for b in s.blocks]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def branches_per_block(self) -> list[int]:
        return [len(b.branches) for b in self.blocks]


def _block(c_in: int, c_out: int, k: int, p: int, s: int, layers: int = 2) -> BlockConfig:
    return BlockConfig(c_in, c_out, tuple(BranchConfig(k, p, s) for _ in range(layers)))


def seednet_config(width: float = 1.0, layers: int = 2) -> SeedNetConfig:
    """The design report's final network (``width=1``), or a uniformly narrower one."""

    def c(n: int) -> int:
        return max(8, int(round(n * width / 8)) * 8)

    return SeedNetConfig(
        stages=(
            StageConfig("block", (_block(3, c(64), 3, 1, 1, layers),)),
            # The report's "padding/stride: 2" read as both = 2: 32x32 -> 16x16.
            StageConfig("block", (_block(c(64), c(128), 5, 2, 2, layers),)),
            StageConfig(
                "residual",
                (
                    _block(c(128), c(256), 3, 1, 1, layers),
                    _block(c(256), c(256), 3, 1, 1, layers),
                ),
            ),
            StageConfig("block", (_block(c(256), c(384), 3, 1, 1, layers),)),
            StageConfig(
                "residual",
                (
                    _block(c(384), c(384), 3, 1, 1, layers),
                    _block(c(384), c(384), 3, 1, 1, layers),
                ),
            ),
        ),
        head_conv_channels=c(256),
        hidden=c(128),
    )


# Named variants, so the CLI and the registry can refer to them by name.
ARCHITECTURES: dict[str, SeedNetConfig] = {
    "seednet": seednet_config(),
    # CPU-friendly: same structure, about 1/3 of the width -> 11 % of the MACs.
    "seednet-small": seednet_config(width=0.34),
}


class IntermediateBlock(nn.Module):
    """L parallel Conv-BN-ReLU branches, mixed by a = softmax(Linear(mean(x)))."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        shapes = {(b.kernel - 2 * b.padding, b.stride) for b in cfg.branches}
        if len(shapes) != 1:
            # Branch outputs are summed, so every branch must give the same spatial size.
            raise ValueError(f"branches of one block must keep the same output shape: {cfg}")
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cfg.c_in, cfg.c_out, b.kernel, b.stride, b.padding, bias=False),
                nn.BatchNorm2d(cfg.c_out),
                nn.ReLU(inplace=True),
            )
            for b in cfg.branches
        )
        self.attention = nn.Linear(cfg.c_in, len(cfg.branches))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = x.mean(dim=(2, 3))
        a = torch.softmax(self.attention(m).float(), dim=1)
        outs = [branch(x) for branch in self.branches]
        w = a.to(outs[0].dtype)
        # Weighted sum without stacking the L outputs (saves one copy of the activations).
        out = outs[0] * w[:, 0].view(-1, 1, 1, 1)
        for i in range(1, len(outs)):
            out = out + outs[i] * w[:, i].view(-1, 1, 1, 1)
        return out, a


class ResidualMacroBlock(nn.Module):
    """Blocks in sequence plus a shortcut of the input, then max pooling."""

    def __init__(self, cfg: StageConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(IntermediateBlock(b) for b in cfg.blocks)
        c_in, c_out = cfg.blocks[0].c_in, cfg.blocks[-1].c_out
        self.shortcut: nn.Module = (
            nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        )
        self.pool = nn.MaxPool2d(cfg.pool, cfg.pool)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        attentions: list[Tensor] = []
        out = x
        for block in self.blocks:
            out, a = block(out)
            attentions.append(a)
        return self.pool(out + self.shortcut(x)), attentions


class PlainStage(nn.Module):
    """A single intermediate block as a stage (same interface as the residual one)."""

    def __init__(self, cfg: StageConfig) -> None:
        super().__init__()
        if len(cfg.blocks) != 1:
            raise ValueError("a 'block' stage holds exactly one block")
        self.block = IntermediateBlock(cfg.blocks[0])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out, a = self.block(x)
        return out, [a]


class SeedNet(nn.Module):
    """The design report's network; see ``seednet_config`` for the exact layers."""

    def __init__(self, cfg: SeedNetConfig) -> None:
        super().__init__()
        self.config = cfg
        stages: list[nn.Module] = []
        for s in cfg.stages:
            if s.kind == "block":
                stages.append(PlainStage(s))
            elif s.kind == "residual":
                stages.append(ResidualMacroBlock(s))
            else:
                raise ValueError(f"unknown stage kind {s.kind!r} (expected 'block' or 'residual')")
        self.stages = nn.ModuleList(stages)
        c_last = cfg.stages[-1].blocks[-1].c_out
        self.head_conv = nn.Sequential(
            nn.Conv2d(
                c_last,
                cfg.head_conv_channels,
                cfg.head_conv_kernel,
                padding=cfg.head_conv_padding,
                bias=False,
            ),
            nn.BatchNorm2d(cfg.head_conv_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cfg.head_conv_channels, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        attentions: list[Tensor] = []
        for stage in self.stages:
            x, a = stage(x)
            attentions.extend(a)
        logits = self.classifier(self.head_conv(x))
        return logits, attentions

    def forward_with_stage_means(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """:meth:`forward`, plus the channel means of every stage's output ``[N, C_s]``:
        what the next stage's attention reads (its input to ``IntermediateBlock.attention``),
        and the features the out-of-distribution density is fitted on."""
        attentions: list[Tensor] = []
        means: list[Tensor] = []
        for stage in self.stages:
            x, a = stage(x)
            attentions.extend(a)
            means.append(x.float().mean(dim=(2, 3)))
        logits = self.classifier(self.head_conv(x))
        return logits, attentions, means


def kaiming_init(model: nn.Module) -> None:
    """The report's initialisation: Kaiming (He) normal for convs and linears."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(cfg: SeedNetConfig, init: bool = True) -> SeedNet:
    model = SeedNet(cfg)
    if init:
        kaiming_init(model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(cfg: SeedNetConfig, size: int = 32) -> int:
    """Multiply-accumulates of convs and linears for one ``size`` x ``size`` image."""
    macs = 0
    h = size
    for s in cfg.stages:
        h_in = h
        for b in s.blocks:
            for br in b.branches:
                h_out = (h + 2 * br.padding - br.kernel) // br.stride + 1
                macs += b.c_in * b.c_out * br.kernel**2 * h_out**2
            macs += b.c_in * len(b.branches)
            h = h_out
        if s.kind == "residual":
            if s.blocks[0].c_in != s.blocks[-1].c_out:
                macs += s.blocks[0].c_in * s.blocks[-1].c_out * h_in**2
            h //= s.pool
    c_last = cfg.stages[-1].blocks[-1].c_out
    h_out = h + 2 * cfg.head_conv_padding - cfg.head_conv_kernel + 1
    macs += c_last * cfg.head_conv_channels * cfg.head_conv_kernel**2 * h_out**2
    macs += cfg.head_conv_channels * cfg.hidden + cfg.hidden * cfg.num_classes
    return macs


__all__ = [
    "ARCHITECTURES",
    "BlockConfig",
    "BranchConfig",
    "IntermediateBlock",
    "ResidualMacroBlock",
    "SeedNet",
    "SeedNetConfig",
    "StageConfig",
    "build_model",
    "count_macs",
    "count_parameters",
    "kaiming_init",
    "seednet_config",
]
