// Fused gathered sparse SwiGLU MLP kernel (CPU), loaded by awq/kernel_build.py through
// torch.utils.cpp_extension.load and used by awq/sparse_compute.py (GatheredSparseMLP).
//
// For the active neurons idx of one token group it reads, per neuron n, the interleaved row
// w[n] = [W_gate[n], W_up[n], W_down[:, n]] once, computes g = <W_gate[n], x>, u = <W_up[n], x>
// (+ bias), thresholds |g| < t_gate and |u| < t_up to 0, a = silu(g) * u (rounded like the
// weights' dtype), and adds a * W_down[:, n] to the output.  Parallel over neurons with
// at::parallel_for; per-thread accumulators summed in a fixed order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define AWQ_AVX2 1  // AVX2-only CPUs (e.g. AMD EPYC before Zen 4): 8-wide paths below
static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8(const c10::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif
#if defined(__AVX512F__)
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
#elif defined(AWQ_AVX2)
  __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps(), u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
  for (; h + 16 <= H; h += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + h), x1 = _mm256_loadu_ps(x + h + 8);
    g0 = _mm256_fmadd_ps(ld8(wg + h), x0, g0);
    g1 = _mm256_fmadd_ps(ld8(wg + h + 8), x1, g1);
    u0 = _mm256_fmadd_ps(ld8(wu + h), x0, u0);
    u1 = _mm256_fmadd_ps(ld8(wu + h + 8), x1, u1);
  }
  sg = hsum8(_mm256_add_ps(g0, g1));
  su = hsum8(_mm256_add_ps(u0, u1));
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
#elif defined(AWQ_AVX2)
  const __m256 va = _mm256_set1_ps(a);
  for (; h + 16 <= H; h += 16) {
    _mm256_storeu_ps(y + h, _mm256_fmadd_ps(va, ld8(w + h), _mm256_loadu_ps(y + h)));
    _mm256_storeu_ps(y + h + 8, _mm256_fmadd_ps(va, ld8(w + h + 8), _mm256_loadu_ps(y + h + 8)));
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

// ---------------------------------------------------------------------------------------------
// Dynamic per-token sparsity at batch 1 (awq/dynamic_sparse.py): the active set is found inside the
// call, so a decode step is one call per layer.  Weights in the layouts that make each needed part
// one contiguous row: wgu_t [H, 2F] (row i = [W_gate[:, i], W_up[:, i]]: the columns an input entry
// x_i multiplies), wd_t [F, H] (row n = W_down[:, n]), wg / wu [F, H] (row n = neuron n).
// ---------------------------------------------------------------------------------------------
template <typename S>
static inline float dot1(const S* __restrict w, const float* __restrict x, int64_t H) {
  int64_t h = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; h + 32 <= H; h += 32) {
    a0 = _mm512_fmadd_ps(ld16(w + h), _mm512_loadu_ps(x + h), a0);
    a1 = _mm512_fmadd_ps(ld16(w + h + 16), _mm512_loadu_ps(x + h + 16), a1);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(AWQ_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; h + 16 <= H; h += 16) {
    a0 = _mm256_fmadd_ps(ld8(w + h), _mm256_loadu_ps(x + h), a0);
    a1 = _mm256_fmadd_ps(ld8(w + h + 8), _mm256_loadu_ps(x + h + 8), a1);
  }
  s = hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; h < H; ++h) s += Ld<S>::f(w, h) * x[h];
  return s;
}

// y[c0:c1] += sum_j coef[j] * wt[idx[j], c0:c1], four rows per pass over the (cache-resident) chunk
template <typename S>
static void gaxpy_chunk(float* __restrict y, const S* __restrict wt, int64_t C, const int64_t* idx,
                        const float* coef, int64_t k, int64_t c0, int64_t c1) {
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const S* r0 = wt + idx[j] * C; const S* r1 = wt + idx[j + 1] * C;
    const S* r2 = wt + idx[j + 2] * C; const S* r3 = wt + idx[j + 3] * C;
    const float f0 = coef[j], f1 = coef[j + 1], f2 = coef[j + 2], f3 = coef[j + 3];
    int64_t c = c0;
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_set1_ps(f0), v1 = _mm512_set1_ps(f1), v2 = _mm512_set1_ps(f2), v3 = _mm512_set1_ps(f3);
    for (; c + 16 <= c1; c += 16) {
      __m512 acc = _mm512_loadu_ps(y + c);
      acc = _mm512_fmadd_ps(v0, ld16(r0 + c), acc);
      acc = _mm512_fmadd_ps(v1, ld16(r1 + c), acc);
      acc = _mm512_fmadd_ps(v2, ld16(r2 + c), acc);
      acc = _mm512_fmadd_ps(v3, ld16(r3 + c), acc);
      _mm512_storeu_ps(y + c, acc);
    }
#elif defined(AWQ_AVX2)
    const __m256 v0 = _mm256_set1_ps(f0), v1 = _mm256_set1_ps(f1), v2 = _mm256_set1_ps(f2), v3 = _mm256_set1_ps(f3);
    for (; c + 8 <= c1; c += 8) {
      __m256 acc = _mm256_loadu_ps(y + c);
      acc = _mm256_fmadd_ps(v0, ld8(r0 + c), acc);
      acc = _mm256_fmadd_ps(v1, ld8(r1 + c), acc);
      acc = _mm256_fmadd_ps(v2, ld8(r2 + c), acc);
      acc = _mm256_fmadd_ps(v3, ld8(r3 + c), acc);
      _mm256_storeu_ps(y + c, acc);
    }
#endif
    for (; c < c1; ++c)
      y[c] += f0 * Ld<S>::f(r0, c) + f1 * Ld<S>::f(r1, c) + f2 * Ld<S>::f(r2, c) + f3 * Ld<S>::f(r3, c);
  }
  for (; j < k; ++j) axpy<S>(y + c0, coef[j], wt + idx[j] * C + c0, c1 - c0);
}

// y[C] = sum_j coef[j] * wt[idx[j], :]: split over output chunks (no reduction), threads only for
// jobs of at least min_bytes weight bytes each
template <typename S>
static void gaxpy(float* y, const S* wt, int64_t C, const int64_t* idx, const float* coef, int64_t k,
                  int64_t min_bytes) {
  std::memset(y, 0, C * sizeof(float));
  if (k == 0) return;
  const int64_t bytes = k * C * static_cast<int64_t>(sizeof(S));
  int64_t nchunk = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, bytes / std::max<int64_t>(1, min_bytes)));
  const int64_t per = ((C + nchunk - 1) / nchunk + 15) / 16 * 16;
  nchunk = (C + per - 1) / per;
  if (nchunk <= 1) { gaxpy_chunk<S>(y, wt, C, idx, coef, k, 0, C); return; }
  at::parallel_for(0, nchunk, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) gaxpy_chunk<S>(y, wt, C, idx, coef, k, i * per, std::min(C, (i + 1) * per));
  });
}

static inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// TEAL / WINA / LaRoSA at batch 1: keep x_i with |x_i| * xs_i >= t_x, [g; u] from the kept rows of
// wgu_t, h = silu(g) * u, keep h_n with |h_n| * hs_n >= t_h, y from the kept rows of wd_t.
// counts <- (kept x entries, kept h entries).
template <typename S>
static torch::Tensor input_run(const torch::Tensor& x, const torch::Tensor& wgu_t, const torch::Tensor& wd_t,
                               const torch::Tensor& bias_gu, const torch::Tensor& x_scale, double t_x,
                               const torch::Tensor& h_scale, double t_h, int64_t min_bytes, torch::Tensor& counts) {
  const int64_t H = x.numel(), F = wd_t.size(0);
  const float* xp = x.data_ptr<float>();
  const float* xs = x_scale.numel() ? x_scale.data_ptr<float>() : nullptr;
  const float* hs = h_scale.numel() ? h_scale.data_ptr<float>() : nullptr;
  const float* bp = bias_gu.numel() ? bias_gu.data_ptr<float>() : nullptr;
  const float tx = static_cast<float>(t_x), th = static_cast<float>(t_h);
  std::vector<int64_t> ix; std::vector<float> cx;
  ix.reserve(H); cx.reserve(H);
  for (int64_t i = 0; i < H; ++i) {
    const float s = xs ? Ld<S>::rnd(std::fabs(xp[i]) * xs[i]) : std::fabs(xp[i]);
    if (s >= tx) { ix.push_back(i); cx.push_back(xp[i]); }
  }
  std::vector<float> gu(2 * F);
  gaxpy<S>(gu.data(), wgu_t.data_ptr<S>(), 2 * F, ix.data(), cx.data(), (int64_t)ix.size(), min_bytes);
  std::vector<int64_t> ih; std::vector<float> ch;
  ih.reserve(F); ch.reserve(F);
  for (int64_t n = 0; n < F; ++n) {
    float g = gu[n], u = gu[F + n];
    if (bp) { g += bp[n]; u += bp[F + n]; }
    g = Ld<S>::rnd(g); u = Ld<S>::rnd(u);
    const float h = Ld<S>::rnd(Ld<S>::rnd(silu(g)) * u);
    const float s = hs ? Ld<S>::rnd(std::fabs(h) * hs[n]) : std::fabs(h);
    if (s >= th) { ih.push_back(n); ch.push_back(h); }
  }
  auto out = torch::empty({H}, x.options().dtype(torch::kFloat));
  gaxpy<S>(out.data_ptr<float>(), wd_t.data_ptr<S>(), H, ih.data(), ch.data(), (int64_t)ih.size(), min_bytes);
  auto cp = counts.data_ptr<int64_t>();
  cp[0] = (int64_t)ix.size(); cp[1] = (int64_t)ih.size();
  return out;
}

// CATS / predicted neurons at batch 1.  idx empty: a_n = silu(<wg[n], x>) for every neuron (the
// whole gate is read), keep |a_n| >= t_a; else the neurons idx (gate and up rows of those only).
// h_n = a_n * <wu[n], x>, y from the kept rows of wd_t.  counts <- (kept neurons,).
template <typename S>
static torch::Tensor neuron_run(const torch::Tensor& x, const torch::Tensor& wg, const torch::Tensor& wu,
                                const torch::Tensor& wd_t, const torch::Tensor& idx, double t_a,
                                const torch::Tensor& bias_g, const torch::Tensor& bias_u, int64_t min_bytes,
                                torch::Tensor& counts) {
  const int64_t H = x.numel(), F = wd_t.size(0);
  const float* xp = x.data_ptr<float>();
  const S* gp = wg.data_ptr<S>();
  const S* up = wu.data_ptr<S>();
  const float* bg = bias_g.numel() ? bias_g.data_ptr<float>() : nullptr;
  const float* bu = bias_u.numel() ? bias_u.data_ptr<float>() : nullptr;
  const int64_t row_grain = std::max<int64_t>(1, min_bytes / (H * static_cast<int64_t>(sizeof(S))));
  std::vector<int64_t> sel;
  std::vector<float> a;  // activation of each selected neuron
  const bool cats = idx.numel() == 0;
  if (cats) {
    std::vector<float> act(F);
    at::parallel_for(0, F, row_grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        float g = dot1<S>(gp + n * H, xp, H);
        if (bg) g += bg[n];
        act[n] = Ld<S>::rnd(silu(Ld<S>::rnd(g)));
      }
    });
    const float ta = static_cast<float>(t_a);
    for (int64_t n = 0; n < F; ++n)
      if (std::fabs(act[n]) >= ta) { sel.push_back(n); a.push_back(act[n]); }
  } else {
    const int64_t* ip = idx.data_ptr<int64_t>();
    sel.assign(ip, ip + idx.numel());
    a.resize(sel.size());
  }
  const int64_t k = (int64_t)sel.size();
  std::vector<float> coef(k);
  at::parallel_for(0, k, cats ? row_grain : std::max<int64_t>(1, row_grain / 2), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t n = sel[j];
      float g = 0.f, u;
      if (cats) {
        u = dot1<S>(up + n * H, xp, H);
      } else {
        dot2<S>(gp + n * H, up + n * H, xp, H, g, u);
        if (bg) g += bg[n];
        a[j] = Ld<S>::rnd(silu(Ld<S>::rnd(g)));
      }
      if (bu) u += bu[n];
      coef[j] = Ld<S>::rnd(a[j] * Ld<S>::rnd(u));
    }
  });
  auto out = torch::empty({H}, x.options().dtype(torch::kFloat));
  gaxpy<S>(out.data_ptr<float>(), wd_t.data_ptr<S>(), H, sel.data(), coef.data(), k, min_bytes);
  counts.data_ptr<int64_t>()[0] = k;
  return out;
}

// y[r] = <w[r], x> for every row: the dense GEMV of one decoded token, four rows per pass over x,
// split over rows from min_bytes weight bytes per thread
template <typename S>
static void gemv_rows(float* __restrict y, const S* __restrict w, const float* __restrict x, int64_t R, int64_t C,
                      int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const S* w0 = w + r * C; const S* w1 = w0 + C; const S* w2 = w1 + C; const S* w3 = w2 + C;
    int64_t c = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; c + 16 <= C; c += 16) {
      const __m512 xv = _mm512_loadu_ps(x + c);
      a0 = _mm512_fmadd_ps(ld16(w0 + c), xv, a0);
      a1 = _mm512_fmadd_ps(ld16(w1 + c), xv, a1);
      a2 = _mm512_fmadd_ps(ld16(w2 + c), xv, a2);
      a3 = _mm512_fmadd_ps(ld16(w3 + c), xv, a3);
    }
    s0 = _mm512_reduce_add_ps(a0); s1 = _mm512_reduce_add_ps(a1);
    s2 = _mm512_reduce_add_ps(a2); s3 = _mm512_reduce_add_ps(a3);
#elif defined(AWQ_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; c + 8 <= C; c += 8) {
      const __m256 xv = _mm256_loadu_ps(x + c);
      a0 = _mm256_fmadd_ps(ld8(w0 + c), xv, a0);
      a1 = _mm256_fmadd_ps(ld8(w1 + c), xv, a1);
      a2 = _mm256_fmadd_ps(ld8(w2 + c), xv, a2);
      a3 = _mm256_fmadd_ps(ld8(w3 + c), xv, a3);
    }
    s0 = hsum8(a0); s1 = hsum8(a1); s2 = hsum8(a2); s3 = hsum8(a3);
#endif
    for (; c < C; ++c) {
      s0 += Ld<S>::f(w0, c) * x[c]; s1 += Ld<S>::f(w1, c) * x[c];
      s2 += Ld<S>::f(w2, c) * x[c]; s3 += Ld<S>::f(w3, c) * x[c];
    }
    y[r] = s0; y[r + 1] = s1; y[r + 2] = s2; y[r + 3] = s3;
  }
  for (; r < r1; ++r) y[r] = dot1<S>(w + r * C, x, C);
}

torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w, int64_t min_bytes_per_thread) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [C]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.numel() && w.is_contiguous(), "w: contiguous [R, C]");
  const int64_t R = w.size(0), C = w.size(1);
  auto out = torch::empty({R}, x.options());
  float* y = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t esz = w.scalar_type() == torch::kFloat ? 4 : 2;
  const int64_t grain = std::max<int64_t>(4, (min_bytes_per_thread / std::max<int64_t>(1, C * esz) + 3) / 4 * 4);
  if (w.scalar_type() == torch::kFloat) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) { gemv_rows<float>(y, wp, xp, R, C, b, e); });
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w: float32 or bfloat16");
    const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
    at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) { gemv_rows<c10::BFloat16>(y, wp, xp, R, C, b, e); });
  }
  return out;
}

static void check_vec(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.numel() == 0 || (t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n),
              what, ": empty or a contiguous float32 tensor of ", n, " entries");
}

torch::Tensor input_sparse_swiglu(torch::Tensor x, torch::Tensor wgu_t, torch::Tensor wd_t, torch::Tensor bias_gu,
                                  torch::Tensor x_scale, double t_x, torch::Tensor h_scale, double t_h,
                                  int64_t min_bytes_per_thread, torch::Tensor counts) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [H]");
  const int64_t H = x.numel();
  TORCH_CHECK(wgu_t.dim() == 2 && wgu_t.size(0) == H && wgu_t.is_contiguous(), "wgu_t: contiguous [H, 2F]");
  const int64_t F = wgu_t.size(1) / 2;
  TORCH_CHECK(wd_t.dim() == 2 && wd_t.size(0) == F && wd_t.size(1) == H && wd_t.is_contiguous() &&
              wd_t.scalar_type() == wgu_t.scalar_type(), "wd_t: contiguous [F, H], same dtype as wgu_t");
  check_vec(bias_gu, 2 * F, "bias_gu"); check_vec(x_scale, H, "x_scale"); check_vec(h_scale, F, "h_scale");
  TORCH_CHECK(counts.scalar_type() == torch::kLong && counts.numel() >= 2, "counts: int64 [2]");
  if (wgu_t.scalar_type() == torch::kFloat)
    return input_run<float>(x, wgu_t, wd_t, bias_gu, x_scale, t_x, h_scale, t_h, min_bytes_per_thread, counts);
  TORCH_CHECK(wgu_t.scalar_type() == torch::kBFloat16, "weights: float32 or bfloat16");
  return input_run<c10::BFloat16>(x, wgu_t, wd_t, bias_gu, x_scale, t_x, h_scale, t_h, min_bytes_per_thread, counts);
}

torch::Tensor neuron_sparse_swiglu(torch::Tensor x, torch::Tensor wg, torch::Tensor wu, torch::Tensor wd_t,
                                   torch::Tensor idx, double t_a, torch::Tensor bias_g, torch::Tensor bias_u,
                                   int64_t min_bytes_per_thread, torch::Tensor counts) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [H]");
  const int64_t H = x.numel();
  TORCH_CHECK(wd_t.dim() == 2 && wd_t.size(1) == H && wd_t.is_contiguous(), "wd_t: contiguous [F, H]");
  const int64_t F = wd_t.size(0);
  for (const auto* w : {&wg, &wu})
    TORCH_CHECK(w->dim() == 2 && w->size(0) == F && w->size(1) == H && w->is_contiguous() &&
                w->scalar_type() == wd_t.scalar_type(), "wg, wu: contiguous [F, H], same dtype as wd_t");
  TORCH_CHECK(idx.numel() == 0 || (idx.scalar_type() == torch::kLong && idx.dim() == 1 && idx.is_contiguous()),
              "idx: empty or int64 [k]");
  if (idx.numel()) {
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t j = 0; j < idx.numel(); ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < F, "idx out of range");
  }
  check_vec(bias_g, F, "bias_g"); check_vec(bias_u, F, "bias_u");
  TORCH_CHECK(counts.scalar_type() == torch::kLong && counts.numel() >= 1, "counts: int64 [1]");
  if (wd_t.scalar_type() == torch::kFloat)
    return neuron_run<float>(x, wg, wu, wd_t, idx, t_a, bias_g, bias_u, min_bytes_per_thread, counts);
  TORCH_CHECK(wd_t.scalar_type() == torch::kBFloat16, "weights: float32 or bfloat16");
  return neuron_run<c10::BFloat16>(x, wg, wu, wd_t, idx, t_a, bias_g, bias_u, min_bytes_per_thread, counts);
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

// which vector path this build uses (logged when the kernel is loaded)
std::string simd() {
#if defined(__AVX512BF16__)
  return "avx512+bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(AWQ_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_sparse_swiglu", torch::wrap_pybind_function(fused_sparse_swiglu), "fused_sparse_swiglu");
  m.def("input_sparse_swiglu", torch::wrap_pybind_function(input_sparse_swiglu), "input_sparse_swiglu");
  m.def("neuron_sparse_swiglu", torch::wrap_pybind_function(neuron_sparse_swiglu), "neuron_sparse_swiglu");
  m.def("dense_gemv", torch::wrap_pybind_function(dense_gemv), "dense_gemv");
  m.def("simd", &simd, "vector instruction path of this build");
}
