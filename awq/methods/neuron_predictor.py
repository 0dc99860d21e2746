"""Deja Vu-style neuron predictor: a per-layer low-rank net ``x -> r -> F`` picks the active neurons.

Per layer ``l``: ``score = B_l (A_l x) + b_l`` (``A_l``: ``[r, H]``, ``B_l``: ``[F, r]``); the
``k = round(density * F)`` highest-scoring neurons are kept and only their gate/up rows and down
columns are computed: ``y = down((act(gate(x)) * up(x)) * keep)``. Read per token:
``gate = up = down = density(keep)``, plus the predictor's weights as a share of the MLP's
(:meth:`NeuronPredictorConfig.extra_read`). The rank is the largest with ``r (H + F)`` multiply-adds
at most ``budget`` (5%) of the MLP's ``3 H F``.

Training (:func:`calibrate_neuron_predictor`): on the dense train-part MLP inputs, target = neuron
``j`` is active when ``|act(g_j) u_j|`` is above the layer's calibration quantile at ``density``;
binary cross-entropy, Adam, minibatches in an order drawn from ``seed``; the net starts from the
rank-``r`` SVD of ``W_gate`` (so it starts as a low-rank gate). Deterministic for a seed on one
machine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import check_density, dense_h, keep_threshold, mlp_dims, mlp_of, neuron_masked_mlp
from awq.methods.dynamic_sparse import neuron_decode_for, unsupported
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)

BUDGET = 0.05


def predictor_rank(hidden: int, inter: int, budget: float = BUDGET) -> int:
    """Largest ``r`` with ``r * (hidden + inter) <= budget * 3 * hidden * inter`` (at least 1)."""
    return max(1, int(budget * 3 * hidden * inter // (hidden + inter)))


@dataclass
class NeuronPredictorConfig(MethodConfig):
    density: float
    a: list[torch.Tensor] = field(default_factory=list)  # [r, H] per layer
    b: list[torch.Tensor] = field(default_factory=list)  # [F, r] per layer
    bias: list[torch.Tensor] = field(default_factory=list)  # [F] per layer

    def __post_init__(self) -> None:
        check_density(self.density)

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "NeuronPredictorConfig", a=self.a, b=self.b, bias=self.bias)

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        r = self.a[0].shape[0]
        return (r * (hidden + inter) + inter) / (3.0 * hidden * inter)

    def summary(self) -> dict:
        return {"density": self.density, "rank": int(self.a[0].shape[0]) if self.a else None}

    def build(self, mlp: nn.Module, i: int) -> "NeuronPredictorMLP":
        return NeuronPredictorMLP(mlp, i, self.density, self.a[i], self.b[i], self.bias[i])


class NeuronPredictorMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, density: float, a: torch.Tensor, b: torch.Tensor,
                 bias: torch.Tensor) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        dev, dt = base.gate_proj.weight.device, base.gate_proj.weight.dtype
        self.a, self.b, self.bias = a.to(dev, dt), b.to(dev, dt), bias.to(dev, dt)
        self.k = max(1, int(round(density * base.gate_proj.out_features)))

    @property
    def extra_bytes(self) -> int:
        """Weight bytes of the predictor, read per token besides the MLP's."""
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.bias))

    def decode_unsupported(self) -> Optional[str]:
        return unsupported(self.base)

    def prepare_decode(self) -> bool:
        """Make the batch-1 row-gathered kernel (:mod:`awq.methods.dynamic_sparse`; a transposed copy of
        ``W_down``) used for single-token calls from now on.  False if it cannot run here."""
        if self._decode is None:
            self._decode = neuron_decode_for(self)
        return self._decode is not None

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        score = F.linear(F.linear(x, self.a), self.b, self.bias)
        idx = score.topk(self.k, dim=-1).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            x1 = x.reshape(1, -1)
            idx = F.linear(F.linear(x1, self.a), self.b, self.bias).topk(self.k, dim=-1).indices
            y = self._decode(x1, idx)
            if self.read_meter is not None:
                d = self.k / self._decode.F
                self.read_meter.add(self.layer_idx, 1, d, d, d)
            return y.to(x.dtype).view(x.shape)
        if self.observers:
            self._notify("input", x)
        keep = self.keep_mask(x)
        return neuron_masked_mlp(self, x, keep)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, neuron_predictor, k={self.k}, rank={self.a.shape[0]}"


def train_layer(x: torch.Tensor, target: torch.Tensor, w_gate: torch.Tensor, rank: int, steps: int = 60,
                batch: int = 512, lr: float = 3e-3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE-train ``B (A x) + b`` to predict ``target`` (bool ``[N, F]``); starts from the rank-r SVD of ``w_gate``."""
    u, s, vh = torch.linalg.svd(w_gate.float(), full_matrices=False)
    a = nn.Parameter((s[:rank, None].sqrt() * vh[:rank]).float().clone())
    b = nn.Parameter((u[:, :rank] * s[:rank].sqrt()).float().clone())
    bias = nn.Parameter(torch.zeros(w_gate.shape[0]))
    opt = torch.optim.Adam([a, b, bias], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    tgt = target.float()
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(0, n, (min(batch, n),), generator=g)
            logits = F.linear(F.linear(x[idx], a), b, bias)
            loss = F.binary_cross_entropy_with_logits(logits, tgt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return a.detach(), b.detach(), bias.detach()


def calibrate_neuron_predictor(model: nn.Module, xs: list[torch.Tensor], density: float, steps: int = 60,
                               seed: int = 0, budget: float = BUDGET) -> NeuronPredictorConfig:
    check_density(density)
    hidden, inter = mlp_dims(model)
    rank = predictor_rank(hidden, inter, budget)
    cfg = NeuronPredictorConfig(density)
    from tqdm.auto import tqdm

    for i, x in enumerate(tqdm(xs, desc=f"neuron predictor d={density:.2f}", unit="layer", disable=None)):
        mlp = mlp_of(model, i)
        with torch.no_grad():
            a_, u_ = dense_h(mlp, x)
            h = (a_ * u_).abs().cpu()
            target = h >= keep_threshold(h, density)
        a, b, bias = train_layer(x.float(), target, mlp.gate_proj.weight.detach().float().cpu(), rank,
                                 steps=steps, seed=seed + i)
        cfg.a.append(a)
        cfg.b.append(b)
        cfg.bias.append(bias)
    log.info("neuron predictor: rank %d, %.2f%% of the MLP's weights, density %.3f", rank,
             100 * cfg.extra_read(model), density)
    return cfg
