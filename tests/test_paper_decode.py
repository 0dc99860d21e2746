"""Batch-1 decode kernel of the paper's thresholded MLP (awq/methods/paper_decode.py, SparseMLP.prepare_decode)
against obviously-correct references: the down gather, the module's masked dense path (outputs and metered
cost, every paper variant) and greedy tokens of the lean decoder against Hugging Face generate."""
from __future__ import annotations

import pytest
import torch

from awq.kernels.mlp import cpp_kernel, cpp_kernel_available
from awq.load.arch import PROJS, decoder_layers
from awq.methods.base import sparsify_, swapped_mlps, unsparsify_
from awq.methods.paper import VARIANTS, paper_config

pytestmark = pytest.mark.skipif(not cpp_kernel_available(), reason="C++ sparse MLP kernel unavailable")


def _ref_down(h, wd):
    """y = W_down (h with its zeros), rows selected by a Python loop: the definition."""
    y = torch.zeros(wd.shape[0], dtype=torch.float64)
    n = 0
    for j in range(h.numel()):
        if h[j] != 0:
            y += float(h[j]) * wd[:, j].double()
            n += 1
    return y.float(), n


@pytest.mark.parametrize("H,Fi", [(64, 128), (72, 200), (37, 53)])  # vector bodies and scalar tails
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_gather_matches_reference(H, Fi, dtype):
    from awq.methods.paper_decode import down_gather_torch

    g = torch.Generator().manual_seed(H * Fi)
    wd = (torch.randn(H, Fi, generator=g) / Fi ** 0.5).to(dtype)
    wd_t = wd.t().contiguous()
    for keep in (0.0, 0.1, 0.5, 1.0):
        h = torch.randn(Fi, generator=g) * (torch.rand(Fi, generator=g) < keep)
        ref, n = _ref_down(h, wd)
        counts = torch.zeros(1, dtype=torch.long)
        y = cpp_kernel().down_gather(h, wd_t, 1 << 18, counts)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y, ref, **tol)
        assert int(counts[0]) == n
        c2 = torch.zeros(1, dtype=torch.long)
        torch.testing.assert_close(down_gather_torch(h, wd_t, c2), ref, **tol)
        assert int(c2[0]) == n


def _thresholds(model, density=0.5, seed=0):
    """Per-layer thresholds keeping ``density`` of |g|, |u| and |down output| on random inputs."""
    from awq.kernels.threshold import threshold as _threshold
    from awq.methods.common import keep_threshold

    g0 = torch.Generator().manual_seed(seed)
    out = {p: [] for p in PROJS}
    with torch.no_grad():
        for layer in decoder_layers(model):
            m = layer.mlp
            x = torch.randn(256, model.config.hidden_size, generator=g0).to(m.gate_proj.weight.dtype)
            g, u = m.gate_proj(x), m.up_proj(x)
            tg, tu = keep_threshold(g.abs(), density), keep_threshold(u.abs(), density)
            d = m.down_proj(m.act_fn(_threshold(g, tg)) * _threshold(u, tu))
            for p, t in zip(PROJS, (tg, tu, keep_threshold(d.abs(), density))):
                out[p].append(t)
    return out


def _model(arch="llama", bias=False, dtype=torch.float32, seed=0):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config(arch, hidden=64, inter=160)
    if bias:
        cfg.mlp_bias = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if bias:  # random, not zero, biases
        with torch.no_grad():
            for layer in decoder_layers(model):
                for p in PROJS:
                    getattr(layer.mlp, p).bias.normal_(0, 0.1)
    return model.to(dtype)


@pytest.mark.parametrize("arch,bias,dtype", [("llama", False, torch.float32), ("mistral", False, torch.float32),
                                             ("llama", True, torch.float32), ("llama", False, torch.bfloat16)])
def test_kernel_path_equals_masked_dense_path(arch, bias, dtype):
    """Every paper variant: single-token kernel output and metered cost == the masked dense path's."""
    from awq.methods.cost import metering

    model = _model(arch, bias, dtype)
    thr = _thresholds(model)
    x = torch.randn(6, 1, 1, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for variant in VARIANTS:
        unsparsify_(model)
        sparsify_(model, paper_config(thr, variant))
        mods = swapped_mlps(model)
        with metering(model) as meter:
            ref = [[m(xi) for xi in x] for m in mods]
        ref_pp = meter.per_projection()
        assert all(m.prepare_decode() for m in mods), variant
        with metering(model) as meter:
            got = [[m(xi) for xi in x] for m in mods]
        for m, ys, rs in zip(mods, got, ref):
            for y, r in zip(ys, rs):
                assert y.shape == r.shape and y.dtype == r.dtype
                torch.testing.assert_close(y, r, **tol, msg=f"{variant} layer {m.layer_idx}")
        pp = meter.per_projection()
        assert pp["gate_proj"] == pp["up_proj"] == 1.0
        if dtype == torch.float32:  # same h, hence the same rows of W_down
            assert pp == pytest.approx(ref_pp, abs=1e-12), variant
        else:  # bf16 rounding of g/u may move an entry across its threshold
            assert pp["down_proj"] == pytest.approx(ref_pp["down_proj"], abs=0.02), variant
        if variant in ("paper_gate", "paper_up", "paper_gate_up", "paper"):
            assert pp["down_proj"] < 0.9  # the thresholds do save down reads
        # the counts are the nonzero h of the masked computation
        m = mods[0]
        _, g, u, h = m._decode.parts(x[0])
        assert int(m._decode.counts[0]) == int((h != 0).sum())
        assert torch.equal(h, m.act_fn(g) * u)
        if m._decode.fused is not None:  # the one-call C++ step: same y, same rows of W_down
            y = m._decode(x[0])
            assert int(m._decode.counts[0]) == int((h != 0).sum())
            torch.testing.assert_close(y, m._decode.parts(x[0])[0], **tol)


def test_torch_gather_fallback_and_multi_token_path_unchanged():
    model = _model()
    sparsify_(model, paper_config(_thresholds(model)))
    m = swapped_mlps(model)[0]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(5))
    many = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(6))
    want, want_many = m(x), m(many)
    assert m.prepare_decode() and m._decode is not None
    fast = m(x)
    assert m._decode.fused is not None  # SiLU: one C++ call
    m._decode.fused = None  # the GEMV + torch + down_gather path
    torch.testing.assert_close(m(x), fast, rtol=1e-5, atol=1e-6)
    m._decode.gather = None  # a kernel build without down_gather
    torch.testing.assert_close(m(x), fast, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(m(many), want_many)  # several tokens: the masked path, bit for bit
    seen = []
    m.observers.append(lambda i, name, t: seen.append(name))
    torch.testing.assert_close(m(x), want)  # observed: the masked path (observers see every projection)
    assert seen == ["input", "gate_proj", "up_proj", "down_proj"]


def test_codebooks_and_unsupported_weights_keep_masked_path(caplog):
    import awq.methods.dynamic_sparse as ds
    from awq.methods.paper_mlp import SparsityConfig

    class Keep(torch.nn.Module):
        def forward(self, y, raw=None, layer_idx=None, x=None):
            return y

    model = _model()
    thr = _thresholds(model)
    sparsify_(model, SparsityConfig(thresholds=thr, codebooks={"gate_proj": Keep()}))
    m = swapped_mlps(model)[0]
    assert not m.prepare_decode() and m._decode is None
    assert "codebooks" in m.decode_unsupported()
    unsparsify_(model)
    model.half()
    sparsify_(model, paper_config(thr))
    ds._warned.clear()  # the once-per-reason log (shared with awq.methods.dynamic_sparse)
    assert not swapped_mlps(model)[0].prepare_decode()
    assert "float16 weights" in caplog.text


@pytest.mark.parametrize("variant", ["paper", "paper_gate_up"])
def test_lean_decoder_paper_kernel_same_tokens_and_cost(variant):
    """Greedy tokens of the lean decoder (kernel at decode) == HF generate with the same module (masked
    path); the decode-steps meter gives the same read fraction with and without the kernel."""
    from awq.decode.lean import LeanDecoder
    from awq.decode.speed import decode_read_fraction

    model = _model("llama", seed=1)
    sparsify_(model, paper_config(_thresholds(model, seed=1), variant))
    ids = torch.arange(1, 9)
    want = model.generate(ids[None], max_new_tokens=8, do_sample=False, attention_mask=torch.ones(1, 8))[0, 8:].tolist()
    mods = swapped_mlps(model)
    assert all(m._decode is None for m in mods)  # HF ran the masked path
    dec = LeanDecoder(model)
    assert all(ly.mlp._decode is not None for ly in dec.layers)
    assert dec.generate(ids, 8) == want
    fast = decode_read_fraction(dec, ids, 8, mods)
    saved = [m._decode for m in mods]
    for m in mods:  # set_mlps calls prepare_decode again: make it decline, so the masked path runs
        m._decode, m.prepare_decode = None, lambda: False
    slow = decode_read_fraction(dec, ids, 8, mods)
    assert all(m._decode is None for m in mods)
    for m, s in zip(mods, saved):
        del m.prepare_decode
        m._decode = s
    assert fast == pytest.approx(slow, abs=1e-12) and 2 / 3 < fast < 1.0
