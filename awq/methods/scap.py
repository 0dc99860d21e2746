"""SCAP (Statistical Calibrated Activation Pruning, IntelLabs/SCAP): input pruning after mode-centering.

Every linear map of the MLP prunes its *input* (as TEAL), but around a per-layer scalar *mode* ``m``
instead of zero, the shift folded into a bias computed once::

    x' = (x - m_x) * (|x - m_x| >= t_x)          [g; u] = W_gu x' + W_gu (m_x 1)
    h = act(g) * u
    h' = (h - m_h) * (|h - m_h| >= t_h)          y = W_down h' + W_down (m_h 1)

``m`` is the candidate among zero, the median and the peak of a kernel density estimate of the
calibration values whose pruned output is closest to the dense one (SCAP's "kde" rule picks by the
same distance).  SCAP sets the gate/up and the down sparsity separately (its released configs prune
down harder); here the split ``d_h - d_x`` at the frontier's read budget ``B = (2 d_x + d_h) / 3`` is
the one of a small grid with the least mean relative MLP output error on the calibration tokens (one
split for all layers, as SCAP uses one target per layer type).

Read per token: ``gate = up = density(x')``, ``down = density(h')``; the folded biases are vectors
(``2F + H`` numbers per layer, counted as extra).  **Batch-1 decode**: two column-gathered GEMVs of the
C++ kernel (``down_gather``: rows of ``W_gu^T`` for the kept ``x'`` entries and of ``W_down^T`` for the
kept ``h'`` entries), the shift, the biases and the activation in torch.  Any activation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from awq.kernels.mlp import cpp_kernel, min_bytes_per_thread
from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import check_density, dense_h, keep_threshold, mlp_dims, mlp_of, token_density
from awq.methods.dynamic_sparse import _as_row, bias_of, log_once, unsupported
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)

SPLITS = (-0.3, -0.15, 0.0, 0.15)  # d_h - d_x (SmolLM2 picked the lowest of (-0.15 .. 0.3): down pruned harder, as SCAP's configs)
KDE_SAMPLES = 20000
KDE_GRID = 2000


@dataclass
class ScapConfig(MethodConfig):
    budget: float
    x_modes: list[float]
    h_modes: list[float]
    x_thresholds: list[float]
    h_thresholds: list[float]
    info: dict = field(default_factory=dict)

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "ScapConfig", x_modes=self.x_modes, h_modes=self.h_modes,
                      x_thresholds=self.x_thresholds, h_thresholds=self.h_thresholds)

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        return (2 * inter + hidden) / (3.0 * hidden * inter)  # the folded biases

    def summary(self) -> dict:
        return {"budget": self.budget, "x_modes": list(self.x_modes), "h_modes": list(self.h_modes),
                "x_thresholds": list(self.x_thresholds), "h_thresholds": list(self.h_thresholds), **self.info}

    def build(self, mlp: nn.Module, i: int) -> SwappedMLP:
        return ScapMLP(mlp, i, self.x_modes[i], self.h_modes[i], self.x_thresholds[i], self.h_thresholds[i])


class ScapMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, m_x: float, m_h: float, t_x: float, t_h: float) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        self.m_x, self.m_h, self.t_x, self.t_h = float(m_x), float(m_h), float(t_x), float(t_h)
        self.F, self.H = base.gate_proj.out_features, base.gate_proj.in_features
        with torch.no_grad():
            self.b_g = self.gate_proj.weight.sum(1) * self.m_x  # W (m 1)
            self.b_u = self.up_proj.weight.sum(1) * self.m_x
            self.b_d = self.down_proj.weight.sum(1) * self.m_h
        self._decode: Optional[dict] = None

    def prepare_decode(self) -> bool:
        if self._decode is None:
            why = unsupported(self.base, silu_only=False)
            if why is not None:
                log_once(why, "SCAP decode kernel")
                return False
            with torch.no_grad():
                bg, bu, bd = (bias_of(p) for p in (self.gate_proj, self.up_proj, self.down_proj))
                self._decode = {"wgu_t": torch.cat([self.gate_proj.weight, self.up_proj.weight]).t().contiguous(),
                                "wd_t": self.down_proj.weight.detach().t().contiguous(),
                                "b_gu": torch.cat([self.b_g + (0 if bg is None else bg),
                                                   self.b_u + (0 if bu is None else bu)]).float(),
                                "b_d": (self.b_d + (0 if bd is None else bd)).float(),
                                "counts": torch.zeros(1, dtype=torch.long)}
        return True

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        k, d = cpp_kernel(), self._decode
        xc = _as_row(x) - self.m_x
        xk = (xc * (xc.abs() >= self.t_x)).contiguous()
        gu = k.down_gather(xk, d["wgu_t"], min_bytes_per_thread(), d["counts"]) + d["b_gu"]
        nx = int(d["counts"][0])
        hc = self.act_fn(gu[: self.F]) * gu[self.F:] - self.m_h
        hk = (hc * (hc.abs() >= self.t_h)).contiguous()
        y = k.down_gather(hk, d["wd_t"], min_bytes_per_thread(), d["counts"]) + d["b_d"]
        if self.read_meter is not None:
            dx = nx / self.H
            self.read_meter.add(self.layer_idx, 1, dx, dx, int(d["counts"][0]) / self.F)
        return y.to(x.dtype).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        xc = x - self.m_x
        kx = xc.abs() >= self.t_x
        xk = xc * kx
        g = self.gate_proj(xk) + self.b_g.to(x.dtype)
        u = self.up_proj(xk) + self.b_u.to(x.dtype)
        hc = self.act_fn(g) * u - self.m_h
        kh = hc.abs() >= self.t_h
        y = self.down_proj(hc * kh) + self.b_d.to(x.dtype)
        if self.observers:
            self._notify("down_proj", y)
        if self.read_meter is not None:
            dx = token_density(kx)
            self.read_meter.add(self.layer_idx, dx.numel(), dx, dx, token_density(kh))
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, scap, m_x={self.m_x:.3g}, m_h={self.m_h:.3g}, t_x={self.t_x:.4g}, t_h={self.t_h:.4g}"


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def kde_peak(values: torch.Tensor, samples: int = KDE_SAMPLES, grid: int = KDE_GRID, bw_adjust: float = 0.5) -> float:
    """Location of the maximum of a Gaussian kernel density estimate (Scott's bandwidth x ``bw_adjust``) of
    an evenly strided subsample of ``values``, on a grid between their min and max."""
    v = values.detach().reshape(-1).double()
    if v.numel() > samples:
        v = v[:: v.numel() // samples][:samples]
    std = float(v.std()) if v.numel() > 1 else 0.0
    if std == 0.0:
        return float(v[0]) if v.numel() else 0.0
    bw = bw_adjust * std * v.numel() ** (-1.0 / 5.0)
    g = torch.linspace(float(v.min()), float(v.max()), grid, dtype=torch.float64)
    dens = torch.zeros(grid, dtype=torch.float64)
    for chunk in v.split(2000):
        dens += torch.exp(-0.5 * ((g[:, None] - chunk[None, :]) / bw).square()).sum(1)
    return float(g[int(dens.argmax())])


def _pick_mode(values: torch.Tensor, density: float, out_fn) -> float:
    """The candidate mode (0, median, KDE peak) whose pruned values give the least output distance."""
    cands = [0.0, float(values.median()), kde_peak(values)]
    best, best_m = None, 0.0
    dense = out_fn(values)
    for m in cands:
        c = values - m
        t = keep_threshold(c.abs(), density)
        err = float((out_fn(c * (c.abs() >= t) + m) - dense).norm())
        if best is None or err < best:
            best, best_m = err, m
    return best_m


SEARCH_TOKENS = 1024  # calibration tokens the mode choice and the split search are scored on


@torch.no_grad()
def calibrate_scap(model: nn.Module, xs: list[torch.Tensor], budget: float,
                   splits: tuple[float, ...] = SPLITS) -> ScapConfig:
    """Modes (chosen at the even split) and thresholds per layer; the x/h split of ``splits`` with the least
    mean MLP output error on the first ``SEARCH_TOKENS`` calibration tokens (``t_h`` from them too,
    ``t_x`` from all)."""
    check_density(budget, "read budget")
    layers = []
    for i, x in enumerate(xs):
        mlp = mlp_of(model, i)
        xf = x.float()
        xe = xf[:SEARCH_TOKENS]
        wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
        wd = mlp.down_proj.weight.float()
        bg, bu = bias_of(mlp.gate_proj), bias_of(mlp.up_proj)
        bgu = torch.cat([bg.float() if bg is not None else torch.zeros(mlp.gate_proj.out_features),
                         bu.float() if bu is not None else torch.zeros(mlp.up_proj.out_features)])
        f = mlp.gate_proj.out_features

        def h_of(v, wgu=wgu, bgu=bgu, f=f, mlp=mlp):
            gu = v @ wgu.T + bgu
            return mlp.act_fn(gu[:, :f]) * gu[:, f:]

        m_x = _pick_mode(xe, budget, lambda v, wgu=wgu: v @ wgu.T)
        a, uu = dense_h(mlp, xe)
        ref = (a * uu) @ wd.T
        m_h = _pick_mode(h_of(xe), budget, lambda v, wd=wd: v @ wd.T)
        layers.append((xf, xe, m_x, m_h, h_of, wd, ref))
    best = None
    for sp in splits:
        dx, dh = budget - sp / 3.0, budget + 2.0 * sp / 3.0
        if not (0.0 < dx <= 1.0 and 0.0 < dh <= 1.0):
            continue
        cfg = ScapConfig(budget, [], [], [], [])
        errs = []
        for xf, xe, m_x, m_h, h_of, wd, ref in layers:
            t_x = keep_threshold((xf - m_x).abs(), dx)

            def pruned(v, m, t):
                c = v - m
                return c * (c.abs() >= t) + m

            he = h_of(pruned(xe, m_x, t_x))
            t_h = keep_threshold((he - m_h).abs(), dh)
            y = pruned(he, m_h, t_h) @ wd.T
            errs.append(float(((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean()))
            for lst, v in ((cfg.x_modes, m_x), (cfg.h_modes, m_h), (cfg.x_thresholds, t_x), (cfg.h_thresholds, t_h)):
                lst.append(v)
        err = sum(errs) / len(errs)
        log.info("SCAP budget %.2f split %+.2f (d_x %.3f, d_h %.3f): mean output error %.4f", budget, sp, dx, dh, err)
        if best is None or err < best[0]:
            cfg.info = {"split": sp, "dx": dx, "dh": dh, "calib_error": err}
            best = (err, cfg)
    return best[1]
