"""An exponential moving average of a model's weights and buffers, with no host syncs.

``torch.optim.swa_utils.AveragedModel`` reads its step counter from a device tensor twice
per update (two host syncs per training step on a GPU). This keeps the counter on the
host, averages every floating-point parameter and buffer (BatchNorm running statistics
included) with one ``_foreach_lerp_``, copies the integer buffers, and can copy the
average back into the trained model (airbench's lookahead). Its state dict has the keys
AveragedModel's had (``module.*``, ``n_averaged``).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn


def _tensors(model: nn.Module) -> list[Tensor]:
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]


class WeightEMA(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self.count = 0  # = n_averaged, kept on the host

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], ...]:
        """(average's floats, model's floats, average's integers, model's integers)."""
        mine, theirs = _tensors(self.module), _tensors(model)
        if len(mine) != len(theirs):
            raise ValueError("WeightEMA: the model's structure differs from the average's")
        out: tuple[list[Tensor], ...] = ([], [], [], [])
        for a, b in zip(mine, theirs, strict=True):
            i = 0 if a.is_floating_point() else 2
            out[i].append(a)
            out[i + 1].append(b)
        return out

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, lookahead: bool = False) -> None:
        """ema = decay * ema + (1 - decay) * model (the first update copies the model);
        integer buffers are copied. ``lookahead`` then copies the average into ``model``."""
        ema_f, model_f, ema_i, model_i = self._pairs(model)
        if self.count == 0:
            torch._foreach_copy_(ema_f, model_f)
        else:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        for a, b in zip(ema_i, model_i, strict=True):
            a.copy_(b)
        if lookahead:
            torch._foreach_copy_(model_f, ema_f)
        self.count += 1
        self.n_averaged.fill_(self.count)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Copy the average's floating-point parameters and buffers into ``model``."""
        ema_f, model_f, _, _ = self._pairs(model)
        torch._foreach_copy_(model_f, ema_f)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.count = int(self.n_averaged)
        return result


def ema_decay_at(step: int, total: int, decay: float, every: int = 1, warmup: float = 0.0) -> float:
    """The decay of one update at (1-based) training step ``step`` of ``total``:
    ``decay ** every``, times ``(step / total) ** warmup`` when warming up (airbench's
    schedule: average little early on, strongly at the end)."""
    base = decay**every if every != 1 else decay
    if warmup == 0.0:
        return base
    return base * (min(step, total) / total) ** warmup


def ema_due(step: int, total: int, every: int = 1, start: float = 0.0) -> bool:
    """Whether the EMA updates after (1-based) step ``step``."""
    return step % every == 0 and step > int(start * total)
