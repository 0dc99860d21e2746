// Block-quantised (ggml Q8_0 / Q4_0 / Q4_1) batch-1 kernels shared by csrc/quant_kernels.cpp and
// csrc/quant_decode.cpp (awq/quant_decode.py).  Three vector paths, chosen at compile time:
//   QK512: AVX-512 F/BW/VL + VNNI (vpdpbusd: u8 x s8 -> s32, 64 products per instruction);
//   QK256: AVX2 + FMA + F16C (vpmaddubsw + vpmaddwd);   otherwise: scalar.
//
// Values (as ggml): a block of 32 inputs has a float16 scale d (Q4_1: and a float16 min m) and quants q:
//   Q8_0: d*q (q int8);  Q4_0: d*(q-8) (q 0..15);  Q4_1: d*q + m (q 0..15).
// Activations are quantised like llama.cpp's Q8_0/Q8_1 activation: per block of 32 entries
// xd = fp16(amax/127), xq = round_half_even(x * 127/amax), plus xs = sum(xq) (what Q8_1 keeps).
// A row's dot product is then
//   y = sum_b d_b * xd_b * isum_b + sum_b cw_b * xc_b,   isum_b = sum_j u_j * xq_j over the block,
// where u is the quant as the kernel reads it (Q4: 0..15; Q8_0 under QK512: q + 128, unsigned for
// vpdpbusd) and the correction xc_b = k * xd_b * xs_b (k = -128 Q8_0-QK512, 0 other Q8_0 paths, -8 Q4_0,
// +1 Q4_1 with cw = m; cw = d otherwise).
//
// Layouts (made once by pack_rows / pack_cols from ggml's planes; bits are moved, values unchanged):
// * rows (GEMV over output rows, blocks along a row): row r = [d: nb f16][m: nb f16 (Q4_1)][quants],
//   contiguous (the scales first: one ascending stream per row), exactly the format's bits per weight.  Q4 nibbles in groups of G = 128 (then one 64 and
//   one 32 at the row's end): byte j of a group = entry j (low nibble) | entry G/2 + j (high nibble), so
//   one 64-byte load and two masks give 128 entries in order.
// * cols (input-channel sparsity: W^T, one row per input channel i holding q[:, i] for every output):
//   quants [C, Rp] (Q8) or [C, Rp/2] (Q4), Rp = R rounded up to 64; scales ds [C/32, Rp] (and ms), i.e.
//   the same blocks and scales as the rows layout, stored input-major.  Within each chunk of CW outputs
//   (64 for QK512, 32 for QK256) the byte at position p = 16L + 4k + j holds output CW/4*k + 4L + j (Q8_0 under
//   QK512 stored as q + 128, the unsigned operand of vpdpbusd, so the kernel reads it as is): after
//   the byte/word interleave of four rows (unpack within 128-bit lanes) the int32 lanes come out in
//   output order.  Q4 nibbles in groups of 128 positions (tail 64): low = position j, high = j + G/2.
// * tcols (output-blocked, for the sparse kernels; awq/decode/tcols.py): W^T requantised in the same format
//   with its blocks along the OUTPUTS (32 outputs of one input channel share a scale d (Q4_1: and m)): quants
//   exactly as the cols layout, scales ds [C, Rp/32] (and ms).  An active input reads its row of quants and its
//   Rp/32 scales, nothing else: the bytes read are the format's bits per weight times the active inputs.
//   Product (q_tcols_range): per group of 32 consecutive active entries j and output block b the activation
//   z_jb = x_j d_jb is quantised to int8 (scale amax_j|z_jb| / 127, as llama.cpp's activations), summed
//   against the quants with the same int8 dot products as cols, then scaled; Q4_1 adds sum_j x_j m_jb.
#pragma once
#include "simd.h"
#include <c10/util/Half.h>
#include <atomic>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QK512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK256 1
#endif
#if defined(QK512) || defined(QK256)
#include <immintrin.h>
#endif

enum QFmt : int { QF_Q8_0 = 0, QF_Q4_0 = 1, QF_Q4_1 = 2 };
constexpr int64_t QBLK = 32;
#if defined(QK512)
constexpr int64_t QCW = 64;
#elif defined(QK256)
constexpr int64_t QCW = 32;
#else
constexpr int64_t QCW = 64;
#endif

static inline float qh2f(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
static inline uint16_t qf2h(float f) { return c10::Half(f).x; }

static inline int64_t q_quant_bytes(int fmt, int64_t n) { return fmt == QF_Q8_0 ? n : n / 2; }
static inline int64_t q_row_bytes(int fmt, int64_t C) {
  const int64_t nb = C / QBLK;
  return q_quant_bytes(fmt, C) + 2 * nb + (fmt == QF_Q4_1 ? 2 * nb : 0);
}
static inline int64_t q_scale_bytes(int fmt, int64_t C) { return (C / QBLK) * (fmt == QF_Q4_1 ? 4 : 2); }
static inline int64_t q_pad64(int64_t n) { return (n + 63) / 64 * 64; }

// correction factor k of the activation term (see the header comment)
static inline float q_corr_k(int fmt) {
  if (fmt == QF_Q4_0) return -8.f;
  if (fmt == QF_Q4_1) return 1.f;
#if defined(QK512)
  return -128.f;
#else
  return 0.f;
#endif
}

// position p within a chunk of QCW outputs -> the output it holds (cols layout)
static inline int64_t q_col_of_pos(int64_t p) {
#if defined(QK512) || defined(QK256)
  const int64_t L = p / 16, k = (p % 16) / 4, j = p % 4;
  return (QCW / 4) * k + 4 * L + j;
#else
  return p;
#endif
}

// ------------------------------------------------------------------------------------------------
// activations
// ------------------------------------------------------------------------------------------------
struct QAct {
  int64_t C = 0, nb = 0;
  std::vector<int8_t> q;   // C entries (+ 128 zero padding)
  std::vector<float> d;    // nb (+ 16 zero padding)
  std::vector<int32_t> s;  // nb
  std::vector<float> c[3];  // per format: k * d * s
  // sizes grow only; entries past nb keep finite stale values, which the kernels multiply by zeros
  void resize(int64_t C_) {
    C = C_; nb = C / QBLK;
    if (static_cast<int64_t>(q.size()) < C + 128) q.resize(C + 128, 0);
    if (static_cast<int64_t>(d.size()) < nb + 16) {
      d.resize(nb + 16, 0.f); s.resize(nb + 16, 0);
      for (auto& v : c) v.resize(nb + 16, 0.f);
    }
  }
  void corr() {
    for (int f = 0; f < 3; ++f) {
      const float k = q_corr_k(f);
      for (int64_t b = 0; b < nb; ++b) c[f][b] = k * d[b] * static_cast<float>(s[b]);
    }
  }
};

// quantise one block of 32 floats: q, fp16-rounded scale, sum
static inline void q_act_block(const float* x, int8_t* q, float& d, int32_t& s) {
  float amax = 0.f;
#if defined(QK512)
  const __m512 a0 = _mm512_loadu_ps(x), a1 = _mm512_loadu_ps(x + 16);
  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
#else
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
#endif
  const float dd = amax / 127.f;
  const float id = dd != 0.f ? 1.f / dd : 0.f;
  d = qh2f(qf2h(dd));
#if defined(QK512)
  const __m512 vid = _mm512_set1_ps(id);
  const __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a0, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a1, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(i0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(i1));
  s = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#else
  int32_t sum = 0;
  for (int j = 0; j < 32; ++j) {
    const int v = static_cast<int>(std::nearbyint(x[j] * id));  // round half to even, as the SIMD paths
    q[j] = static_cast<int8_t>(v);
    sum += v;
  }
  s = sum;
#endif
}

static inline void q_act(const float* x, int64_t C, QAct& a) {
  a.resize(C);
  for (int64_t b = 0; b < a.nb; ++b) q_act_block(x + b * QBLK, a.q.data() + b * QBLK, a.d[b], a.s[b]);
  a.corr();
}

// sparse activation for the cols layout: entries idx[0..n) (ascending) with values v; blocks of 32
// inputs; per block the scale from its active entries.  Fills xq[n] and per-block d, s.
struct QSparseAct {
  std::vector<int32_t> idx;   // active inputs, ascending
  std::vector<int8_t> xq;     // their quants
  std::vector<int32_t> bstart;  // per block: first position in idx (nb + 1 entries)
  std::vector<float> d;
  std::vector<int32_t> s;
};

static inline void q_sparse_act(const int32_t* idx, const float* v, int64_t n, int64_t C, QSparseAct& a) {
  const int64_t nb = C / QBLK;
  a.idx.assign(idx, idx + n);
  a.xq.resize(n + 8);
  a.bstart.assign(nb + 1, 0);
  a.d.assign(nb, 0.f);
  a.s.assign(nb, 0);
  int64_t j = 0;
  for (int64_t b = 0; b < nb; ++b) {
    a.bstart[b] = static_cast<int32_t>(j);
    int64_t e = j;
    float amax = 0.f;
    while (e < n && idx[e] < (b + 1) * QBLK) { amax = std::max(amax, std::fabs(v[e])); ++e; }
    const float dd = amax / 127.f;
    const float id = dd != 0.f ? 1.f / dd : 0.f;
    a.d[b] = qh2f(qf2h(dd));
    int32_t sum = 0;
    for (int64_t t = j; t < e; ++t) {
      const int q = static_cast<int>(std::nearbyint(v[t] * id));
      a.xq[t] = static_cast<int8_t>(q);
      sum += q;
    }
    a.s[b] = sum;
    j = e;
  }
  a.bstart[nb] = static_cast<int32_t>(j);
}

// ------------------------------------------------------------------------------------------------
// rows layout: y[j] = <W[row j], x> for NR rows at once
// ------------------------------------------------------------------------------------------------
template <int FMT, int NR>
static inline void q_rows_pass(const uint8_t* const* wr, int64_t C, const QAct& a, float* out) {
  const int64_t nb = C / QBLK, sbytes = q_scale_bytes(FMT, C);
  const float* xcp = a.c[FMT].data();
  const uint8_t* wq[NR];  // the quants of each row (after its scales)
  for (int r = 0; r < NR; ++r) wq[r] = wr[r] + sbytes;
#if defined(QK512)
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  __m512i IDX[8];
  for (int k = 0; k < 8; ++k)
    IDX[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * k)), _mm256_set1_epi32(2 * k + 1), 1);
  int64_t e = 0;
  for (int64_t sb = 0; sb < nb; sb += 16) {
    const int nbs = static_cast<int>(std::min<int64_t>(16, nb - sb));
    const __mmask16 km = static_cast<__mmask16>(nbs == 16 ? 0xFFFF : (1u << nbs) - 1);
    const __m512 xd = _mm512_maskz_loadu_ps(km, a.d.data() + sb);
    const __m512 xc = _mm512_maskz_loadu_ps(km, xcp + sb);
    __m512 s[NR];
    for (int r = 0; r < NR; ++r) {
      const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, wr[r] + 2 * sb));
      s[r] = _mm512_mul_ps(dw, xd);
      if (FMT == QF_Q4_1) {
        const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, wr[r] + 2 * nb + 2 * sb));
        acc[r] = _mm512_fmadd_ps(mw, xc, acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(dw, xc, acc[r]);
      }
    }
    const int64_t e_end = e + QBLK * nbs;
    int lb = 0;
    while (e < e_end) {
      const int64_t rem = C - e;
      if (rem >= 128) {
        const __m512i x0 = _mm512_loadu_si512(a.q.data() + e), x1 = _mm512_loadu_si512(a.q.data() + e + 64);
        for (int r = 0; r < NR; ++r) {
          __m512i lo, hi;
          if (FMT == QF_Q8_0) {
            lo = _mm512_xor_si512(_mm512_loadu_si512(wq[r] + e), bias);
            hi = _mm512_xor_si512(_mm512_loadu_si512(wq[r] + e + 64), bias);
          } else {
            const __m512i v = _mm512_loadu_si512(wq[r] + e / 2);
            lo = _mm512_and_si512(v, m4);
            hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
          }
          const __m512i i0 = _mm512_dpbusd_epi32(zero, lo, x0), i1 = _mm512_dpbusd_epi32(zero, hi, x1);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(IDX[lb / 2], s[r]), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(IDX[lb / 2 + 1], s[r]), acc[r]);
        }
        e += 128; lb += 4;
      } else if (rem >= 64) {
        const __m512i x0 = _mm512_loadu_si512(a.q.data() + e);
        for (int r = 0; r < NR; ++r) {
          __m512i w;
          if (FMT == QF_Q8_0) {
            w = _mm512_xor_si512(_mm512_loadu_si512(wq[r] + e), bias);
          } else {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[r] + e / 2));
            const __m256i m4h = _mm256_set1_epi8(0x0F);
            w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4h)),
                                   _mm256_and_si256(_mm256_srli_epi16(v, 4), m4h), 1);
          }
          const __m512i i0 = _mm512_dpbusd_epi32(zero, w, x0);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(IDX[lb / 2], s[r]), acc[r]);
        }
        e += 64; lb += 2;
      } else {  // one block of 32: lanes 8..15 multiply zeros
        const __m512i x0 = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, a.q.data() + e);
        for (int r = 0; r < NR; ++r) {
          __m512i w;
          if (FMT == QF_Q8_0) {
            w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(0xFFFFFFFFull, wq[r] + e), bias);
          } else {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq[r] + e / 2));
            const __m128i m4q = _mm_set1_epi8(0x0F);
            const __m256i w2 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4q), _mm_and_si128(v, m4q));
            w = _mm512_castsi256_si512(w2);
            w = _mm512_inserti64x4(w, _mm256_setzero_si256(), 1);
          }
          const __m512i i0 = _mm512_dpbusd_epi32(zero, w, x0);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(IDX[lb / 2], s[r]), acc[r]);
        }
        e += 32; lb += 1;
      }
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(QK256)
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  int64_t e = 0;
  for (int64_t sb = 0; sb < nb; sb += 8) {
    const int nbs = static_cast<int>(std::min<int64_t>(8, nb - sb));
    const __m256 xd = _mm256_loadu_ps(a.d.data() + sb);  // padded with zeros past nb
    const __m256 xc = _mm256_loadu_ps(xcp + sb);
    __m256 s[NR];
    for (int r = 0; r < NR; ++r) {
      __m128i dh, mh = _mm_setzero_si128();
      if (nbs == 8) {
        dh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + 2 * sb));
        if (FMT == QF_Q4_1) mh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + 2 * nb + 2 * sb));
      } else {
        uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tmpm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(tmp, wr[r] + 2 * sb, 2 * nbs);
        dh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
        if (FMT == QF_Q4_1) {
          std::memcpy(tmpm, wr[r] + 2 * nb + 2 * sb, 2 * nbs);
          mh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmpm));
        }
      }
      const __m256 dw = _mm256_cvtph_ps(dh);
      s[r] = _mm256_mul_ps(dw, xd);
      if (FMT == QF_Q4_1) acc[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(mh), xc, acc[r]);
      else if (FMT == QF_Q4_0) acc[r] = _mm256_fmadd_ps(dw, xc, acc[r]);  // Q8_0 here: no correction
    }
    const int64_t e_end = e + QBLK * nbs;
    int lb = 0;
    // one block: w (u8 for Q4, s8 for Q8) times x (s8) -> acc += cvt(sum) * s[lb]
    auto block = [&](int r, __m256i w, __m256i x, int b) {
      __m256i p;
      if (FMT == QF_Q8_0) p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
      else p = _mm256_maddubs_epi16(w, x);
      const __m256i i = _mm256_madd_epi16(p, ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_permutevar8x32_ps(s[r], _mm256_set1_epi32(b)), acc[r]);
    };
    auto ldx = [&](int64_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + off)); };
    auto ldw = [&](int r, int64_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[r] + off)); };
    while (e < e_end) {
      const int64_t rem = C - e;
      if (rem >= 128) {
        const __m256i x0 = ldx(e), x1 = ldx(e + 32), x2 = ldx(e + 64), x3 = ldx(e + 96);
        for (int r = 0; r < NR; ++r) {
          if (FMT == QF_Q8_0) {
            block(r, ldw(r, e), x0, lb); block(r, ldw(r, e + 32), x1, lb + 1);
            block(r, ldw(r, e + 64), x2, lb + 2); block(r, ldw(r, e + 96), x3, lb + 3);
          } else {
            const __m256i v0 = ldw(r, e / 2), v1 = ldw(r, e / 2 + 32);
            block(r, _mm256_and_si256(v0, m4), x0, lb);
            block(r, _mm256_and_si256(v1, m4), x1, lb + 1);
            block(r, _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), x2, lb + 2);
            block(r, _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), x3, lb + 3);
          }
        }
        e += 128; lb += 4;
      } else if (rem >= 64) {
        const __m256i x0 = ldx(e), x1 = ldx(e + 32);
        for (int r = 0; r < NR; ++r) {
          if (FMT == QF_Q8_0) {
            block(r, ldw(r, e), x0, lb); block(r, ldw(r, e + 32), x1, lb + 1);
          } else {
            const __m256i v = ldw(r, e / 2);
            block(r, _mm256_and_si256(v, m4), x0, lb);
            block(r, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), x1, lb + 1);
          }
        }
        e += 64; lb += 2;
      } else {
        const __m256i x0 = ldx(e);
        for (int r = 0; r < NR; ++r) {
          if (FMT == QF_Q8_0) {
            block(r, ldw(r, e), x0, lb);
          } else {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq[r] + e / 2));
            const __m128i m4q = _mm_set1_epi8(0x0F);
            block(r, _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4q), _mm_and_si128(v, m4q)), x0, lb);
          }
        }
        e += 32; lb += 1;
      }
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum8(acc[r]);
#else
  for (int r = 0; r < NR; ++r) {
    const uint8_t* w = wq[r];
    float acc = 0.f;
    int64_t e = 0;
    auto qv = [&](int64_t i) -> int {  // quant of entry i (Q4: nibble groups)
      if (FMT == QF_Q8_0) return static_cast<int8_t>(w[i]);
      int64_t g0 = 0, G = 128;
      while (true) {
        const int64_t rem = C - g0;
        G = rem >= 128 ? 128 : rem >= 64 ? 64 : 32;
        if (i < g0 + G) break;
        g0 += G;
      }
      const int64_t j = i - g0;
      const uint8_t byte = w[g0 / 2 + (j < G / 2 ? j : j - G / 2)];
      return j < G / 2 ? (byte & 0x0F) : (byte >> 4);
    };
    const uint16_t* dp = reinterpret_cast<const uint16_t*>(wr[r]);
    for (int64_t b = 0; b < nb; ++b, e += QBLK) {
      int32_t is = 0;
      for (int64_t j = 0; j < QBLK; ++j) is += qv(e + j) * a.q[e + j];
      const float dw = qh2f(dp[b]);
      acc += dw * a.d[b] * static_cast<float>(is);
      if (FMT == QF_Q4_1) acc += qh2f(dp[nb + b]) * xcp[b];
      else if (FMT == QF_Q4_0) acc += dw * xcp[b];
    }
    out[r] = acc;
  }
#endif
}

// rows GEMV rows per pass, per format: 1, 2 or 4 (0: 1 for Q8_0, 4 for Q4).  Set from Python by a measurement
// on this machine (awq.kernels.quant.kernel, cached by awq.kernels.hw) or AWQ_QUANT_ROWS_PER_PASS: which one
// streams fastest from DRAM differs between CPUs (AMD EPYC, 2 threads: 1 row ~1.5x faster than 4 for Q4_1).
inline int q_rows_per_pass[3] = {0, 0, 0};
#ifndef QPF_PASSES
#define QPF_PASSES 2  // prefetch distance in 4-row passes
#endif
// y[j] = <W[rows ? rows[j] : j], x> for j in [j0, j1)
template <int FMT>
static void q_rows_range(const uint8_t* W, int64_t C, const int64_t* rows, int64_t j0, int64_t j1, const QAct& a,
                         float* y) {
  const int64_t rb = q_row_bytes(FMT, C);
  int64_t j = j0;
  auto row = [&](int64_t i) { return W + (rows ? rows[i] : i) * rb; };
  const int nr = q_rows_per_pass[FMT] > 0 ? q_rows_per_pass[FMT] : (FMT == QF_Q8_0 ? 1 : 4);
  for (; nr == 4 && j + 4 <= j1; j += 4) {
    const uint8_t* wr[4];
    for (int t = 0; t < 4; ++t) wr[t] = row(j + t);
    // the rows of a later pass into the cache now: four rows read side by side are four streams that start
    // with a miss each, which the hardware prefetcher does not cover
    for (int64_t t = j + 4 * QPF_PASSES; t < std::min(j1, j + 4 * QPF_PASSES + 4); ++t) {
      const uint8_t* p = row(t);
      for (int64_t o = 0; o < rb; o += 64) __builtin_prefetch(p + o, 0, 3);
    }
    q_rows_pass<FMT, 4>(wr, C, a, y + j);
  }
  for (; nr == 2 && j + 2 <= j1; j += 2) {
    const uint8_t* wr[2] = {row(j), row(j + 1)};
    q_rows_pass<FMT, 2>(wr, C, a, y + j);
  }
  for (; j < j1; ++j) {
    const uint8_t* wr[1] = {W + (rows ? rows[j] : j) * rb};
    q_rows_pass<FMT, 1>(wr, C, a, y + j);
  }
}

static inline void q_rows(int fmt, const uint8_t* W, int64_t C, const int64_t* rows, int64_t j0, int64_t j1,
                          const QAct& a, float* y) {
  if (fmt == QF_Q8_0) q_rows_range<QF_Q8_0>(W, C, rows, j0, j1, a, y);
  else if (fmt == QF_Q4_0) q_rows_range<QF_Q4_0>(W, C, rows, j0, j1, a, y);
  else q_rows_range<QF_Q4_1>(W, C, rows, j0, j1, a, y);
}

// dequantise row r of a rows-layout matrix into out[C]
static inline void q_row_dequant(int fmt, const uint8_t* W, int64_t C, int64_t r, float* out) {
  const int64_t rb = q_row_bytes(fmt, C), nb = C / QBLK;
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(W + r * rb);
  const uint8_t* w = W + r * rb + q_scale_bytes(fmt, C);
  int64_t g0 = 0;
  while (g0 < C) {
    const int64_t rem = C - g0;
    const int64_t G = fmt == QF_Q8_0 ? rem : rem >= 128 ? 128 : rem >= 64 ? 64 : 32;
    for (int64_t j = 0; j < G; ++j) {
      const int64_t i = g0 + j, b = i / QBLK;
      float v;
      if (fmt == QF_Q8_0) {
        v = qh2f(dp[b]) * static_cast<float>(static_cast<int8_t>(w[i]));
      } else {
        const uint8_t byte = w[g0 / 2 + (j < G / 2 ? j : j - G / 2)];
        const int q = j < G / 2 ? (byte & 0x0F) : (byte >> 4);
        v = fmt == QF_Q4_0 ? qh2f(dp[b]) * static_cast<float>(q - 8) : qh2f(dp[b]) * q + qh2f(dp[nb + b]);
      }
      out[i] = v;
    }
    g0 += G;
  }
}

// ------------------------------------------------------------------------------------------------
// cols layout: acc[c] (int32, c < Rp) = sum over the rows of one input block of u[row, c] * xq[row]
// ------------------------------------------------------------------------------------------------
struct QColsView {
  int fmt = 0;
  int64_t R = 0, C = 0, Rp = 0, rowb = 0;  // rowb: bytes of one input row of quants
  const uint8_t* q = nullptr;   // [C, rowb]
  const uint16_t* ds = nullptr;  // [C/32, Rp]
  const uint16_t* ms = nullptr;  // [C/32, Rp] (Q4_1)
};

#if defined(QK512)
// interleave four 64-byte rows (positions) into four int32-lane registers in output order, and
// accumulate u * x (u unsigned: Q4 nibbles, Q8_0 stored as q + 128; x: four int8 packed in xb for outputs
// 0..31 of the chunk, in xb2 for 32..63)
static inline void q_quad512(__m512i a, __m512i b, __m512i c, __m512i d, __m512i xb, __m512i xb2, __m512i* acc) {
  const __m512i ab0 = _mm512_unpacklo_epi8(a, b), ab1 = _mm512_unpackhi_epi8(a, b);
  const __m512i cd0 = _mm512_unpacklo_epi8(c, d), cd1 = _mm512_unpackhi_epi8(c, d);
  acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_unpacklo_epi16(ab0, cd0), xb);
  acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_unpackhi_epi16(ab0, cd0), xb);
  acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_unpacklo_epi16(ab1, cd1), xb2);
  acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_unpackhi_epi16(ab1, cd1), xb2);
}
#elif defined(QK256)
static inline void q_quad256(__m256i a, __m256i b, __m256i c, __m256i d, __m256i xb, __m256i* acc, bool q8) {
  const __m256i ab0 = _mm256_unpacklo_epi8(a, b), ab1 = _mm256_unpackhi_epi8(a, b);
  const __m256i cd0 = _mm256_unpacklo_epi8(c, d), cd1 = _mm256_unpackhi_epi8(c, d);
  const __m256i qq[4] = {_mm256_unpacklo_epi16(ab0, cd0), _mm256_unpackhi_epi16(ab0, cd0),
                         _mm256_unpacklo_epi16(ab1, cd1), _mm256_unpackhi_epi16(ab1, cd1)};
  const __m256i ones = _mm256_set1_epi16(1);
  for (int k = 0; k < 4; ++k) {
    __m256i p;
    if (q8) p = _mm256_maddubs_epi16(_mm256_sign_epi8(qq[k], qq[k]), _mm256_sign_epi8(xb, qq[k]));
    else p = _mm256_maddubs_epi16(qq[k], xb);
    acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(p, ones));
  }
}
#endif

#ifndef QCOLS_PF
#define QCOLS_PF 512  // software prefetch distance (bytes) along each row of an input-major product
#endif
// the rows of an input-major product are up to 32 scattered streams, more than the hardware prefetcher
// follows: each chunk step prefetches every row QCOLS_PF bytes ahead (past a row's end: harmless)
static inline void q_prefetch_rows(const uint8_t* (*P)[4], int64_t nq, int64_t off) {
  for (int64_t q = 0; q < nq; ++q)
    for (int t = 0; t < 4; ++t) __builtin_prefetch(P[q][t] + off + QCOLS_PF, 0, 2);
}

// acc[0..Rp) = sum_t u[rows[t], :] * x[t] for the n rows given, x as int8: word(t4, b) is the int32 holding
// the four activations of rows 4 t4 .. 4 t4 + 3 (zero past n) for the outputs of block b (32 outputs):
// the same for every block in the cols layout, one per block in the tcols layout (q_tcols_range)
// n <= 32.  Loop order: per chunk of outputs, every row of the call, the chunk's int32 sums in registers.
template <class Word>
static void q_cols_accum(const QColsView& W, const int32_t* rows, int64_t n, int32_t* acc, Word word) {
  const int64_t Rp = W.Rp;
  const bool q8 = W.fmt == QF_Q8_0;
  if (n == 0) { std::memset(acc, 0, Rp * sizeof(int32_t)); return; }
  const int64_t nq = (n + 3) / 4;
  const uint8_t* P[8][4];  // row pointers per quad (a padding entry repeats the quad's first row, activation 0)
  for (int64_t q = 0; q < nq; ++q)
    for (int t = 0; t < 4; ++t) P[q][t] = W.q + static_cast<int64_t>(rows[4 * q + t < n ? 4 * q + t : 4 * q]) * W.rowb;
#if defined(QK512)
  auto bc = [&](int64_t q, int64_t b) { return _mm512_set1_epi32(static_cast<int>(word(q, b))); };
  auto store = [&](const __m512i* ac, int64_t c0) {
    for (int k = 0; k < 4; ++k) _mm512_storeu_si512(acc + c0 + 16 * k, ac[k]);
  };
  if (q8) {
    for (int64_t c0 = 0; c0 < Rp; c0 += 64) {
      __m512i ac[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
      q_prefetch_rows(P, nq, c0);
      for (int64_t q = 0; q < nq; ++q) {
        q_quad512(_mm512_loadu_si512(P[q][0] + c0), _mm512_loadu_si512(P[q][1] + c0), _mm512_loadu_si512(P[q][2] + c0),
                  _mm512_loadu_si512(P[q][3] + c0), bc(q, c0 / QBLK), bc(q, c0 / QBLK + 1), ac);
      }
      store(ac, c0);
    }
    return;
  }
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  int64_t c0 = 0;
  for (; c0 + 128 <= Rp; c0 += 128) {
    __m512i lo[4], hi[4];
    for (int k = 0; k < 4; ++k) { lo[k] = _mm512_setzero_si512(); hi[k] = _mm512_setzero_si512(); }
    q_prefetch_rows(P, nq, c0 / 2);
    for (int64_t q = 0; q < nq; ++q) {
      __m512i l[4], h[4];
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(P[q][t] + c0 / 2);
        l[t] = _mm512_and_si512(v, m4);
        h[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      const int64_t b = c0 / QBLK;
      q_quad512(l[0], l[1], l[2], l[3], bc(q, b), bc(q, b + 1), lo);
      q_quad512(h[0], h[1], h[2], h[3], bc(q, b + 2), bc(q, b + 3), hi);
    }
    store(lo, c0);
    store(hi, c0 + 64);
  }
  if (c0 < Rp) {  // one 64-position tail group
    const __m256i m4h = _mm256_set1_epi8(0x0F);
    __m512i ac[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t q = 0; q < nq; ++q) {
      __m512i w[4];
      for (int t = 0; t < 4; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P[q][t] + c0 / 2));
        w[t] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4h)),
                                  _mm256_and_si256(_mm256_srli_epi16(v, 4), m4h), 1);
      }
      q_quad512(w[0], w[1], w[2], w[3], bc(q, c0 / QBLK), bc(q, c0 / QBLK + 1), ac);
    }
    store(ac, c0);
  }
#elif defined(QK256)
  auto ld = [](const uint8_t* q) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)); };
  // one chunk of 32 outputs at c0 from the 32 bytes at byte offset off of each row (Q4: nibble half hi)
  auto chunk = [&](int64_t c0, int64_t off, int nib) {
    __m256i ac[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t q = 0; q < nq; ++q) {
      __m256i v[4];
      for (int t = 0; t < 4; ++t) {
        v[t] = ld(P[q][t] + off);
        if (nib == 1) v[t] = _mm256_and_si256(v[t], m4);
        else if (nib == 2) v[t] = _mm256_and_si256(_mm256_srli_epi16(v[t], 4), m4);
      }
      q_quad256(v[0], v[1], v[2], v[3], _mm256_set1_epi32(static_cast<int>(word(q, c0 / QBLK))), ac, q8);
    }
    for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c0 + 8 * k), ac[k]);
  };
  if (q8) {
    for (int64_t c0 = 0; c0 < Rp; c0 += 32) {
      if (c0 % 64 == 0) q_prefetch_rows(P, nq, c0);
      chunk(c0, c0, 0);
    }
    return;
  }
  int64_t c0 = 0;
  for (; c0 + 128 <= Rp; c0 += 128)
    for (int half = 0; half < 2; ++half) {  // bytes 0..31: positions 0..31 and 64..95; 32..63: 32..63, 96..127
      if (half == 0) q_prefetch_rows(P, nq, c0 / 2);
      chunk(c0 + 32 * half, c0 / 2 + 32 * half, 1);
      chunk(c0 + 64 + 32 * half, c0 / 2 + 32 * half, 2);
    }
  if (c0 < Rp) {
    chunk(c0, c0 / 2, 1);
    chunk(c0 + 32, c0 / 2, 2);
  }
#else
  for (int64_t pos = 0; pos < Rp; ++pos) {
    int32_t sum = 0;
    for (int64_t q = 0; q < nq; ++q) {
      const uint32_t xw = word(q, pos / QBLK);
      int8_t xs[4];
      std::memcpy(xs, &xw, 4);
      for (int t = 0; t < 4; ++t) {
        int u;
        if (q8) {
          u = static_cast<int8_t>(P[q][t][pos]);
        } else {
          const int64_t g0 = pos / 128 * 128, G = Rp - g0 >= 128 ? 128 : 64, j = pos - g0;
          const uint8_t byte = P[q][t][g0 / 2 + (j < G / 2 ? j : j - G / 2)];
          u = j < G / 2 ? (byte & 0x0F) : (byte >> 4);
        }
        sum += u * xs[t];
      }
    }
    acc[pos] = sum;  // scalar build: positions are outputs (identity order)
  }
#endif
}

// acc[0..Rp) = sum_t u[rows[t], :] * xq[t] for the n rows given (n <= 32: one input block of the cols layout)
static void q_cols_block(const QColsView& W, const int32_t* rows, const int8_t* xq, int64_t n, int32_t* acc) {
  uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(words, xq, static_cast<size_t>(std::min<int64_t>(n, 32)));
  q_cols_accum(W, rows, n, acc, [&](int64_t g4, int64_t) { return words[g4]; });
}

// y[0..Rp) += finalised block b: d[b, c] * xd * (acc[c] - corr) (+ m[b, c] * xd * xs for Q4_1)
static inline void q_cols_finish(const QColsView& W, int64_t b, const int32_t* acc, float xd, int32_t xs, float* y) {
  const int64_t Rp = W.Rp;
  int32_t corr = 0;
  if (W.fmt == QF_Q4_0) corr = 8 * xs;
#if defined(QK512)
  if (W.fmt == QF_Q8_0) corr = 128 * xs;
#endif
  const uint16_t* dr = W.ds + b * Rp;
  const uint16_t* mr = W.ms ? W.ms + b * Rp : nullptr;
  const float xm = xd * static_cast<float>(xs);
  int64_t c = 0;
#if defined(QK512)
  const __m512i vc = _mm512_set1_epi32(corr);
  const __m512 vxd = _mm512_set1_ps(xd), vxm = _mm512_set1_ps(xm);
  for (; c + 16 <= Rp; c += 16) {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(acc + c), vc));
    const __m512 d = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dr + c))), vxd);
    __m512 v = _mm512_fmadd_ps(a, d, _mm512_loadu_ps(y + c));
    if (mr) v = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mr + c))), vxm, v);
    _mm512_storeu_ps(y + c, v);
  }
#elif defined(QK256)
  const __m256i vc = _mm256_set1_epi32(corr);
  const __m256 vxd = _mm256_set1_ps(xd), vxm = _mm256_set1_ps(xm);
  for (; c + 8 <= Rp; c += 8) {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c)), vc));
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dr + c))), vxd);
    __m256 v = _mm256_fmadd_ps(a, d, _mm256_loadu_ps(y + c));
    if (mr) v = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mr + c))), vxm, v);
    _mm256_storeu_ps(y + c, v);
  }
#endif
  for (; c < Rp; ++c) {
    float v = static_cast<float>(acc[c] - corr) * (qh2f(dr[c]) * xd) + y[c];
    if (mr) v += qh2f(mr[c]) * xm;
    y[c] = v;
  }
}

// y[0..Rp) += sum over the blocks [b0, b1) of the active rows in each (a: per-block d, s, bstart)
static void q_cols_range(const QColsView& W, const QSparseAct& a, int64_t b0, int64_t b1, int32_t* acc, float* y) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s0 = a.bstart[b], s1 = a.bstart[b + 1];
    if (s1 == s0) continue;
    q_cols_block(W, a.idx.data() + s0, a.xq.data() + s0, s1 - s0, acc);
    q_cols_finish(W, b, acc, a.d[b], a.s[b], y);
  }
}

// split the blocks of a sparse activation into nt contiguous ranges of about equal active count
static inline void q_split_blocks(const QSparseAct& a, int nt, std::vector<int64_t>& bounds) {
  const int64_t nb = static_cast<int64_t>(a.bstart.size()) - 1, n = a.bstart[nb];
  bounds.assign(nt + 1, nb);
  bounds[0] = 0;
  int64_t b = 0;
  for (int t = 1; t < nt; ++t) {
    const int64_t target = (n * t + nt - 1) / nt;
    while (b < nb && a.bstart[b] < target) ++b;
    bounds[t] = b;
  }
}

// ------------------------------------------------------------------------------------------------
// tcols layout (output-blocked scales ds [C, Rp/32]): y[0..Rp) += W x over groups [g0, g1) of 32 active entries
// ------------------------------------------------------------------------------------------------
struct QTScratch {
  std::vector<float> z, zs, mb, dh;
  std::vector<int8_t> zq8;
  std::vector<int32_t> zw, corr, acc;
};

// float16 row -> float
static inline void q_h2f_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(QK512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(QK256)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = qh2f(src[i]);
}

// idx: the n active inputs (any order), v: their values; groups g of entries [32 g, 32 g + 32)
static void q_tcols_range(const QColsView& W, const int32_t* idx, const float* v, int64_t n, int64_t g0, int64_t g1,
                          QTScratch& s, float* y) {
  const int64_t Rp = W.Rp, NB = Rp / QBLK;
  int32_t kint = W.fmt == QF_Q4_0 ? 8 : 0;  // integer correction per sum of zq (see the header comment)
#if defined(QK512)
  if (W.fmt == QF_Q8_0) kint = 128;
#endif
  const int64_t NBp = (NB + 15) / 16 * 16;  // rows of the int8 scratch padded for 16-byte loads
  if (static_cast<int64_t>(s.z.size()) < 32 * NB) {
    s.z.resize(32 * NB); s.zs.resize(NB); s.mb.resize(NB); s.dh.resize(NB);
  }
  if (static_cast<int64_t>(s.zq8.size()) < 32 * NBp) {
    s.zq8.assign(32 * NBp, 0); s.zw.assign(8 * NBp, 0); s.corr.assign(NBp, 0);
  }
  if (static_cast<int64_t>(s.acc.size()) < Rp) s.acc.resize(Rp);
  const bool q41 = W.fmt == QF_Q4_1 && W.ms != nullptr;
  if (q41) std::fill(s.mb.begin(), s.mb.begin() + NB, 0.f);
  float* z = s.z.data();
  // the next group's scales and the first QCOLS_PF bytes of its rows (q_cols_accum prefetches the rest)
  auto prefetch_group = [&](int64_t g) {
    for (int64_t j = g * 32; j < std::min<int64_t>(n, g * 32 + 32); ++j) {
      const int64_t i = idx[j];
      for (int64_t o = 0; o < 2 * NB; o += 64) {
        __builtin_prefetch(reinterpret_cast<const uint8_t*>(W.ds + i * NB) + o, 0, 2);
        if (q41) __builtin_prefetch(reinterpret_cast<const uint8_t*>(W.ms + i * NB) + o, 0, 2);
      }
      for (int64_t o = 0; o < std::min<int64_t>(W.rowb, QCOLS_PF); o += 64) __builtin_prefetch(W.q + i * W.rowb + o, 0, 2);
    }
  };
  if (g0 < g1) prefetch_group(g0);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t j0 = g * 32, m = std::min<int64_t>(32, n - j0);
    if (m <= 0) break;
    if (g + 1 < g1) prefetch_group(g + 1);
    float* zs = s.zs.data();
    std::fill(zs, zs + NB, 0.f);  // amax first, then the scale
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = idx[j0 + j];
      const float x = v[j0 + j];
      float* zr = z + j * NB;
      q_h2f_row(W.ds + i * NB, zr, NB);
      for (int64_t b = 0; b < NB; ++b) {
        zr[b] *= x;
        zs[b] = std::max(zs[b], std::fabs(zr[b]));
      }
      if (q41) {
        q_h2f_row(W.ms + i * NB, s.dh.data(), NB);
        for (int64_t b = 0; b < NB; ++b) s.mb[b] += x * s.dh[b];
      }
    }
    float* inv = s.dh.data();
    for (int64_t b = 0; b < NB; ++b) {
      zs[b] /= 127.f;
      inv[b] = zs[b] != 0.f ? 1.f / zs[b] : 0.f;
      s.corr[b] = 0;
    }
    // zq = round_half_even(z * inv): int8 rows [j][NBp] (zero rows up to a multiple of 4), sums per block in corr
    int8_t* zq = s.zq8.data();
    const int64_t m4 = (m + 3) / 4 * 4;
    for (int64_t j = 0; j < m; ++j) {
      const float* zr = z + j * NB;
      int8_t* qr = zq + j * NBp;
      int64_t b = 0;
#if defined(QK512)
      for (; b + 16 <= NB; b += 16) {
        const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(zr + b), _mm512_loadu_ps(inv + b)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_si512(s.corr.data() + b, _mm512_add_epi32(_mm512_loadu_si512(s.corr.data() + b), q));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + b), _mm512_cvtepi32_epi8(q));
      }
#elif defined(QK256)
      for (; b + 8 <= NB; b += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(zr + b), _mm256_loadu_ps(inv + b)));
        auto* cp = reinterpret_cast<__m256i*>(s.corr.data() + b);
        _mm256_storeu_si256(cp, _mm256_add_epi32(_mm256_loadu_si256(cp), q));
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + b), _mm_packs_epi16(w, w));
      }
#endif
      for (; b < NB; ++b) {
        const int q = static_cast<int>(std::nearbyint(zr[b] * inv[b]));
        qr[b] = static_cast<int8_t>(q);
        s.corr[b] += q;
      }
    }
    if (m4 > m) std::memset(zq + m * NBp, 0, (m4 - m) * NBp);
    // words [g4][NBp]: the int8 of rows 4 g4 .. 4 g4 + 3 for block b, interleaved (a 4 x NB byte transpose)
    int8_t* zb = reinterpret_cast<int8_t*>(s.zw.data());
    for (int64_t g4 = 0; g4 < m4 / 4; ++g4) {
      const int8_t* r0 = zq + 4 * g4 * NBp;
      int8_t* o = zb + g4 * NBp * 4;
      int64_t b = 0;
#if defined(QK512) || defined(QK256)
      for (; b + 16 <= NBp; b += 16) {
        auto ld = [&](int t) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + t * NBp + b)); };
        const __m128i a = ld(0), bb = ld(1), c = ld(2), d = ld(3);
        const __m128i ab0 = _mm_unpacklo_epi8(a, bb), ab1 = _mm_unpackhi_epi8(a, bb);
        const __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
        auto st = [&](int k, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4 * (b + 4 * k)), v); };
        st(0, _mm_unpacklo_epi16(ab0, cd0)); st(1, _mm_unpackhi_epi16(ab0, cd0));
        st(2, _mm_unpacklo_epi16(ab1, cd1)); st(3, _mm_unpackhi_epi16(ab1, cd1));
      }
#endif
      for (; b < NBp; ++b)
        for (int t = 0; t < 4; ++t) o[4 * b + t] = r0[t * NBp + b];
    }
    const int32_t* zw = s.zw.data();
    q_cols_accum(W, idx + j0, m, s.acc.data(), [&](int64_t g4, int64_t b) { return static_cast<uint32_t>(zw[g4 * NBp + b]); });
    const int32_t* acc = s.acc.data();
    for (int64_t b = 0; b < NB; ++b) {
      const float sc = zs[b];
      const int32_t c = kint * s.corr[b];
      float* yb = y + b * QBLK;
      const int32_t* ab = acc + b * QBLK;
      for (int k = 0; k < QBLK; ++k) yb[k] += sc * static_cast<float>(ab[k] - c);
    }
  }
  if (q41)
    for (int64_t b = 0; b < NB; ++b) {
      float* yb = y + b * QBLK;
      for (int k = 0; k < QBLK; ++k) yb[k] += s.mb[b];
    }
}
