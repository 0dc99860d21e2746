"""bench/common.py (interleaving, quantiles, rooflines, flagging) and a smoke run of every bench script."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from bench.common import (
    ABOVE_ROOFLINE,
    FusedDenseMLP,
    Report,
    Timing,
    best_dense,
    check_ratio,
    interleaved,
    quantile,
    roofline_speedup,
    swiglu_bytes,
)


# --------------------------------------------------------------------------------------------
# rooflines (hand-computed values)
# --------------------------------------------------------------------------------------------
def test_swiglu_bytes_smollm2_block():
    assert swiglu_bytes(576, 1536, 4) == 3 * 576 * 1536 * 4 == 10_616_832


def test_roofline_plain_ratio():
    assert roofline_speedup(100.0, 50.0) == pytest.approx(2.0)
    assert roofline_speedup(10.0, 3.0) == pytest.approx(10 / 3)
    # 50% of a SwiGLU block: half the bytes, 2x
    assert roofline_speedup(swiglu_bytes(576, 1536, 4), swiglu_bytes(576, 768, 4)) == pytest.approx(2.0)


def test_roofline_with_dense_part():
    # 60 MB of MLP weights of which 30% are read, 40 MB (attention, head) stay dense:
    # (60 + 40) / (18 + 40) = 100 / 58
    assert roofline_speedup(60e6, 18e6, 40e6) == pytest.approx(100 / 58)
    assert roofline_speedup(1.0, 1.0, 5.0) == pytest.approx(1.0)


def test_roofline_rejects_bad_bytes():
    with pytest.raises(ValueError):
        roofline_speedup(10.0, -1.0)
    with pytest.raises(ValueError):
        roofline_speedup(10.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------
# flagging
# --------------------------------------------------------------------------------------------
def test_check_ratio():
    assert check_ratio(1.9, 2.0) == "ok"
    assert check_ratio(2.0, 2.0) == "ok"
    assert check_ratio(2.01, 2.0) == ABOVE_ROOFLINE
    assert check_ratio(2.01, 2.0, tol=0.05) == "ok"
    assert check_ratio(40.0, None) == "ok"  # no bound known


def test_report_flags_ratio_above_roofline(tmp_path, capsys):
    rep = Report("t", {"x": 1})
    above = rep.ratio("too good", Timing([4.0, 4.2, 3.8]), Timing([0.1, 0.1, 0.1]), roofline=2.0)
    below = rep.ratio("fine", Timing([2.0, 2.0, 2.0]), Timing([1.25, 1.25, 1.25]), roofline=2.0)
    out = capsys.readouterr().out
    assert above["status"] == ABOVE_ROOFLINE and above["valid"] is False and above["speedup"] is None
    assert above["measured_ratio"] == pytest.approx(40.0)
    too_good_line = [line for line in out.splitlines() if line.startswith("too good")][0]
    assert ABOVE_ROOFLINE in too_good_line and "speedup 40" not in too_good_line
    assert below["valid"] and below["speedup"] == pytest.approx(1.6) and below["status"] == "ok"
    assert rep.flagged() == ["too good"]
    rep.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ratios"]["too good"]["status"] == ABOVE_ROOFLINE and data["ratios"]["too good"]["speedup"] is None
    assert data["ratios"]["fine"]["speedup"] == pytest.approx(1.6)
    assert data["config"] == {"x": 1} and "cpu" in data["system"] and "flags" in data["system"]


def test_report_header_names_cpu_and_threads(capsys):
    Report("hdr", {})
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("# hdr") and "cpu:" in line and "flags:" in line
    assert f"torch threads {torch.get_num_threads()}" in line


def test_paired_spread_and_gbs():
    rep = Report("t", {}, echo=False)
    r = rep.ratio("r", Timing([2.0, 4.0, 3.0]), Timing([1.0, 1.0, 2.0]), roofline=None)
    assert r["measured_ratio"] == pytest.approx(3.0 / 1.0)
    assert (r["paired_min"], r["paired_max"]) == (pytest.approx(1.5), pytest.approx(4.0))
    rec = rep.timing("d", Timing([0.5, 0.25, 1.0]), nbytes=1e9)
    assert rec["gbs"] == pytest.approx(2.0)  # 1 GB per 0.5 s median


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def test_interleaved_order_and_samples():
    calls: list[str] = []
    now = [0.0]
    cost = {"a": 2.0, "b": 3.0, "c": 0.5}

    def make(name):
        def f():
            calls.append(name)
            now[0] += cost[name]
        return f

    t = interleaved({k: make(k) for k in "abc"}, repeats=3, warmup=2, clock=lambda: now[0])
    assert calls == ["a", "b", "c"] * 5  # 2 warm-up rounds + 3 timed rounds, round-robin
    assert {k: v.samples for k, v in t.items()} == {"a": [2.0] * 3, "b": [3.0] * 3, "c": [0.5] * 3}


def test_interleaved_rejects_no_repeats():
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, repeats=0)


def test_quantiles_match_numpy():
    rng = random.Random(0)
    for n in (1, 2, 5, 10):
        xs = [rng.random() for _ in range(n)]
        for q in (0.0, 0.25, 0.5, 0.75, 1.0):
            assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
        t = Timing(xs)
        assert (t.median, t.min, t.max) == (pytest.approx(float(np.median(xs))), min(xs), max(xs))
        assert t.q1 == pytest.approx(float(np.quantile(xs, 0.25)))


def test_best_dense_picks_fastest_median():
    t = {"hf": Timing([3.0, 1.0, 3.0]), "fused": Timing([2.0, 2.0, 2.0])}
    assert best_dense(t, ["hf", "fused"]) == "fused"  # hf's min is lower, its median is not


def test_fused_dense_mlp_matches_hf_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96)).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(FusedDenseMLP(mlp)(x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# every bench script, smallest options
# --------------------------------------------------------------------------------------------
def _check_json(path, bench):
    data = json.loads(path.read_text())
    assert data["bench"] == bench and data["config"] and data["system"]["cpu"]
    assert data["ratios"], "a bench must report at least one ratio"
    for name, r in data["ratios"].items():
        assert r["valid"] == (r["roofline"] is None or r["measured_ratio"] <= r["roofline"]), name
    return data


def test_bench_sparse_mlp_quick(tmp_path):
    from bench import bench_sparse_mlp

    rep = bench_sparse_mlp.main(["--quick", "--threads", "1", "--output", str(tmp_path / "o.json")])
    data = _check_json(tmp_path / "o.json", "bench_sparse_mlp")
    assert set(data["ratios"]) == {"tiny mlp density=50%", "tiny step density=50%"}
    assert data["ratios"]["tiny mlp density=50%"]["roofline"] == pytest.approx(2.0)
    assert all(f"tiny mlp {k}" in data["timings"] for k in bench_sparse_mlp.DENSE)
    assert rep.data["figures"]["tiny mlp dense_baseline"] in bench_sparse_mlp.DENSE


def test_bench_sparse_mlp_bad_input_exit_2(capsys):
    from bench import bench_sparse_mlp

    assert bench_sparse_mlp.cli(["--shapes", "nope", "--quick"]) == 2  # explicit options win over --quick
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert bench_sparse_mlp.cli(["--quick", "--densities", "0"]) == 2
    assert "densities" in capsys.readouterr().err


def test_bench_lowbit_rank_quick(tmp_path):
    from awq.kernels.lowbit import lowbit_kernel
    from bench import bench_lowbit_rank

    if lowbit_kernel() is None:
        pytest.skip("low-bit rank C++ kernel unavailable")
    bench_lowbit_rank.main(["--quick", "--threads", "1", "--output", str(tmp_path / "l.json")])
    data = _check_json(tmp_path / "l.json", "bench_lowbit_rank")
    assert {r.split(" vs ")[0] for r in data["ratios"]} == {"tiny score", "tiny gathered", "tiny lowbit_rank"}
    assert all(r["roofline"] > 1 for r in data["ratios"].values())


def test_bench_clustering_quick(tmp_path):
    from bench import bench_clustering

    bench_clustering.main(["--quick", "--threads", "1", "--output", str(tmp_path / "c.json")])
    data = _check_json(tmp_path / "c.json", "bench_clustering")
    assert {"ours (global) vs reference", "ours (global) vs scikit-learn Lloyd",
            "distance rate / bare GEMM rate"} <= set(data["ratios"])
    assert data["ratios"]["distance rate / bare GEMM rate"]["roofline"] == 1.0
    assert data["figures"]["distance_kernel"] in ("int8", "fp32")


def test_bench_predictor_quick(tmp_path):
    from bench import bench_predictor

    bench_predictor.main(["--quick", "--threads", "1", "--output", str(tmp_path / "p.json")])
    data = _check_json(tmp_path / "p.json", "bench_predictor")
    assert len(data["ratios"]) == 2  # one K, two trunks
    assert all(r["roofline"] > 1 for r in data["ratios"].values())


def test_bench_ppl_quick(tmp_path, tiny_model_dir, tiny_corpus, tiny_thresholds):
    from bench import bench_ppl

    bench_ppl.main(["--quick", "--threads", "1", "--model_path", str(tiny_model_dir), "--data_path",
                    str(tiny_corpus), "--thresholds", str(tiny_thresholds), "--seqlen", "32",
                    "--output", str(tmp_path / "q.json")])
    data = _check_json(tmp_path / "q.json", "bench_ppl")
    assert all(r["roofline"] == 1.0 for r in data["ratios"].values())
    assert data["figures"]["dense_tok_s"] > 0


def test_bench_decode_method_rows_tiny(tiny_model_dir, tiny_corpus, tmp_path):
    """bench_decode on a tiny model: method rows with metered read fractions, ratios beside rooflines."""
    import json

    from bench import bench_decode

    out = tmp_path / "d.json"
    rc = bench_decode.main(["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), "--threads", "1",
                            "--repeats", "1", "--prompt_tokens", "8", "--new_tokens", "4", "--densities", "0.5",
                            "--methods", "teal=0.5,cats=0.25", "--output", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    figs = data["figures"]
    for key in ("lean teal d=0.5", "lean cats d=0.25"):
        assert 0.0 < figs[f"{key} weight_read_fraction"] < 1.0
        assert any(line.startswith(f"{key} vs ") for line in data["lines"])
    assert any("roofline" in line or "ABOVE ROOFLINE" in line for line in data["lines"])
    assert any(line.startswith("CPU ") and "this project's kernels" in line for line in data["lines"])
    # the docs/kernels.md block generated from it (python -m awq.report --import_decode JSON decode_smollm2)
    from awq.report.decode import decode_table, import_decode
    from awq.report.importers import RunOutputError

    ref = import_decode(out, "decode_smollm2", tmp_path)
    table = decode_table(json.loads(ref.read_text()))
    for key in ("lean dense", "lean teal d=0.5", "lean cats d=0.25", "lean gathered d=0.5"):
        assert f"| {key} |" in table
    assert f"{figs['lean teal d=0.5 weight_read_fraction']:.3f}" in table
    with pytest.raises(RunOutputError, match="NAME must be one of"):
        import_decode(out, "decode_x", tmp_path)


def test_bench_decode_bad_method(capsys):
    from bench import bench_decode

    assert bench_decode.main(["--methods", "teal"]) == 2
    assert "name=density" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no llama_cpp package"):
        bench_decode.import_llama_cpp("/nonexistent")
