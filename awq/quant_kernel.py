"""Build and load the block-quantised C++ kernels (``csrc/quant_kernels.cpp`` + ``csrc/quant_decode.cpp``,
vector code in ``csrc/quant_simd.h``) with :mod:`awq.kernel_build`.

One module per ``-march`` (:func:`awq.kernel_build.march_flag`): native, or with ``AWQ_HW_FLAGS="avx2 fma"``
a real AVX2-only ``-march=haswell`` build, so a test can load both vector paths in one process
(``kernel()`` is memoised per flag set).  ``simd()`` of the module names the path it was built with:
``avx512vnni`` (AVX-512 F/BW/VL + VNNI), ``avx2`` (AVX2 + FMA + F16C) or ``scalar``.
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Optional

from awq.kernel_build import load_cpp_extension, march_flag

log = logging.getLogger(__name__)

SOURCES = ("quant_kernels.cpp", "quant_decode.cpp")
_state: dict[tuple, Optional[ModuleType]] = {}


def build_flags() -> list[str]:
    return ["-O3", march_flag(), "-fopenmp", "-ffp-contract=fast"]


def kernel() -> Optional[ModuleType]:
    """The compiled module for this process's view of the CPU, or None if it cannot be built (logged)."""
    key = tuple(build_flags())
    if key not in _state:
        mod = load_cpp_extension("awq_quant", SOURCES, list(key), ["-fopenmp"], what="quantised decode")
        if mod is not None:
            log.info("quantised decode kernels: %s vector path", mod.simd())
        _state[key] = mod
    return _state[key]
