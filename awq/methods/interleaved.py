"""The SwiGLU MLP behind a :class:`awq.methods.gathered.GatheredSparseMLP`: strided views of its
interleaved ``[F, 3, H]`` weight (gate row, up row, down column per neuron), so nothing is stored twice."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _linear_view(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An nn.Linear whose weight (and bias) *are* the given tensors (views, no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class InterleavedMLP(nn.Module):
    """The SwiGLU MLP behind a :class:`GatheredSparseMLP`, as strided views of its ``[F, 3, H]`` weight."""

    def __init__(self, mod: nn.Module) -> None:  # a GatheredSparseMLP
        super().__init__()
        w = mod.weight
        object.__setattr__(self, "interleaved", w)  # unregistered; reused when re-configured (no copy)
        bg = None if mod.bias_gu is None else mod.bias_gu[:, 0].to(w.dtype)
        bu = None if mod.bias_gu is None else mod.bias_gu[:, 1].to(w.dtype)
        self.gate_proj, self.up_proj = _linear_view(w[:, 0], bg), _linear_view(w[:, 1], bu)
        self.down_proj = _linear_view(w[:, 2].t(), mod.bias_down)
        self.act_fn = mod.act_fn

    def shares_storage(self) -> bool:
        """Whether the projections are still views of ``interleaved`` (not moved or replaced since)."""
        w = self.interleaved
        return (self.gate_proj.weight.device == w.device and self.gate_proj.weight.data_ptr() == w.data_ptr()
                and self.down_proj.weight.data_ptr() == w[:, 2].data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
