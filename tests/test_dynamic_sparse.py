"""Batch-1 dynamic sparse decode kernels (awq/methods/dynamic_sparse.py) against obviously-correct references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awq.kernels.mlp import cpp_kernel_available
from awq.methods import dynamic_sparse as ds

pytestmark = pytest.mark.skipif(not cpp_kernel_available(), reason="C++ sparse MLP kernel unavailable")


def _ref_input(x, wg, wu, wd, t_x, t_h, xs=None, hs=None, bg=None, bu=None, bd=None):
    """Loop-free masked dense reference: TEAL/WINA as the module defines it."""
    sx = x.abs() if xs is None else x.abs() * xs
    keep_x = sx >= t_x
    xk = x * keep_x
    g = wg @ xk + (0 if bg is None else bg)
    u = wu @ xk + (0 if bu is None else bu)
    h = F.silu(g) * u
    sh = h.abs() if hs is None else h.abs() * hs
    keep_h = sh >= t_h
    y = wd @ (h * keep_h) + (0 if bd is None else bd)
    return y, int(keep_x.sum()), int(keep_h.sum())


def _weights(H, Fi, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    wg, wu = torch.randn(Fi, H, generator=g) / H ** 0.5, torch.randn(Fi, H, generator=g) / H ** 0.5
    wd = torch.randn(H, Fi, generator=g) / Fi ** 0.5
    x = torch.randn(H, generator=g)
    return wg.to(dtype), wu.to(dtype), wd.to(dtype), x


@pytest.mark.parametrize("H,Fi", [(64, 128), (72, 200), (37, 53)])  # vector bodies and scalar tails
@pytest.mark.parametrize("scaled", [False, True])
def test_input_sparse_kernel_matches_reference(H, Fi, scaled):
    wg, wu, wd, x = _weights(H, Fi, seed=H + Fi)
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(H, generator=g) + 0.5 if scaled else None
    hs = torch.rand(Fi, generator=g) + 0.5 if scaled else None
    bg, bu, bd = torch.randn(Fi, generator=g), torch.randn(Fi, generator=g), torch.randn(H, generator=g)
    for t_x, t_h in [(0.0, 0.0), (0.5, 0.05), (0.9, 0.2), (100.0, 0.0)]:
        k = ds.InputSparseDecode(wg, wu, wd, t_x, t_h, bg, bu, bd, xs, hs)
        y = k(x)
        ref, kx, kh = _ref_input(x, wg, wu, wd, t_x, t_h, xs, hs, bg, bu, bd)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        assert k.counts.tolist() == [kx, kh]
        assert k.densities() == (kx / H, kh / Fi)


def test_input_sparse_kernel_bf16_weights():
    wg, wu, wd, x = _weights(64, 160, dtype=torch.bfloat16)
    x = x.bfloat16()
    k = ds.InputSparseDecode(wg, wu, wd, 0.6, 0.02)
    ref, _, _ = _ref_input(x.float(), wg.float(), wu.float(), wd.float(), 0.6, 0.02)
    torch.testing.assert_close(k(x), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("H,Fi", [(64, 128), (72, 200), (37, 53)])
def test_neuron_kernel_cats_and_index_modes(H, Fi):
    wg, wu, wd, x = _weights(H, Fi, seed=7)
    g = torch.Generator().manual_seed(2)
    bg, bu, bd = torch.randn(Fi, generator=g) * 0.1, torch.randn(Fi, generator=g) * 0.1, torch.randn(H, generator=g)
    a = F.silu(wg @ x + bg)
    u = wu @ x + bu
    for t in (0.0, 0.1, 0.3, 1e9):
        k = ds.NeuronSparseDecode(wg, wu, wd, t, bg, bu, bd)
        keep = a.abs() >= t
        torch.testing.assert_close(k(x), wd @ (a * keep * u) + bd, rtol=1e-4, atol=1e-5)
        assert int(k.counts[0]) == int(keep.sum())
    idx = torch.randperm(Fi, generator=g)[: Fi // 3]
    keep = torch.zeros(Fi, dtype=torch.bool)
    keep[idx] = True
    k = ds.NeuronSparseDecode(wg, wu, wd, 0.0, bg, bu, bd)
    torch.testing.assert_close(k(x, idx), wd @ (a * u * keep) + bd, rtol=1e-4, atol=1e-5)
    assert k.density() == idx.numel() / Fi
    with pytest.raises(RuntimeError, match="out of range"):
        k(x, torch.tensor([Fi]))
    for t in (0.1, 0.3):  # predicted then thresholded: gate rows of idx, up/down rows of |a| >= t within idx
        k = ds.NeuronSparseDecode(wg, wu, wd, t, bg, bu, bd)
        kept = keep & (a.abs() >= t)
        torch.testing.assert_close(k(x, idx), wd @ (a * u * kept) + bd, rtol=1e-4, atol=1e-5)
        assert k.counts.tolist() == [int(kept.sum()), idx.numel()]
        assert k.gate_density() == idx.numel() / Fi and k.density() == int(kept.sum()) / Fi


@pytest.mark.parametrize("H,Fi", [(64, 128), (37, 53)])
def test_down_gather_reads_nonzero_rows(H, Fi):
    from awq.kernels.mlp import MIN_BYTES_PER_THREAD, cpp_kernel

    _, _, wd, _ = _weights(H, Fi, seed=3)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(Fi, generator=g)
    h[torch.rand(Fi, generator=g) < 0.6] = 0
    counts = torch.zeros(1, dtype=torch.long)
    y = cpp_kernel().down_gather(h, wd.t().contiguous(), MIN_BYTES_PER_THREAD, counts)
    torch.testing.assert_close(y, wd @ h, rtol=1e-4, atol=1e-5)
    assert int(counts[0]) == int((h != 0).sum())
    y0 = cpp_kernel().down_gather(torch.zeros(Fi), wd.t().contiguous(), MIN_BYTES_PER_THREAD, counts)
    assert int(counts[0]) == 0 and not y0.any()


# --- the method modules: the single-token kernel path equals their masked dense path, cost included ----
def _methods(model):
    from awq.load.arch import decoder_layers
    from awq.methods.cats import calibrate_cats
    from awq.methods.neuron_predictor import calibrate_neuron_predictor
    from awq.methods.registry import calibrate_larosa, calibrate_wina
    from awq.methods.teal import calibrate_teal

    g = torch.Generator().manual_seed(0)
    H = model.config.hidden_size
    xs = [torch.randn(256, H, generator=g) for _ in decoder_layers(model)]
    return {"teal": calibrate_teal(model, xs, 0.5), "wina": calibrate_wina(model, xs, 0.5),
            "larosa": calibrate_larosa(model, xs, 0.4), "cats": calibrate_cats(model, xs, 0.4),
            "neuron_predictor": calibrate_neuron_predictor(model, xs, 0.4, steps=5)}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_method_modules_decode_path_equals_masked_dense(arch):
    from awq.methods.base import sparsify_, swapped_mlps, unsparsify_
    from awq.methods.cost import metering
    from tests.conftest import tiny_model

    model = tiny_model(arch, hidden=64, inter=160)
    x = torch.randn(3, 1, 1, 64, generator=torch.Generator().manual_seed(3))
    for name, cfg in _methods(model).items():
        unsparsify_(model)
        sparsify_(model, cfg)
        mods = swapped_mlps(model)
        ref_y, ref_read = [], []
        for m in mods:
            with metering(model) as meter:
                ref_y.append([m(xi) for xi in x])
            ref_read.append(meter.weight_read_fraction())
        assert ds.prepare_decode_(model) == len(mods), name
        for m, ry, rr in zip(mods, ref_y, ref_read):
            with metering(model) as meter:
                ys = [m(xi) for xi in x]
            for y, r in zip(ys, ry):
                assert y.shape == r.shape
                torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-5, msg=f"{name} layer {m.layer_idx}")
            assert meter.weight_read_fraction() == pytest.approx(rr, abs=1e-12), name
        # observers still see the reference path; several tokens never take the kernel
        many = torch.randn(1, 5, 64)
        m = mods[0]
        m._decode, saved = None, m._decode
        want = m(many)
        m._decode = saved
        torch.testing.assert_close(m(many), want)


def test_lean_decoder_uses_kernels_same_tokens():
    from awq.decode.lean import LeanDecoder
    from awq.load.arch import decoder_layers
    from awq.methods.base import sparsify_
    from awq.methods.teal import calibrate_teal
    from tests.conftest import tiny_model

    model = tiny_model("llama", hidden=64, inter=160)
    xs = [torch.randn(256, 64, generator=torch.Generator().manual_seed(i)) for i in range(len(decoder_layers(model)))]
    sparsify_(model, calibrate_teal(model, xs, 0.5))
    ids = torch.arange(1, 9)
    want = model.generate(ids[None], max_new_tokens=6, do_sample=False, attention_mask=torch.ones(1, 8))[0, 8:].tolist()
    dec = LeanDecoder(model)
    assert all(ly.mlp._decode is not None for ly in dec.layers)
    assert dec.generate(ids, 6) == want


def test_unsupported_reason_logged_not_raised(monkeypatch, caplog):
    from awq.load.arch import decoder_layers
    from awq.methods.base import sparsify_, swapped_mlps
    from awq.methods.teal import calibrate_teal
    from tests.conftest import tiny_model

    model = tiny_model("llama", hidden=64, inter=160)
    xs = [torch.randn(64, 64) for _ in decoder_layers(model)]
    sparsify_(model, calibrate_teal(model, xs, 0.5))
    monkeypatch.setattr(ds, "cpp_kernel", lambda: None)
    monkeypatch.setattr(ds, "_warned", set())
    assert ds.prepare_decode_(model) == 0
    assert "kernel is unavailable" in caplog.text
    assert all(m._decode is None for m in swapped_mlps(model))


def test_decode_read_fraction_and_measure_point():
    """The decode-steps meter gives the same fraction with and without the kernels; measure_point uses it."""
    from awq.decode.lean import LeanDecoder
    from awq.decode.speed import decode_read_fraction, measure_point, read_bytes, roofline
    from awq.load.arch import decoder_layers
    from awq.methods.base import sparsify_, swapped_mlps
    from awq.methods.neuron_predictor import calibrate_neuron_predictor
    from tests.conftest import tiny_model, tiny_tokenizer

    model = tiny_model("llama", hidden=64, inter=160)
    xs = [torch.randn(256, 64, generator=torch.Generator().manual_seed(i)) for i in range(len(decoder_layers(model)))]
    sparsify_(model, calibrate_neuron_predictor(model, xs, 0.4, steps=3))
    mods = swapped_mlps(model)
    dec = LeanDecoder(model)
    ids = torch.arange(1, 11)
    fast = decode_read_fraction(dec, ids, 6, mods)
    assert all(m._decode is not None for m in mods)
    saved = [m._decode for m in mods]
    for m in mods:
        m._decode = None
    slow = decode_read_fraction(dec, ids, 6, mods)
    for m, s in zip(mods, saved):
        m._decode = s
    assert fast == pytest.approx(slow) and fast == pytest.approx(round(0.4 * 160) / 160)
    out = measure_point(model, tiny_tokenizer(), None, prompt_tokens=8, new_tokens=4, repeats=1)
    extra = sum(m.extra_bytes for m in mods) / read_bytes(model)["mlp"]
    assert out["decode_weight_read_fraction"] == pytest.approx(fast + extra)
    assert out["roofline"] == pytest.approx(roofline(model, fast + extra))
