"""The block-quantised kernel family (``csrc/quant_kernels.cpp`` + ``csrc/quant_decode.cpp``, vector code in
``csrc/quant_simd.h``): loading, the C++ format ids, and the torch references of what the kernels compute.

One module per ``-march`` (:func:`awq.kernels.build.march_flag`): native, or with ``AWQ_HW_FLAGS="avx2 fma"``
a real AVX2-only ``-march=haswell`` build, so a test loads both vector paths in one process (:func:`kernel`
is memoised per flag set).  The vector path follows the CPU flags :mod:`awq.kernels.hw` acts on
(:func:`expected_simd`): ``avx512vnni`` (AVX-512 F/BW/VL + VNNI), ``avx2`` (AVX2 + FMA + F16C) or ``scalar``;
``simd()`` of the module names the path it was built with.

Functions of the module (contracts in the C++ sources; references here and in ``tests/test_quant_kernels.py``):
``quantize_act`` (int8 activation blocks, :func:`quantize_act_ref`), ``pack_rows`` / ``gemv_rows`` (ggml's
row-major blocks, optionally gathered rows), ``pack_cols`` / ``gemv_cols`` (the input-major copy for
input-channel sparsity), ``QDecoder`` (one C++ call per decode step, :mod:`awq.decode.quant`).  Every product
equals :func:`gemv_ref`: the dequantised weights times the int8-quantised activation, in float.
The rows GEMV's rows per pass (1, 2 or 4 rows side by side) is chosen per format by a short measurement on
this machine (:func:`choose_rows_per_pass`, cached by :func:`awq.kernels.hw.choose`): which streams fastest
differs between CPUs (AMD EPYC, 2 threads, a 151936x896 Q4_1 matrix: 1 row 30 GB/s, 4 rows 20 GB/s).
``AWQ_QUANT_ROWS_PER_PASS`` (``1``, ``2`` or ``4``) overrides it; every choice computes the same bits.
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Optional, Sequence

import torch

from awq.kernels import hw
from awq.kernels.build import load_cpp_extension, march_flag
from awq.util import env

log = logging.getLogger(__name__)

SOURCES = ("quant_kernels.cpp", "quant_decode.cpp")
KERNEL_CODE = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # the C++ kernels' format ids (enum QFmt of csrc/quant_simd.h)
BLOCK = 32  # entries per block, weights and activations
_state: dict[tuple, Optional[ModuleType]] = {}


def build_flags() -> list[str]:
    return ["-O3", march_flag(), "-fopenmp", "-ffp-contract=fast"]


def expected_simd(flags: Optional[Sequence[str]] = None) -> str:
    """The vector path a build for these CPU flags (default: :func:`awq.kernels.hw.cpu_flags`) compiles to."""
    f = set(hw.cpu_flags() if flags is None else flags)
    if {"avx512f", "avx512bw", "avx512_vnni"} <= f:
        return "avx512vnni"
    if {"avx2", "fma"} <= f:
        return "avx2"
    return "scalar"


def kernel() -> Optional[ModuleType]:
    """The compiled module for this process's view of the CPU, or None if it cannot be built (logged)."""
    key = tuple(build_flags())
    if key not in _state:
        mod = load_cpp_extension("awq_quant", SOURCES, list(key), ["-fopenmp"], what="quantised decode")
        if mod is not None:
            rows = env.get("AWQ_QUANT_ROWS_PER_PASS")
            if rows == "auto":
                for fmt, code in KERNEL_CODE.items():
                    mod.set_rows_per_pass(choose_rows_per_pass(mod, fmt), code)
            else:
                mod.set_rows_per_pass(int(rows))
            log.info("quantised decode kernels: %s vector path", mod.simd())
        _state[key] = mod
    return _state[key]


PROBE_BYTES = 64 << 20  # the rows-per-pass probe matrix: larger than most CPUs' last-level cache


def choose_rows_per_pass(mod: ModuleType, fmt: str) -> int:
    """Rows per pass of ``mod``'s rows GEMV for ``fmt``, measured on this machine (interleaved calls on a
    ``PROBE_BYTES`` matrix of random packed rows, 896 wide) and cached per CPU, flags, torch and thread count."""
    C = 896
    row_bytes = C + C // BLOCK * 2 if fmt == "q8_0" else C // 2 + C // BLOCK * (4 if fmt == "q4_1" else 2)

    def make():
        g = torch.Generator().manual_seed(0)
        w = torch.randint(0, 256, (PROBE_BYTES // row_bytes, row_bytes), dtype=torch.uint8, generator=g)
        n_scales = C // BLOCK * (2 if fmt == "q4_1" else 1)  # each row starts with its float16 scales (and mins)
        w[:, : 2 * n_scales] = torch.full((w.shape[0], n_scales), 0.01, dtype=torch.half).view(torch.uint8)
        x = torch.randn(C, generator=g)
        empty = torch.empty(0, dtype=torch.long)

        def call(nr: int):
            def run():
                mod.set_rows_per_pass(nr, KERNEL_CODE[fmt])
                mod.gemv_rows(w, KERNEL_CODE[fmt], C, x, empty)
            return run
        return {str(nr): call(nr) for nr in (1, 2, 4)}

    before = mod.rows_per_pass(KERNEL_CODE[fmt])
    try:
        return int(hw.choose(f"quant_rows_per_pass_{fmt}", ("1", "2", "4"), make))
    finally:
        mod.set_rows_per_pass(before, KERNEL_CODE[fmt])


# -- torch references ---------------------------------------------------------------------------------
def quantize_act_ref(x: torch.Tensor) -> torch.Tensor:
    """The kernels' (and llama.cpp's) activation quantisation, dequantised: per 32 entries along the last dim
    ``d = fp16(amax / 127)``, ``q = round_half_even(x * (1 / (amax / 127)))``, value ``q * d``."""
    shape = x.shape
    b = x.float().reshape(-1, BLOCK)
    d = b.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(b * inv) * d.half().float()).reshape(shape).to(x.dtype)


def gemv_ref(w_deq: torch.Tensor, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What ``gemv_rows`` / ``gemv_cols`` compute (float64): the dequantised weights ``[R, C]`` (rows ``rows``
    when given) times the int8-quantised ``x``; a masked input (exact zeros) gives the masked dense product."""
    w = w_deq.double() if rows is None else w_deq.double()[rows]
    return w @ quantize_act_ref(x).double()
