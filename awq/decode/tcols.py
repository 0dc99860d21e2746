"""The output-blocked ("tcols") copy of the MLP weights that the quantised sparse kernels read (issue 19).

ggml's blocks run along a row's inputs: 32 inputs share a scale.  A kernel that skips inputs (TEAL / WINA on
gate/up, every neuron method on the columns of ``W_down``) still reads the scales of every 32-input block
holding one active input, which for Q4_1 is 1 bit of every 5: at half the inputs it reads ~0.57 of the bytes.
Requantising ``W^T`` in the same format makes 32 *outputs* of one input share a scale, so an active input reads
its quants and its own scales and nothing else: exactly the format's bits per weight times the active inputs.

The values change (a second rounding, from the dequantised file weights), so a point that runs on this copy is
scored on exactly these weights: :func:`awq.decode.check.sparse_weights` writes them into the model for the
projections :data:`TCOLS_PROJS` names for the point's kernel.  At 8 bits the second rounding is lost in the noise;
at 4 bits it costs quality against the file's own blocks, which ``AWQ_QUANT_SPARSE_LAYOUT=cols`` keeps (no
requantisation, more bytes): fewer bytes or a better PPL, the frontier's ``sparse_layout`` field says which a point had.
"""
from __future__ import annotations

from typing import Optional

import torch

from awq.load.quant_formats import QTensor, quantize
from awq.util import env

LAYOUTS = {"cols": 0, "tcols": 1}  # the C++ layout codes (csrc/quant_decode.cpp make_cols)
# the MLP projections each quantised sparse kernel reads input-major (awq.decode.quant.mlp_kind)
TCOLS_PROJS = {"input": ("gate_proj", "up_proj", "down_proj"), "cats": ("down_proj",), "paper": ("down_proj",),
               "fixed": ("down_proj",)}


def sparse_layout() -> str:
    """``tcols`` (default) or ``cols``: ``AWQ_QUANT_SPARSE_LAYOUT``."""
    return env.get("AWQ_QUANT_SPARSE_LAYOUT")


def requant_t(qt: QTensor) -> QTensor:
    """``W [R, C]`` (a QTensor of ggml row blocks) -> ``W^T [C, R]`` requantised in the same format from the
    dequantised weights: blocks of 32 outputs of one input (R must be a multiple of 32)."""
    return quantize(qt.dequantize().t().contiguous(), qt.fmt)


def dequant_t(qt_t: QTensor) -> torch.Tensor:
    """The values of a tcols copy as ``W [R, C]`` (what the kernels multiply by)."""
    return qt_t.dequantize().t().contiguous()


def int_quants(qt: QTensor) -> torch.Tensor:
    """The integer quants of ``qt [R, C]`` in entry order, such that the value is ``d * q`` (Q4_1: ``+ m``):
    Q8_0 the int8, Q4_0 ``q - 8``, Q4_1 ``q`` (0..15), decoded from ggml's block bytes."""
    R, C = qt.shape
    b = qt.qs.reshape(R, C // 32, -1)
    if qt.fmt == "q8_0":
        return b.view(torch.int8).reshape(R, C).to(torch.int32)
    q = torch.cat([b & 15, b >> 4], -1).reshape(R, C).to(torch.int32)
    return q - 8 if qt.fmt == "q4_0" else q


class TcolsProduct:
    """What the tcols kernel (``q_tcols_range`` of csrc/quant_simd.h) computes for ``x @ W.T``, in torch, per row
    of ``x``: the nonzero entries in groups of 32; per group and output block ``z = x_j d_jb`` rounded to int8
    (scale ``amax / 127`` in float32); summed against the integer quants (float32, as the kernel scales its int32 sums); Q4_1 adds ``sum_j x_j m_jb``.  The
    decode-path check scores a tcols layer with it (its float32 sums aside, equal to the kernel)."""

    def __init__(self, qt_t: QTensor, outputs: Optional[slice] = None) -> None:
        C, R = qt_t.shape
        o = outputs or slice(0, R)  # a range of whole output blocks (e.g. the gate half of [gate; up])
        b = slice(o.start // 32, o.stop // 32)
        self.q = int_quants(qt_t)[:, o].float()
        self.d = qt_t.d.float().reshape(C, R // 32)[:, b]
        self.m = qt_t.m.float().reshape(C, R // 32)[:, b] if qt_t.m is not None else None
        self.C, self.R = C, o.stop - o.start

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        nb = self.R // 32
        rows = x.reshape(-1, self.C).float()
        out = torch.zeros(rows.shape[0], self.R)
        for r, row in enumerate(rows):
            idx = torch.nonzero(row).flatten()
            n = idx.numel()
            if n == 0:
                continue
            g, pad = -(-n // 32), -n % 32
            xi = row[idx]
            z = torch.nn.functional.pad(xi[:, None] * self.d[idx], (0, 0, 0, pad)).reshape(g, 32, nb)
            s = z.abs().amax(1) / 127
            inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
            zq = torch.round(z * inv[:, None, :]) * s[:, None, :]
            qq = torch.nn.functional.pad(self.q[idx], (0, 0, 0, pad)).reshape(g, 32, nb, 32)
            y = torch.einsum("gjb,gjbk->bk", zq, qq).reshape(self.R)
            if self.m is not None:
                y += (xi[:, None] * self.m[idx]).sum(0).repeat_interleave(32)
            out[r] = y
        return out.reshape(*x.shape[:-1], self.R).to(x.dtype)
