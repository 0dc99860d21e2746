// Block-quantised kernels (csrc/quant_simd.h) as torch functions: layout packing from ggml's planes
// (awq/quant_formats.py QTensor) and single-call GEMVs for the tests (tests/test_quant_kernels.py).
// The decode step itself is csrc/quant_decode.cpp (one call per token).
#include "quant_simd.h"

namespace {

void check_planes(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m, int64_t fmt, int64_t C,
                  int64_t& R, int64_t& nb) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "fmt: 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1)");
  TORCH_CHECK(C > 0 && C % QBLK == 0, "C: a positive multiple of 32");
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.dim() == 2 && qs.is_contiguous(), "qs: contiguous uint8 [R, *]");
  R = qs.size(0);
  nb = C / QBLK;
  TORCH_CHECK(qs.size(1) == q_quant_bytes(static_cast<int>(fmt), C), "qs: ", q_quant_bytes(static_cast<int>(fmt), C),
              " bytes per row");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.numel() == R * nb, "d: float16 [R, C/32]");
  if (fmt == QF_Q4_1)
    TORCH_CHECK(m.scalar_type() == torch::kHalf && m.is_contiguous() && m.numel() == R * nb, "m: float16 [R, C/32]");
}

// quant of entry i of row r in ggml's per-block order (Q4: 0..15, Q8: int8)
inline int ggml_quant(const uint8_t* row, int fmt, int64_t i) {
  if (fmt == QF_Q8_0) return static_cast<int8_t>(row[i]);
  const int64_t b = i / QBLK, j = i % QBLK;
  const uint8_t byte = row[b * 16 + (j < 16 ? j : j - 16)];
  return j < 16 ? (byte & 0x0F) : (byte >> 4);
}

// the nonzero entries of x: indices and values
void nonzero(const torch::Tensor& x, std::vector<int32_t>& idx, std::vector<float>& val) {
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (xp[i] != 0.f) { idx.push_back(static_cast<int32_t>(i)); val.push_back(xp[i]); }
}

}  // namespace

// rows layout [R, row_bytes] from ggml's planes
torch::Tensor pack_rows(torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t fmt, int64_t C) {
  int64_t R, nb;
  check_planes(qs, d, m, fmt, C, R, nb);
  const int f = static_cast<int>(fmt);
  const int64_t rb = q_row_bytes(f, C), sbytes = q_scale_bytes(f, C), qsb = qs.size(1);
  auto out = torch::zeros({R, rb}, qs.options());
  uint8_t* op = out.data_ptr<uint8_t>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const auto* mp = f == QF_Q4_1 ? reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) : nullptr;
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* o = op + r * rb + sbytes;  // quants after the scales
      const uint8_t* q = qp + r * qsb;
      if (f == QF_Q8_0) {
        std::memcpy(o, q, C);
      } else {
        int64_t g0 = 0;
        while (g0 < C) {
          const int64_t rem = C - g0, G = rem >= 128 ? 128 : rem >= 64 ? 64 : 32;
          for (int64_t j = 0; j < G / 2; ++j)
            o[g0 / 2 + j] = static_cast<uint8_t>(ggml_quant(q, f, g0 + j) | (ggml_quant(q, f, g0 + G / 2 + j) << 4));
          g0 += G;
        }
      }
      std::memcpy(op + r * rb, dp + r * nb, 2 * nb);
      if (mp) std::memcpy(op + r * rb + 2 * nb, mp + r * nb, 2 * nb);
    }
  });
  return out;
}

// the quants of the cols / tcols layouts [C, rowb]: quant(i, c) of input i, output c (Rp = R padded to 64)
template <class Quant>
torch::Tensor cols_quants(int f, int64_t R, int64_t C, const torch::TensorOptions& opt, Quant quant) {
  const int64_t Rp = q_pad64(R), rowb = q_quant_bytes(f, Rp);
  auto q = torch::zeros({C, rowb}, opt);
  uint8_t* qo = q.data_ptr<uint8_t>();
  auto col = [](int64_t pos) { return pos / QCW * QCW + q_col_of_pos(pos % QCW); };
  at::parallel_for(0, C, 16, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> u(Rp);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t p = 0; p < Rp; ++p) {
        const int64_t c = col(p);
        u[p] = c < R ? static_cast<uint8_t>(quant(i, c)) : 0;
      }
      uint8_t* o = qo + i * rowb;
      if (f == QF_Q8_0) {
#if defined(QK512)
        for (int64_t p = 0; p < Rp; ++p) u[p] ^= 0x80;  // stored as q + 128: vpdpbusd's unsigned operand as is
#endif
        std::memcpy(o, u.data(), Rp);
      } else {
        int64_t g0 = 0;
        while (g0 < Rp) {
          const int64_t G = Rp - g0 >= 128 ? 128 : 64;
          for (int64_t j = 0; j < G / 2; ++j) o[g0 / 2 + j] = static_cast<uint8_t>((u[g0 + j] & 0x0F) | (u[g0 + G / 2 + j] << 4));
          g0 += G;
        }
      }
    }
  });
  return q;
}

// cols layout: (quants [C, rowb], ds [C/32, Rp], ms [C/32, Rp] or empty) from ggml's planes of W [R, C]
std::vector<torch::Tensor> pack_cols(torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t fmt, int64_t C) {
  int64_t R, nb;
  check_planes(qs, d, m, fmt, C, R, nb);
  const int f = static_cast<int>(fmt);
  const int64_t Rp = q_pad64(R), qsb = qs.size(1);
  auto ds = torch::zeros({nb, Rp}, d.options());
  auto ms = f == QF_Q4_1 ? torch::zeros({nb, Rp}, d.options()) : torch::empty({0}, d.options());
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  auto q = cols_quants(f, R, C, qs.options(), [&](int64_t i, int64_t c) { return ggml_quant(qp + c * qsb, f, i); });
  const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  auto* dso = reinterpret_cast<uint16_t*>(ds.data_ptr<at::Half>());
  const auto* mp = f == QF_Q4_1 ? reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) : nullptr;
  auto* mso = f == QF_Q4_1 ? reinterpret_cast<uint16_t*>(ms.data_ptr<at::Half>()) : nullptr;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t c = 0; c < R; ++c) {
      dso[b * Rp + c] = dp[c * nb + b];
      if (mso) mso[b * Rp + c] = mp[c * nb + b];
    }
  return {q, ds, ms};
}

// tcols layout: (quants [C, rowb], ds [C, Rp/32], ms [C, Rp/32] or empty) from ggml's planes of W^T [C, R]
// (W requantised with its blocks along the outputs: awq/decode/tcols.py)
std::vector<torch::Tensor> pack_tcols(torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t fmt, int64_t R) {
  int64_t C, nbr;
  check_planes(qs, d, m, fmt, R, C, nbr);
  const int f = static_cast<int>(fmt);
  const int64_t Rp = q_pad64(R), NB = Rp / QBLK, qsb = qs.size(1);
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  auto q = cols_quants(f, R, C, qs.options(), [&](int64_t i, int64_t c) { return ggml_quant(qp + i * qsb, f, c); });
  auto ds = torch::zeros({C, NB}, d.options());
  auto ms = f == QF_Q4_1 ? torch::zeros({C, NB}, d.options()) : torch::empty({0}, d.options());
  ds.narrow(1, 0, nbr).copy_(d.reshape({C, nbr}));
  if (f == QF_Q4_1) ms.narrow(1, 0, nbr).copy_(m.reshape({C, nbr}));
  return {q, ds, ms};
}

// the view of an input-major layout (cols or tcols: both hold C * Rp / 32 scales), checked
QColsView input_major_view(const torch::Tensor& q, const torch::Tensor& ds, const torch::Tensor& ms, int64_t fmt,
                           int64_t R, int64_t C, const char* what) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "fmt: 0, 1 or 2");
  const int64_t Rp = q_pad64(R), ns = C * Rp / QBLK;
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.dim() == 2 && q.size(0) == C &&
              q.size(1) == q_quant_bytes(static_cast<int>(fmt), Rp), "q: packed ", what, " [C, row bytes]");
  TORCH_CHECK(ds.scalar_type() == torch::kHalf && ds.is_contiguous() && ds.numel() == ns, "ds: float16, C * Rp / 32");
  if (fmt == QF_Q4_1) TORCH_CHECK(ms.scalar_type() == torch::kHalf && ms.numel() == ns, "ms: float16, C * Rp / 32");
  QColsView v;
  v.fmt = static_cast<int>(fmt); v.R = R; v.C = C; v.Rp = Rp; v.rowb = q.size(1);
  v.q = q.data_ptr<uint8_t>();
  v.ds = reinterpret_cast<const uint16_t*>(ds.data_ptr<at::Half>());
  v.ms = fmt == QF_Q4_1 ? reinterpret_cast<const uint16_t*>(ms.data_ptr<at::Half>()) : nullptr;
  return v;
}

// y = sum of the per-thread partial outputs (first R entries)
torch::Tensor sum_parts(const std::vector<std::vector<float>>& part, int64_t R, const torch::TensorOptions& opt) {
  auto y = torch::zeros({R}, opt);
  float* yp = y.data_ptr<float>();
  for (const auto& p : part)
    for (int64_t c = 0; c < R; ++c) yp[c] += p[c];
  return y;
}

// y = W x over the tcols layout of W [R, C] (nonzero entries of x only), threads over groups of 32 entries
torch::Tensor gemv_tcols(torch::Tensor q, torch::Tensor ds, torch::Tensor ms, int64_t fmt, int64_t R, torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: float32");
  const QColsView v = input_major_view(q, ds, ms, fmt, R, x.numel(), "tcols");
  std::vector<int32_t> idx;
  std::vector<float> val;
  nonzero(x, idx, val);
  const int64_t n = static_cast<int64_t>(idx.size()), ng = (n + 31) / 32;
  const int nt = at::get_num_threads();
  std::vector<std::vector<float>> part(nt, std::vector<float>(v.Rp, 0.f));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    QTScratch s;
    for (int64_t t = t0; t < t1; ++t) q_tcols_range(v, idx.data(), val.data(), n, ng * t / nt, ng * (t + 1) / nt, s, part[t].data());
  });
  return sum_parts(part, R, x.options());
}

// activation quantisation (for the tests' reference): (xq int8 [C], d float [C/32], s int32 [C/32])
std::vector<torch::Tensor> quantize_act(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.numel() % QBLK == 0,
              "x: contiguous float32, a multiple of 32 entries");
  QAct a;
  q_act(x.data_ptr<float>(), x.numel(), a);
  auto q = torch::empty({a.C}, x.options().dtype(torch::kChar));
  auto d = torch::empty({a.nb}, x.options());
  auto s = torch::empty({a.nb}, x.options().dtype(torch::kInt));
  std::memcpy(q.data_ptr<int8_t>(), a.q.data(), a.C);
  std::memcpy(d.data_ptr<float>(), a.d.data(), 4 * a.nb);
  std::memcpy(s.data_ptr<int32_t>(), a.s.data(), 4 * a.nb);
  return {q, d, s};
}

// y = W x (rows layout; rows: empty = all, else those rows), parallel over rows
torch::Tensor qgemv_rows(torch::Tensor w, int64_t fmt, int64_t C, torch::Tensor x, torch::Tensor rows) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "fmt: 0, 1 or 2");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() &&
              w.size(1) == q_row_bytes(static_cast<int>(fmt), C), "w: packed rows [R, row_bytes]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.numel() == C, "x: float32 [C]");
  const int64_t R = w.size(0);
  const int64_t* rp = nullptr;
  int64_t n = R;
  if (rows.numel()) {
    TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.is_contiguous(), "rows: int64");
    rp = rows.data_ptr<int64_t>();
    n = rows.numel();
    for (int64_t j = 0; j < n; ++j) TORCH_CHECK(rp[j] >= 0 && rp[j] < R, "rows: out of range");
  }
  QAct a;
  q_act(x.data_ptr<float>(), C, a);
  auto y = torch::empty({n}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int f = static_cast<int>(fmt);
  at::parallel_for(0, (n + 3) / 4, 1, [&](int64_t b, int64_t e) {
    q_rows(f, wp, C, rp, 4 * b, std::min(n, 4 * e), a, yp);
  });
  return y;
}

// y = W x over the cols layout of W [R, C], reading only the rows of the nonzero entries of x;
// counts <- (active entries, blocks with an active entry)
torch::Tensor gemv_cols(torch::Tensor q, torch::Tensor ds, torch::Tensor ms, int64_t fmt, int64_t R, torch::Tensor x,
                        torch::Tensor counts) {
  const int64_t C = x.numel(), nb = C / QBLK;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && C % QBLK == 0, "x: float32, C % 32 == 0");
  TORCH_CHECK(counts.scalar_type() == torch::kLong && counts.numel() >= 2, "counts: int64 [2]");
  const QColsView v = input_major_view(q, ds, ms, fmt, R, C, "cols");
  std::vector<int32_t> idx;
  std::vector<float> val;
  nonzero(x, idx, val);
  QSparseAct a;
  q_sparse_act(idx.data(), val.data(), static_cast<int64_t>(idx.size()), C, a);
  const int nt = at::get_num_threads();
  std::vector<int64_t> bounds;
  q_split_blocks(a, nt, bounds);
  std::vector<std::vector<float>> part(nt, std::vector<float>(v.Rp, 0.f));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> acc(v.Rp);
    for (int64_t t = t0; t < t1; ++t) q_cols_range(v, a, bounds[t], bounds[t + 1], acc.data(), part[t].data());
  });
  int64_t blocks = 0;
  for (int64_t b = 0; b < nb; ++b) blocks += a.bstart[b + 1] > a.bstart[b];
  counts.data_ptr<int64_t>()[0] = static_cast<int64_t>(idx.size());
  counts.data_ptr<int64_t>()[1] = blocks;
  return sum_parts(part, R, x.options());
}

// the cols layout's order within a chunk (for the tests): output held by each position 0..QCW-1
torch::Tensor cols_order() {
  auto o = torch::empty({QCW}, torch::kLong);
  for (int64_t p = 0; p < QCW; ++p) o.data_ptr<int64_t>()[p] = q_col_of_pos(p);
  return o;
}

std::string quant_simd() {
#if defined(QK512)
  return "avx512vnni";
#elif defined(QK256)
  return "avx2";
#else
  return "scalar";
#endif
}

void register_quant_decode(pybind11::module_& m);  // csrc/quant_decode.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_rows", &pack_rows, "rows layout from ggml planes");
  m.def("pack_cols", &pack_cols, "cols (input-major) layout from ggml planes");
  m.def("quantize_act", &quantize_act, "activation quantisation (Q8 blocks)");
  m.def("gemv_rows", &qgemv_rows, "quantised GEMV over (some) rows");
  m.def("gemv_cols", &gemv_cols, "quantised GEMV over the cols layout, nonzero inputs only");
  m.def("pack_tcols", &pack_tcols, "tcols (output-blocked) layout from ggml planes of W^T");
  m.def("gemv_tcols", &gemv_tcols, "quantised GEMV over the tcols layout, nonzero inputs only");
  m.def("cols_order", &cols_order, "cols layout order within a chunk");
  m.def("simd", &quant_simd, "vector path of this build");
  m.def("set_rows_per_pass", [](int nr, int fmt) {
    TORCH_CHECK(nr == 0 || nr == 1 || nr == 2 || nr == 4, "rows per pass must be 0 (by format), 1, 2 or 4");
    TORCH_CHECK(fmt >= -1 && fmt <= 2, "fmt: -1 (all), 0, 1 or 2");
    for (int f = 0; f < 3; ++f)
      if (fmt < 0 || fmt == f) q_rows_per_pass[f] = nr;
  }, "rows GEMV rows per pass of one format (-1: all; nr 0: the default)", pybind11::arg("nr"),
        pybind11::arg("fmt") = -1);
  m.def("rows_per_pass", [](int fmt) { TORCH_CHECK(fmt >= 0 && fmt <= 2, "fmt: 0, 1 or 2"); return q_rows_per_pass[fmt]; },
        "rows GEMV rows per pass of one format (0: the default)");
  register_quant_decode(m);
}
