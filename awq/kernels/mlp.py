"""The MLP kernel family (``csrc/sparse_mlp.cpp`` + ``csrc/decode_step.cpp``, one extension module): loading,
threading policy, and the activation the kernels implement.

Functions of the module (see the C++ sources for their contracts; each has a torch reference in the tests):
``dense_gemv`` (one-row product, four rows per pass), ``gathered_swiglu`` / ``gathered_swiglu_idx`` (rows of the
active neurons of an interleaved ``[F, 3, H]`` weight), ``neuron_sparse_swiglu`` (gate rows, then up/down rows of
the survivors), ``input_sparse_swiglu`` (columns of the kept inputs), ``threshold_swiglu`` and ``down_gather``
(the paper's thresholded MLP), ``attn_step`` and ``dense_swiglu`` (the lean decoder's per-layer step).
Callers pass :data:`MIN_BYTES_PER_THREAD` (read it as ``awq.kernels.mlp.MIN_BYTES_PER_THREAD`` at call time so
that a test can change it).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from awq.kernels.build import load_cpp_extension, march_flag
from awq.util import env

log = logging.getLogger(__name__)

_CFLAGS = ["-O3", march_flag(), "-fopenmp", "-ffp-contract=fast"]  # AWQ_HW_FLAGS="avx2 fma": an AVX2 build
SOURCES = ("sparse_mlp.cpp", "decode_step.cpp")  # one extension module (csrc/simd.h shared)
# the C++ kernels use several threads only when each gets at least this many weight bytes.  A parallel
# region costs microseconds on an idle core; 256 KiB is ~20-30 us of streaming.  The dynamic kernels
# (awq.methods.dynamic_sparse) split a layer into two stages of 0.5-3 MB each on SmolLM2: at 1 MiB their down
# stage ran on one thread (2 threads, 64 new tokens: TEAL 17.9 tok/s at 1 MiB, 21.2 at 256 KiB; CATS
# 17.6 vs 21.2).  On a machine whose other core is busy, a larger value (AWQ_SPARSE_MIN_BYTES, e.g.
# 1048576, or a huge value for one thread) avoids waiting for a time slice in every parallel region.
MIN_BYTES_PER_THREAD = int(env.get("AWQ_SPARSE_MIN_BYTES"))
EMPTY = torch.empty(0)  # the kernels' "no tensor" argument (no bias, no index list)

_kernel_state: dict[str, object] = {}


def min_bytes_per_thread() -> int:
    """:data:`MIN_BYTES_PER_THREAD`, read at call time (a test may change it)."""
    return MIN_BYTES_PER_THREAD


def cpp_kernel():
    """The compiled extension module, or None if it cannot be built (logged once)."""
    if "mod" not in _kernel_state:
        if env.get("AWQ_SPARSE_KERNEL") == "torch":
            log.info("AWQ_SPARSE_KERNEL=torch: using the pure torch sparse MLP path")
            _kernel_state["mod"] = None
        else:
            mod = load_cpp_extension("awq_sparse_swiglu", SOURCES, _CFLAGS, ["-fopenmp"], what="sparse MLP")
            if mod is not None:
                log.info("sparse MLP C++ kernel: %s vector path, threads from %d weight bytes per thread",
                         mod.simd() if hasattr(mod, "simd") else "?", MIN_BYTES_PER_THREAD)
            _kernel_state["mod"] = mod
    return _kernel_state["mod"]


def cpp_kernel_available() -> bool:
    return cpp_kernel() is not None


def is_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``act_fn`` is SiLU, recognised by value (the C++ kernels implement SiLU only)."""
    with torch.no_grad():
        probe = torch.linspace(-8, 8, 33)
        return bool(torch.allclose(act_fn(probe), F.silu(probe), rtol=1e-6, atol=1e-7))
