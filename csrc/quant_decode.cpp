// One batch-1 decode step of a Llama/Qwen2/Mistral model on block-quantised weights in one call
// (awq/quant_decode.py QuantStep, used by awq/decode.py LeanDecoder(weights="q8_0"|"q4_0"|"q4_1")).
//
// Every linear layer of the step (q/k/v, o, gate/up, down, LM head) is a quantised GEMV of
// csrc/quant_simd.h on the activation quantised to int8 blocks (as llama.cpp); the KV cache is float16
// (llama.cpp's default).  The whole step is ONE OpenMP parallel region: each thread keeps its own copy
// of the residual stream and recomputes the cheap vector work (RMSNorm, activation quantisation, the
// sparse selections) redundantly, so the only synchronisation is a barrier after each GEMV phase
// (5 per layer dense; row phases handed out in chunks from an atomic counter; the input-major sparse
// phases split by input block into per-thread partial outputs summed after the barrier).
//
// MLP kinds per layer (the sparse ones mirror the fp32 kernels of csrc/sparse_mlp.cpp):
//   0 dense:   [g; u] = Wgu x, h = silu(g) u, y = Wd h
//   1 input:   TEAL / WINA: keep x_i with |x_i| s_i >= t_x, [g; u] from the kept input rows of the
//              input-major layout of Wgu; h = silu(g) u; keep |h_n| s_n >= t_h; y from the kept rows of Wd's cols
//   ("cols" here and below: the input-major layout of a matrix, cols or tcols of csrc/quant_simd.h)
//   2 cats:    g = Wg x (all rows); keep |silu(g_n)| >= t_a; u from those rows of Wu; y from Wd's cols
//   3 paper:   [g; u] = Wgu x; g, u below t_g, t_u -> 0; h = silu(g) u; y from Wd's cols of nonzero h;
//              |y| < t_d -> 0
//   4 fixed:   a fixed neuron set: those rows of Wg, Wu, those input rows of Wd's cols (thresholds t_g, t_u)
// counts (int64 [layers, 6], accumulated): active x entries, x blocks with one, active h entries /
// neurons, their blocks, gate rows read, up rows read.
#include "quant_simd.h"

namespace {

#if defined(QK512)
inline __m512 vexp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#elif defined(QK256)
inline __m256 vexp(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// out[i] = silu(g[i]) * u[i]
void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#if defined(QK512)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
  }
#elif defined(QK256)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, vexp(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) out[i] = silu(g[i]) * u[i];
}

// s[0..n) = exp(s - max) / sum, in place
void softmax(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  float sum = 0.f;
  int64_t i = 0;
#if defined(QK512)
  __m512 vs = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(mx);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
    _mm512_storeu_ps(s + i, e);
    vs = _mm512_add_ps(vs, e);
  }
  sum = _mm512_reduce_add_ps(vs);
#elif defined(QK256)
  __m256 vs = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(mx);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = vexp(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  sum = hsum8(vs);
#endif
  for (; i < n; ++i) { s[i] = std::exp(s[i] - mx); sum += s[i]; }
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// <k (float16 bits), q>
inline float dot_h(const uint16_t* k, const float* q, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(QK512)
  __m512 a = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16)
    a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + i))),
                        _mm512_loadu_ps(q + i), a);
  s = _mm512_reduce_add_ps(a);
#elif defined(QK256)
  __m256 a = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8)
    a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i))),
                        _mm256_loadu_ps(q + i), a);
  s = hsum8(a);
#endif
  for (; i < n; ++i) s += qh2f(k[i]) * q[i];
  return s;
}

// out += a * v (float16 bits)
inline void axpy_h(float* out, float a, const uint16_t* v, int64_t n) {
  int64_t i = 0;
#if defined(QK512)
  const __m512 va = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(va, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i))),
                                              _mm512_loadu_ps(out + i)));
#elif defined(QK256)
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(va, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i))),
                                              _mm256_loadu_ps(out + i)));
#endif
  for (; i < n; ++i) out[i] += a * qh2f(v[i]);
}

void rms_norm(float* out, const float* h, const float* w, int64_t H, float eps) {
  float ss = 0.f;
  int64_t i = 0;
#if defined(QK512)
  __m512 a = _mm512_setzero_ps();
  for (; i + 16 <= H; i += 16) { const __m512 v = _mm512_loadu_ps(h + i); a = _mm512_fmadd_ps(v, v, a); }
  ss = _mm512_reduce_add_ps(a);
#elif defined(QK256)
  __m256 a = _mm256_setzero_ps();
  for (; i + 8 <= H; i += 8) { const __m256 v = _mm256_loadu_ps(h + i); a = _mm256_fmadd_ps(v, v, a); }
  ss = hsum8(a);
#endif
  for (; i < H; ++i) ss += h[i] * h[i];
  const float s = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t j = 0; j < H; ++j) out[j] = w[j] * (h[j] * s);
}

// rows handed out per grab of a dense product: at least kMinChunkBytes of weights, else (guided, as OpenMP's
// schedule(guided)) half the remaining rows' share per thread.  Measured (AMD EPYC, 2 threads, lean dense decode):
// fixed 16 KiB grabs ran SmolLM2 Q8_0 at 8.3 ms/token and Qwen2.5-0.5B Q8_0 at 25 ms/token, guided grabs of at
// least 64 KiB at 5.1 and 14-16 ms: every grab is an atomic on a line both cores write and breaks a thread's
// sequential stream, which the hardware prefetcher must pick up again.
constexpr int64_t kMinChunkBytes = 65536;

struct RowsMat {
  int fmt = 0;
  int64_t R = 0, C = 0, rb = 0, chunk = 4;
  torch::Tensor t;
  const uint8_t* p = nullptr;
};

RowsMat make_rows(const torch::Tensor& t, int64_t fmt, int64_t C, const char* what) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, what, ": fmt 0, 1 or 2");
  TORCH_CHECK(C % QBLK == 0, what, ": inputs a multiple of 32");
  TORCH_CHECK(t.scalar_type() == torch::kUInt8 && t.dim() == 2 && t.is_contiguous() &&
              t.size(1) == q_row_bytes(static_cast<int>(fmt), C), what, ": packed rows [R, row bytes] of width ", C);
  RowsMat m;
  m.fmt = static_cast<int>(fmt); m.R = t.size(0); m.C = C; m.rb = t.size(1); m.t = t; m.p = t.data_ptr<uint8_t>();
  m.chunk = std::max<int64_t>(4, (kMinChunkBytes / m.rb + 3) / 4 * 4);
  return m;
}

struct ColsMat {
  QColsView v;
  torch::Tensor q, ds, ms;
  bool tcols = false;  // the output-blocked layout (scales [C, Rp/32])
};

ColsMat make_cols(const torch::Tensor& q, const torch::Tensor& ds, const torch::Tensor& ms, int64_t fmt, int64_t R,
                  int64_t C, const char* what, int64_t layout) {
  TORCH_CHECK(layout == 0 || layout == 1, what, ": layout 0 (cols) or 1 (tcols)");
  TORCH_CHECK(fmt >= 0 && fmt <= 2, what, ": fmt 0, 1 or 2");
  const int64_t Rp = q_pad64(R), nb = C / QBLK;
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous() && q.size(0) == C &&
              q.size(1) == q_quant_bytes(static_cast<int>(fmt), Rp), what, ": packed cols [", C, ", row bytes]");
  TORCH_CHECK(ds.scalar_type() == torch::kHalf && ds.is_contiguous() && ds.numel() == nb * Rp, what, ": ds [C/32, Rp]");
  if (fmt == QF_Q4_1)
    TORCH_CHECK(ms.scalar_type() == torch::kHalf && ms.is_contiguous() && ms.numel() == nb * Rp, what, ": ms [C/32, Rp]");
  ColsMat c;
  c.q = q; c.ds = ds; c.ms = ms; c.tcols = layout == 1;  // both layouts hold C * Rp / 32 scales
  c.v.fmt = static_cast<int>(fmt); c.v.R = R; c.v.C = C; c.v.Rp = Rp; c.v.rowb = q.size(1);
  c.v.q = q.data_ptr<uint8_t>();
  c.v.ds = reinterpret_cast<const uint16_t*>(ds.data_ptr<at::Half>());
  c.v.ms = fmt == QF_Q4_1 ? reinterpret_cast<const uint16_t*>(ms.data_ptr<at::Half>()) : nullptr;
  return c;
}

const float* opt_f32(const torch::Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, what, ": float32 [", n, "]");
  return t.data_ptr<float>();
}

struct Mlp {
  int kind = -1;
  RowsMat gu, d;
  ColsMat gu_t, d_t;
  float t_x = 0, t_h = 0, t_a = 0, t_g = 0, t_u = 0, t_d = 0;
  torch::Tensor xs, hs, fixed_idx, fixed_rows;
};

struct Layer {
  torch::Tensor ln1, ln2, bqkv, bo, kc, vc;
  RowsMat qkv, o;
  int64_t window = 0;
  Mlp mlp;
};

struct Scratch {
  std::vector<float> h, n, a, q, k, sc, val;
  QAct act, act2;
  QSparseAct sact;
  QTScratch tsc;
  std::vector<int32_t> idx, acc;
  std::vector<int64_t> rows, bounds;
};

}  // namespace

class QDecoder {
 public:
  QDecoder(int64_t H, int64_t nh, int64_t nkv, int64_t hd, int64_t F, double eps, torch::Tensor norm,
           torch::Tensor head, int64_t head_fmt, torch::Tensor embed, int64_t embed_fmt)
      : H_(H), nh_(nh), nkv_(nkv), hd_(hd), F_(F), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0 && hd % 2 == 0, "heads: nh a multiple of nkv, even head_dim");
    TORCH_CHECK(H % QBLK == 0 && F % QBLK == 0 && (nh * hd) % QBLK == 0, "sizes: multiples of 32");
    norm_ = norm.contiguous();
    TORCH_CHECK(norm_.scalar_type() == torch::kFloat && norm_.numel() == H, "norm: float32 [H]");
    head_ = make_rows(head, head_fmt, H, "head");
    embed_ = make_rows(embed, embed_fmt, H, "embed");
  }

  void add_layer(torch::Tensor ln1, torch::Tensor ln2, torch::Tensor wqkv, int64_t fmt_qkv, torch::Tensor bqkv,
                 torch::Tensor wo, int64_t fmt_o, torch::Tensor bo, int64_t window) {
    Layer L;
    L.ln1 = ln1.contiguous(); L.ln2 = ln2.contiguous();
    TORCH_CHECK(L.ln1.scalar_type() == torch::kFloat && L.ln1.numel() == H_ && L.ln2.numel() == H_, "ln: float32 [H]");
    L.qkv = make_rows(wqkv, fmt_qkv, H_, "wqkv");
    TORCH_CHECK(L.qkv.R == (nh_ + 2 * nkv_) * hd_, "wqkv: (nh + 2 nkv) * head_dim rows");
    L.o = make_rows(wo, fmt_o, nh_ * hd_, "wo");
    TORCH_CHECK(L.o.R == H_, "wo: H rows");
    L.bqkv = bqkv; L.bo = bo;
    opt_f32(bqkv, L.qkv.R, "bqkv"); opt_f32(bo, H_, "bo");
    L.window = window;
    layers_.push_back(std::move(L));
    counts_ = torch::zeros({static_cast<int64_t>(layers_.size()), 6}, torch::kLong);
  }

  void set_cache(int64_t l, torch::Tensor k, torch::Tensor v) {
    Layer& L = layer(l);
    const auto dt = k.scalar_type();
    TORCH_CHECK((dt == torch::kHalf || dt == torch::kFloat) && k.dim() == 3 && k.size(0) == nkv_ &&
                k.size(2) == hd_ && k.is_contiguous() && v.sizes() == k.sizes() && v.scalar_type() == dt &&
                v.is_contiguous(), "cache: float16 or float32 [nkv, capacity, head_dim]");
    L.kc = k; L.vc = v;
  }

  void set_rope(torch::Tensor table) {
    TORCH_CHECK(table.scalar_type() == torch::kFloat && table.is_contiguous() && table.dim() == 3 &&
                table.size(1) == hd_ / 2 && table.size(2) == 2, "rope: float32 [capacity, head_dim/2, 2]");
    rope_ = table;
  }

  void mlp_dense(int64_t l, torch::Tensor wgu, torch::Tensor wd, int64_t fmt_gu, int64_t fmt_d) {
    Mlp m;
    m.kind = 0;
    m.gu = make_rows(wgu, fmt_gu, H_, "wgu");
    m.d = make_rows(wd, fmt_d, F_, "wd");
    TORCH_CHECK(m.gu.R == 2 * F_ && m.d.R == H_, "dense MLP: wgu [2F, H], wd [H, F]");
    layer(l).mlp = std::move(m);
  }

  void mlp_input(int64_t l, torch::Tensor gq, torch::Tensor gds, torch::Tensor gms, torch::Tensor dq, torch::Tensor dds,
                 torch::Tensor dms, int64_t fmt, double t_x, double t_h, torch::Tensor xs, torch::Tensor hs,
                 int64_t layout) {
    Mlp m;
    m.kind = 1;
    m.gu_t = make_cols(gq, gds, gms, fmt, 2 * F_, H_, "wgu cols", layout);
    m.d_t = make_cols(dq, dds, dms, fmt, H_, F_, "wd cols", layout);
    m.t_x = static_cast<float>(t_x); m.t_h = static_cast<float>(t_h);
    m.xs = xs.contiguous(); m.hs = hs.contiguous();
    opt_f32(m.xs, H_, "x_scale"); opt_f32(m.hs, F_, "h_scale");
    layer(l).mlp = std::move(m);
  }

  void mlp_neuron(int64_t l, int64_t kind, torch::Tensor wgu, int64_t fmt_gu, torch::Tensor dq, torch::Tensor dds,
                  torch::Tensor dms, int64_t fmt_d, double t_a, double t_g, double t_u, double t_d, torch::Tensor idx,
                  int64_t layout) {
    TORCH_CHECK(kind >= 2 && kind <= 4, "kind: 2 (cats), 3 (paper) or 4 (fixed set)");
    Mlp m;
    m.kind = static_cast<int>(kind);
    m.gu = make_rows(wgu, fmt_gu, H_, "wgu");
    TORCH_CHECK(m.gu.R == 2 * F_, "wgu: [2F, H]");
    m.d_t = make_cols(dq, dds, dms, fmt_d, H_, F_, "wd cols", layout);
    m.t_a = static_cast<float>(t_a); m.t_g = static_cast<float>(t_g); m.t_u = static_cast<float>(t_u);
    m.t_d = static_cast<float>(t_d);
    if (kind == 4) {
      TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.dim() == 1, "idx: int64 [k]");
      auto s = std::get<0>(idx.sort());
      const int64_t* ip = s.data_ptr<int64_t>();
      for (int64_t j = 0; j < s.numel(); ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < F_ && (j == 0 || ip[j] > ip[j - 1]),
                                                          "idx: distinct neurons in range");
      m.fixed_idx = s.contiguous();
      m.fixed_rows = torch::cat({s, s + F_}).contiguous();
    }
    layer(l).mlp = std::move(m);
  }

  torch::Tensor step(int64_t token, int64_t pos) {
    auto logits = torch::empty({head_.R}, torch::kFloat);
    run(token, pos, logits.data_ptr<float>());
    return logits;
  }

  // run tokens ids at positions pos0.. (the cache filled); logits of the last one
  torch::Tensor prefill(torch::Tensor ids, int64_t pos0) {
    TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1 && ids.numel() > 0, "ids: int64 [T]");
    const int64_t* ip = ids.data_ptr<int64_t>();
    const int64_t T = ids.numel();
    for (int64_t t = 0; t + 1 < T; ++t) run(ip[t], pos0 + t, nullptr);
    return step(ip[T - 1], pos0 + T - 1);
  }

  void set_min_bytes(int64_t b) { min_bytes_ = b; }
  torch::Tensor counts() const { return counts_; }
  void reset_counts() { counts_.zero_(); }

 private:
  Layer& layer(int64_t l) {
    TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(layers_.size()), "layer index out of range");
    return layers_[l];
  }

  void ensure(int nt) {
    const int64_t R = (nh_ + 2 * nkv_) * hd_, A = nh_ * hd_, cap = rope_.defined() ? rope_.size(0) : 0;
    if (static_cast<int>(ts_.size()) != nt || cap_ != cap) {
      ts_.assign(nt, Scratch());
      for (auto& s : ts_) {
        s.h.assign(H_, 0.f); s.n.assign(std::max(H_, A), 0.f); s.a.assign(2 * F_, 0.f); s.q.assign(hd_, 0.f);
        s.k.assign(hd_, 0.f); s.sc.assign(cap + 16, 0.f); s.val.assign(std::max(H_, 2 * F_), 0.f);
        s.acc.assign(q_pad64(std::max(H_, 2 * F_)), 0);
      }
      qkv_.assign(R, 0.f); att_.assign(A, 0.f); o_.assign(H_, 0.f); gu_.assign(2 * F_, 0.f); y_.assign(H_, 0.f);
      gu_part_.assign(nt, std::vector<float>(q_pad64(2 * F_), 0.f));
      y_part_.assign(nt, std::vector<float>(q_pad64(H_), 0.f));
      cap_ = cap;
    }
    const size_t nctr = 8 * layers_.size() + 8;
    if (ctr_.size() != nctr) ctr_ = std::vector<std::atomic<int64_t>>(nctr);
    for (auto& c : ctr_) c.store(0, std::memory_order_relaxed);
  }

  // rows [0, n) (or the listed rows) of W x into y, chunks handed out by the counter; + bias
  void dyn_rows(const RowsMat& W, const int64_t* rows, int64_t n, const QAct& a, float* y, std::atomic<int64_t>& ctr,
                const float* bias) {
    const int64_t nt = static_cast<int64_t>(ts_.size());
    int64_t j0 = ctr.load(std::memory_order_relaxed);
    while (j0 < n) {
      const int64_t ch = std::max(W.chunk, ((n - j0) / (2 * nt) + 3) / 4 * 4);
      if (!ctr.compare_exchange_weak(j0, j0 + ch, std::memory_order_relaxed)) continue;
      const int64_t j1 = std::min(n, j0 + ch);
      q_rows(W.fmt, W.p, W.C, rows, j0, j1, a, y);
      if (bias)
        for (int64_t j = j0; j < j1; ++j) y[j] += bias[j];
      j0 = ctr.load(std::memory_order_relaxed);
    }
  }

  void attention(const Layer& L, int tid, int nt, Scratch& s, int64_t p, const float* rope) {
    const int64_t g = nh_ / nkv_, hd = hd_, half = hd / 2, cap = L.kc.size(1);
    const int64_t lo = L.window > 0 ? std::max<int64_t>(0, p + 1 - L.window) : 0, n = p + 1 - lo;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    auto roped = [&](const float* v, float* out, float mul) {
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1], c = rope[2 * i], sn = rope[2 * i + 1];
        out[2 * i] = (a * c - b * sn) * mul;
        out[2 * i + 1] = (a * sn + b * c) * mul;
      }
    };
    const bool f32 = L.kc.scalar_type() == torch::kFloat;
    const auto* K = reinterpret_cast<const uint16_t*>(L.kc.data_ptr());
    const auto* V = reinterpret_cast<const uint16_t*>(L.vc.data_ptr());
    const float* Kf = reinterpret_cast<const float*>(L.kc.data_ptr());
    const float* Vf = reinterpret_cast<const float*>(L.vc.data_ptr());
    const int64_t q0 = nh_ * tid / nt, q1 = nh_ * (tid + 1) / nt;
    int64_t kv_done = -1;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t kvh = q / g;
      roped(qkv_.data() + q * hd, s.q.data(), scale);
      if (kv_done != kvh) { roped(qkv_.data() + (nh_ + kvh) * hd, s.k.data(), 1.f); kv_done = kvh; }
      const float* vp = qkv_.data() + (nh_ + nkv_ + kvh) * hd;
      const int64_t base = (kvh * cap + lo) * hd;
      float* sc = s.sc.data();
      if (f32) for (int64_t t = 0; t + 1 < n; ++t) sc[t] = dot1<float>(Kf + base + t * hd, s.q.data(), hd);
      else for (int64_t t = 0; t + 1 < n; ++t) sc[t] = dot_h(K + base + t * hd, s.q.data(), hd);
      // the current position's k and v as the cache holds them (float16-rounded in a float16 cache), so
      // every position is read at one precision (awq.quant_decode.fake_quantized models exactly that)
      float last = 0.f;
      for (int64_t i = 0; i < hd; ++i) last += (f32 ? s.k[i] : qh2f(qf2h(s.k[i]))) * s.q[i];
      sc[n - 1] = last;
      softmax(sc, n);
      float* out = att_.data() + q * hd;
      for (int64_t i = 0; i < hd; ++i) out[i] = sc[n - 1] * (f32 ? vp[i] : qh2f(qf2h(vp[i])));
      if (f32) for (int64_t t = 0; t + 1 < n; ++t) axpy<float>(out, sc[t], Vf + base + t * hd, hd);
      else for (int64_t t = 0; t + 1 < n; ++t) axpy_h(out, sc[t], V + base + t * hd, hd);
    }
    if (tid == 0) {  // position p into the cache (read by later steps only)
      auto* Kw = reinterpret_cast<uint16_t*>(L.kc.data_ptr());
      auto* Vw = reinterpret_cast<uint16_t*>(L.vc.data_ptr());
      auto* Kwf = reinterpret_cast<float*>(L.kc.data_ptr());
      auto* Vwf = reinterpret_cast<float*>(L.vc.data_ptr());
      for (int64_t j = 0; j < nkv_; ++j) {
        roped(qkv_.data() + (nh_ + j) * hd, s.k.data(), 1.f);
        const float* vp = qkv_.data() + (nh_ + nkv_ + j) * hd;
        const int64_t o = (j * cap + p) * hd;
        for (int64_t i = 0; i < hd; ++i) {
          if (f32) { Kwf[o + i] = s.k[i]; Vwf[o + i] = vp[i]; }
          else { Kw[o + i] = qf2h(s.k[i]); Vw[o + i] = qf2h(vp[i]); }
        }
      }
    }
  }

  // the k active entries s.idx / s.val of an input of width C made ready for W's layout
  void sparse_in(const ColsMat& W, Scratch& s, int64_t k, int64_t C) {
    if (!W.tcols) q_sparse_act(s.idx.data(), s.val.data(), k, C, s.sact);
  }

  // partial input-major product of this thread's share of the active entries into part (zeroed first):
  // cols: whole input blocks; tcols: groups of 32 active entries
  void cols_part(const ColsMat& W, Scratch& s, int tid, int nt, std::vector<float>& part) {
    std::fill(part.begin(), part.begin() + W.v.Rp, 0.f);
    if (W.tcols) {
      const int64_t n = static_cast<int64_t>(s.idx.size()), ng = (n + 31) / 32;
      q_tcols_range(W.v, s.idx.data(), s.val.data(), n, ng * tid / nt, ng * (tid + 1) / nt, s.tsc, part.data());
      return;
    }
    q_split_blocks(s.sact, nt, s.bounds);
    q_cols_range(W.v, s.sact, s.bounds[tid], s.bounds[tid + 1], s.acc.data(), part.data());
  }

  int64_t active_blocks(const ColsMat& W, const QSparseAct& a) const {
    if (W.tcols) return 0;
    int64_t nb = 0;
    for (size_t b = 0; b + 1 < a.bstart.size(); ++b) nb += a.bstart[b + 1] > a.bstart[b];
    return nb;
  }

  void mlp(Layer& L, int64_t l, int tid, int nt, Scratch& s, int& ph) {
    Mlp& M = L.mlp;
    const int64_t F = F_, H = H_;
    int64_t* cnt = counts_.data_ptr<int64_t>() + 6 * l;
    auto add_y = [&](const std::vector<std::vector<float>>* parts, float t_d) {
      for (int64_t i = 0; i < H; ++i) {
        float v;
        if (parts) { v = 0.f; for (int t = 0; t < nt; ++t) v += (*parts)[t][i]; }
        else v = y_[i];
        if (t_d > 0.f && std::fabs(v) < t_d) v = 0.f;
        s.h[i] += v;
      }
    };
    if (M.kind == 0) {
      q_act(s.n.data(), H, s.act);
      dyn_rows(M.gu, nullptr, 2 * F, s.act, gu_.data(), ctr_[ph++], nullptr);
#pragma omp barrier
      silu_mul(gu_.data(), gu_.data() + F, s.a.data(), F);
      q_act(s.a.data(), F, s.act2);
      dyn_rows(M.d, nullptr, H, s.act2, y_.data(), ctr_[ph++], nullptr);
#pragma omp barrier
      add_y(nullptr, 0.f);
      if (tid == 0) { cnt[0] += H; cnt[1] += H / QBLK; cnt[2] += F; cnt[3] += F / QBLK; cnt[4] += F; cnt[5] += F; }
      return;
    }
    if (M.kind == 1) {
      const float* xs = M.xs.numel() ? M.xs.data_ptr<float>() : nullptr;
      const float* hs = M.hs.numel() ? M.hs.data_ptr<float>() : nullptr;
      s.idx.clear();
      int64_t k = 0;
      for (int64_t i = 0; i < H; ++i) {
        const float v = s.n[i];
        const float sc = xs ? std::fabs(v) * xs[i] : std::fabs(v);
        if (sc >= M.t_x) { s.idx.push_back(static_cast<int32_t>(i)); s.val[k++] = v; }
      }
      sparse_in(M.gu_t, s, k, H);
      const int64_t kx = k, bx = tid == 0 ? active_blocks(M.gu_t, s.sact) : 0;
      cols_part(M.gu_t, s, tid, nt, gu_part_[tid]);
#pragma omp barrier
      for (int64_t j = 0; j < 2 * F; ++j) {
        float v = 0.f;
        for (int t = 0; t < nt; ++t) v += gu_part_[t][j];
        s.a[j] = v;
      }
      silu_mul(s.a.data(), s.a.data() + F, s.a.data(), F);
      s.idx.clear();
      k = 0;
      for (int64_t n = 0; n < F; ++n) {
        const float v = s.a[n];
        const float sc = hs ? std::fabs(v) * hs[n] : std::fabs(v);
        if (sc >= M.t_h) { s.idx.push_back(static_cast<int32_t>(n)); s.val[k++] = v; }
      }
      sparse_in(M.d_t, s, k, F);
      cols_part(M.d_t, s, tid, nt, y_part_[tid]);
      if (tid == 0) { cnt[0] += kx; cnt[1] += bx; cnt[2] += k; cnt[3] += active_blocks(M.d_t, s.sact); }
#pragma omp barrier
      add_y(&y_part_, 0.f);
      return;
    }
    // neuron kinds: gate/up rows of the rows layout, down from the cols layout
    q_act(s.n.data(), H, s.act);
    int64_t k = 0, gate_rows = 0, up_rows = 0;
    s.idx.clear();
    if (M.kind == 2) {  // CATS
      dyn_rows(M.gu, nullptr, F, s.act, gu_.data(), ctr_[ph++], nullptr);
#pragma omp barrier
      s.rows.clear();
      for (int64_t n = 0; n < F; ++n) {
        const float a = silu(gu_[n]);
        if (std::fabs(a) >= M.t_a) { s.idx.push_back(static_cast<int32_t>(n)); s.rows.push_back(F + n); s.val[k++] = a; }
      }
      dyn_rows(M.gu, s.rows.data(), k, s.act, gu_.data() + F, ctr_[ph++], nullptr);
#pragma omp barrier
      for (int64_t j = 0; j < k; ++j) s.val[j] *= gu_[F + j];
      gate_rows = F; up_rows = k;
    } else if (M.kind == 3) {  // paper: thresholds on g and u
      dyn_rows(M.gu, nullptr, 2 * F, s.act, gu_.data(), ctr_[ph++], nullptr);
#pragma omp barrier
      for (int64_t n = 0; n < F; ++n) {
        float g = gu_[n], u = gu_[F + n];
        if (std::fabs(g) < M.t_g) g = 0.f;
        if (std::fabs(u) < M.t_u) u = 0.f;
        const float h = silu(g) * u;
        if (h != 0.f) { s.idx.push_back(static_cast<int32_t>(n)); s.val[k++] = h; }
      }
      gate_rows = F; up_rows = F;
    } else {  // fixed set
      const int64_t nf = M.fixed_idx.numel();
      const int64_t* fi = M.fixed_idx.data_ptr<int64_t>();
      dyn_rows(M.gu, M.fixed_rows.data_ptr<int64_t>(), 2 * nf, s.act, gu_.data(), ctr_[ph++], nullptr);
#pragma omp barrier
      for (int64_t j = 0; j < nf; ++j) {
        float g = gu_[j], u = gu_[nf + j];
        if (std::fabs(g) < M.t_g) g = 0.f;
        if (std::fabs(u) < M.t_u) u = 0.f;
        s.idx.push_back(static_cast<int32_t>(fi[j]));
        s.val[k++] = silu(g) * u;
      }
      gate_rows = nf; up_rows = nf;
    }
    sparse_in(M.d_t, s, k, F);
    cols_part(M.d_t, s, tid, nt, y_part_[tid]);
    if (tid == 0) { cnt[0] += H; cnt[1] += H / QBLK; cnt[2] += k; cnt[3] += active_blocks(M.d_t, s.sact); cnt[4] += gate_rows; cnt[5] += up_rows; }
#pragma omp barrier
    add_y(&y_part_, M.kind == 3 ? M.t_d : 0.f);
  }

  void run(int64_t token, int64_t p, float* logits) {
    TORCH_CHECK(!layers_.empty(), "no layers");
    TORCH_CHECK(rope_.defined() && p >= 0 && p < rope_.size(0), "position ", p, " outside the rope table / cache");
    TORCH_CHECK(token >= 0 && token < embed_.R, "token id out of range");
    for (size_t l = 0; l < layers_.size(); ++l) {
      TORCH_CHECK(layers_[l].mlp.kind >= 0, "layer ", l, ": no MLP set");
      TORCH_CHECK(layers_[l].kc.defined() && layers_[l].kc.size(1) > p, "layer ", l, ": cache too small");
    }
    // threads only where a layer has at least min_bytes of weights per thread: a parallel region's
    // barriers cost more than a small model's work (and a time slice each when the other core is busy)
    const Layer& L0 = layers_[0];
    const int64_t layer_bytes = L0.qkv.R * L0.qkv.rb + L0.o.R * L0.o.rb +
                                3 * H_ * q_row_bytes(L0.qkv.fmt, F_);
    const int64_t by_size = std::max<int64_t>(1, layer_bytes / std::max<int64_t>(1, min_bytes_));
    const int nt_req = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size)));
    ensure(nt_req);
    const float* rope = rope_.data_ptr<float>() + p * hd_;
    const int64_t Rqkv = (nh_ + 2 * nkv_) * hd_, A = nh_ * hd_;
#pragma omp parallel num_threads(nt_req)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      Scratch& s = ts_[tid];
      int ph = 0;
      q_row_dequant(embed_.fmt, embed_.p, H_, token, s.h.data());
      for (size_t l = 0; l < layers_.size(); ++l) {
        Layer& L = layers_[l];
        rms_norm(s.n.data(), s.h.data(), L.ln1.data_ptr<float>(), H_, eps_);
        q_act(s.n.data(), H_, s.act);
        dyn_rows(L.qkv, nullptr, Rqkv, s.act, qkv_.data(), ctr_[ph++], L.bqkv.numel() ? L.bqkv.data_ptr<float>() : nullptr);
#pragma omp barrier
        attention(L, tid, nt, s, p, rope);
#pragma omp barrier
        q_act(att_.data(), A, s.act);
        dyn_rows(L.o, nullptr, H_, s.act, o_.data(), ctr_[ph++], L.bo.numel() ? L.bo.data_ptr<float>() : nullptr);
#pragma omp barrier
        for (int64_t i = 0; i < H_; ++i) s.h[i] += o_[i];
        rms_norm(s.n.data(), s.h.data(), L.ln2.data_ptr<float>(), H_, eps_);
        mlp(L, static_cast<int64_t>(l), tid, nt, s, ph);
      }
      if (logits) {
        rms_norm(s.n.data(), s.h.data(), norm_.data_ptr<float>(), H_, eps_);
        q_act(s.n.data(), H_, s.act);
        dyn_rows(head_, nullptr, head_.R, s.act, logits, ctr_[ph++], nullptr);
      }
    }
  }

  int64_t H_, nh_, nkv_, hd_, F_;
  float eps_;
  torch::Tensor norm_, rope_, counts_;
  RowsMat head_, embed_;
  std::vector<Layer> layers_;
  std::vector<Scratch> ts_;
  std::vector<float> qkv_, att_, o_, gu_, y_;
  std::vector<std::vector<float>> gu_part_, y_part_;
  std::vector<std::atomic<int64_t>> ctr_;
  int64_t cap_ = -1;
  int64_t min_bytes_ = 1 << 18;
};

void register_quant_decode(pybind11::module_& m) {
  pybind11::class_<QDecoder>(m, "QDecoder", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor, int64_t,
                          torch::Tensor, int64_t>())
      .def("add_layer", &QDecoder::add_layer)
      .def("set_cache", &QDecoder::set_cache)
      .def("set_rope", &QDecoder::set_rope)
      .def("mlp_dense", &QDecoder::mlp_dense)
      .def("mlp_input", &QDecoder::mlp_input)
      .def("mlp_neuron", &QDecoder::mlp_neuron)
      .def("step", &QDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("prefill", &QDecoder::prefill, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_min_bytes", &QDecoder::set_min_bytes)
      .def("counts", &QDecoder::counts)
      .def("reset_counts", &QDecoder::reset_counts);
}
