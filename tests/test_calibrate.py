"""Exact streamed quantile calibration."""
from __future__ import annotations

import pytest
import torch

from awq.experiments.eval import measure_sparsity
from awq.load.arch import PROJS
from awq.methods.base import sparsify_
from awq.methods.calibration import calibrate, exact_quantile_thresholds
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.recording import add_observer, remove_observer
from tests.conftest import tiny_model


def _collect(model, windows, projs):
    vals = {p: {} for p in projs}

    def obs(layer, name, y):
        if name in projs:
            vals[name].setdefault(layer, []).append(y.detach().abs().reshape(-1))

    add_observer(model, obs)
    with torch.no_grad():
        for i in range(windows.size(0)):
            model(windows[i : i + 1])
    remove_observer(model, obs)
    return {p: {l: torch.cat(v) for l, v in d.items()} for p, d in vals.items()}


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_quantile_equals_sorted_reference(sparsity):
    model = tiny_model("llama", layers=2, seed=1)
    sparsify_(model, SparsityConfig(thresholds=None))
    windows = torch.randint(0, 128, (3, 40))
    got = exact_quantile_thresholds(model, windows, sparsity, ("gate_proj", "up_proj", "down_proj"), 2)
    ref = _collect(model, windows, PROJS)
    for p in PROJS:
        for layer in range(2):
            v = torch.sort(ref[p][layer].float()).values
            k = min(int(round(sparsity * v.numel())), v.numel() - 1)
            assert got[p][layer] == float(v[k]), (p, layer)
    # several levels share the passes and give the same answers
    multi = exact_quantile_thresholds(model, windows, [0.1, sparsity], PROJS, 2)
    assert multi[1] == got


def test_calibration_hits_target_sparsity():
    model = tiny_model("mistral", layers=3, seed=2)
    windows = torch.randint(0, 128, (4, 64))
    thr = calibrate(model, windows, 0.5, 3)
    sparsify_(model, SparsityConfig(thresholds=thr))
    with measure_sparsity(model, 3) as meter, torch.no_grad():
        for i in range(windows.size(0)):
            model(windows[i : i + 1])
    s = meter.summary()
    for p in ("gate_proj", "up_proj"):
        # gate/up were calibrated on the dense model; upstream thresholds shift them only slightly
        assert abs(s[p]["mean"] - 0.5) < 0.005, (p, s[p]["mean"])
    assert abs(s["down_proj"]["mean"] - 0.5) < 0.005
    # the first layer sees the dense residual stream, so it is exact
    assert abs(s["gate_proj"]["per_layer"][0] - 0.5) < 1e-3


def test_bad_sparsity_rejected():
    model = tiny_model("mistral", layers=1)
    with pytest.raises(ValueError, match="sparsity"):
        calibrate(model, torch.randint(0, 128, (1, 8)), 1.5, 1)
