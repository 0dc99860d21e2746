"""`python -m awq.reproduce --quick` end to end on the tiny model: every results file and plot."""
from __future__ import annotations

import csv
import json

import pytest

from awq.reproduce import cli


@pytest.mark.slow
def test_reproduce_quick_tiny(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path):
    thr = tiny_thresholds
    out = tmp_path / "rep"
    args = ["--quick", "--out", str(out), "--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus),
            "--thresholds", str(thr), "--seqlen", "32", "--ppl_nsamples", "2", "--extract_nsamples", "3",
            "--ks", "4,8", "--sparsities", "0.3,0.4", "--baseline_k", "8", "--max_rows", "150",
            "--eval_rows", "150", "--max_iter", "2", "--baseline_max_iter", "2"]
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert {"dense", "threshold_50", "extract"} <= set(runs)
    swaps = [n for n in runs if n.startswith("swap_awc")]
    assert len(swaps) == 2 * 2
    for n in swaps:
        eff = runs[n]["effective_sparsity"]
        assert set(eff) == {"gate_proj", "up_proj", "down_proj"}
        # the centroid mask only removes active neurons: effective sparsity >= threshold-only sparsity
        for p, v in eff.items():
            assert v >= runs["threshold_50"]["measured_sparsity"][p] - 0.05
    methods = {(r["method"], r["proj"]) for r in summary["precision"]}
    for m in ("awc", "bmf", "brbkmeans", "penalized_brbkmeans"):
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert (m, p) in methods
    for r in summary["precision"]:
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 < r["density"] <= 1.0
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(summary["precision"]) + len(runs)
    assert "| awc |" in (out / "results.md").read_text()
    for png in ("fig4a_precision_by_method.png", "fig4b_ppl_vs_k.png", "ppl_vs_effective_sparsity.png"):
        f = out / "plots" / png
        assert f.is_file() and f.stat().st_size > 5000 and f.read_bytes()[:4] == b"\x89PNG"
    # a rerun skips every finished step
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")}
    assert cli(args) == 0
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")} == before
