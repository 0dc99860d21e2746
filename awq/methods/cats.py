"""CATS-style neuron sparsity: threshold on ``|act(gate(x))|``.

Per layer ``l``: ``a = act(gate(x))`` is computed in full, ``keep = |a| >= t[l]``, then only the kept
neurons' rows of up and columns of down are needed: ``y = down((a * keep) * up(x))``.
Read per token: ``gate = 1``, ``up = down = density(keep)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import dense_h, keep_threshold, mlp_of, token_density
from awq.methods.dynamic_sparse import neuron_decode_for, unsupported
from awq.methods.teal import _check_layers


@dataclass
class CatsConfig(MethodConfig):
    thresholds: list[float]

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "CatsConfig", thresholds=self.thresholds)

    def extra_read(self, model: nn.Module) -> float:
        return 0.0

    def summary(self) -> dict:
        return {"thresholds": list(self.thresholds)}

    def build(self, mlp: nn.Module, i: int) -> "CatsMLP":
        return CatsMLP(mlp, i, self.thresholds[i])


class CatsMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, t: float) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        self.t = float(t)

    def decode_unsupported(self) -> Optional[str]:
        return unsupported(self.base)

    def prepare_decode(self) -> bool:
        """Make the batch-1 row-gathered kernel (:mod:`awq.methods.dynamic_sparse`; a transposed copy of
        ``W_down``) used for single-token calls from now on.  False if it cannot run here."""
        if self._decode is None:
            self._decode = neuron_decode_for(self, self.t)
        return self._decode is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            y = self._decode(x)
            if self.read_meter is not None:
                d = self._decode.density()
                self.read_meter.add(self.layer_idx, 1, 1.0, d, d)
            return y.to(x.dtype).view(x.shape)
        if self.observers:
            self._notify("input", x)
        a = self.act_fn(self.gate_proj(x))
        keep = a.abs() >= self.t
        h = (a * keep) * self.up_proj(x)
        y = self.down_proj(h)
        if self.observers:
            self._notify("gate_proj", a * keep)
            self._notify("down_proj", y)
        if self.read_meter is not None:
            d = token_density(keep)
            self.read_meter.add(self.layer_idx, d.numel(), 1.0, d, d)
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, cats, t={self.t:.4g}"


@torch.no_grad()
def calibrate_cats(model: nn.Module, xs: list[torch.Tensor], density: float) -> CatsConfig:
    """Per layer, the threshold keeping a fraction ``density`` of the calibration ``|act(gate(x))|``."""
    out = []
    for i, x in enumerate(xs):
        a, _ = dense_h(mlp_of(model, i), x)
        out.append(keep_threshold(a.abs(), density))
    return CatsConfig(out)
