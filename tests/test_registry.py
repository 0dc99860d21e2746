"""The method registry and contract: every method by name, the topk template method against a plain reference,
and ``python -m awq.entry --method`` giving the frontier's point."""
from __future__ import annotations

import json
import math

import pytest
import torch

from awq.kernels.mlp import cpp_kernel_available
from awq.methods.base import MethodConfig, SwappedMLP, sparsify_, swapped_mlps, unsparsify_
from awq.methods.common import CalibData
from awq.methods.cost import metering
from awq.methods.registry import METHODS, default_methods, get_method
from awq.methods.topk import TopKConfig, TopKMLP
from tests.conftest import tiny_model


def test_every_method_declares_its_contract():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.config is None or issubclass(spec.config, MethodConfig), name
        assert spec.kernel and spec.about, name
        assert spec.densities and all(0 < d <= 1 for d in spec.densities), name
        assert spec.needs in (None, "centroids", "predictor"), name
        assert spec.realizable or spec.kernel.startswith("none"), f"{name}: an oracle has no batch-1 kernel"
    assert default_methods({})[0] == "dense" and "cluster_oracle" not in default_methods({})
    assert "cluster_oracle" in default_methods({"centroids": "x"})


def test_sparsify_refuses_a_non_method_in_one_line():
    with pytest.raises(TypeError, match="is not a method configuration") as e:
        sparsify_(tiny_model(), {"thresholds": None})
    assert "\n" not in str(e.value)


def test_default_hooks():
    class Plain(SwappedMLP):
        def forward(self, x):
            return self.base(x)

    m = Plain(tiny_model().model.layers[0].mlp, 0)
    assert m.prepare_decode() is False and "has no batch-1 kernel" in m.decode_unsupported()
    assert m.extra_bytes == 0 and not m.is_decode_step(torch.zeros(1, 1, 64))
    cfg = TopKConfig(0.25)
    assert cfg.summary() == {"density": 0.25} and cfg.extra_read(tiny_model()) == 0.0


@torch.no_grad()
def _topk_reference(mlp, x, k):
    """Per token: h = act(gate x) * up x, keep the k largest |h| (ties: lower index), y = W_down h_kept."""
    out = []
    for row in x.reshape(-1, x.shape[-1]):
        h = mlp.act_fn(mlp.gate_proj.weight @ row) * (mlp.up_proj.weight @ row)
        order = sorted(range(h.numel()), key=lambda j: (-abs(float(h[j])), j))
        keep = torch.zeros_like(h)
        keep[order[:k]] = 1
        out.append(mlp.down_proj.weight @ (h * keep))
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_topk_equals_reference_and_meters_its_reads(density):
    model = tiny_model("llama", layers=2, seed=4)
    bases = [layer.mlp for layer in model.model.layers]
    x = torch.randn(2, 5, bases[0].gate_proj.in_features, generator=torch.Generator().manual_seed(1))
    sparsify_(model, get_method("topk").calibrate(model, CalibData(torch.zeros(1, 4, dtype=torch.long)), density))
    mods = swapped_mlps(model, TopKMLP)
    k = math.ceil(density * bases[0].gate_proj.out_features)
    assert len(mods) == 2 and all(m.k == k for m in mods)
    with metering(model) as meter:
        for m, b in zip(mods, bases):
            torch.testing.assert_close(m(x), _topk_reference(b, x, k), rtol=1e-4, atol=1e-5)
    pp = meter.per_projection()
    assert pp["gate_proj"] == pp["up_proj"] == 1.0
    assert pp["down_proj"] == pytest.approx(k / bases[0].gate_proj.out_features)
    unsparsify_(model)


@pytest.mark.skipif(not cpp_kernel_available(), reason="C++ kernel unavailable")
def test_topk_kernel_equals_batched_path():
    model = tiny_model("llama", layers=1, seed=2)
    sparsify_(model, TopKConfig(0.3))
    m = swapped_mlps(model, TopKMLP)[0]
    x = torch.randn(1, 1, m.gate_proj.in_features, generator=torch.Generator().manual_seed(3))
    want = m(x)
    assert m.prepare_decode() and m.is_decode_step(x)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)


def test_entry_method_equals_frontier_point(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """`python -m awq.entry --method teal --density 0.5` prints the frontier's TEAL point: same PPL and read."""
    from awq.experiments.entry import cli as entry_cli
    from awq.experiments.frontier import FrontierConfig
    from awq.experiments.frontier import main as frontier

    common = dict(model_path=str(tiny_model_dir), data_path=str(tiny_corpus), nsamples=2, seqlen=32)
    res = frontier(FrontierConfig(**common, out=tmp_path / "fr", plots_dir=tmp_path / "plots", methods=["teal"],
                                  densities=[0.5], calib_nsamples=2, device="cpu"))
    point = next(p for p in res["points"] if p["method"] == "teal")
    out = tmp_path / "entry.json"
    args = ["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), "--nsamples", "2", "--seqlen", "32",
            "--method", "teal", "--density", "0.5", "--output_path", str(out)]
    # with --kl the entry scores as the frontier does (awq.experiments.quality: the same figures exactly) ...
    assert entry_cli(args + ["--kl", "--dense_ref", str(tmp_path / "dense_ref")]) == 0
    got = json.loads(out.read_text())
    assert (got["ppl"], got["kl"], got["top1"]) == (point["ppl"], point["kl"], point["top1"])
    capsys.readouterr()
    # ... without it, awq.experiments.eval.perplexity (float32 sums per window; the frontier sums in float64)
    rc = entry_cli(args)
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["ppl"] == pytest.approx(point["ppl"], rel=1e-6)
    assert got["weight_read"]["weight_read_fraction"] == point["weight_read_fraction"]
    assert got["method"]["name"] == "teal" and got["method"]["config"] == point["config"]
    assert f"ppl={got['ppl']:.4f} method=teal density=0.5" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--method", "nope", "--density", "0.5"], "--method: 'nope' is not one of"),
    (["--method", "teal"], "needs --density"),
    (["--method", "teal", "--density", "0.5", "--dense"], "--dense does not apply with --method"),
    (["--method", "cluster_oracle", "--density", "0.5"], "cluster_oracle needs centroid files"),
    (["--density", "0.5"], "--density needs --method"),
])
def test_entry_method_bad_options_one_line(tiny_model_dir, args, match, capsys):
    from awq.experiments.entry import cli as entry_cli

    assert entry_cli(["--model_path", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
