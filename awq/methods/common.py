"""Shared pieces of the training-free sparsity methods: density checks, calibration inputs, quantiles.

Calibration follows one recipe for every method: run the *dense* model on a few train-part windows,
keep each decoder layer's MLP input ``x`` (a token subsample), and derive the statistic a method
thresholds (``|x|``, ``|act(g)|``, ``|act(g)*u|`` ...) from ``x`` and the layer's own weights.
The threshold for a target density ``d`` is the exact value above which a fraction ``d`` of the
calibration entries lies (:func:`keep_threshold`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from awq.load.arch import decoder_layers
from awq.methods.base import base_mlp, unsparsify_

log = logging.getLogger(__name__)


class MethodError(ValueError):
    """Bad method name or setting (one-line message)."""


def check_density(density: float, what: str = "density") -> float:
    d = float(density)
    if not (0.0 < d <= 1.0) or d != d:
        raise MethodError(f"{what} must be in (0, 1], got {density}")
    return d


def keep_threshold(scores: torch.Tensor, density: float) -> float:
    """Smallest ``t`` such that ``scores >= t`` keeps a fraction ``density`` of ``scores`` (0.0 keeps all).

    Exact: the ``n_drop + 1``-th smallest value, ``n_drop = round((1 - density) * N)``.
    """
    check_density(density)
    flat = scores.detach().reshape(-1).float()
    n_drop = int(round((1.0 - density) * flat.numel()))
    if n_drop <= 0:
        return 0.0
    n_drop = min(n_drop, flat.numel() - 1)
    return float(torch.kthvalue(flat.cpu(), n_drop + 1).values)


def mlp_of(model: nn.Module, layer: int) -> nn.Module:
    return base_mlp(decoder_layers(model)[layer].mlp)


@torch.no_grad()
def collect_mlp_inputs(model: nn.Module, windows: torch.Tensor, max_tokens: Optional[int] = 4096,
                       seed: int = 0) -> list[torch.Tensor]:
    """MLP inputs ``[tokens, hidden]`` (float32, CPU) of every decoder layer on the dense model.

    The model is un-sparsified first. With ``max_tokens`` a fixed random subsample of token
    positions (the same for every layer, drawn with ``seed``) is kept.
    """
    unsparsify_(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    bufs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def pre(mod, args, i=i):
            bufs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
        hooks.append(layer.mlp.register_forward_pre_hook(pre))
    try:
        for w in range(windows.size(0)):
            model(windows[w : w + 1].to(device))
    finally:
        for h in hooks:
            h.remove()
    xs = [torch.cat(b) for b in bufs]
    n = xs[0].shape[0]
    if max_tokens is not None and n > max_tokens:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:max_tokens].sort().values
        xs = [x[idx] for x in xs]
    log.info("calibration: %d MLP inputs per layer from %d windows", xs[0].shape[0], windows.size(0))
    return xs


@torch.no_grad()
def dense_h(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(gate(x)), up(x))`` of a base MLP on ``x`` (float32, on the weights' device)."""
    dev, dt = mlp.gate_proj.weight.device, mlp.gate_proj.weight.dtype
    xx = x.to(dev, dt)
    return mlp.act_fn(mlp.gate_proj(xx)).float(), mlp.up_proj(xx).float()


def token_density(mask: torch.Tensor) -> torch.Tensor:
    """Per-token fraction of kept entries of a ``[..., width]`` boolean mask -> ``[tokens]`` float64."""
    m = mask.reshape(-1, mask.shape[-1])
    return m.sum(1, dtype=torch.float64) / m.shape[-1]


def neuron_masked_mlp(m: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The gated MLP of a swapped module ``m`` on the neurons ``keep`` marks (gate, up and down read only there):
    ``down((act(gate x) * up x) * keep)``, with its ``down_proj`` observers and the read meter (every projection at
    the token's share of kept neurons)."""
    y = m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x) * keep)
    if m.observers:
        m._notify("down_proj", y)
    if m.read_meter is not None:
        d = token_density(keep)
        m.read_meter.add(m.layer_idx, d.numel(), d, d, d)
    return y


def mlp_dims(model: nn.Module) -> tuple[int, int]:
    mlp = mlp_of(model, 0)
    return mlp.gate_proj.in_features, mlp.gate_proj.out_features


@dataclass
class CalibData:
    """Train-part windows plus the dense MLP inputs collected from them (once, on first use): what every
    method's calibration reads (:attr:`awq.methods.registry.MethodSpec.calibrate`)."""

    windows: torch.Tensor
    model_name: Optional[str] = None
    max_tokens: Optional[int] = 4096
    seed: int = 0
    centroids: Optional[str] = None  # cluster_*: a --centroids spec (gate=FILE,up=FILE,down=FILE or a folder)
    predictor: Optional[str] = None  # cluster_predicted: a cluster predictor file (python -m awq.predictor train)
    _xs: Optional[list] = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # per-calibration-set results a method reuses across densities

    def xs(self, model: nn.Module) -> list[torch.Tensor]:
        if self._xs is None:
            self._xs = collect_mlp_inputs(model, self.windows, self.max_tokens, self.seed)
        return self._xs


def as_calib(calib: Any) -> CalibData:
    """``calib`` itself, or train windows wrapped as :class:`CalibData`."""
    return calib if isinstance(calib, CalibData) else CalibData(windows=calib)
