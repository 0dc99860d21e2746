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

#include "simd.h"


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

// CATS / predicted neurons at batch 1.  Candidates: every neuron (idx empty) or the neurons idx.
// Threshold mode (idx empty, or t_a > 0): a_n = silu(<wg[n], x>) over the candidates' gate rows,
// keep |a_n| >= t_a, then read the up rows of the kept neurons only (CATS; a predicted cluster
// thresholded within).  Predicted mode (idx given, t_a <= 0): gate and up rows of idx in one pass.
// h_n = a_n * <wu[n], x>, y from the kept rows of wd_t.  counts <- (kept neurons, candidates).
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
  const int64_t* ip = idx.numel() ? idx.data_ptr<int64_t>() : nullptr;
  const int64_t ncand = ip ? idx.numel() : F;
  std::vector<int64_t> sel;
  std::vector<float> a;  // activation of each selected neuron
  const bool thresh = !ip || t_a > 0.0;
  if (thresh) {
    std::vector<float> act(ncand);
    at::parallel_for(0, ncand, row_grain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const int64_t n = ip ? ip[j] : j;
        float g = dot1<S>(gp + n * H, xp, H);
        if (bg) g += bg[n];
        act[j] = Ld<S>::rnd(silu(Ld<S>::rnd(g)));
      }
    });
    const float ta = static_cast<float>(t_a);
    sel.reserve(ncand); a.reserve(ncand);
    for (int64_t j = 0; j < ncand; ++j)
      if (std::fabs(act[j]) >= ta) { sel.push_back(ip ? ip[j] : j); a.push_back(act[j]); }
  } else {
    sel.assign(ip, ip + ncand);
    a.resize(sel.size());
  }
  const int64_t k = (int64_t)sel.size();
  std::vector<float> coef(k);
  at::parallel_for(0, k, thresh ? row_grain : std::max<int64_t>(1, row_grain / 2), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t n = sel[j];
      float g = 0.f, u;
      if (thresh) {
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
  auto cp = counts.data_ptr<int64_t>();
  cp[0] = k;
  if (counts.numel() >= 2) cp[1] = ncand;
  return out;
}

// y = sum_{n: h_n != 0} h_n * wd_t[n]: the down projection reading only the rows of the nonzero
// entries of h (the paper's thresholded MLP at batch 1).  counts <- (nonzero entries,).
template <typename S>
static torch::Tensor down_run(const torch::Tensor& h, const torch::Tensor& wd_t, int64_t min_bytes,
                              torch::Tensor& counts) {
  const int64_t F = wd_t.size(0), H = wd_t.size(1);
  const float* hp = h.data_ptr<float>();
  std::vector<int64_t> sel; std::vector<float> coef;
  sel.reserve(F); coef.reserve(F);
  for (int64_t n = 0; n < F; ++n)
    if (hp[n] != 0.f) { sel.push_back(n); coef.push_back(hp[n]); }
  auto out = torch::empty({H}, h.options().dtype(torch::kFloat));
  gaxpy<S>(out.data_ptr<float>(), wd_t.data_ptr<S>(), H, sel.data(), coef.data(), (int64_t)sel.size(), min_bytes);
  counts.data_ptr<int64_t>()[0] = (int64_t)sel.size();
  return out;
}

torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w, int64_t min_bytes_per_thread) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [C]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.numel() && w.is_contiguous(), "w: contiguous [R, C]");
  const int64_t R = w.size(0), C = w.size(1);
  auto out = torch::empty({R}, x.options());
  float* y = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  if (w.scalar_type() == torch::kFloat) {
    gemv_par<float>(y, w.data_ptr<float>(), xp, R, C, min_bytes_per_thread);
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w: float32 or bfloat16");
    gemv_par<c10::BFloat16>(y, w.data_ptr<c10::BFloat16>(), xp, R, C, min_bytes_per_thread);
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
  TORCH_CHECK(counts.scalar_type() == torch::kLong && counts.numel() >= 1, "counts: int64 [1] or [2]");
  if (wd_t.scalar_type() == torch::kFloat)
    return neuron_run<float>(x, wg, wu, wd_t, idx, t_a, bias_g, bias_u, min_bytes_per_thread, counts);
  TORCH_CHECK(wd_t.scalar_type() == torch::kBFloat16, "weights: float32 or bfloat16");
  return neuron_run<c10::BFloat16>(x, wg, wu, wd_t, idx, t_a, bias_g, bias_u, min_bytes_per_thread, counts);
}

// The paper's thresholded MLP at batch 1 in one call: [g; u] = W_gu x (+ bias), read in full;
// g, u below their thresholds -> 0; h = silu(g) * u; y from the rows of wd_t of the nonzero h.
// counts <- (nonzero h,).  (Down's output threshold saves no reads: the caller applies it.)
template <typename S>
static torch::Tensor threshold_run(const torch::Tensor& x, const torch::Tensor& wgu, const torch::Tensor& bias_gu,
                                   const torch::Tensor& wd_t, double t_gate, double t_up, int64_t min_bytes,
                                   torch::Tensor& counts) {
  const int64_t H = x.numel(), F = wd_t.size(0);
  std::vector<float> gu(2 * F);
  gemv_par<S>(gu.data(), wgu.data_ptr<S>(), x.data_ptr<float>(), 2 * F, H, min_bytes);
  const float* bp = bias_gu.numel() ? bias_gu.data_ptr<float>() : nullptr;
  const float tg = static_cast<float>(t_gate), tu = static_cast<float>(t_up);
  std::vector<int64_t> sel; std::vector<float> coef;
  sel.reserve(F); coef.reserve(F);
  for (int64_t n = 0; n < F; ++n) {
    float g = gu[n], u = gu[F + n];
    if (bp) { g += bp[n]; u += bp[F + n]; }
    g = Ld<S>::rnd(g); u = Ld<S>::rnd(u);
    if (std::fabs(g) < tg) g = 0.f;
    if (std::fabs(u) < tu) u = 0.f;
    const float h = Ld<S>::rnd(Ld<S>::rnd(silu(g)) * u);
    if (h != 0.f) { sel.push_back(n); coef.push_back(h); }
  }
  auto out = torch::empty({H}, x.options().dtype(torch::kFloat));
  gaxpy<S>(out.data_ptr<float>(), wd_t.data_ptr<S>(), H, sel.data(), coef.data(), (int64_t)sel.size(), min_bytes);
  counts.data_ptr<int64_t>()[0] = (int64_t)sel.size();
  return out;
}

torch::Tensor threshold_swiglu(torch::Tensor x, torch::Tensor wgu, torch::Tensor bias_gu, torch::Tensor wd_t,
                               double t_gate, double t_up, int64_t min_bytes_per_thread, torch::Tensor counts) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [H]");
  const int64_t H = x.numel();
  TORCH_CHECK(wd_t.dim() == 2 && wd_t.size(1) == H && wd_t.is_contiguous(), "wd_t: contiguous [F, H]");
  const int64_t F = wd_t.size(0);
  TORCH_CHECK(wgu.dim() == 2 && wgu.size(0) == 2 * F && wgu.size(1) == H && wgu.is_contiguous() &&
              wgu.scalar_type() == wd_t.scalar_type(), "wgu: contiguous [2F, H], same dtype as wd_t");
  check_vec(bias_gu, 2 * F, "bias_gu");
  TORCH_CHECK(counts.scalar_type() == torch::kLong && counts.numel() >= 1, "counts: int64 [1]");
  if (wd_t.scalar_type() == torch::kFloat)
    return threshold_run<float>(x, wgu, bias_gu, wd_t, t_gate, t_up, min_bytes_per_thread, counts);
  TORCH_CHECK(wd_t.scalar_type() == torch::kBFloat16, "weights: float32 or bfloat16");
  return threshold_run<c10::BFloat16>(x, wgu, bias_gu, wd_t, t_gate, t_up, min_bytes_per_thread, counts);
}

torch::Tensor down_gather(torch::Tensor h, torch::Tensor wd_t, int64_t min_bytes_per_thread, torch::Tensor counts) {
  TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.dim() == 1, "h: contiguous float32 [F]");
  TORCH_CHECK(wd_t.dim() == 2 && wd_t.size(0) == h.numel() && wd_t.is_contiguous(), "wd_t: contiguous [F, H]");
  TORCH_CHECK(counts.scalar_type() == torch::kLong && counts.numel() >= 1, "counts: int64 [1]");
  if (wd_t.scalar_type() == torch::kFloat) return down_run<float>(h, wd_t, min_bytes_per_thread, counts);
  TORCH_CHECK(wd_t.scalar_type() == torch::kBFloat16, "wd_t: float32 or bfloat16");
  return down_run<c10::BFloat16>(h, wd_t, min_bytes_per_thread, counts);
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

void register_decode_step(pybind11::module_& m);  // csrc/decode_step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_step(m);
  m.def("fused_sparse_swiglu", torch::wrap_pybind_function(fused_sparse_swiglu), "fused_sparse_swiglu");
  m.def("input_sparse_swiglu", torch::wrap_pybind_function(input_sparse_swiglu), "input_sparse_swiglu");
  m.def("neuron_sparse_swiglu", torch::wrap_pybind_function(neuron_sparse_swiglu), "neuron_sparse_swiglu");
  m.def("dense_gemv", torch::wrap_pybind_function(dense_gemv), "dense_gemv");
  m.def("down_gather", torch::wrap_pybind_function(down_gather), "down_gather");
  m.def("threshold_swiglu", torch::wrap_pybind_function(threshold_swiglu), "threshold_swiglu");
  m.def("simd", &simd, "vector instruction path of this build");
}
