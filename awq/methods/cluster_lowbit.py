"""The paper's centroids as candidate sets, ranked per token by a low-bit copy (issue 21, cluster idea).

Per layer a codebook of ``K`` neuron sets (each ``candidates * F`` neurons, coverage k-means on the
calibration ``|h|``) and a linear router ``x -> K`` (:mod:`awq.methods.cluster_neuron`, its routed
``within="none"`` variant).  Per token::

    C = centroid[argmax(router(x))]                     (router read every step)
    score_j = |act(g~_j) * u~_j|  for j in C            (the low-bit copy's rows of C only)
    keep = C & (score >= t_l)                           (t_l: calibration quantile, overall ``density``)
    y = down((act(gate(x)) * up(x)) * keep)             (exact rows of keep only)

Read per token: ``gate = up = down = density(keep)``, plus the router ``(K H + K) / (3 H F)`` and the
centroid's rows of the copy (``candidates`` x :func:`awq.methods.lowbit_rank.copy_bytes` over the MLP's
bytes; the mean centroid size, measured).  The cluster saves the copy's rows outside the centroid and,
laid out contiguously (neurons permuted by centroid), makes the candidate rows one block per cluster.

**Batch-1 decode**: router in torch, then ``csrc/lowbit_rank.cpp`` scores the centroid's neurons and the
row-gathered kernel of :mod:`awq.methods.dynamic_sparse` reads the kept rows (SiLU only; else the masked path).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.cluster_neuron import ClusterVariant, calibrate_cluster_neuron
from awq.methods.common import MethodError, check_density, keep_threshold, mlp_dims, mlp_of, neuron_masked_mlp
from awq.methods.lowbit_rank import LowbitRankMLP, check_bits, copy_bytes, copy_scores, layer_copy
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)


@dataclass
class ClusterLowbitConfig(MethodConfig):
    candidates: float
    density: float
    bits: int = 4
    centroids: list[torch.Tensor] = field(default_factory=list)  # [K, F] bool
    router_w: list[torch.Tensor] = field(default_factory=list)  # [K, H]
    router_b: list[torch.Tensor] = field(default_factory=list)  # [K]
    codes: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_density(self.candidates, "candidates")
        check_density(self.density)
        check_bits(self.bits)
        if self.density > self.candidates:
            raise MethodError(f"density {self.density} above the candidate share {self.candidates}")

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "ClusterLowbitConfig", centroids=self.centroids, router_w=self.router_w,
                      router_b=self.router_b, codes=self.codes, scales=self.scales, thresholds=self.thresholds)
        hidden, inter = mlp_dims(model)
        for i, (c, w) in enumerate(zip(self.centroids, self.router_w)):
            if c.dim() != 2 or c.shape[1] != inter or tuple(w.shape) != (c.shape[0], hidden):
                raise MethodError(f"ClusterLowbitConfig: layer {i} centroids {tuple(c.shape)} / router "
                                  f"{tuple(w.shape)}, want (K, {inter}) / (K, {hidden})")

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        elt = mlp_of(model, 0).gate_proj.weight.element_size()
        k = self.router_w[0].shape[0]
        cand = float(torch.stack([c.float().mean() for c in self.centroids]).mean())
        router = (k * hidden + k) * self.router_w[0].element_size()
        return (router + cand * copy_bytes(hidden, inter, self.bits)) / (3.0 * hidden * inter * elt)

    def summary(self) -> dict:
        return {"candidates": self.candidates, "density": self.density, "bits": self.bits,
                "K": int(self.centroids[0].shape[0]), "thresholds": list(self.thresholds), **self.info}

    def build(self, mlp: nn.Module, i: int) -> SwappedMLP:
        return ClusterLowbitMLP(mlp, i, self)


class ClusterLowbitMLP(LowbitRankMLP):
    def __init__(self, base: nn.Module, layer_idx: int, cfg: ClusterLowbitConfig) -> None:
        i = layer_idx
        super().__init__(base, i, cfg.bits, cfg.codes[i], cfg.scales[i], cfg.thresholds[i])
        dev, dt = base.gate_proj.weight.device, base.gate_proj.weight.dtype
        self.centroids = cfg.centroids[i].to(dev, torch.bool)
        self.router_w, self.router_b = cfg.router_w[i].to(dev, dt), cfg.router_b[i].to(dev, dt)
        self._cidx: Optional[list[torch.Tensor]] = None

    @property
    def extra_bytes(self) -> int:
        hidden = self.gate_proj.in_features
        mean_c = float(self.centroids.float().mean())
        return int(self.router_w.numel() * self.router_w.element_size() + self.router_b.numel() * 4
                   + mean_c * copy_bytes(hidden, self.F, self.bits))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, F]`` bool: each token's routed centroid."""
        return self.centroids[F.linear(x, self.router_w, self.router_b).argmax(-1)]

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        if self._cidx is None:
            self._cidx = [c.nonzero().reshape(-1).cpu().contiguous() for c in self.centroids]
        top = int(F.linear(x.reshape(1, -1), self.router_w, self.router_b).argmax())
        self.candidates = self._cidx[top]
        try:
            return super()._decode_step(x)
        finally:
            self.candidates = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        keep = self.route(x) & (self.scores(x) >= self.t)
        return neuron_masked_mlp(self, x, keep)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, cluster_lowbit, K={self.centroids.shape[0]}, bits={self.bits}, t={self.t:.4g}"


def calibrate_cluster_lowbit(model: nn.Module, xs: list[torch.Tensor], density: float, candidates: float,
                             k: int = 64, bits: int = 4, seed: int = 0) -> ClusterLowbitConfig:
    """Codebooks + routers (``cluster_neuron`` routed, centroids of ``candidates * F``), the low-bit copy, and
    per-layer thresholds keeping ``density`` of all calibration neurons inside each token's routed centroid."""
    cfg = ClusterLowbitConfig(candidates=candidates, density=density, bits=bits)
    cn = calibrate_cluster_neuron(model, xs, candidates, ClusterVariant(k=k), seed=seed)
    cfg.centroids, cfg.router_w, cfg.router_b = cn.centroids, cn.router_w, cn.router_b
    for i, x in enumerate(xs):
        mlp = mlp_of(model, i)
        codes, scales = layer_copy(mlp, bits)
        cfg.codes.append(codes)
        cfg.scales.append(scales)
        s = copy_scores(mlp, x, codes, scales, bits)
        routed = cfg.centroids[i][F.linear(x.float(), cfg.router_w[i].float(), cfg.router_b[i].float()).argmax(-1)]
        cfg.thresholds.append(keep_threshold(torch.where(routed, s, torch.full_like(s, -1.0)), density))
    cfg.info = {"calib_coverage": cn.info.get("calib_coverage")}
    return cfg
