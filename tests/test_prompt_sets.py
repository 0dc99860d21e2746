"""GRIFFIN prompt-chosen neuron sets and their refinements (awq/methods/prompt_sets.py) against plain references."""
from __future__ import annotations

import pytest
import torch

from awq.kernels.lowbit import lowbit_kernel
from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.common import MethodError, mlp_of
from awq.methods.cost import metering
from awq.methods.prompt_sets import (
    GriffinConfig,
    GriffinRefineConfig,
    calibrate_griffin_refine,
    griffin_stat_sq,
    top_set,
)
from awq.methods.registry import METHODS
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _h(mlp, x):
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def test_griffin_stat_matches_loop():
    h = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    got = griffin_stat_sq(h)
    for b in range(2):
        for j in range(7):
            want = sum((float(h[b, t, j]) / float(h[b, t].norm())) ** 2 for t in range(5))
            assert float(got[b, j]) == pytest.approx(want, rel=1e-5)
    m = top_set(torch.tensor([[0.1, 3.0, 2.0, -1.0]]), 2)
    assert m.tolist() == [[False, True, True, False]]


def test_griffin_prompt_then_continuation_batched():
    model = tiny_model(inter=96)
    sparsify_(model, GriffinConfig(0.25))
    mod = decoder_layers(model)[0].mlp
    base = mlp_of(model, 0)
    g = torch.Generator().manual_seed(1)
    xp, xc = torch.randn(3, 6, 64, generator=g), torch.randn(3, 4, 64, generator=g)
    hp = _h(base, xp)
    mod.observe_prompt(xp[:, :2], hp[:, :2])  # chunked prompt: accumulated
    mod.observe_prompt(xp[:, 2:], hp[:, 2:])
    with metering(model) as meter:
        y = mod(xc)
    k = round(0.25 * 96)
    for b in range(3):
        stat = [sum((float(hp[b, t, j]) / float(hp[b, t].norm())) ** 2 for t in range(6)) for j in range(96)]
        keep = torch.zeros(96, dtype=torch.bool)
        keep[sorted(range(96), key=lambda j: -stat[j])[:k]] = True
        want = base.down_proj(_h(base, xc[b]) * keep)
        torch.testing.assert_close(y[b], want, rtol=1e-4, atol=1e-5)
    assert meter.per_projection()["down_proj"] == pytest.approx(k / 96)
    assert meter.tokens[0] == 12
    mod.end_sequence()
    assert mod.keep is None and mod.state.stat is None
    unsparsify_(model)


def test_griffin_without_protocol_first_call_is_the_prompt_and_decode_matches():
    from awq.methods.dynamic_sparse import prepare_decode_

    model = tiny_model(inter=96)
    sparsify_(model, GriffinConfig(0.5))
    mod = decoder_layers(model)[0].mlp
    base = mlp_of(model, 0)
    g = torch.Generator().manual_seed(2)
    xp, xt = torch.randn(1, 5, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    torch.testing.assert_close(mod(xp), base(xp))  # the prompt runs dense
    masked = mod(xt)
    keep = top_set(griffin_stat_sq(_h(base, xp)), 48)
    torch.testing.assert_close(masked[0, 0], base.down_proj(_h(base, xt[0, 0]) * keep[0]), rtol=1e-4, atol=1e-5)
    if prepare_decode_(model):
        torch.testing.assert_close(mod(xt), masked, rtol=1e-4, atol=1e-5)
    with pytest.raises(MethodError, match="sequences"):
        mod.observe_prompt(torch.randn(2, 3, 64), _h(base, torch.randn(2, 3, 64)))
        mod(torch.randn(3, 1, 64))
    unsparsify_(model)


@pytest.mark.parametrize("centroids_k", [0, 3])
def test_refine_threshold_from_prompt_and_reference(centroids_k):
    model = tiny_model(inter=96)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(200, 64, generator=g) for _ in decoder_layers(model)]
    cfg = calibrate_griffin_refine(model, xs, 0.3, candidates=0.6, centroids_k=centroids_k)
    sparsify_(model, cfg)
    mod = decoder_layers(model)[0].mlp
    base = mlp_of(model, 0)
    xp, xc = torch.randn(1, 40, 64, generator=g), torch.randn(1, 7, 64, generator=g)
    mod.observe_prompt(xp, _h(base, xp))
    y = mod(xc)
    stat = griffin_stat_sq(_h(base, xp))[0]
    if centroids_k:
        cand = cfg.centroids[0][int((cfg.centroids[0].float() @ stat).argmax())]
    else:
        cand = top_set(stat[None], round(0.6 * 96))[0]
    sp = mod._scores_all(xp[0])[:, cand]
    kept_share = float((sp >= mod.t).float().mean())
    assert kept_share == pytest.approx(0.5, abs=0.02)  # density / candidates of the prompt's candidate scores
    keep = cand & (mod._scores_all(xc[0]) >= mod.t)
    torch.testing.assert_close(y[0], base.down_proj(_h(base, xc[0]) * keep), rtol=1e-4, atol=1e-5)
    if lowbit_kernel() is not None:
        from awq.methods.dynamic_sparse import prepare_decode_

        prepare_decode_(model)
        for t in range(3):
            torch.testing.assert_close(mod(xc[:, t:t + 1]), y[:, t:t + 1], rtol=1e-4, atol=1e-5)
    unsparsify_(model)


def test_registry_and_errors():
    assert "griffin" in METHODS
    with pytest.raises(MethodError, match="above the candidate"):
        GriffinRefineConfig(candidates=0.3, density=0.5)
    with pytest.raises(MethodError, match="density"):
        GriffinConfig(0.0)
