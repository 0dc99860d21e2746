"""`python -m awq.reproduce --quick` end to end on the tiny model: every results file and plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from awq.experiments.reproduce import cli  # noqa: E402
from awq.store.centroids import load_centroids  # noqa: E402
from awq.store.pattern_store import PatternStore  # noqa: E402


@pytest.mark.slow
def test_reproduce_quick_tiny(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path):
    thr = tiny_thresholds
    out = tmp_path / "rep"
    args = ["--quick", "--out", str(out), "--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus),
            "--thresholds", str(thr), "--seqlen", "32", "--ppl_nsamples", "2", "--extract_nsamples", "3",
            "--ks", "4,8", "--sparsities", "0.3,0.4", "--baseline_k", "8", "--max_rows", "150",
            "--eval_rows", "100000", "--max_iter", "2", "--baseline_max_iter", "2"]  # precision on every stored row
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
    store = PatternStore(out / "store")
    checked = 0
    for r in summary["precision"]:
        if r["rule"] != "active_only":
            continue
        # precision = share of the true active neurons that the nearest centroid (largest overlap) keeps, over all
        # stored rows; density = the centroids' share of ones: recomputed here by a plain loop
        C = load_centroids(out / "centroids" / Path(r["file"]).name.replace(".json", ".pt"))[0].bool()
        rows = torch.from_numpy(np.unpackbits(np.concatenate([store.layer(r["proj"], i) for i in range(2)]),
                                              axis=-1, count=C.shape[1])).bool()
        covered = active = 0
        for a in rows:
            overlap = (a & C).sum(1)
            best = int(torch.nonzero(overlap == overlap.max())[0])
            covered += int((a & C[best]).sum())
            active += int(a.sum())
        assert r["precision"] == pytest.approx(covered / active, abs=1e-12), r
        assert r["density"] == pytest.approx(C.float().mean().item(), abs=1e-6), r
        checked += 1
    assert checked == len(swaps) * 3 + 3 * 3  # AWC: K x sparsity x 3 projections; baselines: 3 methods x 3
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(summary["precision"]) + len(runs)
    assert "| awc |" in (out / "results.md").read_text()
    for png in ("fig4a_precision_by_method.png", "fig4b_ppl_vs_k.png", "ppl_vs_effective_sparsity.png"):
        img = plt.imread(out / "plots" / png)  # a real image with drawn content, not a blank canvas
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20, png
    # a rerun skips every finished step
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")}
    assert cli(args) == 0
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")} == before
