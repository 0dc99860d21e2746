"""Every frontier method against a small obviously-correct reference: outputs, masks and read accounting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.cats import calibrate_cats
from awq.methods.common import CalibData, MethodError, check_density, collect_mlp_inputs, keep_threshold
from awq.methods.cost import metering
from awq.methods.neuron_predictor import calibrate_neuron_predictor, predictor_rank
from awq.methods.paper import paper_config
from awq.methods.registry import METHODS, get_method
from awq.methods.teal import calibrate_larosa, calibrate_teal, calibrate_wina
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _windows(n=2, t=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _run_capture(model, windows):
    """Run the (sparsified) model under a meter; return the meter and each layer's (x, y) pairs."""
    caps = [[] for _ in decoder_layers(model)]
    hooks = [layer.mlp.register_forward_hook(lambda m, a, y, i=i: caps[i].append((a[0].detach(), y.detach())))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        with metering(model) as meter, torch.no_grad():
            for w in windows:
                model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return meter, [(torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in c]),
                    torch.cat([y.reshape(-1, y.shape[-1]) for _, y in c])) for c in caps]


@torch.no_grad()
def _ref_mlp_token(mlp, x, x_keep_fn, h_keep_fn, rot=None):
    """One token by hand: dense masks as Python lists, weights used column by column."""
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    if rot is not None:
        x = rot.T @ x  # (x Q) as a column vector
        wg, wu = wg @ rot, wu @ rot
    keep_x = [bool(x_keep_fn(i, float(x[i]))) for i in range(x.numel())]
    g = sum(wg[:, i] * x[i] for i in range(x.numel()) if keep_x[i])
    u = sum(wu[:, i] * x[i] for i in range(x.numel()) if keep_x[i])
    h = mlp.act_fn(g) * u
    keep_h = [bool(h_keep_fn(j, float(h[j]))) for j in range(h.numel())]
    y = sum(wd[:, j] * h[j] for j in range(h.numel()) if keep_h[j])
    return y, sum(keep_x) / len(keep_x), sum(keep_h) / len(keep_h)


def _check(meter, ref_fracs, tol=1e-9):
    pp = meter.per_projection()
    for p, v in zip(("gate_proj", "up_proj", "down_proj"), ref_fracs):
        assert pp[p] == pytest.approx(v, abs=tol), p
    assert meter.weight_read_fraction() == pytest.approx(sum(ref_fracs) / 3, abs=tol)


@pytest.mark.parametrize("kind", ["teal", "wina", "larosa"])
def test_input_sparsity_matches_reference(kind):
    model = tiny_model("llama", layers=2, seed=3)
    windows = _windows()
    xs = collect_mlp_inputs(model, windows, max_tokens=None)
    cfg = {"teal": calibrate_teal, "wina": calibrate_wina, "larosa": calibrate_larosa}[kind](model, xs, 0.5)
    bases = [layer.mlp for layer in decoder_layers(model)]
    sparsify_(model, cfg)
    meter, caps = _run_capture(model, windows)
    fx, fh, n = 0.0, 0.0, 0
    for i, (x, y) in enumerate(caps):
        mlp = bases[i]
        sx = torch.ones(x.shape[-1])
        sh = torch.ones(mlp.down_proj.in_features)
        if kind == "wina":
            sx = torch.stack([torch.cat([mlp.gate_proj.weight[:, c], mlp.up_proj.weight[:, c]]).norm()
                              for c in range(x.shape[-1])])
            sh = torch.stack([mlp.down_proj.weight[:, c].norm() for c in range(sh.numel())])
        rot = cfg.rotations[i] if kind == "larosa" else None
        for t in range(0, x.shape[0], 7):  # every 7th token by hand
            yr, dx, dh = _ref_mlp_token(mlp, x[t], lambda c, v: abs(v) * sx[c] >= cfg.x_thresholds[i],
                                        lambda c, v: abs(v) * sh[c] >= cfg.h_thresholds[i], rot)
            torch.testing.assert_close(y[t], yr, rtol=1e-4, atol=1e-5)
        # accounting for all tokens with dense masks
        xr = x if rot is None else x @ rot
        kx = xr.abs() * sx >= cfg.x_thresholds[i]
        wg = mlp.gate_proj.weight if rot is None else mlp.gate_proj.weight @ rot
        wu = mlp.up_proj.weight if rot is None else mlp.up_proj.weight @ rot
        h = mlp.act_fn(F.linear(xr * kx, wg)) * F.linear(xr * kx, wu)
        kh = h.abs() * sh >= cfg.h_thresholds[i]
        fx += float(kx.double().mean(1).sum())
        fh += float(kh.double().mean(1).sum())
        n += x.shape[0]
    _check(meter, (fx / n, fx / n, fh / n), tol=1e-6)
    if kind == "larosa":
        q = cfg.rotations[0]
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), atol=1e-5, rtol=0)
        assert cfg.extra_read(model) == pytest.approx(64 * 64 / (3 * 64 * 128))


def test_cats_matches_reference():
    model = tiny_model("mistral", layers=2, seed=4)
    windows = _windows(seed=1)
    cfg = calibrate_cats(model, collect_mlp_inputs(model, windows, max_tokens=None), 0.3)
    bases = [layer.mlp for layer in decoder_layers(model)]
    sparsify_(model, cfg)
    meter, caps = _run_capture(model, windows)
    fr, n = 0.0, 0
    for i, (x, y) in enumerate(caps):
        m = bases[i]
        for t in range(x.shape[0]):
            keep = [j for j in range(m.gate_proj.out_features)
                    if abs(float(m.act_fn(m.gate_proj.weight[j] @ x[t]))) >= cfg.thresholds[i]]
            yr = sum(m.down_proj.weight[:, j] * m.act_fn(m.gate_proj.weight[j] @ x[t]) * (m.up_proj.weight[j] @ x[t])
                     for j in keep)
            torch.testing.assert_close(y[t], yr, rtol=1e-4, atol=1e-5)
            fr += len(keep) / m.gate_proj.out_features
            n += 1
    _check(meter, (1.0, fr / n, fr / n), tol=1e-9)


def test_neuron_predictor_matches_reference_and_is_deterministic():
    model = tiny_model("llama", layers=2, seed=5)
    windows = _windows(seed=2)
    xs = collect_mlp_inputs(model, windows, max_tokens=None)
    cfg = calibrate_neuron_predictor(model, xs, 0.25, steps=20, seed=7)
    again = calibrate_neuron_predictor(model, xs, 0.25, steps=20, seed=7)
    for a, b in zip(cfg.a + cfg.b + cfg.bias, again.a + again.b + again.bias):
        assert torch.equal(a, b)
    hidden, inter = 64, 128
    r = predictor_rank(hidden, inter)
    assert r * (hidden + inter) <= 0.05 * 3 * hidden * inter < (r + 1) * (hidden + inter)
    assert cfg.a[0].shape == (r, hidden)
    assert cfg.extra_read(model) == pytest.approx((r * hidden + r * inter + inter) / (3 * hidden * inter))
    bases = [layer.mlp for layer in decoder_layers(model)]
    sparsify_(model, cfg)
    meter, caps = _run_capture(model, windows)
    k = round(0.25 * inter)
    for i, (x, y) in enumerate(caps):
        m = bases[i]
        for t in range(0, x.shape[0], 5):
            score = cfg.b[i] @ (cfg.a[i] @ x[t]) + cfg.bias[i]
            keep = sorted(range(inter), key=lambda j: -float(score[j]))[:k]
            yr = sum(m.down_proj.weight[:, j] * m.act_fn(m.gate_proj.weight[j] @ x[t]) * (m.up_proj.weight[j] @ x[t])
                     for j in keep)
            torch.testing.assert_close(y[t], yr, rtol=1e-4, atol=1e-5)
    _check(meter, (k / inter,) * 3)
    assert meter.weight_read_fraction(cfg.extra_read(model)) == pytest.approx(k / inter + cfg.extra_read(model))


@pytest.mark.parametrize("variant", ["paper", "paper_gate", "paper_up", "paper_gate_up", "paper_down"])
def test_paper_variants_accounting(variant):
    model = tiny_model("mistral", layers=2, seed=6)
    windows = _windows(seed=3)
    xs = collect_mlp_inputs(model, windows, max_tokens=None)
    thr = {p: [] for p in ("gate_proj", "up_proj", "down_proj")}
    for i, x in enumerate(xs):
        m = decoder_layers(model)[i].mlp
        for p in thr:
            inp = x if p != "down_proj" else m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            thr[p].append(keep_threshold(getattr(m, p)(inp).abs(), 0.5))
    cfg = paper_config(thr, variant)
    for p in thr:
        assert (cfg.thresholds[p] == thr[p]) == (p in {"paper": thr, "paper_gate": ["gate_proj"],
                                                       "paper_up": ["up_proj"], "paper_down": ["down_proj"],
                                                       "paper_gate_up": ["gate_proj", "up_proj"]}[variant])
    bases = [layer.mlp for layer in decoder_layers(model)]
    sparsify_(model, cfg)
    meter, caps = _run_capture(model, windows)
    fh, n = 0.0, 0
    for i, (x, _) in enumerate(caps):
        m, t = bases[i], {p: cfg.thresholds[p][i] for p in thr}
        g, u = m.gate_proj(x), m.up_proj(x)
        g, u = g * (g.abs() >= t["gate_proj"]), u * (u.abs() >= t["up_proj"])
        fh += float(((m.act_fn(g) * u) != 0).double().mean(1).sum())
        n += x.shape[0]
    _check(meter, (1.0, 1.0, fh / n))


def test_density_is_read_fraction_on_calibration_tokens():
    """Layer 0 sees the calibration inputs unchanged: its selected fraction is the target density."""
    model = tiny_model("llama", layers=2, seed=8)
    windows = _windows(n=2, t=32, seed=4)
    calib = CalibData(windows, max_tokens=None)
    for name, d, col in (("teal", 0.4, 0), ("wina", 0.6, 0), ("larosa", 0.3, 0), ("cats", 0.35, 1)):
        cfg = get_method(name).calibrate(model, calib, d)
        sparsify_(model, cfg)
        meter, _ = _run_capture(model, windows)
        got = float(meter.sums[0, col] / meter.tokens[0])
        assert got == pytest.approx(d, abs=1e-3), name
        unsparsify_(model)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_one_line(bad):
    with pytest.raises(MethodError, match=r"density must be in \(0, 1\]") as e:
        check_density(bad)
    assert "\n" not in str(e.value)


def test_unknown_method_one_line():
    with pytest.raises(MethodError, match="unknown method 'nope'") as e:
        get_method("nope")
    assert "\n" not in str(e.value) and "teal" in str(e.value)
    assert {"dense", "paper", "cats", "teal", "wina", "larosa", "neuron_predictor"} <= set(METHODS)
    assert not math.isnan(keep_threshold(torch.arange(10.0), 1.0))


def test_cluster_oracle_matches_reference(tmp_path):
    from awq.methods.cluster import calibrate_cluster

    model = tiny_model("mistral", layers=2, seed=9)
    windows = _windows(seed=5)
    gen = torch.Generator().manual_seed(0)
    files = {}
    for p, w in (("gate", 128), ("up", 128), ("down", 64)):
        c = (torch.rand(4, w, generator=gen) < 0.6).to(torch.uint8)
        files[p] = tmp_path / f"{p}.pt"
        torch.save({"centroids": c}, files[p])
    spec = ",".join(f"{p}={f}" for p, f in files.items())
    cfg = calibrate_cluster(model, windows, 0.5, centroids=spec, model_name="tiny")
    cents = {p: torch.load(f, weights_only=True)["centroids"].bool() for p, f in files.items()}
    bases = [layer.mlp for layer in decoder_layers(model)]
    sparsify_(model, cfg)
    meter, caps = _run_capture(model, windows)

    def oracle(y, c):
        a = y != 0
        best = max(range(c.shape[0]), key=lambda k: (int((a & c[k]).sum()), -k))  # largest overlap, lowest index
        return y * c[best]

    fr = torch.zeros(3, dtype=torch.float64)
    n = 0
    for i, (x, y) in enumerate(caps):
        m, t = bases[i], {p: cfg.thresholds[p][i] for p in ("gate_proj", "up_proj", "down_proj")}
        # the projections as the model computes them (one batched product per window: a per-token GEMV rounds
        # differently and flips entries sitting exactly at a calibrated threshold); then, per token, by hand
        G, U = m.gate_proj(x), m.up_proj(x)
        for tok in range(x.shape[0]):
            g, u = G[tok], U[tok]
            g = oracle(g * (g.abs() >= t["gate_proj"]), cents["gate"])
            u = oracle(u * (u.abs() >= t["up_proj"]), cents["up"])
            h = m.act_fn(g) * u
            d = m.down_proj.weight @ h
            torch.testing.assert_close(y[tok], oracle(d * (d.abs() >= t["down_proj"]), cents["down"]),
                                       rtol=1e-4, atol=1e-5)
            fr += torch.tensor([float((g != 0).double().mean()), float((u != 0).double().mean()),
                                float((h != 0).double().mean())], dtype=torch.float64)
            n += 1
    _check(meter, tuple((fr / n).tolist()))
    with pytest.raises(MethodError, match="needs a trained predictor"):
        get_method("cluster_predicted").calibrate(model, CalibData(windows), 0.5)
