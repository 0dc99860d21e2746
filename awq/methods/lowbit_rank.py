"""Neurons ranked by a low-bit copy of gate and up (issue 21): ``|act(g~) * u~|`` picks, exact rows compute.

Per layer ``l`` a ``bits``-bit copy (2, 4 or 8 bits, symmetric, one scale per row, the clipping of
each row's scale chosen for least squared error) of ``W_gate`` and ``W_up`` is kept beside the
model.  Per token::

    g~ = Q(W_gate) x,  u~ = Q(W_up) x                 (the whole copy is read: every neuron scored)
    keep = |act(g~) * u~| >= t_l                       (t_l: calibration quantile at ``density``)
    y = down((act(gate(x)) * up(x)) * keep)            (exact gate/up rows and down columns of keep only)

The score approximates the ideal neuron set's ``|h|`` (``cluster_ideal_oracle``: per-token top
``|h|``, not realizable); an 8-bit copy ranks like ``|h|`` itself, 4 bits nearly so.  Read per token:
``gate = up = down = density(keep)``, plus the copy as a share of the MLP's weight bytes
(:meth:`LowbitRankConfig.extra_read`: ``2 F ceil(H / (8 / bits))`` code bytes and ``2 F`` float16 scales
over ``3 H F`` weights of the MLP's dtype; for 4 bits against float32 weights ``~1/12``).  The copy
is charged against the *loaded* MLP's bytes: against a 4-bit MLP a 4-bit copy would cost about 2/3 of
gate and up, so this accounting favours the method exactly as much as the MLP's dtype is wide.

``candidates`` (optional, :meth:`LowbitRankMLP.set_candidates`): score only a subset of neurons (a
prompt-level set or a cluster centroid), reading only their code rows; used by
:mod:`awq.methods.prompt_sets`.

**Batch-1 decode** (:meth:`LowbitRankMLP.prepare_decode`): ``csrc/lowbit_rank.cpp`` (:mod:`awq.kernels.lowbit`) scores every
(candidate) neuron from the packed codes and returns the kept indices, then the row-gathered kernel of
:mod:`awq.methods.dynamic_sparse` reads gate row, up row and down column of those only.  SiLU only (the kernels
implement SiLU); another activation keeps the masked path (logged once).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from awq.kernels.lowbit import check_bits as kernel_check_bits
from awq.kernels.lowbit import lowbit_kernel, lowbit_select, pack_codes
from awq.methods.base import MethodConfig, SwappedMLP
from awq.methods.common import MethodError, check_density, keep_threshold, mlp_dims, mlp_of, neuron_masked_mlp
from awq.methods.dynamic_sparse import _as_row, bias_of, gu_bias, log_once, neuron_decode_for, unsupported
from awq.methods.teal import _check_layers

log = logging.getLogger(__name__)

CLIP_GRID = 15  # clipping factors tried per row, 0.3 .. 1.0 of the row's max |w|

# ------------------------------------------------------------------------------------------------
# quantisation and packing
# ------------------------------------------------------------------------------------------------
def check_bits(bits: int) -> int:
    try:
        return kernel_check_bits(bits)
    except ValueError as e:
        raise MethodError(str(e)) from None


@torch.no_grad()
def quantize_rows(w: torch.Tensor, bits: int, grid: int = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation of ``w`` [R, C]: ``(codes uint8 [R, C], scales float32 [R])``.

    ``w ~ (codes - 2^(bits-1)) * scale``; codes in ``[0, 2^bits - 1]``.  Each row's scale is
    ``f * max|w_row| / (2^(bits-1) - 1)`` for the ``f`` of ``linspace(0.3, 1, grid)`` with the least
    squared error (``grid=1``: plain absmax).  Scales are rounded to float16 (what is stored and counted).
    """
    check_bits(bits)
    w = w.detach().float()
    qmax = 2 ** (bits - 1) - 1
    off = 2 ** (bits - 1)
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best_s = amax / qmax
    factors = torch.linspace(0.3, 1.0, grid) if grid > 1 else torch.ones(1)
    for f in factors:
        s = (amax * f / qmax).half().float().clamp_min(1e-12)
        q = (w / s).round().clamp(-off, qmax)
        err = (q * s - w).square().sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    codes = ((w / best_s).round().clamp(-off, qmax) + off).to(torch.uint8)
    return codes, best_s.reshape(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.float() - 2 ** (bits - 1)) * scales.float()[:, None]


def copy_bytes(hidden: int, inter: int, bits: int) -> int:
    """Bytes of one layer's copy: packed codes of gate and up plus float16 row scales."""
    return 2 * inter * -(-hidden // (8 // bits)) + 2 * inter * 2


# ------------------------------------------------------------------------------------------------
# config and module
# ------------------------------------------------------------------------------------------------
@dataclass
class LowbitRankConfig(MethodConfig):
    """Per layer: codes ``[2F, H]`` uint8 (gate rows then up rows), scales ``[2F]``, threshold on the score."""

    bits: int
    density: float  # nominal kept-neuron density the thresholds were calibrated for
    codes: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_density(self.density)

    def validate(self, model: nn.Module) -> None:
        _check_layers(model, "LowbitRankConfig", codes=self.codes, scales=self.scales, thresholds=self.thresholds)
        hidden, inter = mlp_dims(model)
        for i, (c, s) in enumerate(zip(self.codes, self.scales)):
            if tuple(c.shape) != (2 * inter, hidden) or tuple(s.shape) != (2 * inter,):
                raise MethodError(f"LowbitRankConfig: layer {i} codes {tuple(c.shape)} / scales {tuple(s.shape)}, "
                                  f"want ({2 * inter}, {hidden}) / ({2 * inter},)")

    def extra_read(self, model: nn.Module) -> float:
        hidden, inter = mlp_dims(model)
        elt = mlp_of(model, 0).gate_proj.weight.element_size()
        return copy_bytes(hidden, inter, self.bits) / (3.0 * hidden * inter * elt)

    def summary(self) -> dict:
        return {"bits": self.bits, "density": self.density, "thresholds": list(self.thresholds), **self.info}

    def build(self, mlp: nn.Module, i: int) -> SwappedMLP:
        return LowbitRankMLP(mlp, i, self.bits, self.codes[i], self.scales[i], self.thresholds[i])


class LowbitRankMLP(SwappedMLP):
    def __init__(self, base: nn.Module, layer_idx: int, bits: int, codes: torch.Tensor, scales: torch.Tensor,
                 t: float) -> None:
        super().__init__(base, layer_idx)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = base.gate_proj, base.up_proj, base.down_proj, base.act_fn
        dev, dt = base.gate_proj.weight.device, base.gate_proj.weight.dtype
        self.bits, self.t = int(bits), float(t)
        self.F = base.gate_proj.out_features
        self.codes, self.scales = codes, scales.float()
        wq = dequantize(codes, scales, bits)
        self.wq_gate, self.wq_up = wq[: self.F].to(dev, dt), wq[self.F:].to(dev, dt)
        self.candidates: Optional[torch.Tensor] = None  # int64 neuron ids scored (None: all)
        self._decode = None
        self._packed: Optional[torch.Tensor] = None

    @property
    def extra_bytes(self) -> int:
        """Bytes of the copy read per token (the candidates' rows only, when a candidate set is given)."""
        hidden = self.gate_proj.in_features
        full = copy_bytes(hidden, self.F, self.bits)
        return full if self.candidates is None else full * int(self.candidates.numel()) // self.F

    def set_candidates(self, idx: Optional[torch.Tensor]) -> None:
        """Score only neurons ``idx`` (sorted int64) from now on; None: all."""
        self.candidates = None if idx is None else idx.reshape(-1).to(torch.long).sort().values.contiguous()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``|act(g~) * u~|`` ``[N, F]`` (``-1`` outside the candidates)."""
        g = self.act_fn(nn.functional.linear(x, self.wq_gate, bias_of(self.gate_proj)))
        u = nn.functional.linear(x, self.wq_up, bias_of(self.up_proj))
        s = (g * u).abs()
        if self.candidates is not None:
            m = torch.zeros(self.F, dtype=torch.bool, device=s.device)
            m[self.candidates.to(s.device)] = True
            s = s.masked_fill(~m, -1.0)
        return s

    def prepare_decode(self) -> bool:
        """Packed codes for ``csrc/lowbit_rank.cpp`` and the row-gathered kernel; False if either cannot run."""
        if self._decode is None:
            k = lowbit_kernel()
            why = unsupported(self.base) or (None if k is not None else "the low-bit rank C++ kernel is unavailable")
            if why is not None:
                log_once(why, "low-bit rank decode kernel")
                return False
            self._decode = neuron_decode_for(self)
            if self._decode is not None:
                self._packed = pack_codes(self.codes, self.bits)
                self._bias_gu = gu_bias(bias_of(self.gate_proj), bias_of(self.up_proj), self.F)
        return self._decode is not None

    def _decode_step(self, x: torch.Tensor) -> torch.Tensor:
        x1 = _as_row(x)
        idx = lowbit_select(x1, self._packed, self.scales, self.bits, self._bias_gu, self.candidates, self.t)
        if idx.numel():
            y = self._decode(x1, idx)
        else:  # nothing kept: the kernel would read every gate row (CATS mode)
            b = bias_of(self.down_proj)
            y = torch.zeros(x1.numel()) if b is None else b.float().clone()
        if self.read_meter is not None:
            d = idx.numel() / self.F
            self.read_meter.add(self.layer_idx, 1, d, d, d)
        return y.to(x.dtype).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_decode_step(x):
            return self._decode_step(x)
        if self.observers:
            self._notify("input", x)
        keep = self.scores(x) >= self.t
        return neuron_masked_mlp(self, x, keep)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, lowbit_rank, bits={self.bits}, t={self.t:.4g}"


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_copy(mlp: nn.Module, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [2F, H], scales [2F])`` of gate and up stacked."""
    cg, sg = quantize_rows(mlp.gate_proj.weight, bits)
    cu, su = quantize_rows(mlp.up_proj.weight, bits)
    return torch.cat([cg, cu]), torch.cat([sg, su])


@torch.no_grad()
def copy_scores(mlp: nn.Module, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """``|act(g~) * u~|`` of calibration inputs ``x`` [N, H] -> [N, F] float32 (CPU)."""
    f = mlp.gate_proj.out_features
    wq = dequantize(codes, scales, bits)
    xx = x.float()
    bg, bu = bias_of(mlp.gate_proj), bias_of(mlp.up_proj)
    g = xx @ wq[:f].T + (0 if bg is None else bg.float().cpu())
    u = xx @ wq[f:].T + (0 if bu is None else bu.float().cpu())
    return (mlp.act_fn(g) * u).abs()


def calibrate_lowbit_rank(model: nn.Module, xs: list[torch.Tensor], density: float, bits: int = 4) -> LowbitRankConfig:
    """Copies of every layer's gate and up at ``bits`` and per-layer thresholds keeping ``density`` of the
    calibration scores."""
    check_density(density)
    cfg = LowbitRankConfig(check_bits(bits), density)
    for i, x in enumerate(xs):
        mlp = mlp_of(model, i)
        codes, scales = layer_copy(mlp, bits)
        cfg.codes.append(codes)
        cfg.scales.append(scales)
        cfg.thresholds.append(keep_threshold(copy_scores(mlp, x, codes, scales, bits), density))
    log.info("lowbit_rank: %d-bit copy of gate and up (%.2f%% of the MLP's bytes), density %.3f", bits,
             100 * cfg.extra_read(model), density)
    return cfg
