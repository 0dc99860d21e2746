"""The lean decoder on block-quantised weights: the decode-path check (teacher-forced perplexity through the
decoder's kernels equals the batched evaluation on the same dequantised weights within 0.5%), dense and sparse,
F32 and quantised, on a tiny random model; raw GGUF blocks; bytes read."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import awq.kernels.quant as qk
from awq.decode.check import batched_nll, decode_path_check, fake_quantized, ppl
from awq.decode.lean import LeanDecoder
from awq.decode.quant import QuantDecodeError, model_qweights
from awq.load.arch import decoder_layers, rope_pair_perm
from awq.load.quant_formats import quantize
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.cats import CatsConfig
from awq.methods.gathered import GatheredSparseMLP
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.teal import LarosaConfig, TealConfig, WinaConfig
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(qk.kernel() is None, reason="quantised C++ kernel could not be built here")


def sharp_model(arch="llama", seed=0):
    """A tiny random model with O(1) activations (weights std 0.1, embedding std 1)."""
    m = tiny_model(arch, seed=seed, layers=2, hidden=64, inter=160)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "embed" not in name else 1.0))
    return m.requires_grad_(False)


def own_text(model, n=40):
    """A window the model predicts well (its own greedy continuation of a random prompt): a wrong kernel or
    the wrong weights move its perplexity by more than the check's 0.5%."""
    prompt = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(1))
    return torch.cat([prompt, torch.tensor(LeanDecoder(model, capacity=64).generate(prompt, n))])


def method_modules(model, kind):
    L = len(decoder_layers(model))
    if kind == "teal":
        cfg = TealConfig([0.5] * L, [0.1] * L)
    elif kind == "wina":
        cfg = WinaConfig([1.0] * L, [0.1] * L)
    elif kind == "cats":
        cfg = CatsConfig([0.2] * L)
    else:
        cfg = SparsityConfig(thresholds={"gate_proj": [0.4] * L, "up_proj": [0.4] * L, "down_proj": [0.0] * L})
    sparsify_(model, cfg)
    mods = [layer.mlp for layer in decoder_layers(model)]
    unsparsify_(model)
    return mods


CASES = [("f32", "dense"), ("f32", "teal"), ("f32", "cats"), ("q8_0", "dense"), ("q8_0", "teal"), ("q8_0", "wina"),
         ("q8_0", "cats"), ("q8_0", "paper"), ("q4_0", "dense"), ("q4_0", "cats"), ("q4_1", "dense"), ("q4_1", "teal"),
         ("q4_1", "paper")]


@pytest.mark.parametrize("weights,method", CASES)
def test_decode_path_ppl_equals_batched(weights, method):
    model = sharp_model("llama" if method != "wina" else "mistral")
    ids = own_text(model)
    dec = LeanDecoder(model, capacity=64, weights=weights)
    mods = None if method == "dense" else method_modules(model, method)
    r = decode_path_check(model, dec, ids, mods)
    assert r["rel_diff"] < 0.005, r
    if method != "dense" and weights != "f32":  # the kernels really skipped weights
        dec.set_mlps(mods)
        dec.prefill(ids[:8])
        dec._q.c.reset_counts()
        for t in ids[8:16].tolist():
            dec.step(t)
        st = dec._q.read_stats(8)
        assert 0.05 < st["mlp_weight_fraction"] < 0.9, st
    if method == "dense" and weights in ("q4_0", "q4_1"):  # the check can fail: the unquantised weights differ
        nb, n = batched_nll(model, ids)
        assert abs(ppl(nb, n) - r["ppl_decode"]) / r["ppl_decode"] > 0.005


def test_fixed_set_counts_and_two_threads():
    """A fixed neuron set; every phase split over two threads (min bytes 0: the tiny model would run on one)."""
    model = sharp_model()
    dec = LeanDecoder(model, capacity=64, weights="q8_0")
    dec._q.c.set_min_bytes(0)
    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = decode_path_check(model, dec, own_text(model, 6), method_modules(model, "teal"))
    finally:
        torch.set_num_threads(n0)
    assert r["rel_diff"] < 0.005, r
    mods = []
    for i, layer in enumerate(decoder_layers(model)):
        m = GatheredSparseMLP.from_mlp(layer.mlp, i)
        m.set_active(torch.arange(0, 160, 3))
        mods.append(m)
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(2))
    r = decode_path_check(model, dec, ids, mods)
    assert r["rel_diff"] < 0.005, r
    dec.set_mlps(mods)
    dec.prefill(ids[:4])
    dec._q.c.reset_counts()
    for t in ids[4:8].tolist():
        dec.step(t)
    st = dec._q.read_stats(4)
    k = len(range(0, 160, 3))
    assert abs(st["mlp_weight_fraction"] - k / 160) < 1e-9  # gate, up rows and down inputs of the set


def test_quantised_greedy_tokens_and_fake_quant_restore():
    model = sharp_model()
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    dec = LeanDecoder(model, capacity=64, weights="q8_0")
    with fake_quantized(model, dec._q.qw):
        assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, w0)
        ref = LeanDecoder(model, capacity=64)  # f32 decoder on the dequantised weights
        ids = torch.arange(5, 15)
        out_ref = ref.generate(ids, 12)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w0)
    out = dec.generate(ids, 12)
    assert out[:6] == out_ref[:6]  # int8 activations: the first tokens of a peaked model agree


def test_unsupported_method_is_one_line():
    model = sharp_model()
    L = len(decoder_layers(model))
    sparsify_(model, LarosaConfig([0.1] * L, [0.1] * L, rotations=[torch.eye(64)] * L))
    with pytest.raises(QuantDecodeError, match="larosa"):
        LeanDecoder(model, capacity=32, weights="q8_0")
    unsparsify_(model)


def test_raw_gguf_blocks(tmp_path):
    """Blocks taken from a GGUF are the file's bytes (no round trip); q/k rows back in HF order."""
    model = sharp_model()
    qw = model_qweights(model, "q4_1")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for i, d in enumerate(qw.layers):
        for p, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("down_proj", "ffn_down")):
            qt = d[p]
            if p in ("q_proj", "k_proj"):  # as llama's converter stores them
                qt = qt.rows(rope_pair_perm(4 if p == "q_proj" else 2, 16))
            raw = qt.to_ggml()
            w.add_tensor(f"blk.{i}.{name}.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    qg = model_qweights(model, "q4_1", gguf_path=path)
    assert qg.sources.get("gguf raw blocks") == 6
    for d, e in zip(qw.layers, qg.layers):
        for p in ("q_proj", "k_proj", "down_proj", "up_proj"):
            assert np.array_equal(d[p].to_ggml(), e[p].to_ggml()), p
    assert np.array_equal(quantize(model.lm_head.weight, "q4_1").to_ggml(), qg.head.to_ggml())


def test_sensitivity_restores_weights_and_moves_only_by_rounding():
    """decode_path_check(sensitivity=True): the batched figure again on weights scaled by 1 +- 2^-23; the model's
    weights are the same afterwards, and a dense F32 point moves by float rounding only."""
    model = sharp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = own_text(model, 12)
    r = decode_path_check(model, LeanDecoder(model, capacity=64), ids, None, sensitivity=True)
    assert r["sensitivity"] < 1e-4 and r["rel_diff"] < 0.005, r
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r = decode_path_check(model, LeanDecoder(model, capacity=64), ids, method_modules(model, "teal"),
                          sensitivity=True)
    assert "ppl_jittered" in r and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _plain_requant_t(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """W^T through gguf's own quantiser and back, transposed: the tcols values written out with gguf alone."""
    t = getattr(gguf.GGMLQuantizationType, fmt.upper())
    wt = np.ascontiguousarray(w.t().numpy())
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(wt, t), t).reshape(wt.shape)).t()


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_sparse_weights_are_the_tcols_values_and_restored(method):
    """sparse_weights puts into the projections a method's quantised kernel reads input-major (TEAL: gate, up,
    down; CATS: down) exactly W^T requantised by gguf's quantiser; the others keep the file's blocks; all restored."""
    from awq.decode.check import sparse_weights

    model = sharp_model()
    qw = model_qweights(model, "q4_1")
    mods = method_modules(model, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with fake_quantized(model, qw, act=False, kv16=False):
        rows = {n: p.detach().clone() for n, p in model.named_parameters()}
        with sparse_weights(model, qw, mods):
            for i, layer in enumerate(decoder_layers(model)):
                tc = ("gate_proj", "up_proj", "down_proj") if method == "teal" else ("down_proj",)
                for p in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(layer.mlp, p).weight
                    r = rows[f"model.layers.{i}.mlp.{p}.weight"]
                    if p in tc:
                        assert torch.equal(w, _plain_requant_t(r, "q4_1")) and not torch.equal(w, r)
                    else:
                        assert torch.equal(w, r)
        assert all(torch.equal(p, rows[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_tcols_reads_exactly_the_active_inputs(monkeypatch):
    """Bytes per token: on the tcols layout a TEAL step reads its active inputs' quants and scales, so the MLP bytes
    fraction equals the weight fraction; on the file's own blocks (AWQ_QUANT_SPARSE_LAYOUT=cols) it is larger
    (whole 32-input blocks' scales), and the decode-path check passes on both."""
    model = sharp_model()
    ids = own_text(model)
    mods = method_modules(model, "teal")
    got = {}
    for layout in ("tcols", "cols"):
        monkeypatch.setenv("AWQ_QUANT_SPARSE_LAYOUT", layout)
        dec = LeanDecoder(model, capacity=64, weights="q4_1")
        r = decode_path_check(model, dec, ids, mods)
        assert r["rel_diff"] < 0.005, (layout, r)
        dec.set_mlps(mods)
        assert dec._q.layout == layout
        dec._ensure(len(ids))
        dec.prefill(ids[:8])
        dec._q.c.reset_counts()
        for t in ids[8:20].tolist():
            dec.step(t)
        got[layout] = dec._q.read_stats(12)
        dec.set_mlps(None)
    t, c = got["tcols"], got["cols"]
    assert 0.2 < t["mlp_weight_fraction"] < 0.9
    assert t["mlp_fraction"] == pytest.approx(t["mlp_weight_fraction"], rel=1e-12)
    assert c["mlp_fraction"] > c["mlp_weight_fraction"] + 0.02
