"""Fault injection (issue 22): a full disk and SIGKILL at chosen points, for the pattern store, clustering,
predictor training, the frontier and reproduce; and concurrency (two frontier runs on one --out, readers of a
pattern store while a writer appends).

Every file of the project becomes visible in one place, ``awq.util.io._commit`` (fsync + rename of a finished
temporary file), and the pattern store's rows are written with ``os.pwrite``.  The faults are injected there:

* **full disk** (in this process): from the N-th write under the run's folder on, every commit and row write fails
  with ``ENOSPC`` -- N is half the writes of an uninterrupted run, counted first.  The command must exit 2 with one
  line naming the file and the disk, leave no temporary file and nothing that reads as complete, and a rerun on a
  disk with space must give exactly the uninterrupted result.  ``test_full_tmpfs_*`` does the same on a real
  1 MiB tmpfs (``unshare -rm``; skipped where user namespaces are not available).
* **SIGKILL**: the command runs in a forked child that sends itself SIGKILL at a chosen commit (before the rename:
  the temporary file is written, the file itself is not); the test asserts the child died by that signal, then a
  rerun must give exactly the uninterrupted result.

Runs use one torch thread (the forked child must: OpenMP does not survive a fork), so that results compare exactly.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

import awq.util.io as awq_io
from awq.store.centroids import load_centroids, save_centroids
from awq.store.pattern_store import PatternStore, StoreError, StoreWriter
from tests.test_clustering import make_store

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(fn: Callable[[list[str]], int], argv: list) -> tuple[int, str]:
    """``fn(argv)`` in this process -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = fn([str(a) for a in argv])
    return rc, err.getvalue()


def ok(fn, argv) -> None:
    rc, err = run(fn, argv)
    assert rc == 0, err[-3000:]


def one_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


class Disk:
    """Counts the writes (file commits and store row writes) under ``root``; from the ``full_at``-th on, each fails
    with ENOSPC as on a full disk."""

    def __init__(self, monkeypatch, root: Path, full_at: Optional[int] = None) -> None:
        self.root, self.full_at, self.writes = Path(root).resolve(), full_at, 0
        self.failed: list[str] = []
        commit, pwrite = awq_io._commit, os.pwrite

        def check(path: str) -> None:
            p = Path(path).resolve()
            if p == self.root or self.root in p.parents:
                self.writes += 1
                if self.full_at is not None and self.writes >= self.full_at:
                    self.failed.append(str(p))
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))

        def fake_commit(tmp: Path, path: Path) -> None:
            check(str(path))
            commit(tmp, path)

        def fake_pwrite(fd: int, data, pos: int) -> int:
            check(os.readlink(f"/proc/self/fd/{fd}"))
            return pwrite(fd, data, pos)

        monkeypatch.setattr(awq_io, "_commit", fake_commit)
        monkeypatch.setattr(os, "pwrite", fake_pwrite)


def killed_at(fn: Callable, argv: list, match: Callable[[Path], bool], nth: int = 1, timeout: float = 180) -> None:
    """Run ``fn(argv)`` in a forked child that SIGKILLs itself at the ``nth`` commit of a file ``match`` accepts
    (its temporary file written, not yet renamed); assert that it died there, by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: one thread, quiet, killed at the chosen point
        try:
            torch.set_num_threads(1)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            commit, seen = awq_io._commit, [0]

            def hook(tmp: Path, path: Path) -> None:
                if match(Path(path)):
                    seen[0] += 1
                    if seen[0] == nth:
                        os.kill(os.getpid(), signal.SIGKILL)
                commit(tmp, path)

            awq_io._commit = hook
            fn([str(a) for a in argv])
        finally:
            os._exit(0)  # only when the kill point never came
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the killed run did not reach its kill point in {timeout} s")
        time.sleep(0.01)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"the run ended (status {status}) before its kill point: the crash was not exercised"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- pattern store -----------------------------------------------------------------------------------------------
STORE_KEYS = ("model_fingerprint", "thresholds_sha256", "corpus_sha256", "seqlen", "windows_total", "windows_done",
              "widths", "hidden", "window_stats")


def same_store(a: Path, b: Path) -> None:
    ma, mb = json.loads((a / "meta.json").read_text()), json.loads((b / "meta.json").read_text())
    assert {k: ma.get(k) for k in STORE_KEYS} == {k: mb.get(k) for k in STORE_KEYS}
    fa = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.npy")) and fa
    for f in fa:
        assert sha(a / f) == sha(b / f), f


def same_results(a: Path, b: Path) -> None:
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for k in ("ppl", "tokens", "nsamples", "measured_sparsity", "weight_read"):
        assert ra[k] == rb[k], k


def entry(argv):
    from awq.experiments.entry import cli

    return cli(argv)


@pytest.fixture(scope="module")
def store_run(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path_factory):
    """An uninterrupted extraction (4 windows of 32 tokens, masks and inputs) and its command line."""
    root = tmp_path_factory.mktemp("store_ref")

    def argv(d: Path) -> list:
        return ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--thresholds", tiny_thresholds,
                "--seqlen", 32, "--nsamples", 4, "--dump_masks", d / "store", "--dump_inputs",
                "--output_path", d / "res.json"]

    return root, argv, _reference(entry, argv, root)


def _reference(fn, argv, root: Path) -> int:
    """Run the uninterrupted reference (one thread) in ``root``; -> how many writes it made there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            count = Disk(mp, root)
            ok(fn, argv(root))
        return count.writes
    finally:
        torch.set_num_threads(n)


def test_pattern_store_on_a_full_disk(store_run, tmp_path, monkeypatch):
    ref, argv, total = store_run
    d = tmp_path / "run"
    disk = Disk(monkeypatch, d, full_at=total // 2)
    rc, err = run(entry, argv(d))
    line = one_line(err, "no space left", "disk mounted at", disk.failed[0])
    assert rc == 2 and str(d / "store") in line
    meta = json.loads((d / "store" / "meta.json").read_text())
    assert 0 < meta["windows_done"] < meta["windows_total"], meta["windows_done"]
    with pytest.raises(StoreError, match="incomplete"):
        PatternStore(d / "store")  # never read as complete
    assert not (d / "res.json").exists() and not temp_files(d)
    monkeypatch.undo()  # space again: the rerun resumes to the uninterrupted store
    ok(entry, argv(d))
    same_store(ref / "store", d / "store")
    same_results(ref / "res.json", d / "res.json")
    print(f"full disk at write {total // 2} of {total}: {line}")


@pytest.mark.parametrize("window", [1, 3])
def test_pattern_store_killed_mid_extraction(store_run, tmp_path, window):
    ref, argv, _ = store_run
    d = tmp_path / "run"
    # commit 1 of meta.json creates the store; commit w + 2 would record window w: killed with its rows written
    killed_at(entry, argv(d), lambda p: p.name == "meta.json", nth=window + 2)
    meta = json.loads((d / "store" / "meta.json").read_text())
    assert meta["windows_done"] == window and temp_files(d / "store")  # the unfinished meta.json's temp is there
    assert PatternStore(d / "store", allow_partial=True).n_tokens == 32 * window
    ok(entry, argv(d))
    same_store(ref / "store", d / "store")
    same_results(ref / "res.json", d / "res.json")


# ---- clustering ---------------------------------------------------------------------------------------------------
def awc(argv):
    from clustering.activation_aware_clustering import cli

    return cli(argv)


@pytest.fixture(scope="module")
def cluster_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("cstore")
    make_store(d / "store", L=3, windows=3, seqlen=40, widths={"gate_proj": 64, "up_proj": 64, "down_proj": 32})
    return d / "store"


def _awc_argv(store: Path, out: Path) -> list:
    return ["--masks", store, "--proj", "up_proj", "--k", 8, "--output", out, "--max_iter", 5, "--resume",
            "--no_progress"]


def same_centroids(a: Path, b: Path) -> None:
    assert torch.equal(load_centroids(a)[0], load_centroids(b)[0])
    ra = json.loads(a.with_name(a.stem + ".results.json").read_text())
    rb = json.loads(b.with_name(b.stem + ".results.json").read_text())
    assert ra["objective_history"] == rb["objective_history"] and ra["cluster_sizes"] == rb["cluster_sizes"]


def test_clustering_full_disk_and_kill(cluster_store, tmp_path, monkeypatch):
    ref = tmp_path / "ref" / "c.pt"
    ok(awc, _awc_argv(cluster_store, ref))
    # full disk at the second checkpoint: one line naming it; the first checkpoint is kept, the result is not written
    out = tmp_path / "full" / "c.pt"
    disk = Disk(monkeypatch, out.parent, full_at=2)
    rc, err = run(awc, _awc_argv(cluster_store, out))
    one_line(err, "no space left", "c.ckpt.pt", "disk mounted at")
    assert disk.failed == [str(out.with_name("c.ckpt.pt").resolve())]  # one failed write: the run stopped there
    assert rc == 2 and not out.exists() and not temp_files(out.parent)
    assert torch.load(out.with_name("c.ckpt.pt"), weights_only=True)["it"] == 1
    monkeypatch.undo()
    ok(awc, _awc_argv(cluster_store, out))
    same_centroids(ref, out)
    # killed at the commit of the centroid file: the results and sidecar are written first, so the run that
    # reads as done (the .pt exists) is complete; here it does not exist yet and the rerun finishes it
    out = tmp_path / "kill" / "c.pt"
    killed_at(awc, _awc_argv(cluster_store, out), lambda p: p.name == "c.pt")
    assert not out.exists() and out.with_name("c.results.json").exists()
    ok(awc, _awc_argv(cluster_store, out))
    same_centroids(ref, out)


# ---- predictor training ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pred_inputs(tiny_model_dir, tmp_path_factory):
    """A store with MLP inputs (3 windows, 2 layers) and centroid files for the tiny model."""
    from transformers import AutoModelForCausalLM

    from awq.load.arch import PROJS
    from awq.methods.base import sparsify_
    from awq.methods.paper_mlp import SparsityConfig
    from awq.methods.recording import record_masks
    from awq.store.bitpack import unpack

    d = tmp_path_factory.mktemp("pred_inputs")
    model = sparsify_(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                      SparsityConfig(thresholds={p: [0.02, 0.02] for p in PROJS}))
    win = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(0))
    with record_masks(model, d / "store", meta={"model": "tiny"}, total_windows=3, seqlen=32,
                      record_inputs=True) as rec:
        for i in range(3):
            rec.start_window(i)
            with torch.no_grad():
                model(win[i: i + 1])
            rec.end_window(i, {})
    st = PatternStore(d / "store")
    spec = []
    for p in PROJS:
        c = torch.cat([torch.ones(1, st.widths[p], dtype=torch.uint8),
                       unpack(st.layer(p, 0)[:5], st.widths[p], dtype=torch.uint8)])
        save_centroids(d / f"{p}.pt", c, {"proj": p})
        spec.append(f"{p.split('_')[0]}={d / f'{p}.pt'}")
    return d / "store", ",".join(spec)


def predictor(argv):
    from awq.predictor.__main__ import main

    return main(argv)


def same_predictor(a: Path, b: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
        ma, mb = json.loads(fa.metadata()["awq_predictor"]), json.loads(fb.metadata()["awq_predictor"])
    assert ma["val_metrics"] == mb["val_metrics"]


def test_predictor_training_full_disk_and_kill(pred_inputs, tmp_path, monkeypatch):
    store, spec = pred_inputs

    def argv(out: Path) -> list:
        return ["train", "--masks", store, "--centroids", spec, "--output", out, "--epochs", 2, "--batch_size", 16,
                "--max_rows", 64, "--seed", 0, "--log_level", "ERROR"]

    ref = tmp_path / "ref" / "p.safetensors"
    ok(predictor, argv(ref))
    # the disk fills as the finished predictor is written: the layer-0 partial file stays, nothing else
    out = tmp_path / "full" / "p.safetensors"
    Disk(monkeypatch, out.parent, full_at=2)
    rc, err = run(predictor, argv(out))
    one_line(err, "no space left", str(out), "disk mounted at")
    assert rc == 2 and not out.exists() and out.with_name("p.safetensors.partial").exists()
    assert not temp_files(out.parent)
    monkeypatch.undo()
    ok(predictor, argv(out))  # resumes at layer 1
    same_predictor(ref, out)
    assert not out.with_name("p.safetensors.partial").exists()
    # killed while the finished predictor is being written
    out = tmp_path / "kill" / "p.safetensors"
    killed_at(predictor, argv(out), lambda p: p.name == "p.safetensors")
    assert not out.exists() and out.with_name("p.safetensors.partial").exists()
    ok(predictor, argv(out))
    same_predictor(ref, out)


# ---- frontier -------------------------------------------------------------------------------------------------------
def frontier(argv):
    from awq.experiments.frontier import cli

    return cli(argv)


@pytest.fixture(scope="module")
def frontier_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier_ref")

    def argv(d: Path) -> list:
        return ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--out", d / "out", "--plots_dir",
                d / "plots", "--methods", "dense,teal,topk", "--densities", "0.5", "--nsamples", 1,
                "--calib_nsamples", 1, "--seqlen", 32]

    _reference(frontier, argv, root)
    return root, argv


POINT_KEYS = ("method", "param", "weight_read_fraction", "ppl", "kl", "top1", "tokens", "per_projection", "config",
              "fingerprint")


def same_frontier(a: Path, b: Path) -> None:
    pa, pb = sorted((a / "points").glob("*.json")), sorted((b / "points").glob("*.json"))
    assert [p.name for p in pa] == [p.name for p in pb] and len(pa) == 3
    for x, y in zip(pa, pb):
        jx, jy = json.loads(x.read_text()), json.loads(y.read_text())
        assert {k: jx[k] for k in POINT_KEYS} == {k: jy[k] for k in POINT_KEYS}, x.name
    assert (b / "frontier.csv").is_file() and (b / "frontier.md").is_file()


def test_frontier_full_disk_and_kill(frontier_run, tmp_path, monkeypatch):
    ref, argv = frontier_run
    d = tmp_path / "full"
    # fingerprint, the dense reference of the one window (.npy, .json: kl/top1), point 1, then full at point 2
    disk = Disk(monkeypatch, d, full_at=5)
    rc, err = run(frontier, argv(d))
    one_line(err, "no space left", "disk mounted at", disk.failed[0])
    assert rc == 2 and len(list((d / "out" / "points").glob("*.json"))) == 1 and not temp_files(d)
    assert not (d / "out" / "frontier.csv").exists()
    monkeypatch.undo()
    ok(frontier, argv(d))
    same_frontier(ref / "out", d / "out")
    d = tmp_path / "kill"
    killed_at(frontier, argv(d), lambda p: p.parent.name == "points", nth=2)
    assert len(list((d / "out" / "points").glob("*.json"))) == 1
    ok(frontier, argv(d))
    same_frontier(ref / "out", d / "out")


def test_two_frontier_runs_on_one_out(frontier_run, tmp_path):
    """A second frontier run on the --out of a running one is refused at once in one line (before its model
    loads); the first one then finishes to the uninterrupted result."""
    ref, argv = frontier_run
    d = tmp_path / "both"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first run pauses at its first point, holding the folder
        code = 3
        try:
            torch.set_num_threads(1)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            commit = awq_io._commit

            def hook(tmp: Path, path: Path) -> None:
                if Path(path).parent.name == "points":
                    os.read(r, 1)  # wait for the test
                commit(tmp, path)

            awq_io._commit = hook
            code = frontier([str(a) for a in argv(d)])
        finally:
            os._exit(code)
    pts = d / "out" / "points"
    try:
        t0 = time.monotonic()
        while not (pts.is_dir() and any(p.name.endswith(".tmp") for p in pts.iterdir())):
            assert time.monotonic() - t0 < 120, "the first run did not reach its first point"
            assert os.waitpid(pid, os.WNOHANG)[0] == 0, "the first run ended before its first point"
            time.sleep(0.02)
        t1 = time.perf_counter()
        rc, err = run(frontier, argv(d))
        line = one_line(err, str(d / "out"), "in use")
        assert rc == 2 and time.perf_counter() - t1 < 5, line
    finally:
        os.write(w, b"x" * 8)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    same_frontier(ref / "out", d / "out")


# ---- reproduce ------------------------------------------------------------------------------------------------------
def reproduce(argv):
    from awq.experiments.reproduce import cli

    return cli(argv)


def _comparable(summary: dict) -> dict:
    runs = {k: {f: v for f, v in r.items() if f != "file"} for k, r in summary["runs"].items()}
    prec = [{f: v for f, v in r.items() if f != "file"} for r in summary["precision"]]
    return {"runs": runs, "precision": sorted(prec, key=lambda r: json.dumps(r, sort_keys=True))}


@pytest.fixture(scope="module")
def reproduce_run(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce_ref")

    def argv(d: Path) -> list:
        return ["--quick", "--out", d / "rep", "--model_path", tiny_model_dir, "--data_path", tiny_corpus,
                "--thresholds", tiny_thresholds, "--seqlen", 32, "--ppl_nsamples", 1, "--extract_nsamples", 2,
                "--ks", 4, "--sparsities", 0.4, "--baseline_k", 100000, "--max_rows", 100, "--eval_rows", 100,
                "--max_iter", 1, "--plots_dir", d / "plots"]

    return root, argv, _reference(reproduce, argv, root)


def test_reproduce_full_disk_and_kill(reproduce_run, tmp_path, monkeypatch):
    ref, argv, total = reproduce_run
    want = _comparable(json.loads((ref / "rep" / "summary.json").read_text()))
    d = tmp_path / "full"
    disk = Disk(monkeypatch, d, full_at=total // 2)
    rc, err = run(reproduce, argv(d))
    one_line(err, "no space left", "disk mounted at", disk.failed[0])
    assert rc == 2 and not (d / "rep" / "summary.json").exists() and not temp_files(d)
    monkeypatch.undo()
    ok(reproduce, argv(d))
    assert _comparable(json.loads((d / "rep" / "summary.json").read_text())) == want
    # killed after the pattern store's last window, as the extraction's results file is written: the rerun
    # must still write that file (the store alone does not mean the step is done)
    d = tmp_path / "kill"
    killed_at(reproduce, argv(d), lambda p: p.name == "extract.json")
    assert PatternStore(d / "rep" / "store").n_tokens == 64 and not (d / "rep" / "runs" / "extract.json").exists()
    ok(reproduce, argv(d))
    assert _comparable(json.loads((d / "rep" / "summary.json").read_text())) == want


# ---- readers of a pattern store while a writer appends --------------------------------------------------------------
def _rows(window: int, layer: int, width: int, seqlen: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * window + layer)
    return np.packbits(rng.random((seqlen, width)) < 0.4, axis=-1)


def test_readers_see_only_complete_windows(tmp_path):
    """A writer process appends windows (rows of each window written layer by layer, slowly); this process opens
    the store again and again while it grows and checks that every row it can see is the row of a complete
    window, and that the per-window stats match."""
    store, windows, layers, seqlen, width = tmp_path / "store", 12, 3, 16, 40
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            wr = StoreWriter(store, meta={"model": "t"}, total_windows=windows, seqlen=seqlen, num_layers=layers)
            os.write(w, b"s")
            for win in range(windows):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for layer in range(layers):
                        wr.write(proj, layer, win, _rows(win, layer, width, seqlen), width=width)
                        time.sleep(0.002)  # a reader gets in between the rows of a window
                wr.end_window(win, {"window": win})
            wr.close()
        finally:
            os._exit(0)
    os.read(r, 1)
    seen, opened, done = set(), 0, 0
    while not done:
        done = os.waitpid(pid, os.WNOHANG)[0]  # read once more after the writer is gone
        st = PatternStore(store, allow_partial=True)
        opened += 1
        n = st.meta["windows_done"]
        assert st.n_tokens == n * seqlen and [s["window"] for s in st.meta["window_stats"]] == list(range(n))
        for win in range(n):
            for layer in range(layers):
                got = np.asarray(st.layer("up_proj", layer)[win * seqlen:(win + 1) * seqlen])
                assert np.array_equal(got, _rows(win, layer, width, seqlen)), (win, layer, n)
        if n:
            assert st.read_rows("down_proj", np.arange(st.n_rows("down_proj"))).shape[0] == n * seqlen * layers
        seen.add(n)
    assert len(seen) >= 3 and max(seen) == windows, seen  # the reads saw the store grow, and complete
    print(f"{opened} reads while {windows} windows were appended; windows_done seen: {sorted(seen)}")


# ---- a real full disk ---------------------------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWUSER, MS_REMOUNT, MS_REC, MS_PRIVATE = 0x00020000, 0x10000000, 32, 16384, 1 << 18


def _private_tmpfs(mnt: Path, size_kib: int) -> None:
    """In this (single-threaded, forked) process: a mount namespace of its own (a user namespace too when not
    root) with a tmpfs of ``size_kib`` KiB on ``mnt``; nothing outside this process sees it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNS if uid == 0 else CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"tmpfs", str(mnt).encode(), b"tmpfs", 0, f"size={size_kib}k".encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs {mnt}")


def _resize(mnt: Path, size_kib: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(mnt).encode(), b"tmpfs", MS_REMOUNT, f"size={size_kib}k".encode()) != 0:
        raise OSError(ctypes.get_errno(), f"remount {mnt}")


def _tmpfs_child(fn: Callable[[Path], dict], mnt: Path, size_kib: int, report: Path) -> Optional[dict]:
    """Run ``fn(mnt)`` in a forked child on a private tmpfs of ``size_kib`` KiB; -> its JSON report, or None when
    this machine cannot mount one (no user namespaces)."""
    mnt.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            try:
                _private_tmpfs(mnt, size_kib)
            except OSError:
                code = 77
                raise
            report.write_text(json.dumps(fn(mnt)))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 77:
        return None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and report.is_file(), f"tmpfs child: {status}"
    return json.loads(report.read_text())


def test_full_tmpfs_pattern_store(store_run, tmp_path):
    """The extraction on a real 64 KiB tmpfs (a mount namespace of a forked child): ENOSPC from the kernel, one
    line naming the file and the disk, no temporary file left; the same tmpfs grown to 16 MiB, the rerun resumes
    to the uninterrupted store (copied out to compare)."""
    ref, argv, _ = store_run
    out = tmp_path / "copied"

    def body(mnt: Path) -> dict:
        rc1, err1 = run(entry, argv(mnt))
        meta = json.loads((mnt / "store" / "meta.json").read_text())
        left = sorted(p.name for p in (mnt / "store").rglob("*") if p.name.endswith(".tmp"))
        _resize(mnt, 16 * 1024)
        rc2, err2 = run(entry, argv(mnt))
        shutil.copytree(mnt / "store", out / "store")
        shutil.copy(mnt / "res.json", out / "res.json")
        return {"rc1": rc1, "err1": err1, "done": meta["windows_done"], "total": meta["windows_total"],
                "left": left, "rc2": rc2, "err2": err2[-3000:]}

    rep = _tmpfs_child(body, tmp_path / "mnt", 64, tmp_path / "report.json")
    if rep is None:
        pytest.skip("this machine cannot mount a private tmpfs (user namespaces unavailable)")
    assert rep["rc1"] == 2, rep["err1"][-3000:]
    line = one_line(rep["err1"], "no space left", f"the disk mounted at {tmp_path / 'mnt'}", str(tmp_path / "mnt"))
    assert rep["done"] < rep["total"] and not rep["left"], rep
    assert rep["rc2"] == 0, rep["err2"]
    same_store(ref / "store", out / "store")
    same_results(ref / "res.json", out / "res.json")
    print(f"real tmpfs, full after {rep['done']} of {rep['total']} windows: {line}")


def test_full_tmpfs_every_writer(tmp_path):
    """On a real full tmpfs, each way a file is written (torch.save, safetensors, JSON, the store's rows) fails
    with the one-line DiskFullError naming the file and the disk, and leaves no file behind: the kernel's ENOSPC
    comes wrapped differently by each library (a RuntimeError from torch, a SafetensorError)."""
    from awq.util.io import DiskFullError, atomic_save_safetensors, atomic_torch_save, atomic_write_json

    big = torch.zeros(1 << 16)  # 256 KiB, more than the disk

    def body(mnt: Path) -> dict:
        out = {}
        for name, write in (("a.pt", lambda p: atomic_torch_save(big, p, "checkpoint")),
                            ("b.safetensors", lambda p: atomic_save_safetensors({"x": big}, p, what="predictor")),
                            ("c.json", lambda p: atomic_write_json(p, list(range(100000)), "results"))):
            try:
                write(mnt / name)
                out[name] = "written"
            except DiskFullError as e:
                out[name] = str(e)
            out[name + " left"] = sorted(os.listdir(mnt))
        w = StoreWriter(mnt / "store", meta={"model": "t"}, total_windows=8, seqlen=64, num_layers=2)
        try:
            for win in range(8):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for layer in range(2):
                        w.write(proj, layer, win, _rows(win, layer, 256, 64), width=256)
                w.end_window(win)
            out["store"] = "written"
        except DiskFullError as e:
            out["store"] = str(e)
        out["store done"] = w.windows_done
        w.close()
        return out

    rep = _tmpfs_child(body, tmp_path / "mnt", 64, tmp_path / "report.json")
    if rep is None:
        pytest.skip("this machine cannot mount a private tmpfs (user namespaces unavailable)")
    disk = f"the disk mounted at {tmp_path / 'mnt'} is full"
    for name in ("a.pt", "b.safetensors", "c.json"):
        assert str(tmp_path / "mnt" / name) in rep[name], rep
        assert disk in rep[name] and "\n" not in rep[name], rep[name]
        assert rep[name + " left"] == [], rep  # neither the file nor its temporary
    assert disk in rep["store"] and 0 < rep["store done"] < 8, rep
