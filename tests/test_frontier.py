"""``python -m awq.frontier`` end to end on the tiny random model: CSV, resume, refusal, and the cost axis."""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from awq.experiments.frontier import FrontierConfig, FrontierError, cli, main
from awq.experiments.frontier_report import CSV_COLUMNS


def _cfg(tiny_model_dir, tiny_corpus, tmp_path, **kw):
    base = dict(model_path=str(tiny_model_dir), data_path=str(tiny_corpus), out=tmp_path / "fr",
                plots_dir=tmp_path / "plots", methods=["dense", "paper", "cats", "teal", "neuron_predictor"],
                densities=[0.5], nsamples=2, calib_nsamples=2, seqlen=32, device="cpu")
    base.update(kw)
    return FrontierConfig(**base)


def _reference_teal_cost(tiny_model_dir, tiny_corpus, point, nsamples, seqlen):
    """Recompute TEAL's read fraction from dense masks on the test windows (independent of awq.methods.cost)."""
    from awq.load.arch import decoder_layers
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model

    model, tok, _ = load_model(str(tiny_model_dir), device="cpu")
    windows = tokenize_windows(tok, load_corpus("test", str(tiny_corpus)).text, seqlen)[:nsamples]
    tx, th = point["config"]["x_thresholds"], point["config"]["h_thresholds"]
    fracs = []

    def hook(mod, args, i):
        x = args[0].reshape(-1, args[0].shape[-1])
        kx = x.abs() >= tx[i]
        xs = x * kx
        h = mod.act_fn(mod.gate_proj(xs)) * mod.up_proj(xs)
        kh = h.abs() >= th[i]
        y = mod.down_proj(h * kh)
        fracs.append((2 * kx.double().mean(1) + kh.double().mean(1)) / 3)
        return y.reshape(args[0].shape[:-1] + (y.shape[-1],))

    hooks = [layer.mlp.register_forward_hook(lambda m, a, y, i=i: hook(m, a, i))
             for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return float(torch.cat(fracs).mean())


def test_frontier_end_to_end(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    cfg = _cfg(tiny_model_dir, tiny_corpus, tmp_path)
    res = main(cfg)
    assert res["computed"] == 5
    rows = list(csv.DictReader(open(res["csv"])))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    by = {r["method"]: r for r in rows}
    assert set(by) == {"dense", "paper", "cats", "teal", "neuron_predictor"}
    assert by["dense"]["weight_read_fraction"] == "1.0" and by["dense"]["realizable"] == "true"
    assert all(r["decode_speedup"] == "" and r["roofline"] == "" for r in rows)
    assert all(int(r["tokens"]) == 2 * 31 for r in rows)
    # kl / top1 beside ppl on every point: dense against its own (float16) reference is ~0 and agrees everywhere
    assert float(by["dense"]["kl"]) < 1e-5 and float(by["dense"]["top1"]) == 1.0
    assert all(0.0 <= float(r["kl"]) and 0.0 <= float(r["top1"]) <= 1.0 for r in rows)
    assert float(by["paper"]["kl"]) > float(by["dense"]["kl"]) and all(r["protocol"] == "standard" for r in rows)
    # accounting shapes: cats reads all of gate, paper all of gate and up
    assert float(by["cats"]["weight_read_fraction"]) >= 1 / 3
    assert float(by["paper"]["weight_read_fraction"]) >= 2 / 3
    assert (tmp_path / "plots" / f"frontier_{tiny_model_dir.name.lower()}.png").is_file()
    # the printed cost is the cost recomputed from the masks
    teal = json.loads((cfg.out / "points" / "teal_0.5000.json").read_text())
    ref = _reference_teal_cost(tiny_model_dir, tiny_corpus, teal, cfg.nsamples, cfg.seqlen)
    assert float(by["teal"]["weight_read_fraction"]) == pytest.approx(ref, abs=1e-9)
    # resume: nothing recomputed, same CSV
    before = open(res["csv"]).read()
    assert cli(["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), "--out", str(cfg.out),
                "--plots_dir", str(tmp_path / "plots"), "--methods", "dense,paper,cats,teal,neuron_predictor",
                "--densities", "0.5", "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(0 computed now)" in out and f"| teal | f32 | 0.50 | {teal['weight_read_fraction']:.3f}" in out
    assert open(res["csv"]).read() == before


def test_frontier_refuses_other_corpus(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense"]))
    other = tmp_path / "corpus2"
    other.mkdir()
    for f in ("wiki.test.raw", "wiki.train.raw"):
        (other / f).write_text((tiny_corpus / f).read_text()[::-1])
    with pytest.raises(FrontierError, match="made with another setup"):
        main(_cfg(tiny_model_dir, other, tmp_path, methods=["dense"]))
    assert cli(["--model_path", str(tiny_model_dir), "--data_path", str(other), "--out", str(tmp_path / "fr"),
                "--methods", "dense", "--seqlen", "32", "--nsamples", "2", "--device", "cpu"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "corpus_test_sha256" in err[0]


@pytest.mark.parametrize("args, msg", [(["--methods", "teal,bogus"], "--methods: 'bogus' is not one of"),
                                       (["--densities", "0.5,0"], "--densities: must be a fraction in (0.0, 1.0]"),
                                       (["--nsamples", "0"], "--nsamples: must be >= 1"),
                                       (["--methods", "cluster_predicted"], "cluster_predicted needs a trained predictor"),
                                       (["--methods", "cluster_oracle"], "cluster_oracle needs centroid files"),
                                       (["--methods", "teal", "--predictor", "/nonexistent/p.safetensors"],
                                        "no such file"),
                                       (["--methods", "teal", "--speed_again"], "--speed_again needs --speed")])
def test_frontier_bad_input_one_line(args, msg, capsys):
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


def test_frontier_refuses_other_model(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """A results directory made with other weights is refused in one line; the same weights at another path resume."""
    import shutil

    from tests.conftest import tiny_model, tiny_tokenizer

    main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense"]))
    other = tmp_path / "other_model"
    tok = tiny_tokenizer()
    tiny_model("mistral", seed=1, vocab=len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(FrontierError, match="weights_sha256"):
        main(_cfg(other, tiny_corpus, tmp_path, methods=["dense"]))
    assert cli(["--model_path", str(other), "--data_path", str(tiny_corpus), "--out", str(tmp_path / "fr"),
                "--methods", "dense", "--seqlen", "32", "--nsamples", "2", "--device", "cpu"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "weights_sha256" in err[0] and "refusing to mix" in err[0]
    copy = tmp_path / "copy_of_model"  # same weights, another folder (e.g. another checkout): resumes
    shutil.copytree(tiny_model_dir, copy)
    assert main(_cfg(copy, tiny_corpus, tmp_path, methods=["dense"]))["computed"] == 0


def test_frontier_refuses_model_without_gated_mlp(tiny_corpus, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import tiny_tokenizer

    d = tmp_path / "gpt2"
    tok = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "fr_gpt2"
    assert cli(["--model_path", str(d), "--data_path", str(tiny_corpus), "--out", str(out), "--methods", "dense,teal",
                "--seqlen", "32", "--nsamples", "1", "--device", "cpu"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "GPT2MLP" in err[0] and "gate_proj" in err[0]
    assert not out.exists()  # refused before anything was written


def test_frontier_speed_added_to_done_points(tiny_model_dir, tiny_corpus, tmp_path):
    """--speed on a finished frontier measures the realizable non-dense points only, keeps PPL and cost, and a
    rerun measures nothing; every recorded speedup is at most its roofline."""
    cfg = _cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal", "cats"])
    res = main(cfg)
    before = {p["method"]: p for p in res["points"]}
    res = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal", "cats"], speed=True,
                    speed_prompt_tokens=8, speed_new_tokens=4, speed_repeats=1))
    assert res["computed"] == 2
    rows = {r["method"]: r for r in csv.DictReader(open(res["csv"]))}
    assert rows["dense"]["decode_speedup"] == "" and rows["dense"]["roofline"] == ""
    for m in ("teal", "cats"):
        p = json.loads((cfg.out / "points" / f"{m}_0.5000.json").read_text())
        assert p["ppl"] == before[m]["ppl"] and p["weight_read_fraction"] == before[m]["weight_read_fraction"]
        assert p["decode_tok_s"] > 0 and p["dense_decode_tok_s"] > 0 and p["roofline"] > 1.0
        assert 0 < p["decode_weight_read_fraction"] < 1
        if p["decode_speedup"] is None:  # flagged: above the roofline is a measurement error, never a result
            assert p["decode_measured_ratio"] > p["roofline"] and "measurement error" in p["decode_status"]
            assert rows[m]["decode_speedup"] == ""
        else:
            assert p["decode_speedup"] <= p["roofline"]
            assert float(rows[m]["decode_speedup"]) == pytest.approx(p["decode_speedup"])
    again = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal", "cats"], speed=True,
                      speed_prompt_tokens=8, speed_new_tokens=4, speed_repeats=1))
    assert again["computed"] == 0


def test_frontier_speed_for_paper_predictor_and_cluster_points(tiny_model_dir, tiny_corpus, tmp_path):
    """--speed times every realizable point whose modules have a batch-1 kernel (the paper's variants and the
    neuron predictor now); a point whose modules have none is reported "no batch-1 kernel", never timed on its
    masked dense path; a rerun measures nothing."""
    methods = ["dense", "paper", "paper_gate", "paper_down", "neuron_predictor", "cluster_thresh", "cluster_neuron",
               "cluster_hthresh", "cluster_neuron_oracle"]
    kw = dict(methods=methods, speed=True, speed_prompt_tokens=8, speed_new_tokens=4, speed_repeats=1)
    res = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, **kw))
    pts = {p["method"]: p for p in res["points"]}
    assert set(pts) == set(methods)
    for m in ("paper", "paper_gate", "paper_down", "neuron_predictor"):
        p = pts[m]
        assert p["decode_tok_s"] > 0 and p["dense_decode_tok_s"] > 0, m
        assert p["decode_status"] is None or "measurement error" in p["decode_status"], m
        assert p["roofline"] >= 1.0 and 0 < p["decode_weight_read_fraction"] <= 1.0 + 1e-9, m
    assert pts["paper"]["decode_weight_read_fraction"] > 2 / 3 - 1e-9  # gate and up read in full
    for m in ("dense", "cluster_neuron_oracle"):  # dense and oracles: never timed
        assert pts[m].get("decode_tok_s") is None and not pts[m].get("decode_status"), m
    for m in ("cluster_thresh", "cluster_neuron", "cluster_hthresh"):  # timed if the module has a kernel, else said so
        p = pts[m]
        if p.get("decode_tok_s") is None:
            assert p["decode_status"].startswith("no batch-1 kernel") and p["decode_speedup"] is None, m
            assert p["roofline"] >= 1.0 and p["decode_module"].endswith("ClusterNeuronMLP"), m
        else:
            assert p["dense_decode_tok_s"] > 0 and (p["decode_status"] is None
                                                    or "measurement error" in p["decode_status"]), m
    table = (tmp_path / "fr" / "frontier.md").read_text()
    for p in pts.values():
        if (p.get("decode_status") or "").startswith("no batch-1 kernel"):
            assert p["decode_status"].replace("|", "\\|") in table
    rows = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert {len(re.findall(r"(?<!\\)\|", ln)) for ln in rows} == {14}  # a '|' in a status is escaped
    again = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, **kw))
    assert again["computed"] == 0


def test_measure_point_without_kernel_reports_status():
    """A swapped module without a batch-1 kernel (here: the paper's MLP with a codebook) is not timed."""
    from awq.decode.speed import measure_point
    from awq.experiments.frontier_report import markdown
    from awq.methods.base import sparsify_
    from awq.methods.paper_mlp import SparsityConfig
    from tests.conftest import tiny_model, tiny_tokenizer

    class Keep(torch.nn.Module):
        def forward(self, y, raw=None, layer_idx=None, x=None):
            return y

    model = tiny_model("llama", seed=3)
    thr = {p: [0.05, 0.05] for p in ("gate_proj", "up_proj", "down_proj")}
    sparsify_(model, SparsityConfig(thresholds=thr, codebooks={"up_proj": Keep()}))
    out = measure_point(model, tiny_tokenizer(), None, prompt_tokens=8, new_tokens=4, repeats=1)
    assert out["decode_status"].startswith("no batch-1 kernel") and "codebooks" in out["decode_status"]
    assert out["decode_tok_s"] is None and out["decode_speedup"] is None and out["dense_decode_tok_s"] is None
    assert out["decode_module"] == "awq.methods.paper_mlp.SparseMLP" and out["roofline"] > 1.0
    row = {"method": "x", "param": 0.5, "weight_read_fraction": 0.8, "ppl": 3.0, "realizable": True, **out}
    assert out["decode_status"] in markdown([row])
    sparsify_(model, SparsityConfig(thresholds=thr))  # same thresholds, no codebook: timed on the kernel
    out = measure_point(model, tiny_tokenizer(), None, prompt_tokens=8, new_tokens=4, repeats=1)
    assert out["decode_tok_s"] > 0 and out["decode_module"] is None


@pytest.mark.parametrize("status, module, want", [
    (None, None, True),
    ("above roofline: measurement error", None, True),
    ("no batch-1 kernel (X has no prepare_decode)", "collections.OrderedDict", False),  # still none: skip
    ("no batch-1 kernel (X has no prepare_decode)", "awq.methods.paper_mlp.SparseMLP", True),  # gained one: retry
    ("no batch-1 kernel (X has no prepare_decode)", "no.such.module.Cls", False),
    ("no batch-1 kernel (SparseMLP: centroid codebooks)", "awq.methods.paper_mlp.SparseMLP", False),  # declined: skip
])
def test_wants_speed_retries_only_gained_kernels(status, module, want):
    from awq.experiments.frontier import Frontier
    from awq.methods.registry import get_method

    point = {"decode_tok_s": None, "decode_status": status, "decode_module": module}
    assert Frontier._wants_speed(get_method("paper"), point) is want
    assert Frontier._wants_speed(get_method("paper"), {**point, "decode_tok_s": 1.0}) is False
    assert Frontier._wants_speed(get_method("paper"), {**point, "decode_tok_s": 1.0}, again=True) is True
    assert Frontier._wants_speed(get_method("dense"), {**point, "decode_tok_s": 1.0}, again=True) is False
    assert Frontier._wants_speed(get_method("dense"), point) is False
    assert Frontier._wants_speed(get_method("cluster_neuron_oracle"), point) is False


def test_frontier_quality_added_to_old_points_and_prompt_protocol(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal"])
    first = {p["method"]: p for p in main(cfg)["points"]}
    assert len(list((tmp_path / "dense_ref").glob("*.json"))) == 2  # one cached reference per window
    f = cfg.out / "points" / "teal_0.5000.json"
    old = json.loads(f.read_text())
    for k in ("kl", "top1"):  # a point made before the columns existed
        old.pop(k)
    old["decode_speedup"] = 1.23
    f.write_text(json.dumps(old))
    res = main(cfg)
    assert res["computed"] == 1
    teal = json.loads(f.read_text())
    assert teal["kl"] == pytest.approx(first["teal"]["kl"], rel=1e-9) and teal["ppl"] == pytest.approx(old["ppl"])
    assert teal["decode_speedup"] == 1.23  # kept
    assert main(cfg)["computed"] == 0
    assert main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal"], quality_again=True))["computed"] == 2
    # the prompt protocol: its own folder (the standard one refuses it), same dense reference, fewer scored tokens
    with pytest.raises(FrontierError, match="protocol"):
        main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense"], protocol="prompt:8"))
    pr = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal"], protocol="prompt:8",
                   out=tmp_path / "fr_prompt"))
    pts = {p["method"]: p for p in pr["points"]}
    assert all(p["protocol"] == "prompt:8" and p["tokens"] == 2 * (31 - 8) for p in pts.values())
    assert pts["dense"]["top1"] == 1.0 and pts["dense"]["kl"] < 1e-4 and pts["teal"]["kl"] > 0
    assert len(list((tmp_path / "dense_ref").glob("*.json"))) == 2
    assert json.loads((tmp_path / "fr_prompt" / "fingerprint.json").read_text())["protocol"] == "prompt:8"
    with pytest.raises(FrontierError, match="must leave at least 2"):
        main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense"], protocol="prompt:31"))
    # a method that needs a prompt is refused under the standard protocol, by its spec or by its modules
    # (two registered names stand in for the toys: the --methods choices are fixed at import)
    from dataclasses import dataclass as _dc

    from awq.methods import registry
    from awq.methods.base import MethodConfig, SwappedMLP

    class _NeedsPrompt(SwappedMLP):
        needs_prompt = True

        def forward(self, x):
            return self.base(x)

    @_dc
    class _Cfg(MethodConfig):
        def build(self, mlp, i):
            return _NeedsPrompt(mlp, i)

    monkeypatch.setitem(registry.METHODS, "topk", registry.MethodSpec("topk", _Cfg, lambda *a: _Cfg(), (0.5,),
                                                                      needs_prompt=True))
    monkeypatch.setitem(registry.METHODS, "gathered", registry.MethodSpec("gathered", _Cfg, lambda *a: _Cfg(), (0.5,)))
    with pytest.raises(FrontierError, match="topk chooses its neurons from a prompt"):
        main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["topk"]))
    with pytest.raises(FrontierError, match="gathered chooses its neurons from a prompt"):
        main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["gathered"]))
    ok = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["gathered"], protocol="prompt:8",
                   out=tmp_path / "fr_prompt"))
    assert {p["method"] for p in ok["points"]} == {"dense", "teal", "gathered"}


def test_frontier_weight_formats(tiny_model_dir, tiny_corpus, tmp_path):
    """--weights f32,q4_0: every point again on the block-quantised weights, dequantised (checked against a plain
    gguf quantise/dequantise of every linear layer and the embeddings), with the whole step's bytes per token and the bytes plot."""
    import gguf
    import numpy as np

    from awq.load.arch import decoder_layers
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model

    cfg = _cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal"], weights=["f32", "q4_0"])
    res = main(cfg)
    assert res["computed"] == 4
    rows = {(r["method"], r["weights"]): r for r in csv.DictReader(open(res["csv"]))}
    assert set(rows) == {("dense", "f32"), ("teal", "f32"), ("dense", "q4_0"), ("teal", "q4_0")}
    assert (cfg.out / "points" / "teal_0.5000_q4_0.json").is_file()
    assert res["plot_bytes"].endswith("_bytes.png") and (tmp_path / "plots").joinpath(res["plot_bytes"]).is_file()
    # reference: every linear layer (and the LM head / tied embedding) through gguf's quantiser, plain eval
    model, tok, _ = load_model(str(tiny_model_dir), device="cpu")
    windows = tokenize_windows(tok, load_corpus("test", str(tiny_corpus)).text, cfg.seqlen)[:cfg.nsamples]
    lins = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    lins.append(model.get_output_embeddings())
    if model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        lins.append(model.get_input_embeddings())  # its own blocks too, as in a GGUF of that format
    n_attn = n_mlp = 0
    with torch.no_grad():
        for lin in lins:
            w = lin.weight.detach().numpy()
            raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
            deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(deq)))
        for layer in decoder_layers(model):
            n_attn += sum(getattr(layer.self_attn, p).weight.numel() for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            n_mlp += sum(getattr(layer.mlp, p).weight.numel() for p in ("gate_proj", "up_proj", "down_proj"))
        nll = sum(float(torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum"))
                  for w in windows)
    ref_ppl = float(np.exp(nll / (windows.numel() - windows.shape[0])))
    dq, df = rows[("dense", "q4_0")], rows[("dense", "f32")]
    assert float(dq["ppl"]) == pytest.approx(ref_ppl, rel=1e-5)
    # the format changed the weights: the two PPLs differ by more than the 1e-5 the reference check allows (a tiny
    # random model's near-uniform PPL moves little under Q4_0: 6e-5 relative in one fresh clone's draw of its
    # tokenizer, whose BPE ties make the model differ between runs)
    assert abs(float(dq["ppl"]) - float(df["ppl"])) > 1e-5 * float(df["ppl"])
    n_head = model.get_output_embeddings().weight.numel()
    assert float(df["bytes_per_token"]) == pytest.approx(4.0 * (n_attn + n_mlp + n_head))
    assert float(dq["bytes_per_token"]) == pytest.approx(4.5 / 8 * (n_attn + n_mlp + n_head))
    tq = rows[("teal", "q4_0")]
    frac = float(tq["weight_read_fraction"])
    assert 0 < frac < 1
    assert float(tq["bytes_per_token"]) == pytest.approx(4.5 / 8 * (n_attn + n_head + frac * n_mlp))
    # the generated by-format table (awq.report): realizable points of both formats, ordered by bytes per token
    from awq.report.tables import by_format

    table = by_format(res["points"])
    mbs = [float(ln.split("|")[5]) for ln in table.splitlines() if ln.startswith("| q4_0") or ln.startswith("| f32")]
    assert len(mbs) == 4 and mbs == sorted(mbs) and "| q4_0 | `teal` | 0.5 |" in table
    assert by_format([p for p in res["points"] if p["weights"] == "f32"]) == ""


def test_quantised_sparse_point_is_scored_on_the_weights_its_kernel_reads(tiny_model_dir, tiny_corpus, tmp_path,
                                                                          monkeypatch):
    """At a block format TEAL's kernel reads the tcols copy (W^T requantised, awq.decode.tcols): its point is scored
    on those values, so it differs from the same point on the file's own blocks (AWQ_QUANT_SPARSE_LAYOUT=cols); the
    dense point (no input-major reads) is the same under both."""
    ppl = {}
    for layout in ("tcols", "cols"):
        monkeypatch.setenv("AWQ_QUANT_SPARSE_LAYOUT", layout)
        res = main(_cfg(tiny_model_dir, tiny_corpus, tmp_path, methods=["dense", "teal"], weights=["q4_0"],
                        out=tmp_path / f"fr_{layout}"))
        ppl[layout] = {p["method"]: p["ppl"] for p in res["points"]}
    assert ppl["tcols"]["dense"] == ppl["cols"]["dense"]
    assert ppl["tcols"]["teal"] != ppl["cols"]["teal"]
