"""TEAL's block-wise greedy sparsity allocation, for TEAL and WINA (``teal_greedy``, ``wina_greedy``).

TEAL (Liu et al., ICLR 2025, "block-wise greedy optimization") does not give every tensor of a block the
same sparsity: per block it starts dense and repeatedly raises the sparsity of the one tensor whose
increase adds least to the block's output error, each step raising the block's size-weighted sparsity by a
fixed amount; the block-level sparsity is then the same in every block.  Here the block is the MLP, whose
sparsified inputs are

* ``x`` (read by gate and up: 2/3 of the MLP's weight bytes; one mask for both, so TEAL's column-gathered
  batch-1 kernel applies unchanged), and
* ``h = act(gate(x)) * up(x)`` (read by down: 1/3),

so a block density ``D = (2 d_x + d_h) / 3`` is split per layer into ``(d_x, d_h)``.  One step lowers ``D`` by
``step``: either ``d_x`` by ``1.5 step`` or ``d_h`` by ``3 step``, whichever gives the smaller relative output
error ``||MLP_sparse(X) - MLP(X)||^2 / ||MLP(X)||^2`` on ``tokens`` calibration inputs ``X`` of that layer.  A
target ``D`` between two steps takes the next step's choice part way.  Thresholds for a component density
are the same quantiles as uniform TEAL / WINA (:func:`awq.methods.teal.calibrate_teal`: of ``|x| (* s_x)`` and
of the dense ``|h| (* s_h)``), so only the allocation differs from ``teal`` / ``wina``; the modules, the read
accounting and the batch-1 kernel are TEAL's / WINA's.

Deviation from TEAL: TEAL thresholds gate's and up's inputs separately (seven tensors per Llama block, the
attention's too); here they share one mask (the kernel reads ``[W_gate; W_up]`` columns together) and the
attention stays dense, as in the frontier's other methods.  The greedy path is computed once per
calibration set (down to the lowest density asked) and cached on it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from awq.methods.common import MethodError, check_density, dense_h, mlp_of
from awq.methods.teal import TealConfig, WinaConfig, wina_scales

log = logging.getLogger(__name__)

STEP = 0.025  # block density lowered per greedy step
TOKENS = 1024  # calibration inputs per layer on which the output error is measured
X_STEP, H_STEP = 1.5, 3.0  # component density lowered per step (x: 2/3 of the reads, h: 1/3)


@dataclass
class TealGreedyConfig(TealConfig):
    """TEAL with a per-layer (d_x, d_h) split; ``density_x[l]`` / ``density_h[l]`` as calibrated."""

    density_x: list[float] = field(default_factory=list)
    density_h: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {**super().summary(), "density_x": list(self.density_x), "density_h": list(self.density_h)}


@dataclass
class WinaGreedyConfig(WinaConfig):
    density_x: list[float] = field(default_factory=list)
    density_h: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {**super().summary(), "density_x": list(self.density_x), "density_h": list(self.density_h)}


def _sorted_threshold(sorted_scores: torch.Tensor, density: float) -> float:
    """As :func:`awq.methods.common.keep_threshold` on an ascending-sorted flat tensor."""
    n = sorted_scores.numel()
    n_drop = int(round((1.0 - density) * n))
    if n_drop <= 0:
        return 0.0
    return float(sorted_scores[min(n_drop, n - 1)])


class LayerTables:
    """The calibration quantile tables of one layer: sorted ``|x| * s_x`` and dense ``|h| * s_h``."""

    def __init__(self, mlp: nn.Module, x: torch.Tensor, kind: str) -> None:
        sx, sh = wina_scales(mlp) if kind == "wina" else (None, None)
        self.sx = None if sx is None else sx.cpu()
        self.sh = None if sh is None else sh.cpu()
        a, u = dense_h(mlp, x)
        h = (a * u).abs().cpu()
        xa = x.abs()
        self.x_sorted = (xa if self.sx is None else xa * self.sx).reshape(-1).float().sort().values
        self.h_sorted = (h if self.sh is None else h * self.sh).reshape(-1).float().sort().values

    def thresholds(self, d_x: float, d_h: float) -> tuple[float, float]:
        return _sorted_threshold(self.x_sorted, d_x), _sorted_threshold(self.h_sorted, d_h)


@torch.no_grad()
def sparse_mlp_out(mlp: nn.Module, x: torch.Tensor, t_x: float, t_h: float, sx: Optional[torch.Tensor] = None,
                   sh: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The TEAL/WINA MLP output (masked dense, as :class:`awq.methods.teal.InputSparseMLP`)."""
    xs = x * ((x.abs() if sx is None else x.abs() * sx) >= t_x)
    h = mlp.act_fn(mlp.gate_proj(xs)) * mlp.up_proj(xs)
    return mlp.down_proj(h * ((h.abs() if sh is None else h.abs() * sh) >= t_h))


@torch.no_grad()
def layer_path(mlp: nn.Module, x_all: torch.Tensor, kind: str, until: float, step: float = STEP,
               tokens: int = TOKENS, seed: int = 0) -> tuple[str, list[float]]:
    """Greedy choices (``"x"`` / ``"h"`` per step) lowering this layer's block density from 1 to ``<= until``,
    and the relative output error after each step."""
    tab = LayerTables(mlp, x_all, kind)
    dev, dt = mlp.gate_proj.weight.device, mlp.gate_proj.weight.dtype
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x_all.shape[0], generator=g)[:tokens].sort().values
    x = x_all[idx].to(dev, dt)
    sx = None if tab.sx is None else tab.sx.to(dev, dt)
    sh = None if tab.sh is None else tab.sh.to(dev, dt)
    y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    norm = float(y.double().square().sum()) or 1.0

    h_of: dict[int, torch.Tensor] = {}  # h at x-step count kx (an h step reuses it: only down is recomputed)

    def error(kx: int, kh: int) -> float:
        tx, th = tab.thresholds(1.0 - X_STEP * step * kx, 1.0 - H_STEP * step * kh)
        if kx not in h_of:
            xs = x * ((x.abs() if sx is None else x.abs() * sx) >= tx)
            h_of[kx] = mlp.act_fn(mlp.gate_proj(xs)) * mlp.up_proj(xs)
        h = h_of[kx]
        out = mlp.down_proj(h * ((h.abs() if sh is None else h.abs() * sh) >= th))
        return float((out - y).double().square().sum()) / norm

    kx = kh = 0
    choices, errors = [], []
    n_steps = math.ceil((1.0 - until) / step - 1e-9)
    for _ in range(n_steps):
        ok_x = 1.0 - X_STEP * step * (kx + 1) >= -1e-9
        ok_h = 1.0 - H_STEP * step * (kh + 1) >= -1e-9
        if not (ok_x or ok_h):
            break
        eh = error(kx, kh + 1) if ok_h else math.inf
        ex = error(kx + 1, kh) if ok_x else math.inf
        if ex <= eh:
            kx, c, e = kx + 1, "x", ex
        else:
            kh, c, e = kh + 1, "h", eh
        choices.append(c)
        errors.append(e)
        for k in [k for k in h_of if k != kx]:
            del h_of[k]
    return "".join(choices), errors


def split_at(choices: str, density: float, step: float = STEP) -> tuple[float, float]:
    """``(d_x, d_h)`` of a layer at block density ``density`` along its greedy ``choices`` (the step after
    the last whole one taken part way)."""
    r = (1.0 - density) / step
    n = int(math.floor(r + 1e-9))
    if n > len(choices) or (n == len(choices) and r - n > 1e-9):
        raise MethodError(f"greedy path of {len(choices)} steps does not reach density {density}")
    kx = float(choices[:n].count("x"))
    kh = float(n - kx)
    frac = r - n
    if frac > 1e-9:
        if choices[n] == "x":
            kx += frac
        else:
            kh += frac
    return max(0.0, 1.0 - X_STEP * step * kx), max(0.0, 1.0 - H_STEP * step * kh)


@torch.no_grad()
def calibrate_greedy(model: nn.Module, xs: list[torch.Tensor], density: float, kind: str = "teal",
                     cache: Optional[dict] = None, step: float = STEP, tokens: int = TOKENS,
                     seed: int = 0) -> TealConfig:
    """TEAL / WINA thresholds at block density ``density`` with each layer's greedy (d_x, d_h) split."""
    check_density(density)
    if kind not in ("teal", "wina"):
        raise MethodError(f"greedy allocation is for teal or wina, not {kind!r}")
    key = (kind, step, tokens, seed)
    got = None if cache is None else cache.get(key)
    if got is None or got["until"] > density + 1e-12:
        until = density  # the frontier asks its densities in ascending order: one pass for the whole sweep
        paths = []
        for i, x in enumerate(xs):
            paths.append(layer_path(mlp_of(model, i), x, kind, until, step, tokens, seed))
        got = {"until": until, "paths": paths}
        if cache is not None:
            cache[key] = got
        log.info("%s greedy: x/h choices per layer down to density %.3f: %s", kind, until,
                 " ".join(c for c, _ in paths))
    tx, th, dxs, dhs = [], [], [], []
    for i, x in enumerate(xs):
        d_x, d_h = split_at(got["paths"][i][0], density, step)
        t_x, t_h = LayerTables(mlp_of(model, i), x, kind).thresholds(d_x, d_h)
        tx.append(t_x)
        th.append(t_h)
        dxs.append(d_x)
        dhs.append(d_h)
    cls = WinaGreedyConfig if kind == "wina" else TealGreedyConfig
    return cls(tx, th, density_x=dxs, density_h=dhs)
