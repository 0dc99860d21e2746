"""Issue 10: the intermediate-neuron cluster method against small loop references on tiny random models."""
from __future__ import annotations

import pytest
import torch

from awq.kernels.mlp import cpp_kernel_available
from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.cluster_fit import coverage_weights, fit_centroids, train_router
from awq.methods.cluster_neuron import ClusterNeuronConfig, ClusterVariant, calibrate_cluster_neuron
from awq.methods.common import CalibData, MethodError, collect_mlp_inputs, dense_h, mlp_of
from awq.methods.cost import metering
from awq.methods.registry import METHODS, extra_read
from tests.conftest import tiny_model

FAST = dict(iters=5, router_steps=30)


def _objective(w, c, lab):
    return sum(float(w[n] @ c[lab[n]].float()) for n in range(w.shape[0]))


def test_fit_centroids_is_a_fixed_point_of_the_loop_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(40, 12, generator=g) ** 3
    c, lab = fit_centroids(w, k=3, s=4, iters=50, seed=0)
    assert c.shape == (3, 12) and (c.sum(1) == 4).all()
    for n in range(w.shape[0]):  # each token is on a centroid covering the most of its weight
        cov = [float(sum(w[n, j] for j in range(12) if c[k, j])) for k in range(3)]
        assert cov[int(lab[n])] == pytest.approx(max(cov), rel=1e-5)
    for k in range(3):  # each centroid holds the s neurons with the largest assigned mass
        mass = [float(sum(w[n, j] for n in range(40) if lab[n] == k)) for j in range(12)]
        if any(lab == k):
            assert min(mass[j] for j in range(12) if c[k, j]) >= max(mass[j] for j in range(12) if not c[k, j]) - 1e-6
    # better than one centroid per token drawn at random (a sanity floor)
    rand_c = torch.zeros(3, 12, dtype=torch.bool)
    rand_c[:, :4] = True
    assert _objective(w, c, lab) >= _objective(w, rand_c, torch.zeros(40, dtype=torch.long))
    c2, lab2 = fit_centroids(w, k=3, s=4, iters=50, seed=0)
    assert torch.equal(c, c2) and torch.equal(lab, lab2)


def test_fit_centroids_respects_allowed():
    w = torch.rand(30, 10, generator=torch.Generator().manual_seed(2))
    allowed = torch.ones(10, dtype=torch.bool)
    allowed[[0, 3]] = False
    c, _ = fit_centroids(w, k=2, s=3, seed=0, allowed=allowed)
    assert not c[:, [0, 3]].any() and (c.sum(1) == 3).all()


def test_router_deterministic_and_learns_a_linear_rule():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g) * torch.linspace(0.5, 3, 16)
    lab = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    w1, b1 = train_router(x, lab, 4, steps=60, seed=7)
    w2, b2 = train_router(x, lab, 4, steps=60, seed=7)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    acc = float(((x @ w1.T + b1).argmax(1) == lab).float().mean())
    assert acc > 0.85


def _ref_forward(mlp, x, cfg, i):
    """Token by token, neuron by neuron: the mask, the output and the per-projection reads."""
    wg, wu, wd = (getattr(mlp, p).weight.detach() for p in ("gate_proj", "up_proj", "down_proj"))
    c, hot = cfg.centroids[i], cfg.hot[i]
    f = wg.shape[0]
    ys, reads = [], []
    for xt in x:
        a = [float(mlp.act_fn(wg[j] @ xt)) for j in range(f)]
        u = [float(wu[j] @ xt) for j in range(f)]
        h = [a[j] * u[j] for j in range(f)]
        if cfg.routed:
            score = [float(cfg.router_w[i][k] @ xt + cfg.router_b[i][k]) for k in range(c.shape[0])]
        else:
            score = [sum(abs(h[j]) for j in range(f) if c[k, j]) for k in range(c.shape[0])]
        top = sorted(range(len(score)), key=lambda k: -score[k])[: cfg.top_m]
        m = [bool(hot[j]) or any(bool(c[k, j]) for k in top) for j in range(f)]
        t = cfg.thresholds[i] if cfg.within != "none" else 0.0
        val = a if cfg.within == "gate" else h
        keep = [m[j] and (cfg.within == "none" or abs(val[j]) >= t) for j in range(f)]
        ys.append(sum(h[j] * wd[:, j] for j in range(f) if keep[j]) if any(keep) else torch.zeros(wd.shape[0]))
        dm, dk = sum(m) / f, sum(keep) / f
        reads.append({"gate": (dm, dk, dk), "h": (dm, dm, dk), "ideal": (dk, dk, dk)}.get(cfg.within, (dm, dm, dm)))
    return torch.stack(ys), torch.tensor(reads, dtype=torch.float64).mean(0)


@pytest.mark.parametrize("routed,top_m,within,hot", [(False, 1, "none", False), (True, 2, "none", True),
                                                     (True, 1, "gate", False), (False, 2, "h", True),
                                                     (False, 1, "ideal", False)])
def test_module_matches_loop_reference(routed, top_m, within, hot):
    model = tiny_model(layers=1, hidden=16, inter=24)
    mlp = mlp_of(model, 0)
    g = torch.Generator().manual_seed(4)
    c = torch.rand(5, 24, generator=g) < 0.3
    hs = torch.rand(24, generator=g) < 0.2 if hot else torch.zeros(24, dtype=torch.bool)
    cfg = ClusterNeuronConfig(centroids=[c], hot=[hs], top_m=top_m, within=within,
                              thresholds=[0.02] if within != "none" else [])
    if routed:
        cfg.router_w, cfg.router_b = [torch.randn(5, 16, generator=g)], [torch.randn(5, generator=g)]
    x = torch.randn(1, 7, 16, generator=g)
    sparsify_(model, cfg)
    with metering(model) as meter:
        y = decoder_layers(model)[0].mlp(x)
    ref_y, ref_reads = _ref_forward(mlp, x[0], cfg, 0)
    torch.testing.assert_close(y[0], ref_y, rtol=1e-4, atol=1e-5)
    got = meter.per_projection()
    for j, p in enumerate(("gate_proj", "up_proj", "down_proj")):
        assert got[p] == pytest.approx(float(ref_reads[j]), abs=1e-9)
    k, hidden, inter = 5, 16, 24
    assert extra_read(cfg, model) == pytest.approx((k * hidden + k) / (3 * hidden * inter) if routed else 0.0)


@pytest.fixture(scope="module")
def tiny_calib():
    model = tiny_model(layers=2)
    windows = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(5))
    return model, windows, collect_mlp_inputs(model, windows, None)


def test_oracle_read_equals_centroid_size(tiny_calib):
    model, windows, xs = tiny_calib
    inter = mlp_of(model, 0).gate_proj.out_features
    cfg = calibrate_cluster_neuron(model, xs, 0.5, ClusterVariant(routed=False, k=8, **FAST))
    sparsify_(model, cfg)
    with metering(model) as meter:
        model(windows[:1])
    unsparsify_(model)
    assert meter.weight_read_fraction() == pytest.approx(round(0.5 * inter) / inter)
    # calib_coverage: per token, the share of its |h| inside the centroid covering the most of it; mean over
    # tokens, then over layers (a plain loop)
    covs = []
    for i, x in enumerate(xs):
        a, u = dense_h(mlp_of(model, i), x)
        habs = (a * u).abs()
        C = cfg.centroids[i].float()
        per_tok = [float((hb * C[int((C @ hb).argmax())]).sum() / hb.sum()) for hb in habs]
        covs.append(sum(per_tok) / len(per_tok))
    assert cfg.info["calib_coverage"] == pytest.approx(sum(covs) / len(covs), rel=1e-5)


@pytest.mark.parametrize("within", ["gate", "h", "ideal"])
def test_threshold_keeps_its_density_on_calibration_tokens(tiny_calib, within):
    model, windows, xs = tiny_calib
    v = ClusterVariant(k=1 if within == "ideal" else 8, within=within, routed=within != "ideal", **FAST)
    cfg = calibrate_cluster_neuron(model, xs, 0.4, v)
    _, dk = v.sizes(0.4)
    sparsify_(model, cfg)
    kept = []
    for i, x in enumerate(xs):
        mod = decoder_layers(model)[i].mlp
        a = mod.act_fn(mod.gate_proj(x))
        val = a.abs() if within == "gate" else (a * mod.up_proj(x)).abs()
        m = mod.select(x, None if mod.router_w is not None else val)
        kept.append(float((m & (val >= mod.t)).float().mean()))
    unsparsify_(model)
    assert sum(kept) / len(kept) == pytest.approx(dk, abs=0.02)


def test_calibration_deterministic_for_a_seed(tiny_calib):
    model, _, xs = tiny_calib
    v = ClusterVariant(k=8, top_m=2, hot_q=0.5, **FAST)
    a, b = calibrate_cluster_neuron(model, xs, 0.5, v, seed=3), calibrate_cluster_neuron(model, xs, 0.5, v, seed=3)
    for name in ("centroids", "hot", "router_w", "router_b"):
        assert all(torch.equal(p, q) for p, q in zip(getattr(a, name), getattr(b, name)))


def test_pooled_codebook_is_shared_with_equal_memory(tiny_calib):
    model, _, xs = tiny_calib
    cfg = calibrate_cluster_neuron(model, xs, 0.5, ClusterVariant(routed=False, pooled=True, k=4, **FAST))
    assert cfg.centroids[0] is cfg.centroids[1] and cfg.centroids[0].shape[0] == 4 * len(xs)


def test_every_variant_registered_and_runs(tiny_calib):
    model, windows, _ = tiny_calib
    calib = CalibData(windows, max_tokens=None)
    names = [n for n in METHODS if n.startswith("cluster_") and n not in ("cluster_oracle", "cluster_predicted")]
    assert len(names) >= 8
    assert METHODS["cluster_neuron_oracle"].realizable is False and METHODS["cluster_hthresh"].realizable is True
    cfg = METHODS["cluster_neuron_oracle"].calibrate(model, calib, 0.5)
    assert cfg.summary()["K"] == 64 and not cfg.routed


def test_bad_input_one_line_errors(tiny_calib):
    model, _, xs = tiny_calib
    n = xs[0].shape[0]
    with pytest.raises(MethodError, match="calibration tokens") as e:
        calibrate_cluster_neuron(model, xs, 0.5, ClusterVariant(k=n + 1, **FAST))
    assert "\n" not in str(e.value)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(MethodError, match="read fraction"):
            calibrate_cluster_neuron(model, xs, bad, ClusterVariant(k=4, **FAST))
    with pytest.raises(MethodError, match="centroid size"):
        fit_centroids(torch.rand(10, 5), k=2, s=6)
    with pytest.raises(MethodError, match="weighting"):
        coverage_weights(torch.rand(3, 4), "nope")
    cfg = calibrate_cluster_neuron(model, xs, 0.5, ClusterVariant(routed=False, k=4, **FAST))
    cfg.top_m = 5
    with pytest.raises(MethodError, match="top_m"):
        sparsify_(model, cfg)


# ------------------------------------------------------------------------------------------------
# batch-1 decode kernel (routed "gate" / "none"): equals the masked dense path, reads included
# ------------------------------------------------------------------------------------------------
def _routed_cfg(model, within, top_m, hot, t, seed=6):
    from awq.methods.common import mlp_dims

    hidden, inter = mlp_dims(model)
    n = len(decoder_layers(model))
    g = torch.Generator().manual_seed(seed)
    cfg = ClusterNeuronConfig(centroids=[torch.rand(6, inter, generator=g) < 0.4 for _ in range(n)],
                              hot=[(torch.rand(inter, generator=g) < 0.15) & hot for _ in range(n)],
                              router_w=[torch.randn(6, hidden, generator=g) for _ in range(n)],
                              router_b=[torch.randn(6, generator=g) for _ in range(n)], top_m=top_m, within=within,
                              thresholds=[t] * n if within != "none" else [])
    for c in cfg.centroids:
        c[:, 0] = True  # never an empty centroid
    return cfg


@pytest.mark.skipif(not cpp_kernel_available(), reason="no C++ compiler")
@pytest.mark.parametrize("within,top_m,hot,t", [("gate", 1, False, 0.02), ("gate", 2, True, 0.05),
                                                ("gate", 1, False, 0.0), ("gate", 1, False, 1e9),
                                                ("none", 1, False, 0.0), ("none", 2, True, 0.0)])
def test_decode_kernel_equals_masked_path(within, top_m, hot, t):
    from awq.methods.base import swapped_mlps
    from awq.methods.dynamic_sparse import prepare_decode_

    model = tiny_model(layers=2, hidden=64, inter=160)
    sparsify_(model, _routed_cfg(model, within, top_m, hot, t))
    xs = torch.randn(4, 1, 1, 64, generator=torch.Generator().manual_seed(7))
    mods = swapped_mlps(model)
    want, want_read = [], []
    for m in mods:  # masked dense path, token by token
        with metering(model) as meter:
            want.append([m(x) for x in xs])
        want_read.append(meter.per_projection())
    assert prepare_decode_(model) == len(mods)
    for m, ws, wr in zip(mods, want, want_read):
        with metering(model) as meter:
            got = [m(x) for x in xs]
        for y, w in zip(got, ws):
            torch.testing.assert_close(y, w, rtol=1e-4, atol=1e-5)
        for p, v in meter.per_projection().items():
            assert v == pytest.approx(wr[p], abs=1e-12), p
    if t > 1e6:  # nothing survives: up and down not read, output zero
        assert want_read[0]["up_proj"] == 0.0 and not any(bool(y.any()) for y in got)
    many = torch.randn(1, 3, 64)  # several tokens never take the kernel
    m = mods[0]
    m._decode, saved = None, m._decode
    ref = m(many)
    m._decode = saved
    torch.testing.assert_close(m(many), ref)


@pytest.mark.parametrize("routed,within", [(False, "gate"), (True, "h"), (False, "ideal"), (False, "none")])
def test_decode_kernel_refused_where_semantics_differ(routed, within):
    from awq.methods.base import swapped_mlps

    model = tiny_model(layers=1, hidden=16, inter=24)
    cfg = _routed_cfg(model, within, 1, False, 0.01)
    if not routed:
        cfg.router_w, cfg.router_b = [], []
    sparsify_(model, cfg)
    m = swapped_mlps(model)[0]
    assert m.decode_unsupported() is not None and m.prepare_decode() is False


@pytest.mark.parametrize("within", ["gate", "none"])
def test_routed_calibration_deterministic_for_a_seed(tiny_calib, within):
    model, _, xs = tiny_calib
    v = ClusterVariant(k=8, within=within, **FAST)
    a, b = calibrate_cluster_neuron(model, xs, 0.4, v, seed=5), calibrate_cluster_neuron(model, xs, 0.4, v, seed=5)
    for name in ("centroids", "router_w", "router_b"):
        assert all(torch.equal(p, q) for p, q in zip(getattr(a, name), getattr(b, name)))
    assert a.thresholds == b.thresholds
