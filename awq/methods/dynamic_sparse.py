"""Batch-1 decode kernels for per-token (dynamic) sparsity: TEAL / WINA / LaRoSA and CATS / predicted neurons.

The frontier's methods (``awq/methods/``) compute their masks per token, so a fixed gathered set
(:mod:`awq.methods.gathered`) does not apply.  At batch 1 (one decoded token) these kernels find the
active set inside one C++ call per layer (``csrc/sparse_mlp.cpp``) and read only the weights it needs:

* **input sparsity** (:class:`InputSparseDecode`, TEAL/WINA/LaRoSA): keep ``x_i`` with
  ``|x_i| * s_i >= t_x``; ``[g; u]`` is the sum of the kept rows of ``W_gu^T [H, 2F]`` (row ``i`` =
  column ``i`` of gate and of up, i.e. **column-gathered** gate/up); ``h = silu(g) * u``; keep ``h_n``
  with ``|h_n| * s_n >= t_h``; ``y`` is the sum of the kept rows of ``W_down^T [F, H]``.  Reads
  ``2/3 * density(x) + 1/3 * density(h)`` of the MLP's weight bytes.
* **neuron sparsity** (:class:`NeuronSparseDecode`): CATS reads the whole gate, keeps neurons with
  ``|silu(g_n)| >= t`` and reads their up rows and down columns (``1/3 + 2/3 * density``); a
  predictor's index list reads gate row, up row and down column of those neurons only (**row-gathered**).

Both sums are split over output chunks (no reduction between threads), threads only from
``MIN_BYTES_PER_THREAD`` weight bytes per thread, four rows per pass over the cache-resident chunk.
The kernels equal the modules' masked dense computation to float tolerance (tests/test_dynamic_sparse.py).

Memory: the transposed layouts are copies made once by ``prepare_decode()`` on a method module (input
sparsity: one extra copy of the MLP's weights; neuron sparsity: of ``W_down`` only); prefill and
perplexity runs (many tokens) keep using the original weights.  With no compiler, a non-SiLU
activation, weights off the CPU or in float16, or ``AWQ_SPARSE_KERNEL=torch``, ``prepare_decode()``
returns False and the module keeps its masked dense path (logged once).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from awq.kernels.mlp import EMPTY, cpp_kernel, is_silu, min_bytes_per_thread
from awq.methods.base import SwappedMLP, swapped_mlps

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _f32(t: Optional[torch.Tensor]) -> torch.Tensor:
    return EMPTY if t is None else t.detach().float().contiguous().view(-1)


def bias_of(lin: nn.Module) -> Optional[torch.Tensor]:
    """A linear layer's bias (detached) or None."""
    b = getattr(lin, "bias", None)
    return None if b is None else b.detach()


def gu_bias(bias_g: Optional[torch.Tensor], bias_u: Optional[torch.Tensor], F: int) -> torch.Tensor:
    """The ``[gate; up]`` bias [2F] float32 (a missing one as zeros), or empty when both are None."""
    if bias_g is None and bias_u is None:
        return EMPTY
    z = torch.zeros(F)
    return torch.cat([_f32(bias_g) if bias_g is not None else z, _f32(bias_u) if bias_u is not None else z]).contiguous()


def unsupported(mlp: nn.Module, silu_only: bool = True) -> Optional[str]:
    """Why the decode kernels cannot run this base MLP (None: they can); ``silu_only=False`` for a kernel
    whose activation may run in torch (the paper's)."""
    ws = [getattr(mlp, p).weight for p in ("gate_proj", "up_proj", "down_proj")]
    w = ws[0]
    if any(v.device.type != "cpu" for v in ws):
        return f"weights on {w.device.type}"
    if any(v.dtype not in (torch.float32, torch.bfloat16) for v in ws) or len({v.dtype for v in ws}) != 1:
        return f"{w.dtype} weights (float32 or bfloat16 only)"
    if silu_only and not is_silu(mlp.act_fn):
        return "activation is not SiLU"
    if cpp_kernel() is None:
        return "the C++ sparse MLP kernel is unavailable"
    return None


def log_once(why: str, kernel: str = "dynamic sparse decode kernel") -> None:
    if why not in _warned:
        _warned.add(why)
        log.warning("%s not used (%s): masked dense path", kernel, why)


def _as_row(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).float().contiguous()


class InputSparseDecode:
    """TEAL/WINA/LaRoSA batch-1 kernel over transposed copies of (possibly rotated) gate/up/down weights."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, t_x: float, t_h: float,
                 bias_g: Optional[torch.Tensor] = None, bias_u: Optional[torch.Tensor] = None,
                 bias_d: Optional[torch.Tensor] = None, x_scale: Optional[torch.Tensor] = None,
                 h_scale: Optional[torch.Tensor] = None) -> None:
        with torch.no_grad():
            self.wgu_t = torch.cat([w_gate.detach(), w_up.detach()]).t().contiguous()  # [H, 2F]
            self.wd_t = w_down.detach().t().contiguous()  # [F, H]
        self.F, self.H = w_gate.shape
        self.bias_gu = gu_bias(bias_g, bias_u, self.F)
        self.bias_d = None if bias_d is None else bias_d.detach().float()
        self.t_x, self.t_h = float(t_x), float(t_h)
        self.x_scale, self.h_scale = _f32(x_scale), _f32(h_scale)
        self.counts = torch.zeros(2, dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One token ``x`` (``H`` entries) -> ``[H]`` float32; ``self.counts`` = kept (x, h) entries."""
        y = cpp_kernel().input_sparse_swiglu(_as_row(x), self.wgu_t, self.wd_t, self.bias_gu, self.x_scale,
                                             self.t_x, self.h_scale, self.t_h, min_bytes_per_thread(), self.counts)
        return y if self.bias_d is None else y + self.bias_d

    def densities(self) -> tuple[float, float]:
        """(density(x), density(h)) of the last call."""
        kx, kh = self.counts.tolist()
        return kx / self.H, kh / self.F


class NeuronSparseDecode:
    """CATS (``t_a``), predicted-neuron (an index list per call) or predicted-then-thresholded (an index
    list and ``t_a > 0``: gate rows of the list, up and down rows of those with ``|silu(g)| >= t_a``)
    batch-1 kernel; copies ``W_down^T`` only."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, t_a: float = 0.0,
                 bias_g: Optional[torch.Tensor] = None, bias_u: Optional[torch.Tensor] = None,
                 bias_d: Optional[torch.Tensor] = None) -> None:
        with torch.no_grad():
            self.wg, self.wu = w_gate.detach().contiguous(), w_up.detach().contiguous()
            self.wd_t = w_down.detach().t().contiguous()
        self.F, self.H = self.wg.shape
        self.t_a = float(t_a)
        self.bias_g, self.bias_u = _f32(bias_g), _f32(bias_u)
        self.bias_d = None if bias_d is None else bias_d.detach().float()
        self.counts = torch.zeros(2, dtype=torch.long)  # (kept neurons, candidates whose gate row was read)

    def __call__(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One token -> ``[H]`` float32.  ``idx`` None: CATS threshold ``t_a`` on ``|silu(gate)|`` over all
        neurons; else those neurons (int64, in range; at least one), thresholded within if ``t_a > 0``."""
        idx = EMPTY if idx is None else idx.reshape(-1).to(torch.long).contiguous()
        y = cpp_kernel().neuron_sparse_swiglu(_as_row(x), self.wg, self.wu, self.wd_t, idx, self.t_a, self.bias_g,
                                              self.bias_u, min_bytes_per_thread(), self.counts)
        return y if self.bias_d is None else y + self.bias_d

    def density(self) -> float:
        """Kept neurons / F of the last call (their up and down rows were read)."""
        return int(self.counts[0]) / self.F

    def gate_density(self) -> float:
        """Candidates / F of the last call (their gate rows were read)."""
        return int(self.counts[1]) / self.F


def input_decode_for(mod: nn.Module, w_gate: torch.Tensor, w_up: torch.Tensor, t_x: float, t_h: float,
                     x_scale: Optional[torch.Tensor], h_scale: Optional[torch.Tensor]) -> Optional[InputSparseDecode]:
    """The kernel for an input-sparse method module (its base MLP's biases), or None (reason logged once)."""
    why = unsupported(mod.base)
    if why is not None:
        log_once(why)
        return None
    b = mod.base
    return InputSparseDecode(w_gate, w_up, b.down_proj.weight, t_x, t_h, bias_of(b.gate_proj), bias_of(b.up_proj),
                             bias_of(b.down_proj), x_scale, h_scale)


def neuron_decode_for(mod: nn.Module, t_a: float = 0.0) -> Optional[NeuronSparseDecode]:
    """The kernel for a neuron-sparse method module, or None (reason logged once)."""
    why = unsupported(mod.base)
    if why is not None:
        log_once(why)
        return None
    b = mod.base
    return NeuronSparseDecode(b.gate_proj.weight, b.up_proj.weight, b.down_proj.weight, t_a, bias_of(b.gate_proj),
                              bias_of(b.up_proj), bias_of(b.down_proj))


def prepare_decode_(model: nn.Module) -> int:
    """Call ``prepare_decode()`` on every swapped MLP; returns how many have their batch-1 kernel ready."""

    return sum(1 for m in swapped_mlps(model, SwappedMLP) if m.prepare_decode())
