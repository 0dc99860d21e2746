"""lowbit_rank (awq/methods/lowbit_rank.py): quantiser, packing, the C++ select kernel and the module, each
against a plain reference on random data (odd sizes too)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awq.kernels.lowbit import lowbit_kernel, pack_codes, unpack_codes
from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.common import MethodError
from awq.methods.cost import metering
from awq.methods.lowbit_rank import LowbitRankConfig, calibrate_lowbit_rank, copy_bytes, dequantize, quantize_rows
from awq.methods.registry import METHODS, extra_read
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _ref_quant(w, bits):
    """Plain loop: per row, every clip factor of linspace(0.3, 1, 15), float16 scale, least squared error."""
    qmax, off = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    rows = []
    for r in range(w.shape[0]):
        best = None
        for f in torch.linspace(0.3, 1.0, 15).tolist():
            s = float(torch.tensor(float(w[r].abs().max()) * f / qmax).half())
            q = [min(max(round(float(v) / s), -off), qmax) for v in w[r]]
            err = sum((qq * s - float(v)) ** 2 for qq, v in zip(q, w[r]))
            if best is None or err < best[0] - 1e-12:
                best = (err, s, q)
        rows.append(best)
    return rows


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_rows_matches_loop_reference(bits):
    w = torch.randn(5, 13, generator=torch.Generator().manual_seed(bits))
    codes, scales = quantize_rows(w, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits
    for r, (err, s, q) in enumerate(_ref_quant(w, bits)):
        deq = dequantize(codes[r:r + 1], scales[r:r + 1], bits)[0]
        got = float((deq - w[r]).square().sum())
        assert got == pytest.approx(err, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 64, 66])
def test_pack_roundtrip(bits, cols):
    codes = torch.randint(0, 2 ** bits, (3, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, -(-cols // (8 // bits)))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def _ref_scores(x, codes, scales, bits, f, bias=None):
    w = dequantize(codes, scales, bits)
    gu = w @ x.double().float() + (0 if bias is None else bias)
    return (F.silu(gu[:f]) * gu[f:]).abs()


kernel = pytest.mark.skipif(lowbit_kernel() is None, reason="low-bit rank C++ kernel unavailable")


@kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("H,Fi", [(64, 32), (37, 11), (130, 7)])
def test_select_kernel_matches_reference(bits, H, Fi):
    g = torch.Generator().manual_seed(H * Fi + bits)
    w = torch.randn(2 * Fi, H, generator=g)
    codes, scales = quantize_rows(w, bits)
    x = torch.randn(H, generator=g)
    bias = torch.randn(2 * Fi, generator=g) * 0.1
    k = lowbit_kernel()
    for b in (None, bias):
        ref = _ref_scores(x, codes, scales, bits, Fi, b)
        for cand in (torch.empty(0, dtype=torch.long), torch.tensor([Fi - 1, 0, Fi // 2])):
            nc = cand.numel() or Fi
            out = torch.empty(nc)
            t = float(ref.median())
            idx = k.lowbit_select(x, pack_codes(codes, bits), scales, bits, torch.empty(0) if b is None else b,
                                  cand, t, 1 << 18, out)
            want = ref if not cand.numel() else ref[cand]
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
            ids = cand if cand.numel() else torch.arange(Fi)
            assert idx.tolist() == ids[out >= t].tolist()  # the kernel's own scores decide: no tie flakiness
    with pytest.raises(RuntimeError, match="out of range"):
        k.lowbit_select(x, pack_codes(codes, bits), scales, bits, torch.empty(0), torch.tensor([Fi]), 0.0, 1 << 18,
                        torch.empty(0))


@kernel
def test_select_kernel_avx2_build_matches_reference(monkeypatch):
    """The AVX2+FMA path (AWQ_HW_FLAGS="avx2 fma": an -march=haswell build under its own key) against the same
    reference, odd sizes, every width."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 only")
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma")
    k = lowbit_kernel()
    if k is None:
        pytest.skip("the AVX2 build is unavailable")
    assert k.simd() == "avx2" and k is not _native()
    for bits in (2, 4, 8):
        for H, Fi in ((37, 11), (130, 7)):
            g = torch.Generator().manual_seed(H + Fi + bits)
            codes, scales = quantize_rows(torch.randn(2 * Fi, H, generator=g), bits)
            x = torch.randn(H, generator=g)
            ref = _ref_scores(x, codes, scales, bits, Fi)
            out = torch.empty(Fi)
            idx = k.lowbit_select(x, pack_codes(codes, bits), scales, bits, torch.empty(0),
                                  torch.empty(0, dtype=torch.long), float(ref.median()), 1 << 18, out)
            # float32 sums in another order: |error| ~ 1e-6 of the terms' magnitude (|W| |x|), not of the score
            mag = (dequantize(codes, scales, bits).abs() @ x.abs()).max()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=float(1e-5 * mag))
            assert idx.tolist() == torch.arange(Fi)[out >= float(ref.median())].tolist()


def _native():
    import os

    saved = os.environ.pop("AWQ_HW_FLAGS", None)
    try:
        return lowbit_kernel()
    finally:
        if saved is not None:
            os.environ["AWQ_HW_FLAGS"] = saved


def _tiny_cfg(model, density=0.4, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(300, 64, generator=g) for _ in decoder_layers(model)]
    return calibrate_lowbit_rank(model, xs, density, bits=bits), xs


def test_module_matches_reference_and_meters_reads():
    model = tiny_model(inter=96)
    cfg, xs = _tiny_cfg(model)
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(3))
    caps = []
    sparsify_(model, cfg)
    hooks = [l.mlp.register_forward_hook(lambda m, a, y: caps.append((m, a[0][0], y[0]))) for l in decoder_layers(model)]
    with metering(model) as meter:
        model(ids)
    for h in hooks:
        h.remove()
    kept = []
    for m, x, y in caps:
        base = m.base
        wq = dequantize(cfg.codes[m.layer_idx], cfg.scales[m.layer_idx], 4)
        for t in range(x.shape[0]):  # token by token, neuron by neuron
            xt = x[t]
            ref = torch.zeros(64)
            n_keep = 0
            for j in range(96):
                s = abs(float(F.silu(wq[j] @ xt)) * float(wq[96 + j] @ xt))
                if s >= cfg.thresholds[m.layer_idx]:
                    n_keep += 1
                    hj = F.silu(base.gate_proj.weight[j] @ xt) * (base.up_proj.weight[j] @ xt)
                    ref += hj * base.down_proj.weight[:, j]
            kept.append(n_keep / 96)
            torch.testing.assert_close(y[t], ref, rtol=1e-4, atol=1e-5)
    pp = meter.per_projection()
    want = sum(kept) / len(kept)
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert pp[p] == pytest.approx(want)
    assert extra_read(cfg, model) == pytest.approx(copy_bytes(64, 96, 4) / (3 * 64 * 96 * 4))
    assert meter.weight_read_fraction(extra_read(cfg, model)) == pytest.approx(want + extra_read(cfg, model))
    unsparsify_(model)


def test_calibration_density_and_errors():
    model = tiny_model(inter=96)
    cfg, xs = _tiny_cfg(model, density=0.3, bits=8)
    from awq.methods.common import mlp_of
    from awq.methods.lowbit_rank import copy_scores

    for i, x in enumerate(xs):
        s = copy_scores(mlp_of(model, i), x, cfg.codes[i], cfg.scales[i], 8)
        assert float((s >= cfg.thresholds[i]).float().mean()) == pytest.approx(0.3, abs=0.01)
    with pytest.raises(MethodError, match="bits"):
        calibrate_lowbit_rank(model, xs, 0.3, bits=3)
    with pytest.raises(MethodError, match="density"):
        calibrate_lowbit_rank(model, xs, 1.5)
    bad = LowbitRankConfig(4, 0.5, cfg.codes[:1], cfg.scales[:1], cfg.thresholds[:1])
    with pytest.raises(MethodError, match="layers"):
        sparsify_(model, bad)
    assert "lowbit_rank" in METHODS


@kernel
def test_decode_step_equals_masked_path():
    from awq.methods.dynamic_sparse import prepare_decode_

    model = tiny_model(inter=96)
    cfg, _ = _tiny_cfg(model, density=0.5)
    sparsify_(model, cfg)
    mods = [l.mlp for l in decoder_layers(model)]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(5))
    masked = [m(x) for m in mods]
    assert prepare_decode_(model) == len(mods)
    with metering(model) as meter:
        for m, ref in zip(mods, masked):
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    keep = mods[0].scores(x.reshape(1, -1)) >= mods[0].t
    assert meter.sums[0, 0] == pytest.approx(float(keep.float().mean()))
    unsparsify_(model)
