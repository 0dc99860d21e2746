"""Every issue-21 method calibrates and runs through the registry on a tiny GELU-gated model (SiLU: their own tests)."""
from __future__ import annotations

import pytest
import torch

from awq.load.arch import decoder_layers
from awq.methods.base import sparsify_, unsparsify_
from awq.methods.common import CalibData
from awq.methods.cost import metering
from awq.methods.registry import METHODS, extra_read
from tests.conftest import tiny_model

STANDARD = ("lowbit_rank", "rsparse", "scap", "cluster_lowbit")
PROMPT = ("griffin", "griffin_lowbit", "griffin_centroid")


def _model(act):
    m = tiny_model(inter=96)
    if act != "silu":
        from transformers.activations import ACT2FN

        for layer in decoder_layers(m):
            layer.mlp.act_fn = ACT2FN[act]
    return m


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh"])  # SiLU: each method's own tests
@pytest.mark.parametrize("name", STANDARD + PROMPT)
def test_method_runs_on_gated_mlp(name, act):
    model = _model(act)
    windows = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    spec = METHODS[name]
    with torch.no_grad():
        cfg = spec.calibrate(model, CalibData(windows=windows, max_tokens=None), spec.densities[0])
        unsparsify_(model)
        sparsify_(model, cfg)
        ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
        with metering(model) as meter:
            if name in PROMPT:  # no protocol: the first multi-token call is the prompt, then continue
                model(ids[:, :12])
                meter.sums.zero_()
                meter.tokens.zero_()
                out = model(ids[:, 12:])
            else:
                out = model(ids)
        assert torch.isfinite(out.logits).all()
        read = meter.weight_read_fraction(extra_read(cfg, model))
        assert 0.0 < read < 1.0 + 1e-9
    unsparsify_(model)
