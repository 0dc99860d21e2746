// Shared CPU vector primitives of the project's C++ kernels (csrc/sparse_mlp.cpp, csrc/decode_step.cpp):
// float32 / bfloat16 weight loads, dot products, axpy, gathered row sums and the 4-rows-per-pass GEMV.
// AVX-512 where the build has it, else AVX2+FMA (8-wide), else scalar.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
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

// y[0:R] = w [R, C] @ x, rows split over threads from min_bytes weight bytes per thread (multiples of 4 rows)
template <typename S>
static void gemv_par(float* y, const S* w, const float* x, int64_t R, int64_t C, int64_t min_bytes) {
  const int64_t grain = std::max<int64_t>(4, (min_bytes / std::max<int64_t>(1, C * (int64_t)sizeof(S)) + 3) / 4 * 4);
  if (R <= grain) { gemv_rows<S>(y, w, x, R, C, 0, R); return; }
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) { gemv_rows<S>(y, w, x, R, C, b, e); });
}
