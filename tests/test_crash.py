"""Crash safety: a clustering run and a small reproduce run killed with SIGKILL at a chosen point resume to
exactly the result of an uninterrupted run.

The kill lands where intended: the run is killed the moment a chosen file appears (a checkpoint, a finished
step's output) plus a random delay drawn from a printed seed (replay with ``AWQ_CRASH_SEED``), and the test
asserts that the process was still running then and that its final output did not exist yet.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from awq.store.centroids import load_centroids
from tests.test_clustering import make_store

SEED = int(os.environ.get("AWQ_CRASH_SEED", str(time.time_ns() % 100000)))


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    return e


def timed_run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return time.perf_counter() - t


def time_after(cmd: list[str], ready: Path, final: Path, timeout: float = 300) -> float:
    """Run ``cmd`` to the end; the seconds between ``ready`` and ``final`` appearing (the window a kill must land in)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(), start_new_session=True)
    t0, seen, done = time.monotonic(), None, None
    while p.poll() is None:
        if seen is None and ready.exists():
            seen = time.monotonic()
        if done is None and final.exists():
            done = time.monotonic()
        if time.monotonic() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.001)
    assert p.returncode == 0, p.stderr.read()[-3000:]
    assert seen is not None and done is not None, f"{ready} or {final} never appeared while the run was going"
    return done - seen


def kill_when(cmd: list[str], ready: Path, delay: float, final: Path, timeout: float = 300) -> bool:
    """Start ``cmd``; once ``ready`` exists, wait ``delay`` seconds and SIGKILL its process group.  True when the
    process was still running at the kill and ``final`` (its last output) did not exist yet."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    t0 = time.monotonic()
    try:
        while not ready.exists():
            if p.poll() is not None or time.monotonic() - t0 > timeout:
                return False
            time.sleep(0.001)
        time.sleep(delay)
        running = p.poll() is None and not final.exists()
        os.killpg(p.pid, signal.SIGKILL)
        return running
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_killed_clustering_run_resumes_to_the_same_result(tmp_path):
    rng = random.Random(SEED)
    store = tmp_path / "store"
    make_store(store, L=4, windows=32, seqlen=64, widths={"gate_proj": 96, "up_proj": 1024, "down_proj": 32})

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "clustering.activation_aware_clustering", "--masks", str(store), "--proj",
                "up_proj", "--k", "64", "--output", str(out), "--max_iter", "8", "--resume", "--no_progress"]

    # the uninterrupted run measures how long after its first checkpoint a run writes its centroids (the run's last
    # output; its results JSON and sidecar come before it): the kill lands in the first third of that window.
    # Machines differ tenfold in speed, so no fixed delay is safe; a kill that still comes too late is retried at once.
    window = time_after(cmd(tmp_path / "full.pt"), tmp_path / "full.ckpt.pt", tmp_path / "full.pt")
    ckpt, out = tmp_path / "crash.ckpt.pt", tmp_path / "crash.pt"
    for attempt in range(3):
        delay = rng.uniform(0.0, window / 3) if attempt == 0 else 0.0
        for f in tmp_path.glob("crash*"):
            f.unlink()
        killed = kill_when(cmd(out), ckpt, delay, out)
        print(f"seed {SEED}: attempt {attempt}: killed {delay:.3f}s after the first checkpoint (the full run wrote its "
              f"centroids {window:.3f}s after it); landed: {killed}")
        if killed:
            break
    assert killed, "every run finished before the kill: the crash was not exercised"
    assert ckpt.exists() and not (tmp_path / "crash.pt").exists()
    timed_run(cmd(tmp_path / "crash.pt"))
    a, _ = load_centroids(tmp_path / "full.pt")
    b, _ = load_centroids(tmp_path / "crash.pt")
    assert torch.equal(a, b)
    ra = json.loads((tmp_path / "full.results.json").read_text())
    rb = json.loads((tmp_path / "crash.results.json").read_text())
    assert ra["objective_history"] == rb["objective_history"] and ra["cluster_sizes"] == rb["cluster_sizes"]


def _comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between two directories and two invocations."""
    runs = {k: {f: v for f, v in r.items() if f != "file"} for k, r in summary["runs"].items()}
    prec = [{f: v for f, v in r.items() if f != "file"} for r in summary["precision"]]
    return {"runs": runs, "precision": sorted(prec, key=lambda r: json.dumps(r, sort_keys=True))}


@pytest.mark.slow
def test_killed_reproduce_run_resumes_to_the_same_result(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path):
    rng = random.Random(SEED + 1)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "awq.experiments.reproduce", "--quick", "--out", str(out), "--model_path",
                str(tiny_model_dir), "--data_path", str(tiny_corpus), "--thresholds", str(tiny_thresholds),
                "--seqlen", "32", "--ppl_nsamples", "1", "--extract_nsamples", "3", "--ks", "4", "--sparsities", "0.4",
                # --baseline_k above the number of rows: AWC only, to stay fast
                "--baseline_k", "100000", "--max_rows", "150", "--eval_rows", "150", "--max_iter", "2",
                "--baseline_max_iter", "2", "--plots_dir", str(out / "plots")]

    # the kill lands in the first third of the window the uninterrupted run had between a complete pattern store
    # and its summary (clustering and the last steps left to do); a kill that still comes too late is retried at once
    full = tmp_path / "full"
    window = time_after(cmd(full), full / "runs" / "extract.json", full / "summary.json")
    crash = tmp_path / "crash"
    for attempt in range(3):
        delay = rng.uniform(0.0, window / 3) if attempt == 0 else 0.0
        shutil.rmtree(crash, ignore_errors=True)
        killed = kill_when(cmd(crash), crash / "runs" / "extract.json", delay, crash / "summary.json")
        done = sorted(str(f.relative_to(crash)) for f in crash.rglob("*.json"))
        print(f"seed {SEED + 1}: attempt {attempt}: killed {delay:.3f}s after the pattern store was complete (the full "
              f"run wrote its summary {window:.3f}s after it); landed: {killed}; json files then: {done}")
        if killed:
            break
    assert killed, "every run finished before the kill: the crash was not exercised"
    timed_run(cmd(crash))
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert _comparable(a) == _comparable(b)
    for f in sorted((tmp_path / "full" / "centroids").glob("*.pt")):
        if not f.name.endswith(".ckpt.pt"):
            assert torch.equal(load_centroids(f)[0], load_centroids(tmp_path / "crash" / "centroids" / f.name)[0])
