"""Runs the quick path of ARTIFACT.md (``make artifact`` = ``python -m awq.artifact``) and gathers its evidence.

Each step is one command run as the evaluator would type it (a subprocess, from the project root,
or from ``clustering/`` for the artifact's step 2); outputs go under ``results/artifact/`` and a
finished step is skipped on rerun (its time is kept from the run that did it).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from awq.report.importers import sparse_mlp_rows
from awq.util import paths
from awq.util.io import atomic_write_json

log = logging.getLogger("awq.report.artifact")

OUT_REL = Path("results/artifact")
PROJ = ("gate_proj", "up_proj", "down_proj")


def steps(root: Path) -> list[tuple[str, list[str], Path, Path]]:
    """(name, argv after ``python``, cwd, output that marks it done) of every quick-path step."""
    out, store, cents = root / OUT_REL, paths.default_store(root), paths.default_centroid_dir(root)
    return [
        ("reproduce", ["-m", "awq.experiments.reproduce", "--quick", "--sparsities", "0.2,0.4", "--out", str(out / "reproduce_quick")],
         root, out / "reproduce_quick" / "summary.json"),
        ("flow_extract", ["-m", "awq.entry", "--dump_masks", str(store), "--nsamples", "2", "--output_path",
                          str(out / "flow_extract.json")], root, out / "flow_extract.json"),
        ("flow_cluster", ["activation_aware_clustering.py"], root / "clustering", cents / "down_proj.pt"),
        ("flow_centroids", ["-m", "awq.entry", "--centroids", str(cents), "--nsamples", "2", "--output_path",
                            str(out / "flow_centroids.json")], root, out / "flow_centroids.json"),
        ("sparse_mlp", [str(root / "bench" / "bench_sparse_mlp.py"), "--shapes", "smollm2-135m", "--densities", "0.5",
                        "--no_step", "--threads", "1", "--output", str(out / "sparse_mlp.json")], root,
         out / "sparse_mlp.json"),
    ]


FULL_REL = Path("results/artifact_full")


def predictor_steps(root: Path) -> list[tuple[str, list[str], Path, Path]]:
    """Row 7 of the full path (``python -m awq.artifact --predictor``; ARTIFACT.md section 3): pattern stores
    with MLP inputs (6 train windows, 2 test windows), AWC centroids (K=2048, 40% sparse, the artifact's
    seed 42 and 61,440-row sample) clustered on the *train* store, the predictor trained on that store and
    evaluated on the test store.  Outputs under ``results/artifact_full/predictor/``."""
    d = root / FULL_REL / "predictor"
    tr, te, cents = d / "train_store", d / "test_store", d / "centroids"
    st = [("train_store", ["-m", "awq.entry", "--split", "train", "--dump_masks", str(tr), "--dump_inputs",
                           "--nsamples", "6", "--output_path", str(d / "train_store.json")], root,
           d / "train_store.json"),
          ("test_store", ["-m", "awq.entry", "--split", "test", "--dump_masks", str(te), "--dump_inputs",
                          "--nsamples", "2", "--output_path", str(d / "test_store.json")], root, d / "test_store.json")]
    for p in PROJ:
        st.append((f"cluster_{p.split('_')[0]}", ["-m", "clustering.activation_aware_clustering", "--masks", str(tr),
                   "--proj", p, "--k", "2048", "--sparsity", "0.4", "--max_rows", "61440", "--seed", "42",
                   "--no_progress", "--output", str(cents / f"{p}.pt")], root, cents / f"{p}.pt"))
    st += [("train", ["-m", "awq.methods.label_predictor", "train", "--masks", str(tr), "--centroids", str(cents), "--output",
                      str(d / "predictor.safetensors")], root, d / "predictor.safetensors"),
           ("evaluate", ["-m", "awq.methods.label_predictor", "evaluate", "--masks", str(te), "--predictor",
                         str(d / "predictor.safetensors"), "--output", str(d / "eval.json")], root, d / "eval.json")]
    return st


def run_steps(root: Path, force: bool = False, predictor: bool = False) -> dict[str, float]:
    """Run the quick path (with ``predictor``: the full path's row 7, a chain that stops at a failed step);
    -> seconds per step, kept in ``timings.json`` beside the outputs (from earlier runs for skipped steps)."""
    out = root / (FULL_REL / "predictor" if predictor else OUT_REL)
    out.mkdir(parents=True, exist_ok=True)
    tfile = out / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.is_file() else {}
    env = dict(os.environ, **{paths.ROOT_ENV: str(root)})
    for name, argv, cwd, done in (predictor_steps(root) if predictor else steps(root)):
        if done.is_file() and not force:
            log.info("skip (done): %s", name)
            continue
        cmd = [sys.executable, *argv]
        log.info("run (%s): %s", paths.display(cwd, root) if cwd != root else ".", " ".join(argv))
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-2:])
            log.error("step %s failed (exit %d): %s", name, r.returncode, tail)
            timings[name] = None
            atomic_write_json(tfile, timings)
            if predictor:  # a chain: later steps need this one's output
                break
            continue
        timings[name] = round(time.perf_counter() - t, 1)
        atomic_write_json(tfile, timings)
    return timings


def _read(f: Path) -> Optional[dict]:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def gather(root: Path, timings: Optional[dict] = None) -> dict:
    """The evidence of a quick-path run under ``root`` (slim: what the checks and the reference need)."""
    out = root / OUT_REL
    ev: dict = {"timings_s": timings or _read(out / "timings.json") or {}}
    s = _read(out / "reproduce_quick" / "summary.json")
    if s:
        ev["reproduce"] = {
            "config": {k: s["config"].get(k) for k in ("seqlen", "ppl_nsamples", "extract_nsamples", "ks",
                                                       "sparsities", "baseline_k", "max_rows", "eval_rows")},
            "runs": {n: {"ppl": r["ppl"], "tokens": r["tokens"], "measured_sparsity": r.get("measured_sparsity"),
                         "effective_sparsity": r.get("effective_sparsity")} for n, r in s["runs"].items()},
            "precision": [{k: r[k] for k in ("method", "rule", "proj", "k", "sparsity", "precision", "density", "f1")}
                          for r in s["precision"]],
            "timings_s": s.get("timings_s", {})}
    m = _read(out / "reproduce_quick" / "store" / "meta.json")
    if m:
        ev["store"] = {k: m.get(k) for k in ("windows_done", "windows_total", "seqlen", "num_layers")}
    ex, ce = _read(out / "flow_extract.json"), _read(out / "flow_centroids.json")
    if ex and ce:
        files = ce.get("centroids", {}).get("files", {})
        ev["flow"] = {"threshold_ppl": ex.get("ppl"), "swap_ppl": ce.get("ppl"),
                      "centroids": {p: {"k": f["k"], "density": f["centroid_density"]} for p, f in files.items()}}
    b = _read(out / "sparse_mlp.json")
    if b:
        ev["sparse_mlp"] = {"rows": [{k: r.get(k) for k in ("shapes", "density", "mlp_speedup", "mlp_measured_ratio",
                                                            "roofline_mlp", "mlp_valid")} for r in sparse_mlp_rows(b)]}
    return ev


def with_checked_in(ev: dict, refs: dict) -> dict:
    """The quick evidence plus the full-path results the quick path does not rerun (predictor, frontier)."""
    return {**ev, **{k: refs[k] for k in ("predictor", "frontier") if k in refs}}
