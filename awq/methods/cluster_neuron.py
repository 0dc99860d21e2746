"""Intermediate-neuron cluster method (issue 10): one neuron mask per token, from a per-layer codebook.

A mask on the intermediate neurons (the shared index of gate rows, up rows and down columns) is the
only mask that saves weight reads in all three projections. Per layer ``l``, a codebook ``C_l``
(``[K, F]`` bool, each centroid ``s`` neurons, fitted by coverage k-means on the calibration |h|,
:mod:`awq.methods.cluster_fit`) and, per token, a *selection*:

* oracle (not realizable): the ``m`` centroids covering the most ``|h|`` of the true token;
* routed: the ``m`` highest logits of a linear router ``x W_l^T + b_l`` (``K x H`` weights, read every
  step: ``extra = (K H + K) / (3 H F)``).

The token's mask ``M`` is the union of its selected centroids, plus the hot set (neurons always
computed), then, with ``within``:

* ``"none"``: ``keep = M``; reads ``gate = up = down = density(M)``;
* ``"gate"``: gate rows of ``M`` computed, ``keep = M & |act(g)| >= t_l``; reads ``gate = density(M)``,
  ``up = down = density(keep)`` (the paper's ``A AND C``, realizable: CATS inside the cluster);
* ``"h"``: gate and up rows of ``M`` computed, ``keep = M & |act(g) u| >= t_l``; reads
  ``gate = up = density(M)``, ``down = density(keep)``;
* ``"ideal"`` (with one all-neuron centroid): ``keep = |h| >= t_l``, every projection read only where
  kept. Needs ``h``, so an oracle: the bound of *any* per-token neuron mask at that density.

``y = down((act(gate(x)) * up(x)) * keep)``; the meter is fed from ``M`` and ``keep`` as applied.

**Batch-1 decode** (:meth:`ClusterNeuronMLP.prepare_decode`, routed ``"gate"`` and ``"none"`` only): the
router picks ``M`` from ``x``, then one call of the row-gathered kernel
(:class:`awq.methods.dynamic_sparse.NeuronSparseDecode`) reads the gate rows of ``M``, keeps ``|silu(g)| >= t_l``
(``"gate"``; ``"none"``: all of ``M``) and reads up rows and ``W_down^T`` rows of the kept neurons only;
the meter gets the same reads as the masked path. ``"h"`` thresholds ``|h|`` (needs the up rows of all
of ``M`` before deciding), ``"ideal"`` and oracle picks need the dense ``h``: they keep the masked path.
The frontier's ``param`` for every ``cluster_<variant>`` is the nominal read fraction ``r``; the
measured one (plus the router) is what is plotted. How ``r`` splits into centroid size and
threshold density is :meth:`ClusterVariant.sizes`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.cluster_fit import coverage_weights, covered_fraction, fit_centroids, train_router
from awq.methods.common import MethodError, check_density, dense_h, keep_threshold, mlp_dims, mlp_of, token_density
from awq.methods.dynamic_sparse import neuron_decode_for
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)

WITHIN = ("none", "gate", "h", "ideal")


@dataclass
class ClusterNeuronConfig(MethodConfig):
    centroids: list[torch.Tensor]  # [K, F] bool per layer (a pooled codebook: the same tensor in every layer)
    hot: list[torch.Tensor]  # [F] bool per layer: always computed
    router_w: list[torch.Tensor] = field(default_factory=list)  # [K, H] per layer; empty: oracle selection
    router_b: list[torch.Tensor] = field(default_factory=list)  # [K] per layer
    top_m: int = 1
    within: str = "none"
    thresholds: list[float] = field(default_factory=list)  # per layer, for within != "none"
    info: dict = field(default_factory=dict)

    @property
    def routed(self) -> bool:
        return bool(self.router_w)

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "ClusterNeuronConfig", centroids=self.centroids, hot=self.hot)
        hidden, inter = mlp_dims(model)
        if self.within not in WITHIN:
            raise MethodError(f"ClusterNeuronConfig: within must be one of {WITHIN}, got {self.within!r}")
        if self.within != "none":
            _check_layers(model, "ClusterNeuronConfig", thresholds=self.thresholds)
        if self.routed:
            _check_layers(model, "ClusterNeuronConfig", router_w=self.router_w, router_b=self.router_b)
        for i, c in enumerate(self.centroids):
            if c.dim() != 2 or c.shape[1] != inter:
                raise MethodError(f"ClusterNeuronConfig: centroids of layer {i} are {tuple(c.shape)}, want (K, {inter})")
            if not (1 <= self.top_m <= c.shape[0]):
                raise MethodError(f"ClusterNeuronConfig: top_m={self.top_m} but layer {i} has {c.shape[0]} centroids")
            if self.routed and tuple(self.router_w[i].shape) != (c.shape[0], hidden):
                raise MethodError(f"ClusterNeuronConfig: router of layer {i} is {tuple(self.router_w[i].shape)}, "
                                  f"want ({c.shape[0]}, {hidden})")

    def extra_read(self, model: nn.Module) -> float:
        if not self.routed:
            return 0.0
        hidden, inter = mlp_dims(model)
        k = self.router_w[0].shape[0]
        return (k * hidden + k) / (3.0 * hidden * inter)

    def summary(self) -> dict:
        return {"K": int(self.centroids[0].shape[0]), "top_m": self.top_m, "within": self.within,
                "routed": self.routed, "thresholds": list(self.thresholds),
                "centroid_density": float(self.centroids[0].float().mean()),
                "hot_density": [float(h.float().mean()) for h in self.hot], **self.info}

    def build(self, mlp: nn.Module, i: int) -> "ClusterNeuronMLP":
        return ClusterNeuronMLP(mlp, i, self)


class ClusterNeuronMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, cfg: ClusterNeuronConfig) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        dev, dt = base.gate_proj.weight.device, base.gate_proj.weight.dtype
        i = layer_idx
        self.centroids = cfg.centroids[i].to(dev, torch.bool)
        self.hot = cfg.hot[i].to(dev, torch.bool)
        self.router_w = cfg.router_w[i].to(dev, dt) if cfg.routed else None
        self.router_b = cfg.router_b[i].to(dev, dt) if cfg.routed else None
        self.top_m, self.within = cfg.top_m, cfg.within
        self.t = float(cfg.thresholds[i]) if cfg.within != "none" else 0.0
        self._cidx: Optional[list[torch.Tensor]] = None

    @property
    def extra_bytes(self) -> int:
        """Weight bytes of the router, read per token besides the MLP's (0 for an oracle pick)."""
        if self.router_w is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.router_w, self.router_b))

    def decode_unsupported(self) -> Optional[str]:
        """Why this variant has no batch-1 kernel (None: it has one)."""
        if self.router_w is None:
            return "oracle pick needs the dense h"
        if self.within not in ("gate", "none"):
            return f"within={self.within!r} thresholds |h| (the kernel thresholds |silu(g)| only)"
        return None

    def prepare_decode(self) -> bool:
        """Make the batch-1 row-gathered kernel (:mod:`awq.methods.dynamic_sparse`; a transposed copy of
        ``W_down``) used for single-token calls from now on.  False if it cannot run here."""
        if self._decode is None and self.decode_unsupported() is None:
            self._decode = neuron_decode_for(self, self.t if self.within == "gate" else 0.0)
            if self._decode is not None and self.top_m == 1 and not bool(self.hot.any()):
                self._cidx = [c.nonzero().reshape(-1).cpu() for c in self.centroids]
        return self._decode is not None

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x.reshape(1, -1)
        top = F.linear(x1, self.router_w, self.router_b)[0].topk(self.top_m).indices
        if self._cidx is not None:
            idx = self._cidx[int(top[0])]
        else:
            idx = (self.centroids[top].any(0) | self.hot).nonzero().reshape(-1).cpu()
        y = self._decode(x1, idx)
        if self.read_meter is not None:
            dm = idx.numel() / self._decode.F
            dk = self._decode.density() if self.within == "gate" else dm
            self.read_meter.add(self.layer_idx, 1, dm, dk, dk)
        return y.to(x.dtype).view(x.shape)

    def select(self, x: torch.Tensor, habs: Optional[torch.Tensor]) -> torch.Tensor:
        """Union of the token's ``top_m`` centroids and the hot set -> ``[N, F]`` bool."""
        if self.router_w is not None:
            score = F.linear(x, self.router_w, self.router_b)
        else:
            score = habs.float() @ self.centroids.float().T
        idx = score.topk(self.top_m, dim=-1).indices  # [N, m]
        return self.centroids[idx].any(1) | self.hot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        a = self.act_fn(self.gate_proj(xf))
        u = self.up_proj(xf)
        h = a * u
        m = self.select(xf, None if self.router_w is not None else h.abs())
        if self.within == "gate":
            keep = m & (a.abs() >= self.t)
        elif self.within in ("h", "ideal"):
            keep = m & (h.abs() >= self.t)
        else:
            keep = m
        y = self.down_proj(h * keep).reshape(*shape[:-1], -1)
        if self.observers:
            self._notify("down_proj", y)
        if self.read_meter is not None:
            dm, dk = token_density(m), token_density(keep)
            gate, up = (dm, dk) if self.within == "gate" else (dk, dk) if self.within == "ideal" else (dm, dm)
            self.read_meter.add(self.layer_idx, dm.numel(), gate, up, dk)
        return y

    def extra_repr(self) -> str:
        sel = "routed" if self.router_w is not None else "oracle"
        return f"layer={self.layer_idx}, cluster_neuron, K={self.centroids.shape[0]}, m={self.top_m}, {sel}, {self.within}"


# ------------------------------------------------------------------------------------------------
# variants and calibration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterVariant:
    """One ``cluster_<variant>`` frontier method."""

    routed: bool = True
    k: int = 64  # centroids per layer (pooled: k * layers in one codebook)
    top_m: int = 1
    pooled: bool = False
    weighting: str = "mag"
    hot_q: Optional[float] = None  # neurons active on more than this share of calibration tokens: always on
    within: str = "none"
    iters: int = 15
    router_steps: int = 60

    def sizes(self, read: float) -> tuple[float, float]:
        """``(centroid-union density, kept density)`` for a nominal read fraction ``read``.

        none: both ``read``; gate: cluster ``1.5 r``, kept ``0.75 r`` (``(c + 2 k) / 3 = r``);
        h: cluster ``1.2 r``, kept ``0.6 r`` (``(2 c + k) / 3 = r``); the cluster is capped at 1.
        """
        if self.within == "gate":
            c = min(1.0, 1.5 * read)
            return c, max(1e-6, min(1.0, (3 * read - c) / 2))
        if self.within == "h":
            c = min(1.0, 1.2 * read)
            return c, max(1e-6, min(1.0, 3 * read - 2 * c))
        if self.within == "ideal":
            return 1.0, read
        return read, read


@torch.no_grad()
def _layer_stats(model: nn.Module, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, x in enumerate(xs):
        a, u = dense_h(mlp_of(model, i), x)
        out.append((a.abs().cpu(), (a * u).abs().cpu()))
    return out


def calibrate_cluster_neuron(model: nn.Module, xs: list[torch.Tensor], read: float, variant: ClusterVariant,
                             seed: int = 0) -> ClusterNeuronConfig:
    """Fit codebooks (and routers) for ``variant`` at nominal read fraction ``read`` on calibration inputs ``xs``."""
    check_density(read, "read fraction")
    v = variant
    if v.within not in WITHIN:
        raise MethodError(f"within must be one of {WITHIN}, got {v.within!r}")
    if v.within == "ideal" and (v.routed or v.k != 1):
        raise MethodError("within='ideal' is the oracle bound: routed=False, k=1")
    if v.pooled and v.routed:
        raise MethodError("a pooled codebook is an oracle-only ablation (routed=False)")
    n = xs[0].shape[0]
    if v.k > n:
        raise MethodError(f"K={v.k} centroids but only {n} calibration tokens: lower K or raise --calib_tokens")
    _, inter = mlp_dims(model)
    dc, dk = v.sizes(read)
    stats = _layer_stats(model, xs)
    hots, ws = [], []
    for aabs, habs in stats:
        t_act = keep_threshold(habs, dc)
        hot = ((habs >= t_act).float().mean(0) > v.hot_q) if v.hot_q is not None else torch.zeros(inter, dtype=torch.bool)
        hots.append(hot)
        ws.append(coverage_weights(habs, v.weighting, t_act))
    cents, labels = [], []
    if v.pooled:
        s = max(1, round(dc * inter / v.top_m))
        per = max(1, min(n, 16384 // len(xs)))
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n, generator=g)[:per]
        c, _ = fit_centroids(torch.cat([w[pick] for w in ws]), v.k * len(xs), s, v.iters, seed)
        cents = [c] * len(xs)
    else:
        for i, (w, hot) in enumerate(zip(ws, hots)):
            n_hot = int(hot.sum())
            s = round((dc * inter - n_hot) / v.top_m)
            s = max(1, min(s, inter - n_hot))
            c, lab = fit_centroids(w, v.k, s, v.iters, seed + i, allowed=~hot if n_hot else None)
            cents.append(c)
            labels.append(lab)
    cfg = ClusterNeuronConfig(centroids=cents, hot=hots, top_m=v.top_m, within=v.within)
    cov = []
    for i, x in enumerate(xs):
        if v.routed:
            rw, rb = train_router(x, labels[i], v.k, steps=v.router_steps, seed=seed + i)
            cfg.router_w.append(rw)
            cfg.router_b.append(rb)
            score = F.linear(x.float(), rw, rb)
        else:
            score = stats[i][1] @ cents[i].float().T  # as the module: most |h| covered
        sel = cents[i][score.topk(v.top_m, dim=-1).indices].any(1) | hots[i]
        cov.append(covered_fraction(stats[i][1], sel))
        if v.within != "none":
            val = stats[i][0] if v.within == "gate" else stats[i][1]
            cfg.thresholds.append(keep_threshold(torch.where(sel, val, torch.full_like(val, -1.0)), dk))
    cfg.info = {"variant": {k: getattr(v, k) for k in ("routed", "k", "top_m", "pooled", "weighting", "hot_q",
                                                       "within")},
                "cluster_density": dc, "kept_density": dk, "calib_coverage": sum(cov) / len(cov)}
    log.info("cluster_neuron %s: read %.2f, cluster density %.3f, coverage of |h| on calibration %.3f", v, read, dc,
             cfg.info["calib_coverage"])
    return cfg

