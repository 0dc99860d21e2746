"""The common currency: the fraction of the MLP's weight bytes a batch-1 decode step reads per token.

Every module that :func:`awq.methods.base.sparsify_` installs reports, per token, the share of each
projection's weights it had to read (rows of gate/up and columns of down for a neuron mask, columns
of gate/up for input sparsity, ...) to a :class:`ReadMeter`. The meter is fed from the masks
actually applied on the evaluation tokens, never from a target sparsity. A predictor's own weights
are added as a fraction of the MLP's (``extra``).

With equally sized gate, up and down weights (every SwiGLU MLP), the read fraction of a token is the
mean of its three per-projection fractions.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Union

import torch
from torch import nn

from awq.load.arch import PROJS
from awq.methods.base import SwappedMLP, swapped_mlps

Frac = Union[float, torch.Tensor]


class ReadMeter:
    """Per-layer sums over tokens of the fraction of each projection's weights read."""

    def __init__(self, num_layers: int, sizes: Optional[Mapping[str, int]] = None) -> None:
        self.sums = torch.zeros(num_layers, len(PROJS), dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)
        self.sizes = dict(sizes) if sizes else {p: 1 for p in PROJS}

    @torch.no_grad()
    def add(self, layer: int, tokens: int, gate_proj: Frac, up_proj: Frac, down_proj: Frac) -> None:
        """Record ``tokens`` tokens; each fraction is a number (same for every token) or a per-token tensor."""
        for j, f in enumerate((gate_proj, up_proj, down_proj)):
            if isinstance(f, torch.Tensor):
                v = float(f.double().sum()) if f.numel() > 1 else float(f) * tokens
            else:
                v = float(f) * tokens
            self.sums[layer, j] += v
        self.tokens[layer] += tokens

    def counts(self) -> dict:
        """The sums so far, JSON-able (a resumable run stores them with each finished window)."""
        return {"sums": self.sums.tolist(), "tokens": self.tokens.tolist()}

    def add_counts(self, counts: Mapping) -> None:
        """Add sums saved by :meth:`counts` (the windows a resumed run does not compute again)."""
        self.sums += torch.tensor(counts["sums"], dtype=torch.float64)
        self.tokens += torch.tensor(counts["tokens"], dtype=torch.float64)

    def per_projection(self) -> dict[str, float]:
        """Mean over layers and tokens of each projection's read fraction."""
        tot = float(self.tokens.sum())
        if tot == 0:
            return {p: float("nan") for p in PROJS}
        return {p: float(self.sums[:, j].sum()) / tot for j, p in enumerate(PROJS)}

    def per_layer(self) -> list[Optional[float]]:
        w = torch.tensor([self.sizes[p] for p in PROJS], dtype=torch.float64)
        out = []
        for i in range(self.tokens.numel()):
            t = float(self.tokens[i])
            out.append(None if t == 0 else float((self.sums[i] / t * w).sum() / w.sum()))
        return out

    def weight_read_fraction(self, extra: float = 0.0) -> float:
        """Weight-size-weighted read fraction of the MLP, plus ``extra`` (e.g. the predictor's share)."""
        pp = self.per_projection()
        w = sum(self.sizes[p] for p in PROJS)
        return sum(pp[p] * self.sizes[p] for p in PROJS) / w + extra

    def per_layer_projection(self) -> dict[str, list[Optional[float]]]:
        """Per layer, the mean read fraction of each projection (e.g. TEAL: gate = up = density of x, down = of h)."""
        return {p: [None if float(t) == 0 else float(self.sums[i, j] / t) for i, t in enumerate(self.tokens)]
                for j, p in enumerate(PROJS)}

    def summary(self, extra: float = 0.0) -> dict:
        return {"weight_read_fraction": self.weight_read_fraction(extra), "per_projection": self.per_projection(),
                "per_layer": self.per_layer(), "per_layer_projection": self.per_layer_projection(), "extra": extra,
                "tokens_per_layer": float(self.tokens.max())}


def mlp_weight_sizes(mlp: nn.Module) -> dict[str, int]:
    """Weight bytes of gate/up/down of a (base) MLP."""
    return {p: getattr(mlp, p).weight.numel() * getattr(mlp, p).weight.element_size() for p in PROJS}


@contextlib.contextmanager
def metering(model: nn.Module) -> Iterator[ReadMeter]:
    """Attach one :class:`ReadMeter` to every swapped MLP of ``model`` for the ``with`` block."""
    mods = swapped_mlps(model, SwappedMLP)
    if not mods:
        raise RuntimeError("model has no sparsified MLPs: call awq.methods.base.sparsify_() first")
    sizes = mlp_weight_sizes(mods[0].base) if all(hasattr(mods[0].base, p) for p in PROJS) else None
    meter = ReadMeter(len(mods), sizes)
    for m in mods:
        m.read_meter = meter
    try:
        yield meter
    finally:
        for m in mods:
            m.read_meter = None
