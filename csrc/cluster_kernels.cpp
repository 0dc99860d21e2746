// Compiled AWC iteration (CPU): bit-packed {0,1} patterns, popcount distances, balanced assignment,
// member counts and the centroid update.  Loaded by clustering/cluster_kernel.py through
// awq/kernel_build.py (torch.utils.cpp_extension.load); self-contained.
//
// Distance (active-only, AWC): D[r, c] = |a_r| - <a_r, c> = popcount(a_r AND NOT c), summed over the
// 64-bit words of the packed rows: one popcount instruction covers 64 neurons; exact int32.
// Every step reproduces the torch path of clustering/ bit for bit (same labels, same ties, same
// objective, same centroids): the assignment rules are those of clustering/assignment.py, and the
// floating-point update calls the same ATen ops in the same order as
// clustering.activation_aware_clustering.awc_update (only the two order statistics per row come from
// std::nth_element: the same values as numpy.partition).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline int popc(uint64_t x) { return __builtin_popcountll(x); }

std::string simd() {
#if defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// ------------------------------------------------------------------------------------------------
// packing: [n, F] {0,1} (float32 / uint8 / int8 / bool) -> uint64 [n, ceil(F/64)], bit j of word w = x[64w+j] != 0
// ------------------------------------------------------------------------------------------------
template <typename T>
inline uint64_t pack_word_scalar(const T* p, int64_t len) {
  uint64_t w = 0;
  for (int64_t j = 0; j < len; ++j) w |= static_cast<uint64_t>(p[j] != T(0)) << j;
  return w;
}

inline uint64_t pack_word(const float* p, int64_t len) {
#if defined(__AVX2__)
  if (len == 64) {
    const __m256 z = _mm256_setzero_ps();
    uint64_t w = 0;
    for (int q = 0; q < 8; ++q) {
      const __m256 v = _mm256_loadu_ps(p + 8 * q);
      w |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, z, _CMP_NEQ_UQ))) << (8 * q);
    }
    return w;
  }
#endif
  return pack_word_scalar(p, len);
}

inline uint64_t pack_word(const uint8_t* p, int64_t len) {
#if defined(__AVX2__)
  if (len == 64) {
    const __m256i z = _mm256_setzero_si256();
    const uint32_t lo = ~static_cast<uint32_t>(_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z)));
    const uint32_t hi = ~static_cast<uint32_t>(_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)), z)));
    return static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
  }
#endif
  return pack_word_scalar(p, len);
}

template <typename T>
void pack_impl(const T* x, int64_t n, int64_t F, uint64_t* out) {
  const int64_t W = (F + 63) / 64;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* p = x + r * F;
      uint64_t* o = out + r * W;
      for (int64_t w = 0; w < W; ++w) o[w] = pack_word(p + 64 * w, std::min<int64_t>(64, F - 64 * w));
    }
  });
}

torch::Tensor pack_rows(const torch::Tensor& X_) {
  TORCH_CHECK(X_.dim() == 2 && X_.device().is_cpu(), "pack_rows: X must be a 2-D CPU tensor");
  const int64_t n = X_.size(0), F = X_.size(1), W = (F + 63) / 64;
  auto out = torch::zeros({n, W}, X_.options().dtype(torch::kInt64));
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  if (X_.scalar_type() == torch::kFloat) {
    auto X = X_.contiguous();
    pack_impl(X.data_ptr<float>(), n, F, o);
  } else {
    auto X = (X_.scalar_type() == torch::kByte ? X_ : X_.ne(0).to(torch::kByte)).contiguous();
    pack_impl(X.data_ptr<uint8_t>(), n, F, o);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// distance: D[r, c] = sum_w popcount(x[r, w] & ~c[c, w]); also the first minimum of each row
// ------------------------------------------------------------------------------------------------
constexpr int64_t RB = 4;  // rows per pass: each centroid word is loaded once for RB rows

// The vector paths count bits with nibble table lookups (vpshufb) summed in byte counters (at most 31
// vectors: 31 * 8 < 256), widened by vpsadbw: 4 rows x 1 centroid per call, over the first 4*V words
// (AVX2: V vectors of 4 words) or 8*V words (AVX-512BW: V vectors of 8 words).
#if defined(__AVX2__)
inline __m256i popcnt_bytes(__m256i x) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(x, m4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}
inline int32_t hsum64(__m256i t) {
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  return static_cast<int32_t>(_mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1));
}
inline void andnot_popcount4(const uint64_t* const x[4], const uint64_t* cw, int64_t V, int32_t out[4]) {
  const __m256i z = _mm256_setzero_si256();
  __m256i t0 = z, t1 = z, t2 = z, t3 = z;
  for (int64_t v0 = 0; v0 < V; v0 += 31) {
    __m256i a0 = z, a1 = z, a2 = z, a3 = z;
    const int64_t v1 = std::min<int64_t>(V, v0 + 31);
    for (int64_t v = v0; v < v1; ++v) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cw + 4 * v));
#define AWQ_ACC(a, r) \
  a = _mm256_add_epi8(a, popcnt_bytes(_mm256_andnot_si256(   \
          c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + 4 * v)))))
      AWQ_ACC(a0, 0); AWQ_ACC(a1, 1); AWQ_ACC(a2, 2); AWQ_ACC(a3, 3);
#undef AWQ_ACC
    }
    t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(a0, z)); t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(a1, z));
    t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(a2, z)); t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(a3, z));
  }
  out[0] = hsum64(t0); out[1] = hsum64(t1); out[2] = hsum64(t2); out[3] = hsum64(t3);
}
#endif
#if defined(__AVX512BW__)
inline __m512i popcnt_bytes512(__m512i x) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_and_si512(x, m4), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
  return _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi));
}
inline void andnot_popcount4_512(const uint64_t* const x[4], const uint64_t* cw, int64_t V, int32_t out[4]) {
  const __m512i z = _mm512_setzero_si512();
  __m512i t0 = z, t1 = z, t2 = z, t3 = z;
  for (int64_t v0 = 0; v0 < V; v0 += 31) {
    __m512i a0 = z, a1 = z, a2 = z, a3 = z;
    const int64_t v1 = std::min<int64_t>(V, v0 + 31);
    for (int64_t v = v0; v < v1; ++v) {
      const __m512i c = _mm512_loadu_si512(cw + 8 * v);
#define AWQ_ACC(a, r) a = _mm512_add_epi8(a, popcnt_bytes512(_mm512_andnot_si512(c, _mm512_loadu_si512(x[r] + 8 * v))))
      AWQ_ACC(a0, 0); AWQ_ACC(a1, 1); AWQ_ACC(a2, 2); AWQ_ACC(a3, 3);
#undef AWQ_ACC
    }
    t0 = _mm512_add_epi64(t0, _mm512_sad_epu8(a0, z)); t1 = _mm512_add_epi64(t1, _mm512_sad_epu8(a1, z));
    t2 = _mm512_add_epi64(t2, _mm512_sad_epu8(a2, z)); t3 = _mm512_add_epi64(t3, _mm512_sad_epu8(a3, z));
  }
  out[0] = static_cast<int32_t>(_mm512_reduce_add_epi64(t0));
  out[1] = static_cast<int32_t>(_mm512_reduce_add_epi64(t1));
  out[2] = static_cast<int32_t>(_mm512_reduce_add_epi64(t2));
  out[3] = static_cast<int32_t>(_mm512_reduce_add_epi64(t3));
}
#endif
bool g_vector = true;  // use the vector popcount where compiled in (tests flip it to check both)

// words per vector of the widest path compiled in (0: scalar only)
constexpr int64_t vec_words() {
#if defined(__AVX512BW__)
  return 8;
#elif defined(__AVX2__)
  return 4;
#else
  return 0;
#endif
}

// sums of 4 rows x 1 centroid: the vector path over whole vectors, scalar popcount over the rest
inline void andnot_popcount_rows4(const uint64_t* const x[4], const uint64_t* cw, int64_t W, int32_t s[4]) {
  s[0] = s[1] = s[2] = s[3] = 0;
  int64_t w0 = 0;
  if (vec_words() > 0 && g_vector && W >= vec_words()) {
    const int64_t V = W / vec_words();
#if defined(__AVX512BW__)
    andnot_popcount4_512(x, cw, V, s);
#elif defined(__AVX2__)
    andnot_popcount4(x, cw, V, s);
#endif
    w0 = V * vec_words();
  }
  for (int64_t w = w0; w < W; ++w) {
    const uint64_t nc = ~cw[w];
    s[0] += popc(x[0][w] & nc); s[1] += popc(x[1][w] & nc); s[2] += popc(x[2][w] & nc); s[3] += popc(x[3][w] & nc);
  }
}

// out: row-major [n, k] (Transposed = false) or [k, n] (Transposed = true); amin/dmin: first minimum per row
template <bool Transposed>
void distance_impl(const uint64_t* X, const uint64_t* C, int64_t n, int64_t k, int64_t W, int32_t* D,
                   int64_t* amin, int32_t* dmin) {
  const int64_t blocks = (n + RB - 1) / RB;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k * W * RB, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
    std::vector<int32_t> tmp(RB * k);  // this row block's distances, [RB, k]
    std::vector<uint64_t> pad(RB * W, 0);  // a partial last block is padded with zero rows
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t r0 = blk * RB;
      const int64_t rows = std::min<int64_t>(RB, n - r0);
      const uint64_t* base = X + r0 * W;
      if (rows < RB) {
        std::copy(base, base + rows * W, pad.begin());
        base = pad.data();
      }
      const uint64_t* const xs[4] = {base, base + W, base + 2 * W, base + 3 * W};
      for (int64_t c = 0; c < k; ++c) {
        int32_t s[4];
        andnot_popcount_rows4(xs, C + c * W, W, s);
        tmp[c] = s[0]; tmp[k + c] = s[1]; tmp[2 * k + c] = s[2]; tmp[3 * k + c] = s[3];
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* t = tmp.data() + r * k;
        if (Transposed) { for (int64_t c = 0; c < k; ++c) D[c * n + r0 + r] = t[c]; }
        else std::copy(t, t + k, D + (r0 + r) * k);
        if (amin || dmin) {
          int32_t bv = INT_MAX;
          int64_t bc = 0;
          for (int64_t c = 0; c < k; ++c) if (t[c] < bv) { bv = t[c]; bc = c; }  // strict: the first minimum wins
          if (amin) amin[r0 + r] = bc;
          if (dmin) dmin[r0 + r] = bv;
        }
      }
    }
  });
}

const uint64_t* u64(const torch::Tensor& t) { return reinterpret_cast<const uint64_t*>(t.data_ptr<int64_t>()); }

void check_packed(const torch::Tensor& Xp, const torch::Tensor& Cp) {
  TORCH_CHECK(Xp.dim() == 2 && Cp.dim() == 2 && Xp.scalar_type() == torch::kInt64 &&
              Cp.scalar_type() == torch::kInt64 &&
              Xp.is_contiguous() && Cp.is_contiguous() && Xp.size(1) == Cp.size(1),
              "packed rows must be contiguous int64 [n, W] and [k, W] of the same W");
}

// int32 [n, k] distances of packed rows to packed centroids
torch::Tensor distance(const torch::Tensor& Xp, const torch::Tensor& Cp) {
  check_packed(Xp, Cp);
  const int64_t n = Xp.size(0), k = Cp.size(0);
  auto D = torch::empty({n, k}, Xp.options().dtype(torch::kInt32));
  if (n && k) distance_impl<false>(u64(Xp), u64(Cp), n, k, Xp.size(1), D.data_ptr<int32_t>(), nullptr, nullptr);
  return D;
}

// ------------------------------------------------------------------------------------------------
// balanced assignments (clustering/assignment.py rules, exact)
// ------------------------------------------------------------------------------------------------
// global: every pending row proposes to its first nearest centroid with capacity; each centroid accepts
// its proposals in (distance, row) order up to its remaining capacity; rejected rows propose again.
// D row-major [n, k]; prop/d: every row's first minimum over all centroids (round 1).
std::vector<int64_t> global_assign(const int32_t* D, int64_t n, int64_t k, int64_t cap, const int64_t* amin,
                                   const int32_t* dmin, int64_t maxd) {
  std::vector<int64_t> labels(n, -1);
  if (cap <= 0 || n == 0 || k == 0) return labels;
  std::vector<int64_t> hist(maxd + 1);  // distances lie in [0, maxd]
  std::vector<int64_t> remaining(k, cap), cnt(k), start(k + 1);
  std::vector<int32_t> rows(n), prop(n), d(n), order, next;
  for (int64_t r = 0; r < n; ++r) {
    rows[r] = static_cast<int32_t>(r);
    prop[r] = static_cast<int32_t>(amin[r]);
    d[r] = dmin[r];
  }
  std::vector<uint8_t> rejected;
  std::vector<uint64_t> keys;
  std::vector<int32_t> avail;
  while (true) {
    const int64_t m = static_cast<int64_t>(rows.size());
    // bucket the pending rows by proposed centroid (stable: increasing row order inside a bucket)
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t i = 0; i < m; ++i) ++cnt[prop[i]];
    start[0] = 0;
    for (int64_t c = 0; c < k; ++c) start[c + 1] = start[c] + cnt[c];
    order.resize(m);
    {
      std::vector<int64_t> pos(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < m; ++i) order[pos[prop[i]]++] = static_cast<int32_t>(i);
    }
    rejected.assign(m, 0);
    int64_t n_rej = 0;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t s = start[c], len = cnt[c], rem = remaining[c];
      if (len == 0) continue;
      if (len <= rem) {
        for (int64_t j = s; j < s + len; ++j) labels[rows[order[j]]] = c;
        remaining[c] -= len;
        continue;
      }
      if (4 * len > maxd) {  // many proposals: a histogram of their distances gives the cut in O(len + maxd)
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t j = s; j < s + len; ++j) ++hist[d[order[j]]];
        int64_t v = 0, below = 0;
        while (below + hist[v] < rem) below += hist[v++];
        int64_t ties = rem - below;  // proposals at distance v to accept, in row order
        for (int64_t j = s; j < s + len; ++j) {
          const int32_t i = order[j];
          if (d[i] < v || (d[i] == v && ties > 0)) { labels[rows[i]] = c; if (d[i] == v) --ties; }
          else { rejected[i] = 1; ++n_rej; }
        }
        remaining[c] = 0;
        continue;
      }
      keys.resize(len);  // (distance, row) order; pending index i is increasing with the row
      for (int64_t j = 0; j < len; ++j) {
        const int32_t i = order[s + j];
        keys[j] = (static_cast<uint64_t>(static_cast<uint32_t>(d[i])) << 32) | static_cast<uint32_t>(i);
      }
      if (rem > 0) std::nth_element(keys.begin(), keys.begin() + (rem - 1), keys.end());
      const uint64_t kth = rem > 0 ? keys[rem - 1] : 0;
      for (int64_t j = 0; j < len; ++j) {
        const int32_t i = static_cast<int32_t>(keys[j] & 0xffffffffu);
        if (rem > 0 && keys[j] <= kth) labels[rows[i]] = c;
        else { rejected[i] = 1; ++n_rej; }
      }
      remaining[c] = 0;
    }
    if (n_rej == 0) break;
    avail.clear();
    for (int64_t c = 0; c < k; ++c) if (remaining[c] > 0) avail.push_back(static_cast<int32_t>(c));
    if (avail.empty()) break;
    next.clear();
    for (int64_t i = 0; i < m; ++i) if (rejected[i]) next.push_back(rows[i]);
    rows.swap(next);
    const int64_t mr = static_cast<int64_t>(rows.size()), na = static_cast<int64_t>(avail.size());
    prop.resize(mr);
    d.resize(mr);
    at::parallel_for(0, mr, std::max<int64_t>(1, 16384 / std::max<int64_t>(na, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int32_t* row = D + static_cast<int64_t>(rows[i]) * k;
        int32_t bv = INT_MAX, bc = 0;
        for (int64_t j = 0; j < na; ++j) {
          const int32_t v = row[avail[j]];
          if (v < bv) { bv = v; bc = avail[j]; }
        }
        prop[i] = bc;
        d[i] = bv;
      }
    });
  }
  return labels;
}

// greedy (artifact's centroid order): centroid i takes the min(cap, left) free rows with the smallest
// D[:, i], ties -> lower row.  DT column-major [k, n] (row c = distances to centroid c); values in [0, F].
std::vector<int64_t> greedy_assign(const int32_t* DT, int64_t n, int64_t k, int64_t cap, int64_t F) {
  std::vector<int64_t> labels(n, -1);
  if (cap <= 0) return labels;
  std::vector<int32_t> freel(n), keep;
  for (int64_t r = 0; r < n; ++r) freel[r] = static_cast<int32_t>(r);
  std::vector<int64_t> hist(F + 1);
  keep.reserve(n);
  int64_t left = n;
  for (int64_t c = 0; c < k && left > 0; ++c) {
    const int64_t m = std::min(cap, left);
    const int32_t* col = DT + c * n;
    std::fill(hist.begin(), hist.end(), 0);
    for (const int32_t r : freel) ++hist[col[r]];
    int64_t v = 0, below = 0;
    while (below + hist[v] < m) below += hist[v++];
    int64_t ties = m - below;  // rows with distance v to take, lowest rows first
    keep.clear();
    for (const int32_t r : freel) {
      const int64_t dv = col[r];
      if (dv < v || (dv == v && ties > 0)) { labels[r] = c; if (dv == v) --ties; }
      else keep.push_back(r);
    }
    freel.swap(keep);
    left -= m;
  }
  return labels;
}

torch::Tensor vec_to_tensor(const std::vector<int64_t>& v) {
  auto t = torch::empty({static_cast<int64_t>(v.size())}, torch::kInt64);
  if (!v.empty()) std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return t;
}

// test entry points: D int32 [n, k] row-major
torch::Tensor assign_global(const torch::Tensor& D_, int64_t cap) {
  auto D = D_.to(torch::kInt32).contiguous();
  const int64_t n = D.size(0), k = D.size(1);
  auto mn = n && k ? D.min(1) : std::make_tuple(torch::zeros({n}, torch::kInt32), torch::zeros({n}, torch::kInt64));
  auto dmin = std::get<0>(mn).to(torch::kInt32).contiguous(), amin = std::get<1>(mn).contiguous();
  TORCH_CHECK(D.numel() == 0 || D.min().item<int32_t>() >= 0, "assign_global: distances must be >= 0");
  const int64_t maxd = D.numel() ? D.max().item<int32_t>() : 0;
  return vec_to_tensor(global_assign(D.data_ptr<int32_t>(), n, k, cap, amin.data_ptr<int64_t>(),
                                     dmin.data_ptr<int32_t>(), maxd));
}

torch::Tensor assign_greedy(const torch::Tensor& D_, int64_t cap) {
  auto DT = D_.to(torch::kInt32).t().contiguous();
  TORCH_CHECK(DT.numel() == 0 || DT.min().item<int32_t>() >= 0, "assign_greedy: distances must be >= 0");
  const int64_t F = DT.numel() ? DT.max().item<int32_t>() : 0;
  return vec_to_tensor(greedy_assign(DT.data_ptr<int32_t>(), DT.size(1), DT.size(0), cap, F));
}

// ------------------------------------------------------------------------------------------------
// member counts: S[c, f] = number of rows labelled c with bit f set (labels -1 skipped)
// ------------------------------------------------------------------------------------------------
// byte-expansion table: LUT[b] has byte j = bit j of b, so adding LUT[byte] to a uint64 bumps 8 byte counters
struct Lut {
  uint64_t v[256];
  Lut() {
    for (int b = 0; b < 256; ++b) {
      uint64_t x = 0;
      for (int j = 0; j < 8; ++j) x |= static_cast<uint64_t>((b >> j) & 1) << (8 * j);
      v[b] = x;
    }
  }
};
const Lut LUT;

torch::Tensor member_counts_impl(const uint64_t* X, int64_t n, int64_t W, int64_t F, const int64_t* lab, int64_t k,
                                 std::vector<int64_t>& counts) {
  counts.assign(k, 0);
  for (int64_t r = 0; r < n; ++r) if (lab[r] >= 0) ++counts[lab[r]];
  std::vector<int64_t> start(k + 1, 0);
  for (int64_t c = 0; c < k; ++c) start[c + 1] = start[c] + counts[c];
  std::vector<int32_t> members(start[k]);
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < n; ++r) if (lab[r] >= 0) members[pos[lab[r]]++] = static_cast<int32_t>(r);
  }
  auto S = torch::zeros({k, F}, torch::kFloat);
  float* Sp = S.data_ptr<float>();
  at::parallel_for(0, k, 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> acc(W * 8);
    std::vector<int64_t> tot(W * 64);
    for (int64_t c = b; c < e; ++c) {
      if (counts[c] == 0) continue;
      std::fill(tot.begin(), tot.end(), 0);
      for (int64_t s0 = start[c]; s0 < start[c + 1]; s0 += 255) {  // byte counters hold up to 255
        std::fill(acc.begin(), acc.end(), 0);
        const int64_t s1 = std::min<int64_t>(s0 + 255, start[c + 1]);
        for (int64_t s = s0; s < s1; ++s) {
          const uint64_t* x = X + static_cast<int64_t>(members[s]) * W;
          for (int64_t w = 0; w < W; ++w) {
            const uint64_t v = x[w];
            uint64_t* a = acc.data() + 8 * w;
            for (int q = 0; q < 8; ++q) a[q] += LUT.v[(v >> (8 * q)) & 0xff];
          }
        }
        for (int64_t i = 0; i < W * 8; ++i)
          for (int j = 0; j < 8; ++j) tot[8 * i + j] += (acc[i] >> (8 * j)) & 0xff;
      }
      float* out = Sp + c * F;
      for (int64_t f = 0; f < F; ++f) out[f] = static_cast<float>(tot[f]);
    }
  });
  return S;
}

torch::Tensor member_counts(const torch::Tensor& Xp, const torch::Tensor& labels_, int64_t k, int64_t F) {
  TORCH_CHECK(Xp.dim() == 2 && Xp.scalar_type() == torch::kInt64 && Xp.is_contiguous() && Xp.size(1) == (F + 63) / 64,
              "member_counts: packed rows must be contiguous int64 [n, ceil(F/64)]");
  auto lab = labels_.to(torch::kInt64).contiguous();
  TORCH_CHECK(lab.numel() == Xp.size(0), "member_counts: one label per row");
  std::vector<int64_t> counts;
  return member_counts_impl(u64(Xp), Xp.size(0), Xp.size(1), F, lab.data_ptr<int64_t>(), k, counts);
}

// ------------------------------------------------------------------------------------------------
// centroid update, bit-identical to clustering.activation_aware_clustering.awc_update / row_quantile:
// the same IEEE float32 operations in the same order (no contraction: built with -ffp-contract=off; torch
// divides by a scalar with a true division), the same two order statistics, and ATen's own lerp
// ------------------------------------------------------------------------------------------------
torch::Tensor awc_update(const torch::Tensor& C_, const torch::Tensor& S_, const torch::Tensor& counts_, int64_t t,
                         int64_t cap, double p, int64_t chunk) {
  auto C = C_.to(torch::kFloat).contiguous(), S = S_.to(torch::kFloat).contiguous();
  auto counts = counts_.to(torch::kInt64).contiguous();
  const int64_t k = C.size(0), F = C.size(1);
  TORCH_CHECK(S.size(0) == k && S.size(1) == F && counts.numel() == k && chunk > 0, "awc_update: shapes");
  auto out = C.clone();
  if (F == 0) return out;
  const float* Cp = C.data_ptr<float>();
  const float* Sp = S.data_ptr<float>();
  const int64_t* cn = counts.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> idx;
  for (int64_t c = 0; c < k; ++c) if (cn[c] > 0) idx.push_back(c);
  const float fh = static_cast<float>(t * cap), fc = static_cast<float>(cap), fd = static_cast<float>(t * cap + cap);
  // row_quantile: ranks = float32(p) * (F - 1); below / above order statistics; w = ranks - below
  const float ranks = static_cast<float>(p) * static_cast<float>(F - 1);
  const int64_t bi = static_cast<int64_t>(ranks), ai = static_cast<int64_t>(std::ceil(ranks));
  auto w = torch::scalar_tensor(ranks - static_cast<float>(bi), torch::kFloat);
  const int64_t nidx = static_cast<int64_t>(idx.size());
  std::vector<float> s;
  for (int64_t s0 = 0; s0 < nidx; s0 += chunk) {
    const int64_t rows = std::min(chunk, nidx - s0);
    s.resize(rows * F);
    auto vb = torch::empty({rows}, torch::kFloat), va = torch::empty({rows}, torch::kFloat);
    float *vbp = vb.data_ptr<float>(), *vap = va.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / F), [&](int64_t b, int64_t e) {
      std::vector<float> buf(F);
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = idx[s0 + r];
        const float cnt = static_cast<float>(cn[c]);
        float* sr = s.data() + r * F;
        for (int64_t f = 0; f < F; ++f) {
          const float mu = Sp[c * F + f] / cnt;
          const float hist = fh * Cp[c * F + f];
          const float cur = fc * mu;
          sr[f] = (hist + cur) / fd;
        }
        std::copy(sr, sr + F, buf.begin());
        std::nth_element(buf.begin(), buf.begin() + bi, buf.end());
        vbp[r] = buf[bi];
        vap[r] = ai == bi ? buf[bi] : *std::min_element(buf.begin() + bi + 1, buf.end());
      }
    });
    auto q = vb.lerp(va, w);
    const float* qp = q.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* sr = s.data() + r * F;
      float* o = op + idx[s0 + r] * F;
      for (int64_t f = 0; f < F; ++f) o[f] = sr[f] > qp[r] ? 1.f : 0.f;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// one AWC block: pack, distances, balanced assignment, leftovers, objective, member counts, update
// ------------------------------------------------------------------------------------------------
// X [n, F] {0,1} (float32 / uint8 / int8 / bool); C float32 [k, F] {0,1}.  greedy: artifact's centroid
// order, else global.  nearest: leftovers go to their first nearest centroid (else stay -1).  t: the
// update weight (iteration * block index).  Returns (C', labels int64 [n], objective, unassigned, empty).
std::tuple<torch::Tensor, torch::Tensor, double, int64_t, int64_t> awc_block(
    const torch::Tensor& X, const torch::Tensor& C, int64_t cap, bool greedy, bool nearest, int64_t t, double p,
    int64_t chunk) {
  TORCH_CHECK(X.dim() == 2 && C.dim() == 2 && X.size(1) == C.size(1) && C.scalar_type() == torch::kFloat,
              "awc_block: X [n, F] and float32 C [k, F] expected");
  const int64_t n = X.size(0), k = C.size(0), F = X.size(1), W = (F + 63) / 64;
  auto Xp = pack_rows(X), Cp = pack_rows(C);
  auto D = torch::empty({n, k}, torch::kInt32);
  std::vector<int64_t> amin(n);
  std::vector<int32_t> dmin(n);
  if (n && k) {
    if (greedy) distance_impl<true>(u64(Xp), u64(Cp), n, k, W, D.data_ptr<int32_t>(), amin.data(), dmin.data());
    else distance_impl<false>(u64(Xp), u64(Cp), n, k, W, D.data_ptr<int32_t>(), amin.data(), dmin.data());
  }
  const int32_t* Dp = D.data_ptr<int32_t>();
  std::vector<int64_t> lab = greedy ? greedy_assign(Dp, n, k, cap, F)
                                    : global_assign(Dp, n, k, cap, amin.data(), dmin.data(), F);
  int64_t obj = 0, unassigned = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (lab[r] < 0 && nearest && k > 0) lab[r] = amin[r];
    if (lab[r] < 0) { ++unassigned; continue; }
    obj += greedy ? Dp[lab[r] * n + r] : Dp[r * k + lab[r]];
  }
  std::vector<int64_t> counts;
  auto S = member_counts_impl(u64(Xp), n, W, F, lab.data(), k, counts);
  int64_t empty = 0;
  for (int64_t c = 0; c < k; ++c) empty += counts[c] == 0;
  auto Cn = awc_update(C, S, vec_to_tensor(counts), t, cap, p, chunk);
  return {Cn, vec_to_tensor(lab), static_cast<double>(obj), unassigned, empty};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd", &simd, "vector path compiled in");
  m.def("set_vector", [](bool on) { g_vector = on; }, "use (default) or skip the vector popcount path");
  m.def("pack_rows", &pack_rows, "pack {0,1} rows [n, F] into int64 words [n, ceil(F/64)]");
  m.def("distance", &distance, "active-only distances int32 [n, k] of packed rows to packed centroids");
  m.def("assign_global", &assign_global, "global balanced assignment of an integer distance matrix");
  m.def("assign_greedy", &assign_greedy, "greedy (centroid order) balanced assignment of an integer distance matrix");
  m.def("member_counts", &member_counts, "per-cluster feature counts float32 [k, F] of packed rows");
  m.def("awc_update", &awc_update, "AWC centroid update (as clustering.activation_aware_clustering.awc_update)");
  m.def("awc_block", &awc_block, "one AWC block: (C', labels, objective, unassigned, empty clusters)");
}
