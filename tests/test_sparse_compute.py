"""Gathered-weight sparse MLP: exactness against masked dense / SparseMLP, for both kernel paths."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import awq.kernels.build as kb
import awq.kernels.mlp as km
from awq.load.arch import PROJS
from awq.methods.base import base_mlp, sparsify_, swapped_mlps, unsparsify_
from awq.methods.cost import metering
from awq.methods.gathered import GatheredConfig, GatheredSparseMLP, InterleavedMLP, cluster_selector, group_tokens
from awq.methods.paper_mlp import SparseMLP, SparsityConfig
from tests.conftest import tiny_model

# both paths; the C++ one is skipped (and says so) where it cannot be built (no g++/ninja)
KERNEL_PATHS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not km.cpp_kernel_available(), reason="C++ sparse MLP kernel could not be built here"))]
H, FI = 64, 128


def make_mlp(seed=0, arch="mistral", bias=False):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=FI, mlp_bias=bias)).eval()
    for p in mlp.parameters():  # O(1) outputs so that thresholds and tolerances mean something
        nn.init.normal_(p, std=0.2)
    return mlp.requires_grad_(False)


def reference(mlp, x, m=None, t=(0.0, 0.0, 0.0), out_mask=None):
    """Plain masked dense MLP: down(act(g*m) * (u*m)) with optional thresholds, one token row at a time
    when m is per-token ([T, F])."""
    g = mlp.gate_proj(x)
    u = mlp.up_proj(x)
    g = torch.where(g.abs() >= t[0], g, torch.zeros_like(g))
    u = torch.where(u.abs() >= t[1], u, torch.zeros_like(u))
    if m is not None:
        g, u = g * m, u * m
    d = mlp.down_proj(F.silu(g) * u)
    d = torch.where(d.abs() >= t[2], d, torch.zeros_like(d))
    return d if out_mask is None else d * out_mask


def random_mask(density, width=FI, gen=None):
    if density == 0.0:
        return torch.zeros(width, dtype=torch.bool)
    if density == 1.0:
        return torch.ones(width, dtype=torch.bool)
    return torch.rand(width, generator=gen) < density


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("split", [False, True])  # True: the C++ kernel splits even tiny jobs over threads
def test_sparse_equals_masked_dense(kernel, density, tokens, split, monkeypatch):
    if split:
        if kernel == "torch":
            pytest.skip("thread split applies to the C++ kernel")
        monkeypatch.setattr(km, "MIN_BYTES_PER_THREAD", 1)
    mlp = make_mlp(seed=int(density * 10) + tokens)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel=kernel)
    assert gmlp._use_cpp() == (kernel == "cpp")  # the path under test is the one that runs
    x = torch.randn(tokens, H)
    m = random_mask(density)
    ref = reference(mlp, x, m.float())
    for active in (m, m.float(), m.to(torch.uint8), torch.nonzero(m).flatten()):
        got = gmlp(x, active)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if density == 0.0:
        assert torch.count_nonzero(gmlp(x, m)) == 0


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_dense_when_no_active_set_and_leading_dims(kernel):
    mlp = make_mlp(1)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel=kernel)
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(gmlp(x), mlp(x), rtol=1e-5, atol=1e-5)
    m = random_mask(0.4)
    torch.testing.assert_close(gmlp(x, m), reference(mlp, x, m.float()), rtol=1e-5, atol=1e-5)
    gmlp.set_active(m)
    torch.testing.assert_close(gmlp(x), reference(mlp, x, m.float()), rtol=1e-5, atol=1e-5)


class MaskCodebook(nn.Module):
    """Minimal codebook for SparseMLP: multiply the projection output by a fixed mask."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, y, **kw):
        return y * self.m


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_thresholds_match_sparse_mlp_with_same_mask(kernel):
    mlp = make_mlp(2)
    x = torch.randn(4, H)
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    t = {"gate_proj": float(g.abs().quantile(0.4)), "up_proj": float(u.abs().quantile(0.3)),
         "down_proj": float(mlp(x).abs().quantile(0.2))}
    m = random_mask(0.5)
    cb = MaskCodebook(m.float())
    smlp = SparseMLP(mlp, 0, t, {"gate_proj": cb, "up_proj": cb})
    gmlp = GatheredSparseMLP.from_mlp(smlp, kernel=kernel)  # takes SparseMLP's thresholds
    assert gmlp.thresholds == t
    ref = smlp(x)
    got = gmlp(x, m)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, reference(mlp, x, m.float(), (t["gate_proj"], t["up_proj"], t["down_proj"])),
                               rtol=1e-5, atol=1e-5)
    assert (ref == 0).float().mean() > 0.1  # the down threshold really bites
    om = random_mask(0.5, H)
    torch.testing.assert_close(gmlp(x, m, out_mask=om), ref * om, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_bias_supported(kernel):
    mlp = make_mlp(3, bias=True)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel=kernel)
    x = torch.randn(2, H)
    m = random_mask(0.3)
    torch.testing.assert_close(gmlp(x, m), reference(mlp, x, m.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("max_groups", [16, 1])  # grouped sparse path, then the masked-dense fallback
def test_grouping_by_cluster_is_exact(kernel, max_groups):
    mlp = make_mlp(4)
    gen = torch.Generator().manual_seed(0)
    cents = torch.stack([random_mask(0.3, gen=gen) for _ in range(5)])  # [K, F]
    labels = torch.tensor([3, 0, 3, 3, 1, 0, 4])
    x = torch.randn(len(labels), H)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel=kernel, max_groups=max_groups)
    rows = torch.stack([reference(mlp, x[i:i + 1], cents[labels[i]].float())[0] for i in range(len(labels))])
    torch.testing.assert_close(gmlp(x, (labels, cents)), rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gmlp(x, cents[labels]), rows, rtol=1e-5, atol=1e-5)  # per-token masks
    masks, inv = group_tokens((labels, cents), len(labels), FI)
    assert masks.shape[0] == 4 and torch.equal(masks[inv], cents[labels])


def test_group_read_counts_each_group_once(monkeypatch):
    """Tokens of one cluster are computed in one gathered call (weights read once per group)."""
    mlp = make_mlp(5)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel="torch")
    calls = []
    orig = gmlp._sparse
    monkeypatch.setattr(gmlp, "_sparse", lambda x2, idx: calls.append((x2.shape[0], idx.numel())) or orig(x2, idx))
    cents = torch.stack([random_mask(0.2), random_mask(0.2)])
    gmlp(torch.randn(6, H), (torch.tensor([1, 0, 1, 1, 0, 1]), cents))
    assert sorted(c[0] for c in calls) == [2, 4]


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_bf16_close(kernel):
    mlp = make_mlp(6).to(torch.bfloat16)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel=kernel)
    x = torch.randn(2, H, dtype=torch.bfloat16)
    m = random_mask(0.5)
    ref = reference(mlp.float(), x.float(), m.float())
    got = gmlp(x, m)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)


def test_bad_inputs_give_clear_errors():
    gmlp = GatheredSparseMLP.from_mlp(make_mlp(7))
    x = torch.randn(2, H)
    with pytest.raises(ValueError, match=r"width 100 but the MLP intermediate size is 128"):
        gmlp(x, torch.ones(100, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"width 64 but the MLP intermediate size is 128"):
        gmlp(x, torch.ones(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        gmlp(x, torch.tensor([0, 128]))
    with pytest.raises(ValueError, match="3 active masks for 2 tokens"):
        gmlp(x, torch.ones(3, FI, dtype=torch.bool))
    with pytest.raises(ValueError, match="cluster labels out of range"):
        gmlp(x, (torch.tensor([0, 5]), torch.ones(2, FI)))
    with pytest.raises(ValueError, match="hidden size 32"):
        gmlp(torch.randn(1, 32), torch.ones(FI, dtype=torch.bool))
    with pytest.raises(ValueError, match="output mask has width 10 but the hidden size is 64"):
        gmlp(x, torch.ones(FI, dtype=torch.bool), out_mask=torch.ones(10))
    with pytest.raises(ValueError, match=r"act_fn\(0\) != 0"):
        GatheredSparseMLP(torch.zeros(4, 3, 8), torch.exp)


def test_fallback_when_compile_fails(monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    def boom(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(km, "_kernel_state", {})
    monkeypatch.setattr(ext, "load", boom)
    monkeypatch.delenv("AWQ_SPARSE_KERNEL", raising=False)
    mlp = make_mlp(8)
    gmlp = GatheredSparseMLP.from_mlp(mlp)  # kernel="auto"
    x, m = torch.randn(1, H), random_mask(0.5)
    with caplog.at_level(logging.WARNING, logger="awq.kernels.build"):
        got = gmlp(x, m)
    assert "C++ kernel unavailable" in caplog.text and "no compiler here" in caplog.text
    assert len(caplog.records) == 1  # one line, once
    gmlp(x, m)
    assert len(caplog.records) == 1
    torch.testing.assert_close(got, reference(mlp, x, m.float()), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="could not be built"):
        GatheredSparseMLP.from_mlp(mlp, kernel="cpp")(x, m)


def test_fallback_when_source_missing(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(km, "_kernel_state", {})
    monkeypatch.setattr(kb, "SOURCE_DIRS", (tmp_path,))
    monkeypatch.delenv("AWQ_SPARSE_KERNEL", raising=False)
    with caplog.at_level(logging.WARNING, logger="awq.kernels.build"):
        assert km.cpp_kernel() is None
    assert "source csrc/sparse_mlp.cpp not found" in caplog.text


def test_kernel_source_is_found_and_keyed():
    src = kb.find_source("sparse_mlp.cpp")
    assert src is not None and "fused_sparse_swiglu" in src.read_text() and "PYBIND11_MODULE" in src.read_text()
    k = kb.build_key(src.read_text(), km._CFLAGS, ["-fopenmp"])
    assert k == kb.build_key(src.read_text(), km._CFLAGS, ["-fopenmp"])
    assert k != kb.build_key(src.read_text() + " ", km._CFLAGS, ["-fopenmp"])
    assert k != kb.build_key(src.read_text(), km._CFLAGS[:-1], ["-fopenmp"])


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_model_swap_with_selector(kernel):
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 128, (1, 6))
    gen = torch.Generator().manual_seed(1)
    cents = {p: torch.stack([random_mask(0.5, gen=gen) for _ in range(3)]) for p in ("gate_proj", "up_proj")}
    cents["down_proj"] = torch.stack([random_mask(0.7, H, gen=gen) for _ in range(3)])

    def label_fn(x, layer_idx):  # a stand-in predictor: any deterministic function of the MLP input
        return (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    fns = {p: label_fn for p in cents}
    with torch.no_grad():
        dense = model(ids).logits
        # reference: masked dense MLPs (per-token masks from the same labels)
        origs = [layer.mlp for layer in model.model.layers]

        class RefMLP(nn.Module):
            def __init__(self, mlp, i):
                super().__init__()
                self.mlp, self.i = mlp, i

            def forward(self, x):
                x2 = x.reshape(-1, H)
                lab = label_fn(x2, self.i)
                m = (cents["gate_proj"][lab] & cents["up_proj"][lab]).float()
                return reference(self.mlp, x2, m, out_mask=cents["down_proj"][lab].float()).reshape(x.shape)

        for i, layer in enumerate(model.model.layers):
            layer.mlp = RefMLP(origs[i], i)
        ref = model(ids).logits
        for i, layer in enumerate(model.model.layers):
            layer.mlp = origs[i]
        mods = swapped_mlps(sparsify_(model, GatheredConfig(kernel=kernel)), GatheredSparseMLP)
        assert [m.layer_idx for m in mods] == [0, 1]
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)  # no selector: dense
        for m in mods:
            m.selector = cluster_selector(fns, cents)
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)
    with pytest.raises(ValueError, match="must have 2 entries"):
        sparsify_(tiny_model("llama", layers=2), GatheredConfig(thresholds={p: [0.0] for p in PROJS}))
    with pytest.raises(ValueError, match=r"thresholds lack \['down_proj'\]"):
        GatheredConfig(thresholds={"gate_proj": [0.0], "up_proj": [0.0]})
    with pytest.raises(ValueError, match="kernel must be one of"):
        GatheredConfig(kernel="cuda")


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("projs", [("gate_proj",), ("gate_proj", "up_proj")])
def test_cluster_selector_single_token_decode(kernel, projs):
    """One token at a time (decode) goes through the per-centroid index cache; same result as masks."""
    mlp = make_mlp(9)
    gen = torch.Generator().manual_seed(2)
    cents = {p: torch.stack([random_mask(0.4, gen=gen) for _ in range(4)]) for p in projs}
    label_fn = lambda x, layer: (x[:, :3] > 0).long().sum(1)  # noqa: E731  (labels 0..3)
    gmlp = GatheredSparseMLP.from_mlp(mlp, kernel=kernel)
    gmlp.selector = cluster_selector({p: label_fn for p in projs}, cents)
    for _ in range(2):  # second pass hits the cache
        for x in torch.randn(5, 1, H):
            lab = label_fn(x, 0)
            m = cents[projs[0]][lab]
            if len(projs) == 2:
                m = m & cents[projs[1]][lab]
            torch.testing.assert_close(gmlp(x), reference(mlp, x, m.float()), rtol=1e-5, atol=1e-5)
    bad = cluster_selector({"gate_proj": lambda x, layer: torch.full((x.shape[0],), 7)}, cents)
    gmlp.selector = bad
    with pytest.raises(ValueError, match=r"gate_proj cluster labels out of range \[0, 4\)"):
        gmlp(torch.randn(1, H))


def ref_read_fraction(active, T):
    """Mean over tokens of |active set| / F, from per-token masks built by hand."""
    if active is None:
        return 1.0
    if isinstance(active, tuple):
        labels, cents = active
        return sum(int(cents[int(l)].sum()) for l in labels) / (len(labels) * FI)
    if active.dtype == torch.int64:  # an index list
        active = torch.zeros(FI, dtype=torch.bool).index_fill_(0, active, True)
    m = active.bool() if active.dim() == 2 else active.bool().expand(T, FI)
    return sum(int(r.sum()) for r in m) / (T * FI)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("max_groups", [16, 1])  # grouped sparse path, then the masked-dense fallback
def test_read_meter_counts_the_gathered_rows(kernel, max_groups):
    """Every path (dense, shared set, one token, groups, masked-dense fallback) reports |active| / F per token
    for gate, up and down."""
    model = sparsify_(tiny_model("llama", layers=2), GatheredConfig(kernel=kernel, max_groups=max_groups))
    mod = swapped_mlps(model, GatheredSparseMLP)[0]
    gen = torch.Generator().manual_seed(3)
    cents = torch.stack([random_mask(0.3, gen=gen) for _ in range(4)])
    labels = torch.tensor([2, 0, 2, 3, 1, 2])
    x = torch.randn(len(labels), H)
    for active in (None, cents[1], cents[1].float(), torch.nonzero(cents[2]).flatten(), (labels, cents),
                   cents[labels]):
        for xs in (x, x[:1]):
            act = active
            if isinstance(active, tuple) and len(xs) == 1:
                act = (labels[:1], cents)
            elif isinstance(active, torch.Tensor) and active.dim() == 2:
                act = active[:len(xs)]
            with metering(model) as meter:
                mod(xs, act)
            want = ref_read_fraction(act, len(xs))
            for p in PROJS:
                assert meter.per_projection()[p] == pytest.approx(want, abs=1e-12), (p, act)
            assert meter.per_layer()[1] is None and float(meter.tokens[0]) == len(xs)


def test_selector_model_is_metered():
    """Through the walker: a selector-driven model feeds the meter with the selected sets' sizes."""
    model = tiny_model("llama", layers=2)
    gen = torch.Generator().manual_seed(4)
    cents = {"gate_proj": torch.stack([random_mask(0.4, gen=gen) for _ in range(3)])}
    fn = lambda x, layer: (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # noqa: E731
    sparsify_(model, GatheredConfig(selector=cluster_selector({"gate_proj": fn}, cents)))
    seen = []
    for m in swapped_mlps(model, GatheredSparseMLP):
        sel = m.selector
        m.selector = lambda layer, x2, sel=sel: seen.append(fn(x2, layer)) or sel(layer, x2)
    with torch.no_grad(), metering(model) as meter:
        model(torch.randint(0, 128, (1, 5)))
    sizes = cents["gate_proj"].sum(1).double() / FI
    want = float(torch.cat([sizes[lab] for lab in seen]).mean())
    assert meter.weight_read_fraction() == pytest.approx(want, abs=1e-12) and 0 < want < 1


def test_reconfigure_through_base():
    """base_mlp() of a gathered MLP is a SwiGLU MLP (views of the interleaved weight): the walker can
    re-configure the model with any method, and put a working dense MLP back."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 7))
    thr = {p: [0.05, 0.08] for p in PROJS}
    with torch.no_grad():
        dense = tiny_model("llama", layers=2)(ids).logits
        want = sparsify_(tiny_model("llama", layers=2), SparsityConfig(thresholds=thr))(ids).logits
        model = sparsify_(tiny_model("llama", layers=2), GatheredConfig(kernel="torch"))
        g0 = swapped_mlps(model, GatheredSparseMLP)[0]
        b = base_mlp(g0)
        assert isinstance(b, InterleavedMLP) and all(hasattr(b, a) for a in ("gate_proj", "up_proj", "down_proj",
                                                                                "act_fn"))
        assert b.gate_proj.weight.data_ptr() == g0.weight.data_ptr()  # a view, not a copy
        sparsify_(model, GatheredConfig(thresholds=thr, kernel="torch"))  # re-configured without a copy
        g1 = swapped_mlps(model, GatheredSparseMLP)[0]
        assert g1.weight.data_ptr() == g0.weight.data_ptr() and g1.thresholds["up_proj"] == 0.05
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        sparsify_(model, SparsityConfig(thresholds=thr))
        assert isinstance(model.model.layers[0].mlp, SparseMLP)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        unsparsify_(model)
        assert isinstance(model.model.layers[1].mlp, InterleavedMLP)
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_build_text_covers_headers_and_march(monkeypatch):
    """Every source of the module and the shared header key the build; AWQ_HW_FLAGS without AVX-512
    builds for AVX2 (-march=haswell), as on an AVX2-only CPU."""
    srcs = [kb.find_source(n) for n in km.SOURCES]
    assert all(s is not None for s in srcs)
    text = kb.source_text(srcs)
    assert "gemv_rows" in text and "attn_step" in text and "fused_sparse_swiglu" in text  # simd.h, both .cpp
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma")
    assert kb.march_flag() == "-march=haswell"
    monkeypatch.setenv("AWQ_HW_FLAGS", "sse4_2")
    assert kb.march_flag() == "-march=x86-64"
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma avx512f")
    assert kb.march_flag() == "-march=native"
    monkeypatch.delenv("AWQ_HW_FLAGS")
    assert kb.march_flag() == "-march=native"
