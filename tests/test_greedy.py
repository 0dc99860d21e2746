"""TEAL's block-wise greedy x/h allocation (awq.methods.greedy) against a plain re-implementation."""
from __future__ import annotations

import pytest
import torch

from awq.methods.common import CalibData, collect_mlp_inputs, keep_threshold, mlp_of
from awq.methods.greedy import TealGreedyConfig, WinaGreedyConfig, calibrate_greedy, layer_path, split_at
from awq.methods.registry import get_method
from awq.methods.teal import wina_scales
from tests.conftest import tiny_model


def _ref_path(mlp, x_all, kind, until, step, tokens, seed):
    """Plain greedy: thresholds by keep_threshold on all calibration entries, error on the same token subsample."""
    sx, sh = wina_scales(mlp) if kind == "wina" else (torch.ones(x_all.shape[1]), torch.ones(mlp.down_proj.in_features))
    h_all = mlp.act_fn(mlp.gate_proj(x_all)) * mlp.up_proj(x_all)
    idx = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(seed))[:tokens].sort().values
    x = x_all[idx]
    y = mlp(x)

    def err(dx, dh):
        tx = keep_threshold(x_all.abs() * sx, dx) if dx < 1 else 0.0
        th = keep_threshold(h_all.abs() * sh, dh) if dh < 1 else 0.0
        xs = torch.where(x.abs() * sx >= tx, x, torch.zeros_like(x))
        h = mlp.act_fn(mlp.gate_proj(xs)) * mlp.up_proj(xs)
        h = torch.where(h.abs() * sh >= th, h, torch.zeros_like(h))
        return float(((mlp.down_proj(h) - y) ** 2).sum() / (y ** 2).sum())

    dx = dh = 1.0
    out = ""
    while (2 * dx + dh) / 3 > until + 1e-9:
        cands = []
        if dx - 1.5 * step >= -1e-9:
            cands.append((err(dx - 1.5 * step, dh), "x"))
        if dh - 3 * step >= -1e-9:
            cands.append((err(dx, dh - 3 * step), "h"))
        e, c = min(cands, key=lambda t: (t[0], t[1] != "x"))
        out += c
        dx, dh = (dx - 1.5 * step, dh) if c == "x" else (dx, dh - 3 * step)
    return out


@pytest.mark.parametrize("kind", ["teal", "wina"])
@torch.no_grad()
def test_greedy_path_matches_plain_reference(kind):
    model = tiny_model("llama", layers=2, hidden=48, inter=100)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.mul_(10)
    win = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    xs = collect_mlp_inputs(model, win, None)
    for i, x in enumerate(xs):
        got, errs = layer_path(mlp_of(model, i), x, kind, until=0.3, step=0.05, tokens=50, seed=1)
        assert got == _ref_path(mlp_of(model, i), x, kind, 0.3, 0.05, 50, 1)
        assert len(got) == 14 and "x" in got and "h" in got  # both components used (else the test proves little)
        assert errs == sorted(errs) or max(errs) > 0


def test_split_at_meets_the_block_density():
    ch = "xhxxhhx"
    for d in (1.0, 0.95, 0.9, 0.875, 0.83, 0.65):
        dx, dh = split_at(ch, d, step=0.05)
        assert (2 * dx + dh) / 3 == pytest.approx(d, abs=1e-12)
    assert split_at(ch, 0.9, step=0.05) == pytest.approx((1 - 1.5 * 0.05, 1 - 3 * 0.05))  # "x", "h"
    assert split_at(ch, 0.875, step=0.05) == pytest.approx((1 - 1.5 * 0.075, 1 - 3 * 0.05))  # half of the 3rd: x
    with pytest.raises(ValueError, match="does not reach"):
        split_at(ch, 0.6, step=0.05)


@torch.no_grad()
def test_greedy_config_thresholds_and_frontier_spec():
    model = tiny_model("llama", layers=2)
    win = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    calib = CalibData(win, max_tokens=None)
    cfg = get_method("wina_greedy").calibrate(model, calib, 0.5)
    assert isinstance(cfg, WinaGreedyConfig) and len(calib.cache) == 1
    cfg7 = get_method("wina_greedy").calibrate(model, calib, 0.7)  # same path, reused
    assert len(calib.cache) == 1
    for c, d in ((cfg, 0.5), (cfg7, 0.7)):
        for i, x in enumerate(calib.xs(model)):
            assert (2 * c.density_x[i] + c.density_h[i]) / 3 == pytest.approx(d)
            sx, sh = wina_scales(mlp_of(model, i))
            h = (mlp_of(model, i).act_fn(mlp_of(model, i).gate_proj(x)) * mlp_of(model, i).up_proj(x)).abs()
            assert c.x_thresholds[i] == pytest.approx(keep_threshold(x.abs() * sx, c.density_x[i]), rel=1e-6)
            assert c.h_thresholds[i] == pytest.approx(keep_threshold(h * sh, c.density_h[i]), rel=1e-6)
    t = calibrate_greedy(model, calib.xs(model), 0.5, kind="teal")
    assert isinstance(t, TealGreedyConfig) and "density_x" in t.summary()
