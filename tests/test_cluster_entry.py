"""Issue 10: the cluster-neuron predictor file and ``awq.entry --predictor`` end to end on a tiny random model."""
from __future__ import annotations

import json

import pytest
import torch

from awq.experiments.entry import cli as entry_cli
from awq.kernels.mlp import cpp_kernel_available
from awq.predictor.cluster_files import (
    FORMAT,
    ClusterPredictorError,
    file_format,
    load_cluster_predictor,
    save_cluster_predictor,
)
from awq.predictor.cluster_files import cli as fit_cli
from tests.conftest import tiny_model

SEQ = ["--seqlen", "64"]


def _errors(err):
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _run(fn, args, capsys):
    rc = fn([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def cluster_file(tiny_model_dir, tiny_corpus, tmp_path_factory):
    p = tmp_path_factory.mktemp("cluster_pred") / "ct.safetensors"
    rc = fit_cli(["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), *SEQ, "--read", "0.5",
                  "--output", str(p)])
    assert rc == 0 and p.is_file()
    return p


def _reference_ppl(tiny_model_dir, tiny_corpus, path, nsamples):
    """Direct: load, sparsify_ with the file's config, perplexity + metered read (the frontier's way)."""
    from awq.experiments.eval import perplexity
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model
    from awq.methods.base import sparsify_
    from awq.methods.cost import metering

    model, tok, _ = load_model(str(tiny_model_dir), None, None)
    cfg, _ = load_cluster_predictor(path, model)
    sparsify_(model, cfg)
    w = tokenize_windows(tok, load_corpus("test", str(tiny_corpus), use_hub=False).text, 64)[:nsamples]
    with metering(model) as meter:
        res = perplexity(model, w)
    return res.ppl, meter.weight_read_fraction(cfg.extra_read(model))


def test_file_roundtrip_and_metadata(cluster_file, tiny_model_dir):
    from awq.load.models import load_model

    assert file_format(cluster_file) == FORMAT
    model, _, info = load_model(str(tiny_model_dir), None, None)
    cfg, meta = load_cluster_predictor(cluster_file, model)
    assert meta["variant"] == "cluster_thresh" and meta["within"] == "gate" and cfg.routed
    assert len(cfg.centroids) == info.num_layers and cfg.centroids[0].dtype == torch.bool
    assert len(cfg.thresholds) == info.num_layers and all(t > 0 for t in cfg.thresholds)
    # a save of the loaded config gives the same tensors back
    p2 = cluster_file.parent / "again.safetensors"
    save_cluster_predictor(cfg, p2, {k: meta[k] for k in ("model", "hidden", "intermediate", "variant", "read")})
    cfg2, _ = load_cluster_predictor(p2, model)
    for name in ("centroids", "hot", "router_w", "router_b"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(cfg, name), getattr(cfg2, name)))
    assert cfg.thresholds == cfg2.thresholds


@pytest.mark.parametrize("sparse", [False, True])
def test_entry_with_cluster_file_equals_direct_run(cluster_file, tiny_model_dir, tiny_corpus, tmp_path, capsys, sparse):
    out = tmp_path / "res.json"
    args = ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, *SEQ, "--nsamples", 2, "--predictor",
            cluster_file, "--output_path", out, "--no_hub"] + (["--sparse_compute"] if sparse else [])
    rc, stdout, err = _run(entry_cli, args, capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    ppl, read = _reference_ppl(tiny_model_dir, tiny_corpus, cluster_file, 2)
    assert res["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert res["weight_read"]["weight_read_fraction"] == pytest.approx(read, abs=1e-12)
    assert res["predictor"]["kind"] == "cluster_neuron" and res["predictor"]["router_read"] > 0
    assert res["weight_read"]["extra"] == pytest.approx(res["predictor"]["router_read"])
    assert 0.0 < read < 1.0 and f"mlp_weight_read={read:.3f}" in stdout
    want_kernels = res["model"]["num_layers"] if (sparse and cpp_kernel_available()) else 0
    assert res["predictor"]["decode_kernels"] == want_kernels


def test_bare_predictor_fits_once_then_uses_the_cache(tiny_model_dir, tiny_corpus, tmp_path, capsys, monkeypatch,
                                                      cluster_file):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path / "cache"))
    base = ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, *SEQ, "--nsamples", 2, "--no_hub"]
    rc, out1, err = _run(entry_cli, base + ["--predictor", "--output_path", tmp_path / "a.json"], capsys)
    assert rc == 0, err
    cached = list((tmp_path / "cache" / "cluster_predictors").glob("*.safetensors"))
    assert len(cached) == 1 and file_format(cached[0]) == FORMAT
    mtime = cached[0].stat().st_mtime_ns
    rc, out2, err = _run(entry_cli, base + ["--predictor", "cluster_thresh", "--output_path", tmp_path / "b.json"],
                         capsys)
    assert rc == 0, err
    assert cached[0].stat().st_mtime_ns == mtime  # not fitted again
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["ppl"] == b["ppl"] and a["predictor"]["variant"] == "cluster_thresh"
    # the default is the same calibration as the explicit CLI fit (same settings, same seed)
    assert a["ppl"] == pytest.approx(_reference_ppl(tiny_model_dir, tiny_corpus, cluster_file, 2)[0], rel=1e-6)


def test_wrong_model_and_conflicting_options_one_line(cluster_file, tiny_corpus, tiny_model_dir, tmp_path, capsys):
    from awq.methods.cluster_neuron import ClusterNeuronConfig

    other = tiny_model(layers=3)  # 3 layers: the tiny model dir has 2
    g = torch.Generator().manual_seed(0)
    cfg = ClusterNeuronConfig(centroids=[torch.rand(4, 128, generator=g) < 0.5 for _ in range(3)],
                              hot=[torch.zeros(128, dtype=torch.bool)] * 3,
                              router_w=[torch.randn(4, 64, generator=g)] * 3, router_b=[torch.zeros(4)] * 3)
    bad = tmp_path / "three_layers.safetensors"
    save_cluster_predictor(cfg, bad, {"model": "other", "hidden": 64, "intermediate": 128, "variant": "cluster_neuron"})
    cfg.validate(other)
    base = ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, *SEQ, "--nsamples", 1, "--no_hub"]
    for extra, match in ((["--predictor", bad], "3 layers"),
                         (["--predictor", cluster_file, "--dense"], "--dense does not apply"),
                         (["--predictor", cluster_file, "--centroids", f"gate={bad}"], "--centroids does not apply"),
                         (["--predictor", "cluster_nope"], "not one of cluster_neuron")):
        rc, _, err = _run(entry_cli, base + extra, capsys)
        assert rc == 2 and "Traceback" not in err and len(_errors(err)) == 1 and match in _errors(err)[0], err
    rc, _, err = _run(fit_cli, ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, *SEQ, "--variant",
                                "cluster_neuron_oracle", "--output", tmp_path / "o.safetensors"], capsys)
    assert rc == 2 and len(_errors(err)) == 1 and "--variant: 'cluster_neuron_oracle' is not one of" in _errors(err)[0], err
    with pytest.raises(ClusterPredictorError, match="hidden/intermediate"):
        load_cluster_predictor(cluster_file, tiny_model(hidden=32, inter=128))


def test_non_finite_or_truncated_file_refused(cluster_file, tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from awq.load.models import load_model

    model, _, _ = load_model(str(tiny_model_dir), None, None)
    with safe_open(str(cluster_file), "pt") as f:
        meta = json.loads(f.metadata()["awq_cluster_neuron"])
    cfg, _ = load_cluster_predictor(cluster_file, model)
    cfg.router_w[1][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_cluster_predictor(cfg, bad, meta)
    with pytest.raises(ClusterPredictorError, match="layers.1.router_w has non-finite"):
        load_cluster_predictor(bad, model)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(cluster_file.read_bytes()[:200])
    with pytest.raises(ClusterPredictorError, match="not a readable safetensors"):
        load_cluster_predictor(cut, model)
