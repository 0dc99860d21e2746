"""Per-token top-k of ``|h|``: the smallest complete method, and the template for a new one.

``h = act(gate(x)) * up(x)`` is computed in full; each token keeps its ``k = ceil(density * F)`` largest
``|h|`` and ``down`` reads only those columns: ``y = W_down[:, top] h[top]``.  Read per token: gate = up = 1,
down = k / F (so the MLP read is ``(2 + density) / 3``).  Calibration: none (the density sets ``k``).
Batch-1 kernel: the ``[gate; up]`` GEMV, the top-k, then only the kept rows of ``W_down^T``
(``dense_gemv`` and ``down_gather`` of :mod:`awq.kernels.mlp`).  Registered in :mod:`awq.methods.registry`
as ``topk``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from awq.kernels.mlp import cpp_kernel, min_bytes_per_thread
from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import CalibData, check_density, token_density
from awq.methods.dynamic_sparse import _as_row, bias_of, gu_bias, unsupported


@dataclass
class TopKConfig(MethodConfig):
    density: float  # share of the intermediate neurons each token keeps

    def validate(self, model: nn.Module) -> None:
        check_density(self.density)

    def build(self, mlp: nn.Module, layer_idx: int) -> "TopKMLP":
        return TopKMLP(mlp, layer_idx, self.density)


def top_k_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|h|`` of every row (ties: the lower index, as ``torch.topk``)."""
    keep = torch.zeros_like(h, dtype=torch.bool)
    return keep.scatter_(-1, h.abs().topk(k, dim=-1).indices, True)


class TopKDecode:
    """One token: ``[gate; up]`` GEMV, top-k of ``|h|``, the kept rows of ``W_down^T``."""

    def __init__(self, base: nn.Module, k: int) -> None:
        with torch.no_grad():
            self.wgu = torch.cat([base.gate_proj.weight.detach(), base.up_proj.weight.detach()]).contiguous()
            self.wd_t = base.down_proj.weight.detach().t().contiguous()
        self.F = self.wd_t.shape[0]
        self.bias_gu = gu_bias(bias_of(base.gate_proj), bias_of(base.up_proj), self.F)
        bd = bias_of(base.down_proj)
        self.bias_d = None if bd is None else bd.float()
        self.act_fn, self.k, self.kern = base.act_fn, k, cpp_kernel()
        self.counts = torch.zeros(1, dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.kern.dense_gemv(_as_row(x), self.wgu, min_bytes_per_thread())
        if self.bias_gu.numel():
            gu = gu + self.bias_gu
        h = self.act_fn(gu[: self.F]) * gu[self.F:]
        h = h * top_k_mask(h, self.k)
        y = self.kern.down_gather(h, self.wd_t, min_bytes_per_thread(), self.counts)
        return y if self.bias_d is None else y + self.bias_d


class TopKMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, density: float) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        self.k = max(1, math.ceil(density * base.gate_proj.out_features))

    def decode_unsupported(self) -> Optional[str]:
        return unsupported(self.base, silu_only=False)

    def prepare_decode(self) -> bool:
        if self._decode is None and self.decode_unsupported() is None:
            self._decode = TopKDecode(self.base, self.k)
        return self._decode is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            y = self._decode(x).to(x.dtype).view(x.shape)
            if self.read_meter is not None:
                self.read_meter.add(self.layer_idx, 1, 1.0, 1.0, self.k / self._decode.F)
            return y
        if self.observers:
            self._notify("input", x)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        keep = top_k_mask(h, self.k)
        y = self.down_proj(h * keep)
        if self.observers:
            self._notify("down_proj", y)
        if self.read_meter is not None:
            d = token_density(keep)
            self.read_meter.add(self.layer_idx, d.numel(), 1.0, 1.0, d)
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, topk, k={self.k}"


def calibrate_topk(model: nn.Module, calib: CalibData, density: float) -> TopKConfig:
    """Nothing to calibrate: the density is the share of neurons kept."""
    return TopKConfig(check_density(density))
