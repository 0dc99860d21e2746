"""R-Sparse (awq/methods/rsparse.py): module against a per-token reference, read accounting, search budget, decode."""
from __future__ import annotations

import pytest
import torch

from awq.kernels.mlp import cpp_kernel_available
from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.common import mlp_of
from awq.methods.cost import metering
from awq.methods.registry import METHODS, extra_read
from awq.methods.rsparse import RSparseConfig, calibrate_rsparse, svd_factors
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _xs(model, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 64, generator=g) for _ in decoder_layers(model)]


def test_svd_factors_best_rank_r():
    w = torch.randn(9, 7, generator=torch.Generator().manual_seed(0))
    a, b = svd_factors(w, 3)
    s = torch.linalg.svdvals(w)
    assert float((a @ b - w).square().sum()) == pytest.approx(float(s[3:].square().sum()), rel=1e-4)


def _ref_token(mlp, x, t_x, t_h, a1, b1, a2, b2):
    """One token with explicit loops over kept / dropped channels."""
    f = mlp.gate_proj.out_features
    wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    keep = [abs(float(v)) >= t_x for v in x]
    gu = sum(wgu[:, i] * x[i] for i in range(x.numel()) if keep[i])
    rest = torch.tensor([0.0 if keep[i] else float(x[i]) for i in range(x.numel())])
    gu = gu + a1 @ (b1 @ rest)
    h = mlp.act_fn(gu[:f]) * gu[f:]
    kh = [abs(float(v)) >= t_h for v in h]
    y = sum(mlp.down_proj.weight[:, j] * h[j] for j in range(f) if kh[j])
    rest_h = torch.tensor([0.0 if kh[j] else float(h[j]) for j in range(f)])
    return y + a2 @ (b2 @ rest_h), sum(keep) / len(keep), sum(kh) / len(kh)


def test_module_matches_reference_reads_and_extra():
    model = tiny_model(inter=96)
    mlp = mlp_of(model, 0)
    a1, b1 = svd_factors(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), 5)
    a2, b2 = svd_factors(mlp.down_proj.weight, 3)
    n = len(decoder_layers(model))
    cfg = RSparseConfig(0.5, [0.6] * n, [0.02] * n, [a1] * n, [b1] * n, [a2] * n, [b2] * n)
    sparsify_(model, cfg)
    mod = decoder_layers(model)[0].mlp
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with metering(model) as meter:
        y = mod(x)
    dxs, dhs = [], []
    for t in range(4):
        want, dx, dh = _ref_token(mlp, x[t], 0.6, 0.02, a1, b1, a2, b2)
        torch.testing.assert_close(y[t], want, rtol=1e-4, atol=1e-5)
        dxs.append(dx)
        dhs.append(dh)
    pp = meter.per_projection()
    assert pp["gate_proj"] == pytest.approx(sum(dxs) / 4) and pp["down_proj"] == pytest.approx(sum(dhs) / 4)
    assert extra_read(cfg, model) == pytest.approx((5 * (64 + 192) + 3 * (64 + 96)) / (3 * 64 * 96))
    if cpp_kernel_available():
        assert mod.prepare_decode()
        for t in range(4):
            torch.testing.assert_close(mod(x[t:t + 1]), y[t:t + 1], rtol=1e-4, atol=1e-5)
    unsparsify_(model)


def test_search_meets_budget_and_rank_zero_is_teal():
    model = tiny_model(inter=96)
    xs = _xs(model)
    cfg = calibrate_rsparse(model, xs, 0.5, rank_fractions=(0.0, 0.1), splits=(0.0, 0.1))
    for c in cfg.info["search"]:
        extra = (c["r1"] * (64 + 192) + c["r2"] * (64 + 96)) / (3 * 64 * 96)
        assert (2 * c["dx"] + c["dh"]) / 3 + extra == pytest.approx(0.5, abs=1e-3)
    teal = calibrate_rsparse(model, xs, 0.5, rank_fractions=(0.0,), splits=(0.0,))
    from awq.methods.common import keep_threshold
    from awq.methods.teal import calibrate_teal

    ref = calibrate_teal(model, xs, 0.5)
    assert teal.x_thresholds == pytest.approx(ref.x_thresholds)
    for i, x in enumerate(xs):  # t_h: on h of the x-pruned input (what the module thresholds), not of dense x
        mlp = mlp_of(model, i)
        xk = x * (x.abs() >= teal.x_thresholds[i])
        h = mlp.act_fn(mlp.gate_proj(xk)) * mlp.up_proj(xk)
        assert teal.h_thresholds[i] == pytest.approx(keep_threshold(h.abs(), 0.5), rel=1e-5)
    assert "rsparse" in METHODS
