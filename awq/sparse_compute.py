"""Gathered-weight sparse SwiGLU MLP: compute only the active intermediate neurons.

Given the active neuron set ``m`` of the intermediate dimension (a predicted centroid: a 0/1 mask
``[F]``, per-token masks ``[T, F]``, an index list, or cluster labels plus a centroid table),
:class:`GatheredSparseMLP` computes::

    g = gate_proj(x)[m] * [|g| >= T_gate]        (only rows m of W_gate are read)
    u = up_proj(x)[m]   * [|u| >= T_up]          (only rows m of W_up are read)
    d = W_down[:, m] @ (act(g) * u)              (only columns m of W_down are read)
    d = d * [|d| >= T_down] * out_mask           (optional, on the H-dim output)

which equals the masked dense computation ``down(act(g*m) * (u*m))`` (and :class:`SparseMLP` with
the same thresholds and the same mask as the gate/up codebook) to floating-point tolerance,
because ``act(0) == 0`` (checked at construction).

Layout (batch-1 decode is memory bound: time ~ weight bytes read): the three projections are
stored interleaved per neuron, ``weight[F, 3, H] = [W_gate[n], W_up[n], W_down[:, n]]``, so one
active neuron is one contiguous ``3*H`` run and a sparse step reads exactly ``3*H*|m|`` weights,
each once.  The dense path uses the same tensor through strided (BLAS leading-dimension) views,
so nothing is stored twice.

Kernels: a fused C++ kernel (gather, two dot products, threshold, SiLU, down axpy; parallel over
neurons with ``at::parallel_for``), JIT-built once with ``torch.utils.cpp_extension.load_inline``
and cached under ``$XDG_CACHE_HOME/awq/torch_extensions`` (or ``~/.cache``); if the build fails,
or the activation is not SiLU, or the tensors are not on the CPU, a pure torch path
(``index_select`` + ``matmul``) is used, with one logged warning.  ``AWQ_SPARSE_KERNEL=torch``
forces the pure torch path.

Batched tokens: tokens are grouped by their active set (cluster label or identical mask rows);
each group reads its neurons' weights once for all its tokens.  When the groups together would
read about as many bytes as the dense MLP (prefill, many distinct clusters), the exact masked
dense computation is used instead (a GEMM is then faster than many gathered GEMVs).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

KERNELS: tuple[str, ...] = ("auto", "cpp", "torch")

# active = mask [F] / masks [..., F] (bool or 0/1) / int indices [k] / (labels [...], centroids [K, F])
Active = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None]
# selector(layer_idx, x2d [T, H]) -> Active, or {"active": Active, "out_mask": [H] or [T, H] mask}
Selector = Callable[[int, torch.Tensor], Union[Active, dict]]


# --------------------------------------------------------------------------------------------
# the C++ kernel
# --------------------------------------------------------------------------------------------
_CPP_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

template <typename S> struct Ld;
template <> struct Ld<float> {
  static inline float f(const float* p, int64_t h) { return p[h]; }
  static inline float rnd(float v) { return v; }
};
template <> struct Ld<c10::BFloat16> {
  static inline float f(const c10::BFloat16* p, int64_t h) {
    uint32_t b = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[h]) << 16;
    float v; std::memcpy(&v, &b, 4); return v;
  }
  static inline float rnd(float v) { return static_cast<float>(c10::BFloat16(v)); }
};

#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16(const c10::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

// g = <wg, x>, u = <wu, x> in one pass over x
template <typename S>
static inline void dot2(const S* __restrict wg, const S* __restrict wu, const float* __restrict x, int64_t H,
                        float& g, float& u) {
  int64_t h = 0;
  float sg = 0.f, su = 0.f;
#if defined(__AVX512F__)
  __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps(), u0 = _mm512_setzero_ps(), u1 = _mm512_setzero_ps();
  for (; h + 32 <= H; h += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + h), x1 = _mm512_loadu_ps(x + h + 16);
    g0 = _mm512_fmadd_ps(ld16(wg + h), x0, g0);
    g1 = _mm512_fmadd_ps(ld16(wg + h + 16), x1, g1);
    u0 = _mm512_fmadd_ps(ld16(wu + h), x0, u0);
    u1 = _mm512_fmadd_ps(ld16(wu + h + 16), x1, u1);
  }
  sg = _mm512_reduce_add_ps(_mm512_add_ps(g0, g1));
  su = _mm512_reduce_add_ps(_mm512_add_ps(u0, u1));
#endif
  for (; h < H; ++h) { sg += Ld<S>::f(wg, h) * x[h]; su += Ld<S>::f(wu, h) * x[h]; }
  g = sg; u = su;
}

#if defined(__AVX512BF16__)
// bf16 weights and a bf16-exact input: dot products with the native bf16 pair instruction
static inline void dot2_dp(const c10::BFloat16* __restrict wg, const c10::BFloat16* __restrict wu,
                           const uint16_t* __restrict xb, const float* __restrict x, int64_t H, float& g, float& u) {
  __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps(), u0 = _mm512_setzero_ps(), u1 = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + 64 <= H; h += 64) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + h), x1 = (__m512bh)_mm512_loadu_si512(xb + h + 32);
    g0 = _mm512_dpbf16_ps(g0, (__m512bh)_mm512_loadu_si512(wg + h), x0);
    g1 = _mm512_dpbf16_ps(g1, (__m512bh)_mm512_loadu_si512(wg + h + 32), x1);
    u0 = _mm512_dpbf16_ps(u0, (__m512bh)_mm512_loadu_si512(wu + h), x0);
    u1 = _mm512_dpbf16_ps(u1, (__m512bh)_mm512_loadu_si512(wu + h + 32), x1);
  }
  float sg = _mm512_reduce_add_ps(_mm512_add_ps(g0, g1)), su = _mm512_reduce_add_ps(_mm512_add_ps(u0, u1));
  for (; h < H; ++h) { sg += Ld<c10::BFloat16>::f(wg, h) * x[h]; su += Ld<c10::BFloat16>::f(wu, h) * x[h]; }
  g = sg; u = su;
}
#endif

template <typename S>
static inline void axpy(float* __restrict y, float a, const S* __restrict w, int64_t H) {
  int64_t h = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a);
  for (; h + 32 <= H; h += 32) {
    _mm512_storeu_ps(y + h, _mm512_fmadd_ps(va, ld16(w + h), _mm512_loadu_ps(y + h)));
    _mm512_storeu_ps(y + h + 16, _mm512_fmadd_ps(va, ld16(w + h + 16), _mm512_loadu_ps(y + h + 16)));
  }
#endif
  for (; h < H; ++h) y[h] += a * Ld<S>::f(w, h);
}

#ifndef AWQ_PF_LINES
#define AWQ_PF_LINES 0
#endif
// touch the first lines of the next neuron's three rows so the hardware prefetcher starts early
static inline void prefetch_next(const char* p, int64_t row_bytes) {
  for (int r = 0; r < 3; ++r)
    for (int o = 0; o < AWQ_PF_LINES * 64; o += 64) __builtin_prefetch(p + r * row_bytes + o, 0, 3);
}

// x [T, H] float32; w [F, 3, H] (gate row, up row, down column); idx [k] int64 (in range);
// bias_gu [F, 2] float32 or empty.  Returns [T, H] float32 = sum_n a[t, n] * w[n, 2, :].
template <typename S>
static torch::Tensor run(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& idx,
                         const torch::Tensor& bias_gu, double t_gate, double t_up, int64_t min_bytes_per_thread) {
  const int64_t T = x.size(0), H = x.size(1), k = idx.size(0);
  auto out = torch::zeros({T, H}, x.options().dtype(torch::kFloat));
  float* outp = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  std::vector<std::vector<float>> part(nt);  // one accumulator per thread, summed in a fixed order
  const float* xp = x.data_ptr<float>();
  const S* wp = w.data_ptr<S>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* bp = bias_gu.numel() ? bias_gu.data_ptr<float>() : nullptr;
  const float tg = static_cast<float>(t_gate), tu = static_cast<float>(t_up);
  // threads only for jobs of at least min_bytes_per_thread weight bytes each: a parallel region costs
  // microseconds when the machine is idle but a scheduler tick when a core is busy with something else
  const int64_t row_bytes = 3 * H * static_cast<int64_t>(sizeof(S));
  const int64_t grain = std::max<int64_t>(1, min_bytes_per_thread / row_bytes);
  // bf16 weights: if the input is exactly bf16 (it is, in a bf16 model) use the bf16 dot instruction
  std::vector<uint16_t> xb;
  bool use_dp = false;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    use_dp = true;
    xb.resize(T * H);
    for (int64_t j = 0; j < T * H && use_dp; ++j) {
      const c10::BFloat16 b(xp[j]);
      use_dp = static_cast<float>(b) == xp[j];
      xb[j] = b.x;
    }
  }
#endif
  at::parallel_for(0, k, grain, [&](int64_t b, int64_t e) {
    std::vector<float>& accv = part[at::get_thread_num()];
    if (accv.empty()) accv.assign(T * H, 0.f);
    std::vector<float> a(T);
    float* acc = accv.data();
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = ip[i];
      const S* wg = wp + n * 3 * H;
      if (AWQ_PF_LINES > 0 && i + 1 < e)
        prefetch_next(reinterpret_cast<const char*>(wp + ip[i + 1] * 3 * H), H * (int64_t)sizeof(S));
      bool any = false;
      for (int64_t t = 0; t < T; ++t) {
        float g, u;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same<S, c10::BFloat16>::value) {
          if (use_dp) dot2_dp(wg, wg + H, xb.data() + t * H, xp + t * H, H, g, u);
          else dot2<S>(wg, wg + H, xp + t * H, H, g, u);
        } else {
          dot2<S>(wg, wg + H, xp + t * H, H, g, u);
        }
#else
        dot2<S>(wg, wg + H, xp + t * H, H, g, u);
#endif
        if (bp) { g += bp[2 * n]; u += bp[2 * n + 1]; }
        g = Ld<S>::rnd(g); u = Ld<S>::rnd(u);
        if (std::fabs(g) < tg) g = 0.f;
        if (std::fabs(u) < tu) u = 0.f;
        const float s = Ld<S>::rnd(g / (1.f + std::exp(-g)));
        a[t] = Ld<S>::rnd(s * u);
        any = any || a[t] != 0.f;
      }
      if (!any) continue;  // nothing to add: the down column need not be read
      for (int64_t t = 0; t < T; ++t)
        if (a[t] != 0.f) axpy<S>(acc + t * H, a[t], wg + 2 * H, H);
    }
  });
  for (const auto& acc : part) {
    if (acc.empty()) continue;
#pragma omp simd
    for (int64_t j = 0; j < T * H; ++j) outp[j] += acc[j];
  }
  return out;
}

torch::Tensor fused_sparse_swiglu(torch::Tensor x, torch::Tensor w, torch::Tensor idx,
                                  torch::Tensor bias_gu, double t_gate, double t_up,
                                  int64_t min_bytes_per_thread) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: [T, H] float32");
  TORCH_CHECK(w.dim() == 3 && w.size(1) == 3 && w.size(2) == x.size(1) && w.is_contiguous(), "w: [F, 3, H]");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == torch::kLong && idx.is_contiguous(), "idx: [k] int64");
  if (w.scalar_type() == torch::kFloat) return run<float>(x, w, idx, bias_gu, t_gate, t_up, min_bytes_per_thread);
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w: float32 or bfloat16");
  return run<c10::BFloat16>(x, w, idx, bias_gu, t_gate, t_up, min_bytes_per_thread);
}
"""
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]

# the C++ kernel uses several threads only when each gets at least this many weight bytes (a parallel
# region costs microseconds on an idle machine but a scheduler tick when a core is busy elsewhere)
MIN_BYTES_PER_THREAD = 8 << 20

_kernel_state: dict[str, object] = {}
_EMPTY = torch.empty(0)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "awq" / "torch_extensions"


def _cpu_tag() -> str:
    """Identify the host CPU so that a -march=native build is never reused on another CPU."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return flags


def cpp_kernel():
    """The compiled extension module, or None if it cannot be built (logged once)."""
    if "mod" in _kernel_state:
        return _kernel_state["mod"]
    mod = None
    if os.environ.get("AWQ_SPARSE_KERNEL", "").lower() == "torch":
        log.info("AWQ_SPARSE_KERNEL=torch: using the pure torch sparse MLP path")
    else:
        key = hashlib.sha256(
            (_CPP_SRC + " ".join(_CFLAGS) + torch.__version__ + _cpu_tag()).encode()
        ).hexdigest()[:16]
        name = f"awq_sparse_swiglu_{key}"
        build = _cache_dir() / name
        try:
            from torch.utils.cpp_extension import load_inline

            build.mkdir(parents=True, exist_ok=True)
            mod = load_inline(
                name=name,
                cpp_sources=[_CPP_SRC],
                functions=["fused_sparse_swiglu"],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
        except Exception as e:  # compiler missing, ninja missing, build error...
            log.warning("sparse MLP C++ kernel unavailable (%s: %s); using the pure torch path",
                        type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
            mod = None
    _kernel_state["mod"] = mod
    return mod


def cpp_kernel_available() -> bool:
    return cpp_kernel() is not None


# --------------------------------------------------------------------------------------------
# active-set handling
# --------------------------------------------------------------------------------------------
def _is_index(t: torch.Tensor) -> bool:
    """int16/32/64 tensors are neuron indices; bool, uint8 and floating tensors are 0/1 masks."""
    return t.dtype in (torch.int16, torch.int32, torch.int64)


def _as_bool_mask(m: torch.Tensor, width: int, what: str, dim_name: str = "MLP intermediate size") -> torch.Tensor:
    if m.dim() == 0 or m.shape[-1] != width:
        got = "no width (a scalar)" if m.dim() == 0 else f"width {m.shape[-1]}"
        raise ValueError(f"{what} has {got} but the {dim_name} is {width}")
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.dtype in (torch.uint8, torch.int8):
        return m != 0
    raise ValueError(f"{what} has dtype {m.dtype}; want bool, uint8 or floating 0/1 values")


def indices_from_active(active: torch.Tensor, width: int) -> torch.Tensor:
    """A 1-D mask [F] (bool/uint8/float) or a 1-D int16/32/64 index tensor -> sorted unique int64 indices."""
    if active.dim() != 1:
        raise ValueError(f"expected a 1-D mask or index tensor, got shape {tuple(active.shape)}")
    if _is_index(active):
        idx = active.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
            raise ValueError(f"active indices out of range [0, {width})")
        return torch.unique(idx)  # sorted
    return torch.nonzero(_as_bool_mask(active, width, "active mask")).flatten()


def group_tokens(
    active: Active, num_tokens: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token active sets -> (group masks [G, F] bool, group id per token [T] int64).

    ``active``: a shared mask [F] / indices, per-token masks [T, F], or (labels [T], centroids [K, F]).
    """
    if isinstance(active, (tuple, list)):
        if len(active) != 2:
            raise ValueError("cluster form of 'active' must be (labels, centroids)")
        labels, cents = active
        cents = _as_bool_mask(cents, width, "centroid table")
        labels = labels.reshape(-1).long()
        if labels.numel() != num_tokens:
            raise ValueError(f"{labels.numel()} cluster labels for {num_tokens} tokens")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cents.shape[0]):
            raise ValueError(f"cluster labels out of range [0, {cents.shape[0]})")
        uniq, inv = torch.unique(labels, return_inverse=True)
        return cents[uniq], inv
    if not isinstance(active, torch.Tensor):
        raise ValueError(f"unsupported active set of type {type(active).__name__}")
    if active.dim() == 1:
        if _is_index(active):
            mask = torch.zeros(width, dtype=torch.bool, device=active.device)
            mask[indices_from_active(active, width)] = True
        else:
            mask = _as_bool_mask(active, width, "active mask")
        return mask[None], torch.zeros(num_tokens, dtype=torch.long, device=active.device)
    masks = _as_bool_mask(active, width, "active mask").reshape(-1, width)
    if masks.shape[0] != num_tokens:
        raise ValueError(f"{masks.shape[0]} active masks for {num_tokens} tokens")
    if num_tokens == 1:
        return masks, torch.zeros(1, dtype=torch.long, device=masks.device)
    uniq, inv = torch.unique(masks, dim=0, return_inverse=True)
    return uniq, inv


class _Prepared:
    """Validated sorted indices shared by all tokens (from set_active)."""

    __slots__ = ("idx",)

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx.contiguous()


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _threshold(y: torch.Tensor, t: float) -> torch.Tensor:
    return y if t <= 0.0 else y.masked_fill(y.abs() < t, 0)


class GatheredSparseMLP(nn.Module):
    """SwiGLU MLP that reads only the active neurons' weights (see the module docstring).

    ``forward(x, active=None)``: ``active`` as in :func:`group_tokens`; when None, the module's
    ``selector(layer_idx, x2d)`` is asked, then the fixed set from :meth:`set_active`; with none of
    these the MLP is dense.  ``out_mask`` ([H] or [..., H]) optionally masks the output (the
    artifact's down_proj centroid mask).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        layer_idx: int = 0,
        thresholds: Optional[Mapping[str, float]] = None,
        bias_gu: Optional[torch.Tensor] = None,
        bias_down: Optional[torch.Tensor] = None,
        kernel: str = "auto",
        max_groups: int = 16,
        dense_ratio: float = 0.9,
    ) -> None:
        super().__init__()
        if weight.dim() != 3 or weight.shape[1] != 3:
            raise ValueError(f"weight must be [F, 3, H], got {tuple(weight.shape)}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        with torch.no_grad():
            z = act_fn(torch.zeros(2, dtype=weight.dtype, device=weight.device))
        if bool((z != 0).any()):
            raise ValueError("act_fn(0) != 0: skipping inactive neurons would not be exact")
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias_gu = None if bias_gu is None else nn.Parameter(bias_gu.reshape(-1, 2).float(), requires_grad=False)
        self.bias_down = None if bias_down is None else nn.Parameter(bias_down.detach().clone(), requires_grad=False)
        self.act_fn = act_fn
        self.layer_idx = layer_idx
        thr = dict(thresholds or {})
        self.thresholds = {p: float(thr.get(p, 0.0)) for p in ("gate_proj", "up_proj", "down_proj")}
        self.kernel = kernel
        self.max_groups = max_groups
        self.dense_ratio = dense_ratio
        self.selector: Optional[Selector] = None
        self._fixed: Active = None
        with torch.no_grad():  # the fused kernel implements SiLU; recognise it by value, not by class
            probe = torch.linspace(-8, 8, 33)
            self._is_silu = bool(torch.allclose(act_fn(probe), F.silu(probe), rtol=1e-6, atol=1e-7))
        if kernel == "cpp" and not self._is_silu:
            raise ValueError("kernel='cpp' implements SiLU only; use kernel='torch' for this activation")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Module,
        layer_idx: Optional[int] = None,
        thresholds: Optional[Mapping[str, float]] = None,
        **kw,
    ) -> "GatheredSparseMLP":
        """Build from a HF SwiGLU MLP or a :class:`awq.sparse_mlp.SparseMLP` (whose thresholds are
        taken unless given).  The weights are copied into the interleaved layout; drop the old
        module afterwards to free its memory."""
        missing = [a for a in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, a)]
        if missing:
            raise ValueError(f"{type(mlp).__name__} lacks {missing}; only SwiGLU MLPs are supported")
        if layer_idx is None:
            layer_idx = int(getattr(mlp, "layer_idx", 0))
        if thresholds is None and isinstance(getattr(mlp, "thresholds", None), dict):
            thresholds = mlp.thresholds
        wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        Fi, H = wg.shape
        if wu.shape != (Fi, H) or wd.shape != (H, Fi):
            raise ValueError(f"inconsistent MLP shapes gate {tuple(wg.shape)} up {tuple(wu.shape)} down {tuple(wd.shape)}")
        with torch.no_grad():
            w = torch.empty(Fi, 3, H, dtype=wg.dtype, device=wg.device)
            w[:, 0].copy_(wg)
            w[:, 1].copy_(wu)
            w[:, 2].copy_(wd.t())
            bg, bu = getattr(mlp.gate_proj, "bias", None), getattr(mlp.up_proj, "bias", None)
            bias_gu = None
            if bg is not None or bu is not None:
                bias_gu = torch.stack([
                    bg if bg is not None else torch.zeros(Fi, dtype=wg.dtype, device=wg.device),
                    bu if bu is not None else torch.zeros(Fi, dtype=wg.dtype, device=wg.device),
                ], dim=1)
        return cls(w, mlp.act_fn, layer_idx, thresholds, bias_gu, getattr(mlp.down_proj, "bias", None), **kw)

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.weight.shape[0]

    def set_active(self, active: Active) -> None:
        """Fix the active set used when forward gets none (None: dense).  A set shared by all
        tokens (1-D mask or indices) is validated and turned into indices once, here."""
        if isinstance(active, torch.Tensor) and active.dim() == 1:
            active = _Prepared(indices_from_active(active.to(self.weight.device), self.intermediate_size))
        self._fixed = active

    def _use_cpp(self) -> bool:
        if self.kernel == "torch" or not self._is_silu or self.weight.device.type != "cpu":
            return False
        if self.weight.dtype not in (torch.float32, torch.bfloat16):
            return False
        mod = cpp_kernel()
        if mod is None and self.kernel == "cpp":
            raise RuntimeError("kernel='cpp' requested but the C++ sparse MLP kernel could not be built")
        return mod is not None

    def _thr(self, proj: str) -> float:
        t = self.thresholds[proj]
        # compare in the weights' dtype, like SparseMLP on a model of that dtype
        return float(torch.tensor(t, dtype=self.weight.dtype)) if t > 0 else 0.0

    # -- compute -----------------------------------------------------------------------------
    def _sparse(self, x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Tokens x2 [t, H] sharing the active indices idx [k] -> [t, H] (before down bias/threshold)."""
        if self._use_cpp():
            bias = self.bias_gu if self.bias_gu is not None else _EMPTY
            out = cpp_kernel().fused_sparse_swiglu(
                x2.float().contiguous(), self.weight, idx.contiguous(), bias,
                self._thr("gate_proj"), self._thr("up_proj"), MIN_BYTES_PER_THREAD)
            return out.to(x2.dtype)
        rows = self.weight.index_select(0, idx)  # [k, 3, H]
        gu = torch.matmul(x2, rows[:, :2].reshape(-1, rows.shape[2]).t()).view(x2.shape[0], -1, 2)
        if self.bias_gu is not None:
            gu = gu + self.bias_gu.index_select(0, idx).to(gu.dtype)
        g = _threshold(gu[..., 0], self.thresholds["gate_proj"])
        u = _threshold(gu[..., 1], self.thresholds["up_proj"])
        return torch.matmul(self.act_fn(g) * u, rows[:, 2])

    def _masked_dense(self, x2: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        """Exact dense reference path: down(act(g*m) * (u*m)); m [T, F] bool or None."""
        w = self.weight
        g = torch.matmul(x2, w[:, 0].t())
        u = torch.matmul(x2, w[:, 1].t())
        if self.bias_gu is not None:
            g = g + self.bias_gu[:, 0].to(g.dtype)
            u = u + self.bias_gu[:, 1].to(u.dtype)
        g = _threshold(g, self.thresholds["gate_proj"])
        u = _threshold(u, self.thresholds["up_proj"])
        if m is not None:
            g = g * m
            u = u * m
        return torch.matmul(self.act_fn(g) * u, w[:, 2])

    def forward(self, x: torch.Tensor, active: Active = None, out_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        H, Fi = self.hidden_size, self.intermediate_size
        if x.shape[-1] != H:
            raise ValueError(f"input has hidden size {x.shape[-1]} but the MLP expects {H}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, H)
        T = x2.shape[0]
        if active is None and self.selector is not None:
            active = self.selector(self.layer_idx, x2)
            if isinstance(active, dict):  # {"active": ..., "out_mask": ...}
                if out_mask is None:
                    out_mask = active.get("out_mask")
                active = active.get("active")
        if active is None:
            active = self._fixed
        if active is None or T == 0:
            out = self._masked_dense(x2, None)
        elif isinstance(active, _Prepared):
            out = self._sparse(x2, active.idx)
        elif isinstance(active, torch.Tensor) and active.dim() == 1:
            out = self._sparse(x2, indices_from_active(active.to(x2.device), Fi))
        else:
            masks, inv = group_tokens(active, T, Fi)
            G = masks.shape[0]
            if G == 1:
                out = self._sparse(x2, torch.nonzero(masks[0]).flatten())
            elif G <= self.max_groups and int(masks.sum()) <= self.dense_ratio * Fi:
                out = x2.new_empty(T, H)
                order = torch.argsort(inv, stable=True)
                counts = torch.bincount(inv, minlength=G).tolist()
                starts = 0
                for gi in range(G):  # bounded by max_groups: each group reads its weights once
                    tok = order[starts:starts + counts[gi]]
                    starts += counts[gi]
                    out[tok] = self._sparse(x2.index_select(0, tok), torch.nonzero(masks[gi]).flatten())
            else:
                out = self._masked_dense(x2, masks[inv])
        if self.bias_down is not None:
            out = out + self.bias_down
        out = _threshold(out, self.thresholds["down_proj"])
        if out_mask is not None:
            om = _as_bool_mask(out_mask, H, "output mask", "hidden size")
            out = out * om.reshape(-1, H) if om.dim() > 1 else out * om
        return out.reshape(*lead, H)

    def extra_repr(self) -> str:
        Fi, _, H = self.weight.shape
        t = ", ".join(f"{p}={v:.4g}" for p, v in self.thresholds.items())
        return f"layer={self.layer_idx}, hidden={H}, intermediate={Fi}, kernel={self.kernel}, thresholds=({t})"


# --------------------------------------------------------------------------------------------
# model-level swap (for awq.entry --sparse_compute)
# --------------------------------------------------------------------------------------------
def gather_sparsify_(
    model: nn.Module,
    thresholds: Optional[Mapping[str, Sequence[float]]] = None,
    selector: Optional[Selector] = None,
    kernel: str = "auto",
) -> list[GatheredSparseMLP]:
    """Replace every decoder layer's MLP (HF SwiGLU or SparseMLP) by a :class:`GatheredSparseMLP`
    (in place).  ``thresholds``: ``{proj: [t per layer]}`` (default: those of existing SparseMLPs,
    else none).  ``selector(layer_idx, x2d [T, H]) -> active`` supplies each token's active set
    (e.g. predicted cluster labels and the centroid table: ``(labels, centroids)``).  Returns the
    new modules in layer order."""
    from awq.sparse_mlp import decoder_layers

    layers = decoder_layers(model)
    if thresholds is not None:
        for p in ("gate_proj", "up_proj", "down_proj"):
            if p not in thresholds or len(thresholds[p]) != len(layers):
                raise ValueError(f"thresholds for '{p}' must have {len(layers)} entries (one per layer)")
    out = []
    for i, layer in enumerate(layers):
        thr = None if thresholds is None else {p: thresholds[p][i] for p in thresholds}
        new = GatheredSparseMLP.from_mlp(layer.mlp, i, thr, kernel=kernel)
        new.selector = selector
        layer.mlp = new  # the old projections are freed if nothing else holds them
        out.append(new)
    return out


def set_selector(modules: Sequence[GatheredSparseMLP], selector: Optional[Selector]) -> None:
    for m in modules:
        m.selector = selector


def cluster_selector(
    label_fns: Mapping[str, Callable[[torch.Tensor, int], torch.Tensor]],
    centroids: Mapping[str, torch.Tensor],
) -> Selector:
    """A selector from per-projection cluster predictors (``label_fn(x, layer_idx) -> labels [T]``,
    the :mod:`awq.codebook` signature) and centroid tables ``{proj: [K, width]}``.

    gate_proj/up_proj labels pick centroid rows whose AND is the token's active neuron set (only
    neurons active in both can contribute, since act(0) = 0); a down_proj label picks the output
    mask.  A projection without a predictor does not restrict the set."""
    unknown = set(label_fns) - {"gate_proj", "up_proj", "down_proj"}
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}")
    missing = [p for p in label_fns if p not in centroids]
    if missing:
        raise ValueError(f"no centroid table for {missing}")
    tables = {p: _as_bool_mask(c, c.shape[-1], f"{p} centroids") for p, c in centroids.items()}
    gu = [p for p in ("gate_proj", "up_proj") if p in label_fns]
    if len(gu) == 2 and tables[gu[0]].shape[-1] != tables[gu[1]].shape[-1]:
        raise ValueError("gate_proj and up_proj centroid tables differ in width")
    # decode (one token): the active index list of a centroid (pair) is computed once and cached
    cache: dict[tuple[int, ...], _Prepared] = {}

    def select(layer_idx: int, x2: torch.Tensor) -> dict:
        out: dict = {"active": None, "out_mask": None}
        labs = {p: label_fns[p](x2, layer_idx).reshape(-1).long() for p in label_fns}
        for p, lab in labs.items():
            k = tables[p].shape[0]
            if lab.numel() != x2.shape[0]:
                raise ValueError(f"{p} predictor gave {lab.numel()} labels for {x2.shape[0]} tokens")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= k):
                raise ValueError(f"{p} cluster labels out of range [0, {k})")
        if gu and x2.shape[0] == 1:
            key = tuple(int(labs[p][0]) for p in gu)
            prep = cache.get(key)
            if prep is None:
                m = tables[gu[0]][key[0]]
                if len(gu) == 2:
                    m = m & tables[gu[1]][key[1]]
                prep = _Prepared(torch.nonzero(m).flatten())
                if len(cache) < 65536:
                    cache[key] = prep
            out["active"] = prep
        elif len(gu) == 1:
            out["active"] = (labs[gu[0]], tables[gu[0]])
        elif len(gu) == 2:
            out["active"] = tables[gu[0]][labs[gu[0]]] & tables[gu[1]][labs[gu[1]]]
        if "down_proj" in label_fns:
            out["out_mask"] = tables["down_proj"][labs["down_proj"]]
        return out

    return select
