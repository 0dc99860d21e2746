// One decoder layer of a batch-1 decode step in two calls (awq/decode.py LeanDecoder, float32 CPU):
//
//   attn_step:    n1 = RMSNorm(h) * ln1;  qkv = Wqkv n1 (+ b);  RoPE on q and k (rows already in
//                 interleaved pair order, softmax scale folded into q);  k, v -> cache[:, p];
//                 GQA attention of the one query over cache[:, lo:p+1];  h += Wo a (+ b);
//                 returns n2 = RMSNorm(h) * ln2 (the MLP's input).  h is updated in place.
//   dense_swiglu: y = Wd (silu(Wg n) * (Wu n)) (+ biases) over the fused [Wg; Wu] weight.
//
// The eager step spends ~20 small tensor ops per layer (each a dispatch, an allocation and, for the
// attention, a parallel region); here a layer is ~5 parallel regions and no allocation besides the
// returned tensor.  Products use the 4-rows-per-pass GEMV of simd.h, split over rows from
// min_bytes weight bytes per thread; attention is split over query heads.
#include "simd.h"

namespace {

void rms_norm(float* out, const float* h, const float* w, int64_t H, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(h[i]) * h[i];
  const float s = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = w[i] * (h[i] * s);
}

void check_f32(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, what,
              ": contiguous float32 with ", n, " entries");
}

const float* opt_ptr(const torch::Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return nullptr;
  check_f32(t, n, what);
  return t.data_ptr<float>();
}

}  // namespace

torch::Tensor attn_step(torch::Tensor h, torch::Tensor ln1, torch::Tensor ln2, double eps, torch::Tensor wqkv,
                        torch::Tensor bqkv, torch::Tensor wo, torch::Tensor bo, torch::Tensor kc, torch::Tensor vc,
                        int64_t p, int64_t lo, torch::Tensor rope, int64_t nh, int64_t nkv, int64_t min_bytes) {
  const int64_t H = h.numel();
  TORCH_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0, "heads: nh a multiple of nkv");
  TORCH_CHECK(kc.dim() == 3 && kc.size(0) == nkv && kc.is_contiguous() && kc.scalar_type() == torch::kFloat,
              "k cache: contiguous float32 [nkv, capacity, head_dim]");
  const int64_t cap = kc.size(1), hd = kc.size(2), half = hd / 2, g = nh / nkv;
  TORCH_CHECK(vc.sizes() == kc.sizes() && vc.is_contiguous() && vc.scalar_type() == torch::kFloat,
              "v cache: same shape as the k cache");
  TORCH_CHECK(0 <= lo && lo <= p && p < cap, "positions: 0 <= lo <= p < capacity");
  const int64_t R = (nh + 2 * nkv) * hd, A = nh * hd;
  check_f32(h, H, "h"); check_f32(ln1, H, "ln1"); check_f32(ln2, H, "ln2");
  check_f32(wqkv, R * H, "wqkv"); check_f32(wo, H * A, "wo"); check_f32(rope, hd, "rope [head_dim/2, 2]");
  const float* bq = opt_ptr(bqkv, R, "bqkv");
  const float* bop = opt_ptr(bo, H, "bo");
  float* hp = h.data_ptr<float>();
  const float e = static_cast<float>(eps);

  std::vector<float> n(H), qkv(R), att(A);
  rms_norm(n.data(), hp, ln1.data_ptr<float>(), H, e);
  gemv_par<float>(qkv.data(), wqkv.data_ptr<float>(), n.data(), R, H, min_bytes);
  if (bq) for (int64_t r = 0; r < R; ++r) qkv[r] += bq[r];
  const float* rp = rope.data_ptr<float>();  // (cos, sin) pairs
  for (int64_t head = 0; head < nh + nkv; ++head) {
    float* v = qkv.data() + head * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[2 * i], b = v[2 * i + 1], c = rp[2 * i], s = rp[2 * i + 1];
      v[2 * i] = a * c - b * s;
      v[2 * i + 1] = a * s + b * c;
    }
  }
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  for (int64_t j = 0; j < nkv; ++j) {
    std::memcpy(kp + (j * cap + p) * hd, qkv.data() + (nh + j) * hd, hd * sizeof(float));
    std::memcpy(vp + (j * cap + p) * hd, qkv.data() + (nh + nkv + j) * hd, hd * sizeof(float));
  }
  const int64_t L = p + 1 - lo;
  const int64_t head_bytes = 2 * L * hd * static_cast<int64_t>(sizeof(float));
  at::parallel_for(0, nh, std::max<int64_t>(1, min_bytes / std::max<int64_t>(1, head_bytes)), [&](int64_t b0, int64_t e0) {
    std::vector<float> sc(L);
    for (int64_t q = b0; q < e0; ++q) {
      const float* qv = qkv.data() + q * hd;
      const float* K = kp + ((q / g) * cap + lo) * hd;
      const float* V = vp + ((q / g) * cap + lo) * hd;
      float mx = -INFINITY;
      for (int64_t t = 0; t < L; ++t) { sc[t] = dot1<float>(K + t * hd, qv, hd); mx = std::max(mx, sc[t]); }
      float sum = 0.f;
      for (int64_t t = 0; t < L; ++t) { sc[t] = std::exp(sc[t] - mx); sum += sc[t]; }
      const float inv = 1.f / sum;
      float* out = att.data() + q * hd;
      std::fill(out, out + hd, 0.f);
      for (int64_t t = 0; t < L; ++t) axpy<float>(out, sc[t] * inv, V + t * hd, hd);
    }
  });
  std::vector<float> o(H);
  gemv_par<float>(o.data(), wo.data_ptr<float>(), att.data(), H, A, min_bytes);
  for (int64_t i = 0; i < H; ++i) hp[i] += bop ? o[i] + bop[i] : o[i];
  auto n2 = torch::empty({1, H}, h.options());
  rms_norm(n2.data_ptr<float>(), hp, ln2.data_ptr<float>(), H, e);
  return n2;
}

torch::Tensor dense_swiglu(torch::Tensor x, torch::Tensor wgu, torch::Tensor bgu, torch::Tensor wd, torch::Tensor bd,
                           int64_t min_bytes) {
  const int64_t H = x.numel();
  TORCH_CHECK(wgu.dim() == 2 && wgu.size(1) == H && wgu.size(0) % 2 == 0, "wgu: [2F, H]");
  const int64_t F = wgu.size(0) / 2;
  check_f32(x, H, "x"); check_f32(wgu, 2 * F * H, "wgu"); check_f32(wd, H * F, "wd [H, F]");
  TORCH_CHECK(wd.size(0) == H, "wd: [H, F]");
  const float* bg = opt_ptr(bgu, 2 * F, "bgu");
  const float* bdp = opt_ptr(bd, H, "bd");
  std::vector<float> gu(2 * F);
  gemv_par<float>(gu.data(), wgu.data_ptr<float>(), x.data_ptr<float>(), 2 * F, H, min_bytes);
  if (bg) for (int64_t r = 0; r < 2 * F; ++r) gu[r] += bg[r];
  for (int64_t f = 0; f < F; ++f) gu[f] = silu(gu[f]) * gu[F + f];
  auto y = torch::empty({1, H}, x.options());
  float* yp = y.data_ptr<float>();
  gemv_par<float>(yp, wd.data_ptr<float>(), gu.data(), H, F, min_bytes);
  if (bdp) for (int64_t i = 0; i < H; ++i) yp[i] += bdp[i];
  return y;
}

void register_decode_step(pybind11::module_& m) {
  m.def("attn_step", torch::wrap_pybind_function(attn_step), "attention block of one batch-1 decode step");
  m.def("dense_swiglu", torch::wrap_pybind_function(dense_swiglu), "dense SwiGLU MLP of one token");
}
