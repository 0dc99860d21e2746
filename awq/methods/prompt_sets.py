"""Neuron sets chosen from the prompt (GRIFFIN, arXiv 2404.01365) and their per-token refinement (issue 21).

**GRIFFIN** (:class:`GriffinConfig`): while the prompt runs dense, each layer collects its
intermediate activations ``h = act(gate(x)) * up(x)`` ``[P, F]``; each token's row is scaled to unit
L2 norm and neuron ``j`` scores ``s_j = || h[:, j] / ||h_t|| ||_2`` over the prompt tokens.  The
``k = round(density * F)`` highest-scoring neurons form the sequence's set, fixed for every generated
token: ``y = down((act(gate(x)) * up(x)) * keep)``.  Read per generated token:
``gate = up = down = k / F``; nothing else (no predictor).  A fixed set makes the MLP a smaller dense
one; the batch-1 kernel is the row-gathered one of :mod:`awq.methods.dynamic_sparse` with the set as index list.

**GRIFFIN + low-bit refinement** (:class:`GriffinRefineConfig`): the prompt's top ``candidates * F``
neurons are only candidates; per token a ``bits``-bit copy of their gate and up rows
(:mod:`awq.methods.lowbit_rank`) scores ``|act(g~) u~|`` and keeps those above a threshold set *on the
prompt itself* (the prompt's own candidate scores, quantile keeping ``density / candidates`` of them),
so no calibration set is needed beyond the copy.  Read per token: ``density(keep)`` of every projection
plus the candidates' rows of the copy.

**GRIFFIN-picked centroid** (:class:`GriffinCentroidConfig`, the paper's cluster idea at sequence
level): per layer a codebook of ``K`` neuron sets (coverage k-means on calibration ``|h|``,
:func:`awq.methods.cluster_fit.fit_centroids`, each ``candidates * F`` neurons); the prompt picks the
centroid holding the most GRIFFIN score ``sum_{j in C} s_j^2``; optionally refined per token as above
(``bits``), else used as the fixed set.

How a method sees the prompt: ``observe_prompt(x, h)`` (the prompt protocol of ``awq.methods.protocol``: the
prompt runs through the dense MLP, which hands each swapped module its ``x [B, P, H]`` and
``h [B, P, F]``; may come in chunks: accumulated), then ``forward`` on the continuation applies row ``b``
of the state to sequence ``b``, and ``end_sequence()`` drops the state.  Without the protocol (plain
generation) the first multi-token call after ``end_sequence`` *is* the prompt: it runs dense and is
observed.  ``needs_prompt = True``: refused under the standard protocol.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.cluster_fit import coverage_weights, fit_centroids
from awq.methods.common import MethodError, check_density, dense_h, keep_threshold, mlp_dims, mlp_of, token_density
from awq.methods.dynamic_sparse import neuron_decode_for
from awq.methods.lowbit_rank import LowbitRankMLP, check_bits, copy_bytes, layer_copy
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)


def griffin_stat_sq(h: torch.Tensor) -> torch.Tensor:
    """``sum_t (h[t, j] / ||h[t]||)^2`` over the token dimension: ``[..., T, F] -> [..., F]`` (float32).

    GRIFFIN's score is the square root of this; summing squares lets a chunked prompt accumulate.
    """
    hf = h.float()
    return (hf / hf.norm(dim=-1, keepdim=True).clamp_min(1e-12)).square().sum(-2)


def top_set(stat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[..., F]`` mask of the ``k`` largest entries of each row (ties: lowest index first)."""
    idx = stat.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(stat, dtype=torch.bool).scatter_(-1, idx, True)


class _PromptState:
    """Per-sequence accumulated statistic of the prompt (``[B, F]``) and prompt inputs kept for refinement."""

    def __init__(self) -> None:
        self.stat: Optional[torch.Tensor] = None
        self.xs: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, h: torch.Tensor, keep_x: bool) -> None:
        x3 = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 2 else x[None, None]
        h3 = h.reshape(-1, h.shape[-2], h.shape[-1]) if h.dim() >= 2 else h[None, None]
        s = griffin_stat_sq(h3)
        self.stat = s if self.stat is None else self.stat + s
        if keep_x:
            self.xs.append(x3.detach())


@dataclass
class GriffinConfig(MethodConfig):
    density: float
    needs_prompt = True

    def __post_init__(self) -> None:
        check_density(self.density)

    def validate(self, model: nn.Module) -> None:
        pass

    def extra_read(self, model: nn.Module) -> float:
        return 0.0

    def summary(self) -> dict:
        return {"density": self.density}

    def build(self, mlp: nn.Module, i: int) -> SwappedMLP:
        return GriffinMLP(mlp, i, self.density)


class GriffinMLP(SwappedMLP):
    """Fixed neuron set per sequence from the prompt's GRIFFIN statistic."""

    needs_prompt = True

    def __init__(self, base: nn.Module, layer_idx: int, density: float) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        self.F = base.gate_proj.out_features
        self.k = max(1, int(round(density * self.F)))
        self.state = _PromptState()
        self.keep: Optional[torch.Tensor] = None  # [B, F] bool
        self._decode = None
        self._idx: Optional[torch.Tensor] = None

    # -- the prompt hook ----------------------------------------------------------------------
    def observe_prompt(self, x: torch.Tensor, h: torch.Tensor) -> None:
        self.keep, self._idx = None, None
        self.state.add(x, h, keep_x=False)

    def end_sequence(self) -> None:
        self.state, self.keep, self._idx = _PromptState(), None, None

    def _choose(self) -> None:
        self.keep = top_set(self.state.stat, self.k)

    def _ensure_set(self, x: torch.Tensor) -> bool:
        """The set exists (True), or this call is the prompt (False: it is observed and must run dense)."""
        if self.keep is None and self.state.stat is not None:
            self._choose()
        return self.keep is not None

    def prepare_decode(self) -> bool:
        if self._decode is None:
            self._decode = neuron_decode_for(self)
        return self._decode is not None

    def _read(self, keep: torch.Tensor) -> None:
        if self.read_meter is not None:
            d = token_density(keep)
            self.read_meter.add(self.layer_idx, d.numel(), d, d, d)

    def _dense_prompt(self, x: torch.Tensor) -> torch.Tensor:
        a, u = self.act_fn(self.gate_proj(x)), self.up_proj(x)
        h = a * u
        self.observe_prompt(x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x, h.reshape(-1, *h.shape[-2:]))
        return self.down_proj(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ensure_set(x):
            return self._dense_prompt(x)
        if self.is_decode_step(x) and self.keep.shape[0] == 1:
            if self._idx is None:
                self._idx = self.keep[0].nonzero().reshape(-1).cpu()
            y = self._decode(x.reshape(1, -1), self._idx)
            self._read(self.keep[0:1])
            return y.to(x.dtype).view(x.shape)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        keep = self._broadcast(self.keep, x)
        y = self.down_proj(h * keep)
        self._read(keep.expand(*h.shape[:-1], -1))
        return y

    @staticmethod
    def _broadcast(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` per-sequence state against ``x`` ``[B, T, H]`` (or ``[T, H]`` / ``[H]`` with B == 1)."""
        if x.dim() == 3:
            if state.shape[0] not in (1, x.shape[0]):
                raise MethodError(f"prompt state for {state.shape[0]} sequences, continuation has {x.shape[0]}")
            return state[:, None, :]
        if state.shape[0] != 1:
            raise MethodError(f"prompt state for {state.shape[0]} sequences but a 2-D continuation")
        return state[0] if x.dim() == 1 else state

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, griffin, k={self.k}"


# ------------------------------------------------------------------------------------------------
# GRIFFIN candidates (or a GRIFFIN-picked centroid) refined per token by a low-bit copy
# ------------------------------------------------------------------------------------------------
@dataclass
class GriffinRefineConfig(MethodConfig):
    """``candidates``: prompt-chosen share of neurons; ``density``: share kept per token (< candidates);
    ``codes``/``scales``: the low-bit copy (:func:`awq.methods.lowbit_rank.layer_copy`); ``centroids``
    (optional): per-layer ``[K, F]`` bool codebooks, the prompt picks one instead of its own top set."""

    candidates: float
    density: float
    bits: int = 4
    codes: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    centroids: list[torch.Tensor] = field(default_factory=list)
    refine: bool = True
    info: dict = field(default_factory=dict)
    needs_prompt = True

    def __post_init__(self) -> None:
        check_density(self.candidates, "candidates")
        check_density(self.density)
        check_bits(self.bits)
        if self.refine and self.density > self.candidates:
            raise MethodError(f"density {self.density} above the candidate share {self.candidates}")

    def validate(self, model: nn.Module) -> None:
        if self.refine:
            _check_layers(model, type(self).__name__, codes=self.codes, scales=self.scales)
        if self.centroids:
            _check_layers(model, type(self).__name__, centroids=self.centroids)

    def extra_read(self, model: nn.Module) -> float:
        """The candidates' rows of the copy (every token reads them)."""
        if not self.refine:
            return 0.0
        hidden, inter = mlp_dims(model)
        elt = mlp_of(model, 0).gate_proj.weight.element_size()
        cand = self.info.get("candidate_density", self.candidates)
        return cand * copy_bytes(hidden, inter, self.bits) / (3.0 * hidden * inter * elt)

    def summary(self) -> dict:
        return {"candidates": self.candidates, "density": self.density, "bits": self.bits, "refine": self.refine,
                "K": int(self.centroids[0].shape[0]) if self.centroids else None, **self.info}

    def build(self, mlp: nn.Module, i: int) -> SwappedMLP:
        return GriffinRefineMLP(mlp, i, self)


class GriffinRefineMLP(LowbitRankMLP):
    """Prompt-chosen candidates (top set or centroid), then per-token low-bit ranking inside them."""

    needs_prompt = True

    def __init__(self, base: nn.Module, layer_idx: int, cfg: GriffinRefineConfig) -> None:
        f = base.gate_proj.out_features
        if cfg.refine:
            codes, scales = cfg.codes[layer_idx], cfg.scales[layer_idx]
        else:  # a fixed centroid: no copy needed (a 1-row stand-in keeps the parent's fields typed)
            codes, scales = torch.zeros(2 * f, 1, dtype=torch.uint8), torch.zeros(2 * f)
        super().__init__(base, layer_idx, cfg.bits, codes, scales, float("inf"))
        self.refine = cfg.refine
        self.kc = max(1, int(round(cfg.candidates * f)))
        self.ratio = min(1.0, cfg.density / cfg.candidates)
        self.centroids = cfg.centroids[layer_idx].bool() if cfg.centroids else None
        self.state = _PromptState()
        self.cand_mask: Optional[torch.Tensor] = None  # [B, F]
        self.t_seq: Optional[torch.Tensor] = None  # [B] per-sequence thresholds
        self._fixed_decode = None

    def observe_prompt(self, x: torch.Tensor, h: torch.Tensor) -> None:
        self.cand_mask = None
        self.state.add(x, h, keep_x=self.refine)

    def end_sequence(self) -> None:
        self.state, self.cand_mask, self.t_seq = _PromptState(), None, None
        self.set_candidates(None)

    def _choose(self) -> None:
        stat = self.state.stat  # [B, F]
        if self.centroids is not None:
            cov = stat @ self.centroids.float().T  # [B, K]
            self.cand_mask = self.centroids[cov.argmax(-1)]
        else:
            self.cand_mask = top_set(stat, self.kc)
        if self.refine:
            ts = []
            for b in range(stat.shape[0]):
                xb = torch.cat([x[b] for x in self.state.xs]).to(self.wq_gate.dtype)
                s = self.scores(xb)[:, self.cand_mask[b]]
                ts.append(keep_threshold(s, self.ratio))
            self.t_seq = torch.tensor(ts)
            self.state.xs = []
        if stat.shape[0] == 1:
            self.set_candidates(self.cand_mask[0].nonzero().reshape(-1))
            if self.refine:
                self.t = float(self.t_seq[0])

    def _ensure(self) -> bool:
        if self.cand_mask is None and self.state.stat is not None:
            self._choose()
        return self.cand_mask is not None

    @property
    def extra_bytes(self) -> int:
        return super().extra_bytes if self.refine else 0

    def prepare_decode(self) -> bool:
        if self.refine:
            return super().prepare_decode()
        if self._fixed_decode is None:
            self._fixed_decode = neuron_decode_for(self)
        self._decode = self._fixed_decode
        return self._decode is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ensure():
            a, u = self.act_fn(self.gate_proj(x)), self.up_proj(x)
            h = a * u
            self.observe_prompt(x.reshape(-1, *x.shape[-2:]), h.reshape(-1, *h.shape[-2:]))
            return self.down_proj(h)
        if self.is_decode_step(x) and self.cand_mask.shape[0] == 1:
            if self.refine:
                return self._decode_step(x)
            idx = self.candidates
            y = self._decode(x.reshape(1, -1), idx)
            if self.read_meter is not None:
                d = idx.numel() / self.F
                self.read_meter.add(self.layer_idx, 1, d, d, d)
            return y.to(x.dtype).view(x.shape)
        cand = GriffinMLP._broadcast(self.cand_mask, x)
        if self.refine:
            full = super().scores(x) if self.candidates is None else self._scores_all(x)
            t = GriffinMLP._broadcast(self.t_seq[:, None].to(full.dtype), x)
            keep = cand & (full >= t)
        else:
            keep = cand.expand(*x.shape[:-1], -1)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) * keep
        y = self.down_proj(h)
        if self.read_meter is not None:
            d = token_density(keep)
            self.read_meter.add(self.layer_idx, d.numel(), d, d, d)
        return y

    def _scores_all(self, x: torch.Tensor) -> torch.Tensor:
        saved, self.candidates = self.candidates, None
        try:
            return super().scores(x)
        finally:
            self.candidates = saved

    def extra_repr(self) -> str:
        kind = "centroid" if self.centroids is not None else "top"
        return f"layer={self.layer_idx}, griffin_refine, {kind} candidates={self.kc}, refine={self.refine}"


def calibrate_griffin(model: nn.Module, xs: list[torch.Tensor], density: float) -> GriffinConfig:
    """GRIFFIN needs no calibration: the set comes from each prompt."""
    return GriffinConfig(check_density(density))


def calibrate_griffin_refine(model: nn.Module, xs: list[torch.Tensor], density: float, candidates: float,
                             bits: int = 4, centroids_k: int = 0, refine: bool = True, seed: int = 0,
                             iters: int = 15) -> GriffinRefineConfig:
    """The low-bit copy (``refine``) and, with ``centroids_k``, per-layer codebooks of ``candidates * F``
    neurons fitted on the calibration ``|h|`` (coverage k-means, as ``cluster_neuron``)."""
    cfg = GriffinRefineConfig(candidates=candidates, density=density, bits=bits, refine=refine)
    _, inter = mlp_dims(model)
    for i, x in enumerate(xs):
        mlp = mlp_of(model, i)
        if refine:
            c, s = layer_copy(mlp, bits)
            cfg.codes.append(c)
            cfg.scales.append(s)
        if centroids_k:
            if centroids_k > x.shape[0]:
                raise MethodError(f"K={centroids_k} centroids but only {x.shape[0]} calibration tokens")
            a, u = dense_h(mlp, x)
            habs = (a * u).abs().cpu()
            t_act = keep_threshold(habs, candidates)
            w = coverage_weights(habs, "mag", t_act)
            s_size = max(1, round(candidates * inter))
            cents, _ = fit_centroids(w, centroids_k, s_size, iters, seed + i)
            cfg.centroids.append(cents)
    if centroids_k:
        cfg.info["candidate_density"] = float(torch.stack([c.float().mean() for c in cfg.centroids]).mean())
    return cfg
