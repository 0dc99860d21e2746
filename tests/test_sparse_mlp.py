"""Thresholded MLP swap: exactness against the dense model and a hand-written reference."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from awq.experiments.eval import SparsityMeter, measure_sparsity, perplexity, window_nll
from awq.load.arch import PROJS, UnsupportedModelError
from awq.methods.base import sparsify_
from awq.methods.paper_mlp import SparseMLP, SparsityConfig, sparse_mlps
from awq.methods.recording import add_observer
from awq.store.thresholds import ThresholdsError, load_thresholds, save_thresholds
from tests.conftest import tiny_model


def zero_thresholds(n):
    return {p: [0.0] * n for p in PROJS}


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_threshold_zero_gives_dense_logits(arch):
    model = tiny_model(arch, layers=3)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        dense = model(ids).logits
        sparsify_(model, SparsityConfig(thresholds=zero_thresholds(3)))
        swapped = model(ids).logits
    assert torch.equal(dense, swapped)
    assert len(sparse_mlps(model)) == 3 == model.config.num_hidden_layers


def reference_mlp(mlp_weights, x, t):
    """Plain per-element reference of the artifact's ThresholdMistralMLP (artifact-behaviour 3.1)."""
    wg, wu, wd = mlp_weights
    g = x @ wg.T
    g = torch.where((g >= t[0]) | (g <= -t[0]), g, torch.zeros_like(g))
    u = x @ wu.T
    u = torch.where((u >= t[1]) | (u <= -t[1]), u, torch.zeros_like(u))
    a = F.silu(g) * u
    d = a @ wd.T
    return torch.where((d >= t[2]) | (d <= -t[2]), d, torch.zeros_like(d))


def test_masking_matches_hand_reference():
    model = tiny_model("mistral", layers=2)
    mlp = model.model.layers[1].mlp
    w = (mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone())
    thr = {"gate_proj": [0.0, 0.05], "up_proj": [0.0, 0.04], "down_proj": [0.0, 0.01]}
    sparsify_(model, SparsityConfig(thresholds=thr))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        got = model.model.layers[1].mlp(x)
    ref = reference_mlp(w, x, (0.05, 0.04, 0.01))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got == 0).float().mean() > 0.05  # the thresholds really bite


def test_swap_reuses_weights_and_resparsify():
    model = tiny_model("llama", layers=2)
    w = model.model.layers[0].mlp.gate_proj.weight
    sparsify_(model, SparsityConfig(thresholds=None))
    sparsify_(model, SparsityConfig(thresholds=zero_thresholds(2)))
    m = model.model.layers[0].mlp
    assert isinstance(m, SparseMLP) and m.gate_proj.weight is w
    assert not any(isinstance(c, SparseMLP) for c in m.children())


def test_observer_sees_thresholded_outputs():
    model = tiny_model("mistral", layers=2)
    thr = {p: [0.02, 0.03] for p in PROJS}
    sparsify_(model, SparsityConfig(thresholds=thr))
    seen = []
    add_observer(model, lambda l, name, y: seen.append((l, name, float((y != 0).float().mean()), y.shape[-1])))
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 8)))
    names = [(l, n) for l, n, _, _ in seen]
    assert names == [(l, n) for l in range(2) for n in ("input", "gate_proj", "up_proj", "down_proj")]
    widths = {n: w for _, n, _, w in seen}
    assert widths == {"input": 64, "gate_proj": 128, "up_proj": 128, "down_proj": 64}


def test_thresholds_file_roundtrip_and_errors(tmp_path):
    thr = {p: [0.1 * (i + 1) for i in range(3)] for p in PROJS}
    f = tmp_path / "t.json"
    save_thresholds(thr, f)
    raw = json.loads(f.read_text())
    raw["act_fn"] = {"layer_0": 1.0}  # ignored, as in the artifact
    f.write_text(json.dumps(raw))
    assert load_thresholds(f, 3) == thr
    with pytest.raises(ThresholdsError, match="has 3 layers but the model has 2"):
        load_thresholds(f, 2)
    with pytest.raises(ThresholdsError, match="not found"):
        load_thresholds(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ThresholdsError, match="not valid JSON"):
        load_thresholds(bad)
    bad.write_text(json.dumps({"gate_proj": {"layer_0": 1}, "up_proj": {"layer_0": 1}}))
    with pytest.raises(ThresholdsError, match="no 'down_proj'"):
        load_thresholds(bad)
    bad.write_text(json.dumps({p: {"layer_0": 1, "layer_2": 1} for p in PROJS}))
    with pytest.raises(ThresholdsError, match="not 0..1"):
        load_thresholds(bad)
    bad.write_text(json.dumps({p: {"layer_0": -1} for p in PROJS}))
    with pytest.raises(ThresholdsError, match="non-negative"):
        load_thresholds(bad)
    model = tiny_model("mistral", layers=2)
    with pytest.raises(ThresholdsError, match="3 layers but the model has 2"):
        sparsify_(model, SparsityConfig(thresholds=thr))


def test_unsupported_architecture_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2MLP"):
        sparsify_(m, SparsityConfig())


def test_perplexity_matches_hand_computation():
    torch.manual_seed(0)
    V, T = 11, 6

    class Toy(torch.nn.Module):
        """Logits are a fixed function of the token id (a bigram table)."""

        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(V, V))

        def forward(self, ids):
            return type("O", (), {"logits": self.table[ids]})()

    toy = Toy()
    windows = torch.randint(0, V, (3, T))
    res = perplexity(toy, windows)
    logp = torch.log_softmax(toy.table.detach(), dim=-1)
    total, n = 0.0, 0
    for w in windows.tolist():
        for a, b in zip(w[:-1], w[1:]):
            total -= float(logp[a, b])
            n += 1
    assert res.tokens == n == 3 * (T - 1)
    assert math.isclose(res.ppl, math.exp(total / n), rel_tol=1e-6)
    nll, cnt = window_nll(toy, windows[:1])
    assert cnt == T - 1 and nll.shape == (1,)
    # batching does not change the result
    assert math.isclose(perplexity(toy, windows, batch_size=2).ppl, res.ppl, rel_tol=1e-6)


def test_sparsity_meter_counts():
    m = SparsityMeter(2)
    m(0, "gate_proj", torch.tensor([0.0, 1.0, 0.0, 2.0]))
    m(1, "gate_proj", torch.tensor([0.0, 0.0, 0.0, 2.0]))
    m(0, "input", torch.zeros(3))
    s = m.summary()
    assert s["gate_proj"]["per_layer"] == [0.5, 0.75]
    assert s["gate_proj"]["mean"] == pytest.approx(5 / 8)
    m2 = SparsityMeter(2)
    m2.add(m.counts())
    assert m2.summary() == s


def test_measured_sparsity_context_on_model():
    model = tiny_model("mistral", layers=2)
    sparsify_(model, SparsityConfig(thresholds={p: [0.0, 0.0] for p in PROJS}))
    with measure_sparsity(model, 2) as meter, torch.no_grad():
        model(torch.randint(0, 128, (1, 8)))
    s = meter.summary()
    assert set(s) == set(PROJS) and all(v["mean"] < 0.01 for v in s.values())
    assert not sparse_mlps(model)[0].observers  # detached on exit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_threshold_equals_reference_including_ties(dtype):
    from awq.kernels.threshold import threshold as _threshold

    for t in (0.3, 0.05, 1e-3, 0.7):
        td = torch.tensor(t, dtype=dtype)
        y = (torch.randn(50000) * 0.5).to(dtype)
        y[:3] = torch.stack([td, -td, torch.tensor(0.0, dtype=dtype)])
        ref = torch.where(y.abs() >= td, y, torch.zeros_like(y))  # compare in the tensor's dtype
        got = _threshold(y, t)
        assert torch.equal(got, ref), (dtype, t)
        assert got[0] == td and got[1] == -td  # |y| == t is kept
