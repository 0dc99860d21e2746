"""SCAP (awq/methods/scap.py): KDE mode, module against a reference with the folded biases, decode, calibration."""
from __future__ import annotations

import pytest
import torch

from awq.kernels.mlp import cpp_kernel_available
from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.common import mlp_of
from awq.methods.cost import metering
from awq.methods.registry import METHODS
from awq.methods.scap import ScapConfig, calibrate_scap, kde_peak
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_kde_peak_finds_the_mode():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(30000, generator=g) * 0.2 + 1.5, torch.randn(10000, generator=g) * 0.2 - 2.0])
    assert kde_peak(v) == pytest.approx(1.5, abs=0.05)
    assert kde_peak(torch.full((10,), 0.3)) == pytest.approx(0.3)


def test_module_matches_shifted_reference_and_decode():
    model = tiny_model(inter=96)
    n = len(decoder_layers(model))
    cfg = ScapConfig(0.5, [0.1] * n, [-0.01] * n, [0.5] * n, [0.03] * n)
    sparsify_(model, cfg)
    mod = decoder_layers(model)[0].mlp
    base = mlp_of(model, 0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with metering(model) as meter:
        y = mod(x)
    dx = dh = 0.0
    for t in range(5):  # the same map written out: prune around the mode, dense weights on pruned + mode
        xc = x[t] - 0.1
        xk = torch.where(xc.abs() >= 0.5, xc, torch.zeros(())) + 0.1
        h = base.act_fn(base.gate_proj(xk)) * base.up_proj(xk)
        hc = h + 0.01
        hk = torch.where(hc.abs() >= 0.03, hc, torch.zeros(())) - 0.01
        torch.testing.assert_close(y[t], base.down_proj(hk), rtol=1e-4, atol=1e-5)
        dx += float((xc.abs() >= 0.5).float().mean()) / 5
        dh += float((hc.abs() >= 0.03).float().mean()) / 5
    pp = meter.per_projection()
    assert pp["up_proj"] == pytest.approx(dx) and pp["down_proj"] == pytest.approx(dh)
    if cpp_kernel_available():
        assert mod.prepare_decode()
        for t in range(5):
            torch.testing.assert_close(mod(x[t:t + 1]), y[t:t + 1], rtol=1e-4, atol=1e-5)
    unsparsify_(model)


def test_calibration_split_and_densities():
    model = tiny_model(inter=96)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(300, 64, generator=g) + 0.3 for _ in decoder_layers(model)]
    cfg = calibrate_scap(model, xs, 0.5, splits=(0.0, 0.15))
    assert cfg.info["split"] in (0.0, 0.15)
    assert (2 * cfg.info["dx"] + cfg.info["dh"]) / 3 == pytest.approx(0.5)
    for i, x in enumerate(xs):
        d = float(((x - cfg.x_modes[i]).abs() >= cfg.x_thresholds[i]).float().mean())
        assert d == pytest.approx(cfg.info["dx"], abs=0.01)
    assert "scap" in METHODS
