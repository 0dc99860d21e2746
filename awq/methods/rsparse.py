"""R-Sparse (Zhang et al., ICLR 2025, arXiv 2504.19449): sparse input channels plus a low-rank remainder.

Each linear map of the MLP sees its input split in two: the large-magnitude channels go through the
exact weights (only their columns are read), the rest through a rank-``r`` SVD of the same weights::

    kx = |x| >= t_x                                  (MLP input, shared by gate and up)
    [g; u] = W_gu[:, kx] x[kx] + A1 (B1 (x * ~kx))   (W_gu = [W_gate; W_up] ~ A1 B1, rank r1)
    h = act(g) * u
    kh = |h| >= t_h
    y = W_down[:, kh] h[kh] + A2 (B2 (h * ~kh))       (W_down ~ A2 B2, rank r2)

Read per token: ``gate = up = density(kx)``, ``down = density(kh)``, plus the factors every step:
``extra = (r1 (H + 2F) + r2 (H + F)) / (3 H F)`` (same dtype as the MLP).  ``r1 = r2 = 0`` is TEAL.

**Search** (the paper uses an evolutionary search over per-layer sparsity and rank; its recipe is not
released, R-Sparse issue #2).  Here, per layer, at a read budget ``B`` (the frontier's ``param``):
every ``(r1, r2)`` of a small grid of ranks and every split ``d_h - d_x`` of a small grid with
``(2 d_x + d_h) / 3 + extra = B`` is scored by the layer's relative output error
``||y - y_dense|| / ||y_dense||`` on held-out calibration tokens (thresholds from the other half), and
the best is kept: a per-layer, layer-local search at equal per-layer budget.  The chosen ranks and
densities are recorded in the point's config summary.

**Batch-1 decode**: two column-gathered GEMVs of the C++ kernel (``down_gather`` of
``csrc/sparse_mlp.cpp``: the rows of ``W_gu^T`` for the kept ``x`` entries and of ``W_down^T`` for the
kept ``h`` entries) and the small low-rank products and the activation in torch.  Needs transposed copies
of the weights (made once by ``prepare_decode``).  Any activation (the activation runs in torch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from awq.kernels.mlp import cpp_kernel, min_bytes_per_thread
from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import MethodError, check_density, dense_h, keep_threshold, mlp_dims, mlp_of, token_density
from awq.methods.dynamic_sparse import _as_row, bias_of, log_once, unsupported
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)

RANK_FRACTIONS = (0.0, 0.02, 0.04, 0.08)  # of min(H, F): the per-layer rank grid of the search
SPLITS = (-0.1, 0.0, 0.1, 0.2)  # d_h - d_x


@dataclass
class RSparseConfig(MethodConfig):
    budget: float  # the read fraction the search aimed at (frontier param)
    x_thresholds: list[float]
    h_thresholds: list[float]
    a1: list[torch.Tensor] = field(default_factory=list)  # [2F, r1]
    b1: list[torch.Tensor] = field(default_factory=list)  # [r1, H]
    a2: list[torch.Tensor] = field(default_factory=list)  # [H, r2]
    b2: list[torch.Tensor] = field(default_factory=list)  # [r2, F]
    info: dict = field(default_factory=dict)

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "RSparseConfig", x_thresholds=self.x_thresholds, h_thresholds=self.h_thresholds,
                      a1=self.a1, b1=self.b1, a2=self.a2, b2=self.b2)

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        n = sum(t.numel() for ts in (self.a1, self.b1, self.a2, self.b2) for t in ts)
        return n / len(self.a1) / (3.0 * hidden * inter)

    def summary(self) -> dict:
        return {"budget": self.budget, "x_thresholds": list(self.x_thresholds),
                "h_thresholds": list(self.h_thresholds), "r1": [int(t.shape[1]) for t in self.a1],
                "r2": [int(t.shape[1]) for t in self.a2], **self.info}

    def build(self, mlp: nn.Module, i: int) -> SwappedMLP:
        return RSparseMLP(mlp, i, self.x_thresholds[i], self.h_thresholds[i], self.a1[i], self.b1[i], self.a2[i], self.b2[i])


class RSparseMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, t_x: float, t_h: float, a1: torch.Tensor, b1: torch.Tensor,
                 a2: torch.Tensor, b2: torch.Tensor) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        dev, dt = base.gate_proj.weight.device, base.gate_proj.weight.dtype
        self.t_x, self.t_h = float(t_x), float(t_h)
        self.a1, self.b1, self.a2, self.b2 = (t.to(dev, dt) for t in (a1, b1, a2, b2))
        self.F = base.gate_proj.out_features
        self._decode: Optional[dict] = None

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a1, self.b1, self.a2, self.b2))

    def _gu(self, x: torch.Tensor, kx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x * kx
        g, u = self.gate_proj(xs), self.up_proj(xs)
        if self.a1.shape[1]:
            lr = F.linear(F.linear(x * ~kx, self.b1), self.a1)
            g, u = g + lr[..., : self.F], u + lr[..., self.F:]
        return g, u

    def _down(self, h: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(h * kh)
        if self.a2.shape[1]:
            y = y + F.linear(F.linear(h * ~kh, self.b2), self.a2)
        return y

    def prepare_decode(self) -> bool:
        """Transposed copies for the column-gathered C++ GEMV (``down_gather``); False if it cannot run."""
        if self._decode is None:
            why = unsupported(self.base, silu_only=False)
            if why is not None:
                log_once(why, "R-Sparse decode kernel")
                return False
            with torch.no_grad():
                self._decode = {"wgu_t": torch.cat([self.gate_proj.weight, self.up_proj.weight]).t().contiguous(),
                                "wd_t": self.down_proj.weight.detach().t().contiguous(),
                                "counts": torch.zeros(1, dtype=torch.long)}
        return True

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        k, d = cpp_kernel(), self._decode
        x1 = _as_row(x)
        kx = x1.abs() >= self.t_x
        gu = k.down_gather((x1 * kx).contiguous(), d["wgu_t"], min_bytes_per_thread(), d["counts"])
        nx = int(d["counts"][0])
        if self.a1.shape[1]:
            gu = gu + self.a1.float() @ (self.b1.float() @ (x1 * ~kx))
        bg, bu = bias_of(self.gate_proj), bias_of(self.up_proj)
        g = gu[: self.F] + (0 if bg is None else bg.float())
        u = gu[self.F:] + (0 if bu is None else bu.float())
        h = self.act_fn(g) * u
        kh = h.abs() >= self.t_h
        y = k.down_gather((h * kh).contiguous(), d["wd_t"], min_bytes_per_thread(), d["counts"])
        nh = int(d["counts"][0])
        if self.a2.shape[1]:
            y = y + self.a2.float() @ (self.b2.float() @ (h * ~kh))
        bd = bias_of(self.down_proj)
        if bd is not None:
            y = y + bd.float()
        if self.read_meter is not None:
            dx = nx / x1.numel()
            self.read_meter.add(self.layer_idx, 1, dx, dx, nh / self.F)
        return y.to(x.dtype).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        kx = x.abs() >= self.t_x
        g, u = self._gu(x, kx)
        h = self.act_fn(g) * u
        kh = h.abs() >= self.t_h
        y = self._down(h, kh)
        if self.observers:
            self._notify("down_proj", y)
        if self.read_meter is not None:
            dx = token_density(kx)
            self.read_meter.add(self.layer_idx, dx.numel(), dx, dx, token_density(kh))
        return y

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, rsparse, t_x={self.t_x:.4g}, t_h={self.t_h:.4g}, "
                f"r1={self.a1.shape[1]}, r2={self.a2.shape[1]}")


# ------------------------------------------------------------------------------------------------
# calibration: per-layer search over ranks and the x / h split at the layer's read budget
# ------------------------------------------------------------------------------------------------
def svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [out, r], B [r, in])`` with ``A B`` the best rank-``r`` approximation of ``w`` (float32)."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


@torch.no_grad()
def _layer_eval(mlp: nn.Module, x_cal: torch.Tensor, x_ev: torch.Tensor, fac1, fac2, dx: float, dh: float,
                f: int) -> tuple[float, float, float]:
    """(mean relative output error on x_ev, t_x, t_h) with thresholds from x_cal."""
    wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
    wd = mlp.down_proj.weight.float()
    bg, bu, bd = (bias_of(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    bgu = None if bg is None and bu is None else torch.cat([
        bg.float() if bg is not None else torch.zeros(f), bu.float() if bu is not None else torch.zeros(f)])

    def h_of(x, t_x):
        kx = x.abs() >= t_x
        gu = (x * kx) @ wgu.T
        if fac1[0].shape[1]:
            gu = gu + ((x * ~kx) @ fac1[1].T) @ fac1[0].T
        if bgu is not None:
            gu = gu + bgu
        return mlp.act_fn(gu[:, :f]) * gu[:, f:]

    t_x = keep_threshold(x_cal.abs(), dx)
    t_h = keep_threshold(h_of(x_cal, t_x).abs(), dh)
    h = h_of(x_ev, t_x)
    kh = h.abs() >= t_h
    y = (h * kh) @ wd.T
    if fac2[0].shape[1]:
        y = y + ((h * ~kh) @ fac2[1].T) @ fac2[0].T
    a, u = dense_h(mlp, x_ev)
    ref = (a * u) @ wd.T
    if bd is not None:
        y, ref = y + bd.float(), ref + bd.float()
    err = float(((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean())
    return err, t_x, t_h


def calibrate_rsparse(model: nn.Module, xs: list[torch.Tensor], budget: float,
                      rank_fractions: tuple[float, ...] = RANK_FRACTIONS,
                      splits: tuple[float, ...] = SPLITS) -> RSparseConfig:
    """Per layer, the (r1, r2, split) of the grids with the least held-out output error at read ``budget``."""
    check_density(budget, "read budget")
    hidden, inter = mlp_dims(model)
    base_rank = min(hidden, inter)
    ranks = sorted({int(round(f * base_rank)) for f in rank_fractions})
    cfg = RSparseConfig(budget, [], [])
    choices = []
    for i, x in enumerate(xs):
        mlp = mlp_of(model, i)
        n = x.shape[0]
        x_cal, x_ev = x[: n // 2].float(), x[n // 2:].float()
        full1 = svd_factors(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), max(ranks))
        full2 = svd_factors(mlp.down_proj.weight, max(ranks))
        best = None
        for r1 in ranks:
            for r2 in ranks:
                extra = (r1 * (hidden + 2 * inter) + r2 * (hidden + inter)) / (3.0 * hidden * inter)
                base = budget - extra  # (2 d_x + d_h) / 3
                for sp in splits:
                    dx, dh = base - sp / 3.0, base + 2.0 * sp / 3.0
                    if not (0.0 < dx <= 1.0 and 0.0 < dh <= 1.0):
                        continue
                    f1 = (full1[0][:, :r1], full1[1][:r1])
                    f2 = (full2[0][:, :r2], full2[1][:r2])
                    err, t_x, t_h = _layer_eval(mlp, x_cal, x_ev, f1, f2, dx, dh, inter)
                    if best is None or err < best[0]:
                        best = (err, r1, r2, dx, dh)
        if best is None:
            raise MethodError(f"R-Sparse: no rank/split fits read budget {budget} (lowest rank costs more)")
        err, r1, r2, dx, dh = best
        # final thresholds from all calibration tokens
        f1 = (full1[0][:, :r1].contiguous(), full1[1][:r1].contiguous())
        f2 = (full2[0][:, :r2].contiguous(), full2[1][:r2].contiguous())
        _, t_x, t_h = _layer_eval(mlp, x.float(), x_ev, f1, f2, dx, dh, inter)
        cfg.x_thresholds.append(t_x)
        cfg.h_thresholds.append(t_h)
        cfg.a1.append(f1[0])
        cfg.b1.append(f1[1])
        cfg.a2.append(f2[0])
        cfg.b2.append(f2[1])
        choices.append({"r1": r1, "r2": r2, "dx": round(dx, 4), "dh": round(dh, 4), "err": round(err, 4)})
    cfg.info = {"search": choices, "rank_grid": ranks, "split_grid": list(splits)}
    log.info("R-Sparse budget %.2f: ranks r1 %s r2 %s", budget, [c["r1"] for c in choices], [c["r2"] for c in choices])
    return cfg
