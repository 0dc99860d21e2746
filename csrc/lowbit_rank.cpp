// Batch-1 neuron ranking from a low-bit copy of [W_gate; W_up] (awq/methods/lowbit_rank.py).
//
// codes [2F, L] uint8: rows 0..F-1 the gate copy, F..2F-1 the up copy; B bits per code (2, 4 or 8),
// P = 8 / B codes per byte, L = ceil(H / P) bytes per row.  Byte j of a row holds the codes of the
// columns j + p * L (p = 0 .. P-1) in bits [p * B, (p + 1) * B) ("planes": each plane is a contiguous
// run of columns, so the inner loop is one pass over the bytes with P accumulators).  Code c stands
// for (c - 2^(B-1)) * scale[row]; columns past H are zero in the padded copy of x.
//
// lowbit_select: for the candidates (every neuron, or the list cand), g~ = <gate copy, x> (+ bias),
// u~ = <up copy, x> (+ bias), score = |silu(g~) * u~|; returns the int64 indices (in candidate order)
// with score >= t.  scores_out (if not empty, [candidates] float32) receives every candidate's score.
// Only the candidates' code rows are read.  Parallel over candidates, at least min_bytes per thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

static inline float silu_f(float g) { return g / (1.f + std::exp(-g)); }

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

// sum_j sum_p code_p(q[j]) * xp[p * L + j]  (unsigned codes; the offset is applied by the caller).
// AVX-512: 16 bytes per step; AVX2+FMA: 8 bytes per step (bytes widened to int32, planes split by
// shift and mask, converted to float, FMA with the plane's x); scalar tail and scalar fallback.
template <int B>
static inline float row_dot(const uint8_t* __restrict q, const float* __restrict xp, int64_t L) {
  constexpr int P = 8 / B;
  constexpr int M = (1 << B) - 1;
  int64_t j = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  {
    __m512 s[P];
    for (int p = 0; p < P; ++p) s[p] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32(M);
    for (; j + 16 <= L; j += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
      for (int p = 0; p < P; ++p) {
        const __m512i c = B == 8 ? b : _mm512_and_si512(_mm512_srli_epi32(b, p * B), mask);
        s[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_loadu_ps(xp + p * L + j), s[p]);
      }
    }
    for (int p = 1; p < P; ++p) s[0] = _mm512_add_ps(s[0], s[p]);
    acc = _mm512_reduce_add_ps(s[0]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  {
    __m256 s[P];
    for (int p = 0; p < P; ++p) s[p] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(M);
    for (; j + 8 <= L; j += 8) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      for (int p = 0; p < P; ++p) {
        const __m256i c = B == 8 ? b : _mm256_and_si256(_mm256_srli_epi32(b, p * B), mask);
        s[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), _mm256_loadu_ps(xp + p * L + j), s[p]);
      }
    }
    for (int p = 1; p < P; ++p) s[0] = _mm256_add_ps(s[0], s[p]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s[0]), _mm256_extractf128_ps(s[0], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    acc = _mm_cvtss_f32(h);
  }
#endif
  for (; j < L; ++j) {
    const int b = q[j];
    for (int p = 0; p < P; ++p) acc += static_cast<float>((b >> (p * B)) & M) * xp[p * L + j];
  }
  return acc;
}

template <int B>
static torch::Tensor select_run(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                                const torch::Tensor& bias_gu, const torch::Tensor& cand, double t,
                                int64_t min_bytes, torch::Tensor& scores_out) {
  constexpr int P = 8 / B;
  const int64_t H = x.numel(), F = codes.size(0) / 2, L = codes.size(1);
  std::vector<float> xp(P * L, 0.f);  // x padded to P * L columns
  const float* x0 = x.data_ptr<float>();
  std::copy(x0, x0 + H, xp.begin());
  float xsum = 0.f;
  for (int64_t h = 0; h < H; ++h) xsum += x0[h];
  const float off = static_cast<float>(1 << (B - 1)) * xsum;
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = bias_gu.numel() ? bias_gu.data_ptr<float>() : nullptr;
  const int64_t* ip = cand.numel() ? cand.data_ptr<int64_t>() : nullptr;
  const int64_t nc = ip ? cand.numel() : F;
  std::vector<float> score(nc);
  const int64_t grain = std::max<int64_t>(1, min_bytes / (2 * L));
  at::parallel_for(0, nc, grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t n = ip ? ip[j] : j;
      float g = (row_dot<B>(qp + n * L, xp.data(), L) - off) * sp[n];
      float u = (row_dot<B>(qp + (F + n) * L, xp.data(), L) - off) * sp[F + n];
      if (bp) { g += bp[n]; u += bp[F + n]; }
      score[j] = std::fabs(silu_f(g) * u);
    }
  });
  if (scores_out.numel()) std::copy(score.begin(), score.end(), scores_out.data_ptr<float>());
  const float tf = static_cast<float>(t);
  std::vector<int64_t> sel;
  sel.reserve(nc);
  for (int64_t j = 0; j < nc; ++j)
    if (score[j] >= tf) sel.push_back(ip ? ip[j] : j);
  auto out = torch::empty({static_cast<int64_t>(sel.size())}, torch::dtype(torch::kLong));
  std::copy(sel.begin(), sel.end(), out.data_ptr<int64_t>());
  return out;
}

torch::Tensor lowbit_select(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t bits,
                            torch::Tensor bias_gu, torch::Tensor cand, double t, int64_t min_bytes_per_thread,
                            torch::Tensor scores_out) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits: 2, 4 or 8");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 1, "x: contiguous float32 [H]");
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.dim() == 2 && codes.is_contiguous() &&
              codes.size(0) % 2 == 0, "codes: contiguous uint8 [2F, L]");
  const int64_t P = 8 / bits, F = codes.size(0) / 2, L = codes.size(1);
  TORCH_CHECK(L == (x.numel() + P - 1) / P, "codes: L must be ceil(H / (8 / bits))");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == 2 * F,
              "scales: contiguous float32 [2F]");
  TORCH_CHECK(bias_gu.numel() == 0 || (bias_gu.scalar_type() == torch::kFloat && bias_gu.is_contiguous() &&
              bias_gu.numel() == 2 * F), "bias_gu: empty or contiguous float32 [2F]");
  TORCH_CHECK(cand.numel() == 0 || (cand.scalar_type() == torch::kLong && cand.dim() == 1 && cand.is_contiguous()),
              "cand: empty or int64 [k]");
  if (cand.numel()) {
    const int64_t* ip = cand.data_ptr<int64_t>();
    for (int64_t j = 0; j < cand.numel(); ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < F, "cand out of range");
  }
  const int64_t nc = cand.numel() ? cand.numel() : F;
  TORCH_CHECK(scores_out.numel() == 0 || (scores_out.scalar_type() == torch::kFloat && scores_out.is_contiguous() &&
              scores_out.numel() == nc), "scores_out: empty or contiguous float32 [candidates]");
  if (bits == 2) return select_run<2>(x, codes, scales, bias_gu, cand, t, min_bytes_per_thread, scores_out);
  if (bits == 4) return select_run<4>(x, codes, scales, bias_gu, cand, t, min_bytes_per_thread, scores_out);
  return select_run<8>(x, codes, scales, bias_gu, cand, t, min_bytes_per_thread, scores_out);
}

// the vector path this build compiled (what -march chose)
static std::string simd() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowbit_select", torch::wrap_pybind_function(lowbit_select), "lowbit_select");
  m.def("simd", &simd, "the vector path of this build");
}
