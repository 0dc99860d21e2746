"""GatheredSparseMLP's single-kernel-call path for a fixed active set (the lean decoder's decode step)."""
from __future__ import annotations

import pytest
import torch

import awq.kernels.mlp as km
from awq.methods.cost import ReadMeter
from awq.methods.gathered import GatheredSparseMLP
from tests.test_sparse_compute import FI, H, make_mlp, reference

pytestmark = pytest.mark.skipif(not km.cpp_kernel_available(), reason="C++ sparse MLP kernel could not be built here")


def _no_general_path(self, *a, **k):
    raise AssertionError("the general path ran")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("split", [False, True])
def test_fixed_set_is_one_kernel_call_and_exact(bias, tokens, split, monkeypatch):
    if split:
        monkeypatch.setattr(km, "MIN_BYTES_PER_THREAD", 1)
    mlp = make_mlp(seed=3 + tokens, bias=bias)
    mlp.down_proj.bias = None  # gate/up biases are in the kernel; a down bias takes the general path
    g = GatheredSparseMLP.from_mlp(mlp, thresholds={"gate_proj": 0.05, "up_proj": 0.02}, kernel="cpp")
    m = torch.rand(FI, generator=torch.Generator().manual_seed(tokens)) < 0.4
    g.set_active(m)
    x = torch.randn(1, tokens, H)
    monkeypatch.setattr(GatheredSparseMLP, "_compute", _no_general_path)
    got = g(x)
    ref = reference(mlp, x, m.float(), t=(0.05, 0.02, 0.0))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got.shape == x.shape


def test_fast_path_feeds_the_meter_and_steps_aside_when_needed(monkeypatch):
    mlp = make_mlp(seed=7)
    g = GatheredSparseMLP.from_mlp(mlp, thresholds={"down_proj": 0.1}, kernel="cpp")
    m = torch.zeros(FI, dtype=torch.bool)
    m[: FI // 4] = True
    g.set_active(m)
    x = torch.randn(1, H)
    # an output threshold is not in the kernel: the general path runs and applies it
    ref = reference(mlp, x, m.float(), t=(0.0, 0.0, 0.1))
    torch.testing.assert_close(g(x), ref, rtol=1e-5, atol=1e-5)
    g.thresholds["down_proj"] = 0.0
    g.set_active(m)  # re-prepared
    monkeypatch.setattr(GatheredSparseMLP, "_compute", _no_general_path)
    g.read_meter = meter = ReadMeter(1)
    g(torch.randn(3, H))
    assert meter.weight_read_fraction() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="hidden size"):
        g(torch.randn(1, H + 1))
