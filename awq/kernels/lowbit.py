"""The low-bit rank kernel (``csrc/lowbit_rank.cpp``): the packed code layout, loading, and the call.

A ``bits``-bit copy (2, 4 or 8) of ``[W_gate; W_up]`` is stored as ``[2F, L]`` bytes, ``P = 8 / bits`` codes per
byte, ``L = ceil(H / P)``: byte ``j`` of a row holds the codes of columns ``j + p * L`` (``p = 0 .. P-1``) in
bits ``[p * bits, (p + 1) * bits)`` (:func:`pack_codes`; each "plane" is a contiguous run of columns, so the
kernel's inner loop is one pass over the bytes with ``P`` accumulators).  ``lowbit_select`` scores every
neuron (or a candidate list) as ``|silu(g~) * u~|`` from the packed codes and returns the indices scoring at
least ``t``; only the candidates' code rows are read.  AVX-512 and AVX2+FMA paths chosen at compile time
(``-march`` by :func:`awq.kernels.build.march_flag`: ``AWQ_HW_FLAGS="avx2 fma"`` builds the AVX2 one under its
own key), scalar otherwise.  The method using it is :mod:`awq.methods.lowbit_rank`; its torch reference is in
``tests/test_lowbit_rank.py``.
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Optional

import torch

from awq.kernels.build import load_cpp_extension, march_flag
from awq.kernels.mlp import EMPTY, min_bytes_per_thread
from awq.util import env

log = logging.getLogger(__name__)

BITS = (2, 4, 8)

_state: dict[tuple, Optional[ModuleType]] = {}  # build flags -> module (None: cannot be built)


def check_bits(bits: int) -> int:
    if int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return int(bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, C]`` codes (uint8, each ``< 2^bits``) -> ``[R, ceil(C / P)]`` bytes, ``P = 8 / bits`` planes;
    padding columns hold the zero code ``2^(bits-1)``."""
    check_bits(bits)
    p = 8 // bits
    r, c = codes.shape
    ln = -(-c // p)
    padded = torch.full((r, p * ln), 2 ** (bits - 1), dtype=torch.int32)
    padded[:, :c] = codes.to(torch.int32)
    out = torch.zeros(r, ln, dtype=torch.int32)
    for k in range(p):
        out |= padded[:, k * ln:(k + 1) * ln] << (k * bits)
    return out.to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (first ``cols`` columns)."""
    p = 8 // check_bits(bits)
    v = packed.to(torch.int32)
    planes = [(v >> (k * bits)) & (2 ** bits - 1) for k in range(p)]
    return torch.cat(planes, 1)[:, :cols].to(torch.uint8)


def build_flags() -> list[str]:
    return ["-O3", march_flag(), "-fopenmp", "-ffp-contract=fast"]


def lowbit_kernel() -> Optional[ModuleType]:
    """The compiled module for this process's view of the CPU, or None (``AWQ_SPARSE_KERNEL=torch``, or it
    cannot be built: logged once by the builder)."""
    if env.get("AWQ_SPARSE_KERNEL") == "torch":
        return None
    cflags = build_flags()
    key = tuple(cflags)
    if key not in _state:
        _state[key] = load_cpp_extension("awq_lowbit_rank", "lowbit_rank.cpp", cflags, ["-fopenmp"],
                                         what="low-bit rank")
    return _state[key]


def lowbit_select(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, bias_gu: torch.Tensor,
                  cand: Optional[torch.Tensor], t: float, scores_out: torch.Tensor = EMPTY) -> torch.Tensor:
    """Indices (int64, in candidate order) of the neurons with ``|silu(g~) * u~| >= t`` for one token ``x``
    (float32 ``[H]``); ``cand`` None: every neuron.  ``scores_out`` (``[candidates]`` float32) receives every
    candidate's score when given.  Raises RuntimeError when the kernel is unavailable."""
    k = lowbit_kernel()
    if k is None:
        raise RuntimeError("the low-bit rank C++ kernel is unavailable")
    c = EMPTY.to(torch.long) if cand is None else cand
    return k.lowbit_select(x, packed, scales, int(bits), bias_gu, c, float(t), min_bytes_per_thread(), scores_out)
