"""LaRoSA's rotation folded into the model (awq.methods.larosa): the fold keeps the function, and the
evaluation module equals TEAL / WINA run on the really folded model."""
from __future__ import annotations

import copy

import pytest
import torch

from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_
from awq.methods.common import CalibData, MethodError, collect_mlp_inputs
from awq.methods.larosa import LarosaFoldedConfig, calibrate_larosa_folded, fold_rotation, norm_scale
from awq.methods.registry import get_method
from awq.methods.teal import TealConfig, WinaConfig
from tests.conftest import tiny_model


def _qwen2(seed=0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def _randomise_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            mod.bias.normal_(0, 0.3, generator=g)
    for layer in decoder_layers(model):
        layer.mlp.down_proj.weight.mul_(10)
    return model


def _mlp_inputs(model, ids):
    got = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: got.append(a[0][0].clone()))
             for layer in decoder_layers(model)]
    out = model(ids).logits
    for h in hooks:
        h.remove()
    return out, got


@pytest.mark.parametrize("make", [lambda: tiny_model("llama", layers=2, hidden=48, inter=100), _qwen2])
@torch.no_grad()
def test_fold_keeps_the_function_and_mlp_inputs_are_rotated(make):
    model = _randomise_norms(make())
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    ref, xs = _mlp_inputs(model, ids)
    scales = [norm_scale(layer.post_attention_layernorm) for layer in decoder_layers(model)]
    folded = fold_rotation(copy.deepcopy(model), q.float())
    got, zs = _mlp_inputs(folded, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for x, z, s in zip(xs, zs, scales):
        torch.testing.assert_close(z.double(), (x.double() / s) @ q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wina", [False, True])
@torch.no_grad()
def test_evaluation_module_is_teal_on_the_folded_model(wina):
    model = _randomise_norms(_qwen2(seed=4))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    calib = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(6))  # not the scored tokens:
    cfg = calibrate_larosa_folded(model, collect_mlp_inputs(model, calib, None), 0.5, wina=wina)  # no score at t
    assert cfg.extra_read(model) == 0.0
    folded = fold_rotation(copy.deepcopy(model), cfg.rotation)
    sparsify_(model, cfg)
    want_cls = WinaConfig if wina else TealConfig
    sparsify_(folded, want_cls(list(cfg.x_thresholds), list(cfg.h_thresholds)))
    a, b = model(ids).logits, folded(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    dense = _qwen2(seed=4)
    assert not torch.allclose(a, _randomise_norms(dense)(ids).logits, atol=1e-3)  # the sparsity is active
    mod = decoder_layers(model)[0].mlp
    assert not mod.prepare_decode() and "folded model" in mod.decode_unsupported() and mod.extra_bytes == 0


def test_refusals_one_line():
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    g2 = AutoModelForCausalLM.from_config(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, head_dim=16)).eval()
    win = torch.randint(0, 64, (1, 16))
    with pytest.raises(MethodError, match="post_feedforward_layernorm"):
        get_method("larosa_folded").calibrate(g2, CalibData(win, max_tokens=None), 0.5)
    m = tiny_model("llama", layers=1)
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[3] = 0.0
    with pytest.raises(MethodError, match="not invertible"):
        get_method("larosa_folded").calibrate(m, CalibData(win, max_tokens=None), 0.5)
    assert isinstance(get_method("larosa_folded_wina").calibrate(tiny_model("llama", layers=1),
                                                                 CalibData(win, max_tokens=None), 0.5),
                      LarosaFoldedConfig)


@torch.no_grad()
def test_larosa_topk_matches_reference_and_meters_exact_densities():
    from awq.methods.cost import metering
    from awq.methods.teal import pca_rotation

    model = tiny_model("llama", layers=2, hidden=48, inter=100)
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(1))
    xs = collect_mlp_inputs(model, ids, None)
    cfg = get_method("larosa_topk").calibrate(model, CalibData(ids, max_tokens=None), 0.375)
    assert cfg.extra_read(model) == pytest.approx(48 / (3 * 100))
    bases = [layer.mlp for layer in decoder_layers(model)]
    want = []
    for i, (mlp, x) in enumerate(zip(bases, xs)):  # plain per-token loop: rotate, top-k, rotate back, top-k of h
        q = pca_rotation(x).double()
        out = []
        for row in x.double():
            z = row @ q
            z[z.abs().argsort(descending=True)[18:]] = 0  # keep round(0.375 * 48) = 18
            xx = (z @ q.T).float()
            h = mlp.act_fn(mlp.gate_proj(xx)) * mlp.up_proj(xx)
            h[h.abs().argsort(descending=True)[38:]] = 0  # round(0.375 * 100) = 38 (37.5 rounds to even: 38)
            out.append(mlp.down_proj(h))
        want.append(torch.stack(out))
    sparsify_(model, cfg)
    got = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, y: got.append(y[0])) for layer in decoder_layers(model)]
    with metering(model) as meter:
        model(ids)
    for h in hooks:
        h.remove()
    # layer 1's input differs from the dense run's (layer 0 is sparse): layer 0 is compared
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    pp = meter.per_projection()
    assert pp["gate_proj"] == pytest.approx(18 / 48) and pp["down_proj"] == pytest.approx(38 / 100)
    assert not decoder_layers(model)[0].mlp.prepare_decode()


@torch.no_grad()
def test_larosa_folded_greedy_is_teal_greedy_on_the_folded_model():
    from awq.methods.greedy import calibrate_greedy

    model = _randomise_norms(_qwen2(seed=7))
    calib = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(8))
    cfg = get_method("larosa_folded_greedy").calibrate(model, CalibData(calib, max_tokens=None), 0.5)
    folded = fold_rotation(copy.deepcopy(model), cfg.rotation)
    want = calibrate_greedy(folded, collect_mlp_inputs(folded, calib, None), 0.5, kind="teal")
    assert cfg.info["density_x"] == pytest.approx(want.density_x) and cfg.info["density_h"] == pytest.approx(want.density_h)
    torch.testing.assert_close(torch.tensor(cfg.x_thresholds), torch.tensor(want.x_thresholds), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(torch.tensor(cfg.h_thresholds), torch.tensor(want.h_thresholds), rtol=1e-3, atol=1e-6)
    assert "density_x" in cfg.summary()
