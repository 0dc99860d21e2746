"""cluster_lowbit (awq/methods/cluster_lowbit.py): routed centroid as candidates, low-bit ranking inside."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awq.kernels.lowbit import lowbit_kernel
from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.cluster_lowbit import calibrate_cluster_lowbit
from awq.methods.common import mlp_of
from awq.methods.cost import metering
from awq.methods.lowbit_rank import copy_bytes, dequantize
from awq.methods.registry import METHODS, extra_read
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_module_reference_reads_and_decode():
    model = tiny_model(inter=96)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(256, 64, generator=g) for _ in decoder_layers(model)]
    cfg = calibrate_cluster_lowbit(model, xs, 0.3, candidates=0.6, k=4)
    sparsify_(model, cfg)
    mod = decoder_layers(model)[0].mlp
    base = mlp_of(model, 0)
    x = torch.randn(6, 64, generator=g)
    with metering(model) as meter:
        y = mod(x)
    wq = dequantize(cfg.codes[0], cfg.scales[0], 4)
    dens = []
    for t in range(6):
        c = cfg.centroids[0][int((cfg.router_w[0] @ x[t] + cfg.router_b[0]).argmax())]
        s = (F.silu(wq[:96] @ x[t]) * (wq[96:] @ x[t])).abs()
        keep = c & (s >= cfg.thresholds[0])
        want = base.down_proj(F.silu(base.gate_proj(x[t])) * base.up_proj(x[t]) * keep)
        torch.testing.assert_close(y[t], want, rtol=1e-4, atol=1e-5)
        dens.append(float(keep.float().mean()))
    assert meter.per_projection()["gate_proj"] == pytest.approx(sum(dens) / 6)
    cand = float(torch.stack([c.float().mean() for c in cfg.centroids]).mean())
    want_extra = ((4 * 64 + 4) * 4 + cand * copy_bytes(64, 96, 4)) / (3 * 64 * 96 * 4)
    assert extra_read(cfg, model) == pytest.approx(want_extra)
    if lowbit_kernel() is not None and mod.prepare_decode():
        for t in range(6):
            torch.testing.assert_close(mod(x[t:t + 1]), y[t:t + 1], rtol=1e-4, atol=1e-5)
    unsparsify_(model)
    assert "cluster_lowbit" in METHODS
