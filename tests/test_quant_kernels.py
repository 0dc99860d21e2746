"""Quantised kernels (csrc/quant_simd.h) against dequantise + (masked) dense in torch, odd sizes, both vector
paths (the native build and a real AVX2-only build, AWQ_HW_FLAGS="avx2 fma")."""
from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

import awq.kernels.quant as qk
from awq.decode.tcols import TcolsProduct, int_quants
from awq.kernels.build import march_flag
from awq.kernels.quant import KERNEL_CODE, gemv_ref, quantize_act_ref
from awq.load.quant_formats import FORMATS, QTensor, quantize

FMTS = list(FORMATS)


def _native():
    return qk.kernel()


def _avx2():
    """The AWQ_HW_FLAGS="avx2 fma" build (a real -march=haswell one), or None off x86 / if it cannot be built."""
    old = os.environ.get("AWQ_HW_FLAGS")
    os.environ["AWQ_HW_FLAGS"] = "avx2 fma"
    try:
        if march_flag() != "-march=haswell":
            return None
        return qk.kernel()
    finally:
        if old is None:
            del os.environ["AWQ_HW_FLAGS"]
        else:
            os.environ["AWQ_HW_FLAGS"] = old


def _paths():
    out = []
    nat = _native()
    if nat is not None:
        out.append(pytest.param(nat, id=f"native-{nat.simd()}"))
    a2 = _avx2()
    if a2 is not None and (nat is None or a2.simd() != nat.simd()):
        out.append(pytest.param(a2, id=f"avx2-{a2.simd()}"))
    if not out:
        out.append(pytest.param(None, marks=pytest.mark.skip(reason="quantised C++ kernel could not be built here")))
    return out


PATHS = _paths()


def act_ref(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp-style activation quantisation, dequantised, written out plainly: per 32 entries
    d = fp16(amax/127), q = round_half_even(x * 127/amax)."""
    b = x.float().reshape(-1, 32)
    amax = b.abs().amax(1, keepdim=True)
    d = amax / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(b * inv)
    return (q * d.half().float()).reshape(-1)


def test_torch_references_agree():
    """awq.kernels.quant's references (used by the decode-path check) equal the plain ones here."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(160, generator=g)
    x[64:96] = 0
    assert torch.equal(quantize_act_ref(x), act_ref(x))
    qt = quantize(weights(9, 160, 4), "q4_1")
    assert torch.allclose(gemv_ref(qt.dequantize(), x), qt.dequantize().double() @ act_ref(x).double())
    rows = torch.tensor([8, 0, 0, 3])
    assert torch.allclose(gemv_ref(qt.dequantize(), x, rows), (qt.dequantize().double() @ act_ref(x).double())[rows])


def weights(R, C, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, C, generator=g) * scale
    w[:, ::7] *= 4  # uneven blocks
    return w


def test_planes_roundtrip_and_ggml_equal():
    w = weights(37, 224, 0)
    for f in FMTS:
        qt = quantize(w, f)
        raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(FORMATS[f].ggml_type))
        assert np.array_equal(qt.to_ggml(), raw)
        assert torch.equal(qt.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, FORMATS[f].ggml_type)))
        assert torch.equal(QTensor.from_ggml(raw, f, (37, 224)).dequantize(), qt.dequantize())


@pytest.mark.parametrize("kern", PATHS)
def test_activation_quantisation(kern):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, generator=g)
    x[32:64] = 0  # an all-zero block
    q, d, s = kern.quantize_act(x)
    ref = act_ref(x)
    assert torch.equal((q.float().reshape(-1, 32) * d[:, None]).reshape(-1), ref)
    assert torch.equal(s, q.reshape(-1, 32).int().sum(1))


@pytest.mark.parametrize("kern", PATHS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("C", [32, 96, 224, 608])
def test_rows_gemv_equals_dequantised_dense(kern, fmt, C):
    R = 37
    qt = quantize(weights(R, C, C), fmt)
    packed = kern.pack_rows(qt.qs, qt.d, qt.m if qt.m is not None else torch.empty(0), KERNEL_CODE[fmt], C)
    assert packed.shape == (R, qt.nbytes // R)  # exactly the format's bits per weight
    x = torch.randn(C, generator=torch.Generator().manual_seed(2))
    ref = qt.dequantize().double() @ act_ref(x).double()
    scale = qt.dequantize().double().abs() @ act_ref(x).double().abs()
    y = kern.gemv_rows(packed, KERNEL_CODE[fmt], C, x, torch.empty(0, dtype=torch.long))
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * float(scale.max()) + 1e-7)
    rows = torch.tensor([5, 0, 36, 17, 17, 3, 30], dtype=torch.long)  # gathered rows, any order, repeats
    yr = kern.gemv_rows(packed, KERNEL_CODE[fmt], C, x, rows)
    assert torch.allclose(yr.double(), ref[rows], rtol=0, atol=1e-5 * float(scale.max()) + 1e-7)


@pytest.mark.parametrize("kern", PATHS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("R,C", [(37, 96), (130, 608), (64, 32)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_cols_gemv_equals_masked_dense(kern, fmt, R, C, density):
    qt = quantize(weights(R, C, R + C), fmt)
    q, ds, ms = kern.pack_cols(qt.qs, qt.d, qt.m if qt.m is not None else torch.empty(0), KERNEL_CODE[fmt], C)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(C, generator=g)
    x = x * (torch.rand(C, generator=g) < density)  # the masked input: inactive entries are exact zeros
    counts = torch.zeros(2, dtype=torch.long)
    y = kern.gemv_cols(q, ds, ms, KERNEL_CODE[fmt], R, x, counts)
    xr = act_ref(x).double()
    ref = qt.dequantize().double() @ xr
    scale = float((qt.dequantize().double().abs() @ xr.abs()).max())
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * scale + 1e-7)
    active = x != 0
    assert int(counts[0]) == int(active.sum())
    assert int(counts[1]) == int(active.reshape(-1, 32).any(1).sum())


def test_both_paths_built():
    """The AVX2-only build is a different vector path from the native one (on an AVX-512 machine)."""
    nat, a2 = _native(), _avx2()
    if nat is None or a2 is None:
        pytest.skip("a path could not be built")
    assert a2.simd() == "avx2"
    assert nat.simd() == qk.expected_simd()  # the path the flags awq.kernels.hw acts on call for
    assert qk.expected_simd(("avx2", "fma")) == "avx2"


@pytest.mark.parametrize("kern", PATHS)
@pytest.mark.parametrize("nr", [1, 2, 4])
def test_rows_per_pass_override(kern, nr):
    """AWQ_QUANT_ROWS_PER_PASS's settings (kernel.set_rows_per_pass) all compute the same product; a bad one is
    refused."""
    C, R = 224, 39
    x = torch.randn(C, generator=torch.Generator().manual_seed(5))
    before = [kern.rows_per_pass(KERNEL_CODE[f]) for f in FMTS]
    try:
        kern.set_rows_per_pass(nr)
        for fmt in FMTS:
            qt = quantize(weights(R, C, 7), fmt)
            packed = kern.pack_rows(qt.qs, qt.d, qt.m if qt.m is not None else torch.empty(0), KERNEL_CODE[fmt], C)
            y = kern.gemv_rows(packed, KERNEL_CODE[fmt], C, x, torch.empty(0, dtype=torch.long))
            ref = gemv_ref(qt.dequantize(), x)
            scale = float((qt.dequantize().double().abs() @ act_ref(x).double().abs()).max())
            assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * scale + 1e-7)
        with pytest.raises(RuntimeError, match="rows per pass"):
            kern.set_rows_per_pass(3)
    finally:
        for f, nr0 in zip(FMTS, before):
            kern.set_rows_per_pass(nr0, KERNEL_CODE[f])


@pytest.mark.parametrize("kern", PATHS)
def test_rows_per_pass_measured_and_cached(kern, tmp_path, monkeypatch):
    """The rows per pass of each format is a measured choice (one of 1, 2, 4), cached per machine, and the
    measurement leaves the kernel's setting as it found it."""
    from awq.kernels import hw

    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qk, "PROBE_BYTES", 1 << 20)
    monkeypatch.setattr(hw, "_memo", {})
    before = kern.rows_per_pass(KERNEL_CODE["q4_1"])
    nr = qk.choose_rows_per_pass(kern, "q4_1")
    assert nr in (1, 2, 4)
    assert kern.rows_per_pass(KERNEL_CODE["q4_1"]) == before
    cached = json.loads((tmp_path / "hw" / "choices.json").read_text())
    assert [v["choice"] for k, v in cached.items() if k.endswith(":quant_rows_per_pass_q4_1")] == [str(nr)]


def tcols_ref(qt_t: QTensor, x: torch.Tensor) -> torch.Tensor:
    """What gemv_tcols computes, written out: W^T [C, R] with blocks along R; the active entries of x in groups
    of 32; per group and output block z = x_j d_jb quantised to int8 (scale amax / 127, float32 as the kernel),
    summed against the integer quants exactly; Q4_1 adds sum_j x_j m_jb."""
    C, R = qt_t.shape
    q = int_quants(qt_t).double()
    d = qt_t.d.float().reshape(C, R // 32)
    m = qt_t.m.float().reshape(C, R // 32) if qt_t.m is not None else None
    idx = torch.nonzero(x).flatten()
    y = torch.zeros(R, dtype=torch.float64)
    for g0 in range(0, len(idx), 32):
        ii = idx[g0:g0 + 32]
        z = x[ii, None].float() * d[ii]  # [n, R/32]
        s = z.abs().amax(0) / 127
        inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
        zq = torch.round(z * inv).double()
        blocks = (zq[:, :, None] * q[ii].reshape(len(ii), R // 32, 32)).sum(0)  # [R/32, 32]
        y += (blocks * s.double()[:, None]).reshape(R)
        if m is not None:
            y += (x[ii, None].double() * m[ii].double()).sum(0).repeat_interleave(32)
    return y


@pytest.mark.parametrize("kern", PATHS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("R,C", [(32, 7), (96, 37), (160, 608), (1088, 45)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_tcols_gemv_equals_reference(kern, fmt, R, C, density):
    """The output-blocked layout (W^T requantised, blocks along the outputs): the kernel equals its written-out
    reference (tcols_ref) to float32 rounding, and dequantise + masked dense to the int8 activation rounding."""
    qt_t = quantize(weights(R, C, R + C).t().contiguous(), fmt)  # W [R, C] -> W^T [C, R]
    q, ds, ms = kern.pack_tcols(qt_t.qs, qt_t.d, qt_t.m if qt_t.m is not None else torch.empty(0),
                                KERNEL_CODE[fmt], R)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(C, generator=g)
    x = x * (torch.rand(C, generator=g) < density)
    y = kern.gemv_tcols(q, ds, ms, KERNEL_CODE[fmt], R, x)
    w = qt_t.dequantize().double().t()
    scale = float((w.abs() @ x.double().abs()).max()) + 1e-12
    assert torch.allclose(y.double(), tcols_ref(qt_t, x), rtol=0, atol=1e-5 * scale + 1e-7)
    assert torch.allclose(y.double(), w @ x.double(), rtol=0, atol=0.02 * scale + 1e-7)


@pytest.mark.parametrize("fmt", FMTS)
def test_int_quants_and_tcols_product(fmt):
    """int_quants times the scales (plus the mins) is the dequantisation; TcolsProduct (the decode-path check's model
    of the kernel) equals the written-out reference on a batch of rows."""
    qt_t = quantize(weights(96, 45, 1).t().contiguous(), fmt)
    C, R = qt_t.shape
    v = int_quants(qt_t).float().reshape(C, R // 32, 32) * qt_t.d.float().reshape(C, R // 32, 1)
    if qt_t.m is not None:
        v = v + qt_t.m.float().reshape(C, R // 32, 1)
    assert torch.equal(v.reshape(C, R), qt_t.dequantize())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, C, generator=g) * (torch.rand(3, C, generator=g) < 0.6)
    got = TcolsProduct(qt_t)(x)
    for r in range(3):
        assert torch.allclose(got[r].double(), tcols_ref(qt_t, x[r]), rtol=1e-6, atol=1e-6)
