"""Clustering suite: fast paths against plainly written references, AWC end to end, CLIs, resume,
torch.distributed (2 CPU processes), bad inputs."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import typing
from dataclasses import replace as dataclass_replace
from pathlib import Path

import numpy as np
import pytest
import torch

from awq.store.centroids import CentroidError, load_centroids, save_centroids
from clustering import ClusteringError
from clustering.activation_aware_clustering import ActivationAwareClustering
from clustering.awc_iteration import awc_update, global_balanced_assign, greedy_balanced_assign, row_quantile
from clustering.sources import StoreSource, TensorSource

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = [
    "activation_aware_clustering", "select_centroids", "brbkmeans", "bmf", "penalized_brbkmeans",
    "error_checking", "centroid_analysis", "replace_centroid_based_on_sparsity",
]


# ------------------------------------------------------------------------------------------
# plain references (written like the artifact: loops, no tricks)
# ------------------------------------------------------------------------------------------
def ref_distance(X, C):
    out = torch.zeros(X.shape[0], C.shape[0])
    for i in range(C.shape[0]):
        out[:, i] = (X * (X - C[i]).abs()).sum(1)
    return out


def ref_greedy(D, cap):
    n, k = D.shape
    labels = [-1] * n
    unassigned = list(range(n))
    for i in range(k):
        if not unassigned:
            break
        order = sorted(unassigned, key=lambda r: (float(D[r, i]), r))  # stable: ties -> lower row
        for r in order[:cap]:
            labels[r] = i
        unassigned = [r for r in unassigned if labels[r] < 0]
    return labels


def ref_global(D, cap):
    n, k = D.shape
    labels, rem, pending = [-1] * n, [cap] * k, list(range(n))
    while pending and any(r > 0 for r in rem):
        props = {}
        for r in pending:
            best = None
            for i in range(k):
                if rem[i] > 0 and (best is None or D[r, i] < D[r, best]):
                    best = i
            props.setdefault(best, []).append((float(D[r, best]), r))
        rejected = []
        for i, lst in props.items():
            lst.sort()
            free = rem[i]
            for j, (_, r) in enumerate(lst):
                if j < free:
                    labels[r] = i
                    rem[i] -= 1
                else:
                    rejected.append(r)
        pending = sorted(rejected)
    return labels


def ref_update(C, X, labels, t, cap, p):
    U = torch.zeros_like(C)
    for i in range(C.shape[0]):
        members = [r for r in range(X.shape[0]) if labels[r] == i]
        if not members:
            U[i] = C[i]
            continue
        mu = X[members].float().mean(0)
        s = (t * cap * C[i] + cap * mu) / (t * cap + cap)
        U[i] = (s > torch.quantile(s, p)).float()
    return U


def ref_awc(X, C, p, max_iter, block_rows, cap):
    """The artifact's brb_kmeans_with_percentile with one GPU, stable sort, leftovers dropped."""
    n, k = X.shape[0], C.shape[0]
    prev = [-1] * n
    it = 0
    for it in range(1, max_iter + 1):
        new = [-1] * n
        for b, s in enumerate(range(0, n, block_rows), start=1):
            Xb = X[s : s + block_rows]
            lab = ref_greedy(ref_distance(Xb, C), cap)
            C = ref_update(C, Xb, lab, it * b, cap, p)
            new[s : s + len(lab)] = lab
        if new == prev:
            break
        prev = new
    return C, prev, it


def rand01(n, f, p, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, f, generator=g) < p).float()


def planted(k=6, per=40, f=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(k, f, generator=g) < 0.45).float()
    truth = torch.arange(k).repeat_interleave(per)
    keep = (torch.rand(k * per, f, generator=g) < 0.9).float()
    noise = (torch.rand(k * per, f, generator=g) < 0.02).float()
    X = ((protos[truth] * keep + noise) > 0).float()
    perm = torch.randperm(k * per, generator=g)
    return X[perm], truth[perm]


def make_store(path, L=3, windows=2, seqlen=40, widths=None, seed=0, windows_done=None):
    from awq.store.pattern_store import StoreWriter, pack

    widths = widths or {"gate_proj": 48, "up_proj": 48, "down_proj": 20}
    g = torch.Generator().manual_seed(seed)
    data = {p: (torch.rand(L, windows * seqlen, w, generator=g) < 0.35).float() for p, w in widths.items()}
    wr = StoreWriter(path, meta={"model": "test"}, total_windows=windows, seqlen=seqlen, num_layers=L)
    for win in range(windows if windows_done is None else windows_done):
        for p, w in widths.items():
            for l in range(L):
                wr.write(p, l, win, pack(data[p][l, win * seqlen : (win + 1) * seqlen]), width=w)
        wr.end_window(win)
    wr.close()
    return data


def run_script(name, *args, torchrun=0, module=False, cwd=None):
    """Run a clustering tool by path (``python clustering/<name>.py``) or as ``python -m clustering.<name>``;
    no PYTHONPATH: the installed package must be enough."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    pre = [sys.executable]
    if torchrun:
        pre += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    target = ["-m", f"clustering.{name}"] if module else [str(REPO / "clustering" / f"{name}.py")]
    return subprocess.run(pre + target + [*map(str, args)], capture_output=True, text=True, env=env, timeout=180,
                          cwd=cwd)


# ------------------------------------------------------------------------------------------
# fast paths vs references
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,cap,lookahead", [(60, 6, 10, 4), (61, 7, 8, 4), (50, 4, 3, 4), (300, 40, 7, 1), (257, 50, 5, 2)])
def test_greedy_assignment_matches_reference(n, k, cap, lookahead):
    D = torch.randint(0, 5, (n, k), generator=torch.Generator().manual_seed(n)).float()  # many ties
    got = greedy_balanced_assign(D, cap, lookahead=lookahead, chunk=16)  # small lists: exercises rebuilds
    assert got.tolist() == ref_greedy(D, cap)
    assert torch.bincount(got[got >= 0], minlength=k).max() <= cap
    assert int((got >= 0).sum()) == min(n, k * cap)


@pytest.mark.parametrize("n,k,cap", [(60, 6, 10), (61, 7, 8), (50, 4, 3), (120, 12, 10)])
def test_global_assignment_matches_reference(n, k, cap):
    D = torch.randint(0, 6, (n, k), generator=torch.Generator().manual_seed(n + 1)).float()
    got = global_balanced_assign(D, cap)
    assert got.tolist() == ref_global(D, cap)
    assert torch.bincount(got[got >= 0], minlength=k).max() <= cap
    assert int((got >= 0).sum()) == min(n, k * cap)


def test_global_assignment_independent_of_centroid_order():
    D = torch.randperm(80 * 8, generator=torch.Generator().manual_seed(3)).float().view(80, 8)  # no ties
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4))
    a = global_balanced_assign(D, 10)
    b = global_balanced_assign(D[:, perm], 10)
    assert torch.equal(perm[b], a)


def test_row_quantile_matches_torch():
    s = torch.randint(0, 7, (9, 37)).float() / 7  # ties like AWC scores
    for p in (0.2, 0.3, 0.4, 0.0, 0.95):
        assert torch.equal(row_quantile(s, p), torch.quantile(s, p, dim=1))


def test_update_matches_reference_and_sparsity():
    X, C = rand01(90, 50, 0.45, 5), rand01(7, 50, 0.6, 6)
    labels = greedy_balanced_assign(ref_distance(X, C), 12)
    labels[labels == 6] = -1  # centroid 6 gets no members -> kept
    S = torch.zeros_like(C)
    ok = labels >= 0
    S.index_add_(0, labels[ok], X[ok])
    counts = torch.bincount(labels[ok], minlength=7)
    for t, p in ((1, 0.4), (3, 0.2), (6, 0.3)):
        got = awc_update(C, S, counts, t, 12, p)
        assert torch.equal(got, ref_update(C, X, labels.tolist(), t, 12, p))
        assert torch.equal(got[6], C[6])
        zeros = (got[:6] == 0).sum(1)
        assert torch.all(zeros >= int(np.floor(p * 49)) + 1)  # sparsity >= p


@pytest.mark.parametrize("p", [0.2, 0.4])
def test_awc_greedy_matches_artifact_reference(p):
    X = rand01(120, 24, 0.4, 7)
    C0 = X[[3, 10, 20, 33, 47, 58, 71, 90]].clone()
    est = ActivationAwareClustering(8, max_iter=4, sparsity=p, assign="greedy", block_rows=60).fit(X, init=C0)
    C_ref, lab_ref, it_ref = ref_awc(X, C0, p, 4, 60, 60 // 8)
    assert torch.equal(est.cluster_centers_.float(), C_ref)
    assert est.labels_.tolist() == lab_ref
    assert est.n_iter_ == it_ref


def test_awc_sparsity_capacity_and_determinism():
    X = rand01(400, 64, 0.4, 8)
    kw = dict(max_iter=3, sparsity=0.3, block_rows=200, random_state=1)
    a = ActivationAwareClustering(10, **kw).fit(X)
    b = ActivationAwareClustering(10, **kw).fit(X)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_) and torch.equal(a.labels_, b.labels_)
    # the artifact's `> quantile` rule: at least floor(p (F-1)) + 1 zeros per centroid (sparsity >= p - p/F)
    assert torch.all((a.cluster_centers_ == 0).sum(1) >= int(np.floor(0.3 * 63)) + 1)
    for s in range(0, 400, 200):  # cap = floor(200 / 10) per block
        assert torch.bincount(a.labels_[s : s + 200], minlength=10).max() <= 20


@pytest.mark.parametrize("assign", ["global", "greedy"])
def test_awc_recovers_planted_clusters(assign):
    from sklearn.metrics import adjusted_rand_score

    X, truth = planted()
    est = ActivationAwareClustering(6, max_iter=10, sparsity=0.4, assign=assign, random_state=0, min_sparsity=0.3)
    est.fit(X)
    assert adjusted_rand_score(truth.numpy(), est.labels_.numpy()) > 0.8
    assert torch.equal(est.predict(X)[:5], est.predict(X[:5]))


@pytest.mark.parametrize("cls", ["BRBKMeans", "BMF", "PenalizedBRBKMeans"])
def test_baselines_recover_planted_clusters(cls):
    from sklearn.metrics import adjusted_rand_score

    import clustering.baselines as B

    X, truth = planted()
    est = getattr(B, cls)(6, max_iter=30, random_state=0).fit(X)
    assert est.cluster_centers_.dtype == torch.uint8
    assert adjusted_rand_score(truth.numpy(), est.labels_.numpy()) > 0.6
    assert est.objective_history_[-1] <= est.objective_history_[0]


def test_baseline_distances_match_reference():
    import clustering.baselines as B

    X, C = rand01(50, 30, 0.4, 9), rand01(7, 30, 0.5, 10)
    ham = torch.cdist(X, C, p=1)
    assert torch.equal(B.BMF(7)._dist(X, C), ham)
    pen = torch.zeros(50, 7)
    for i in range(7):
        diff = X - C[i]
        pen[:, i] = diff.abs().sum(1) + 2.0 * (diff < 0).float().sum(1)
    assert torch.equal(B.PenalizedBRBKMeans(7, penalty=2.0)._dist(X, C), pen)
    Cr = torch.rand(7, 30)
    assert torch.allclose(B.BRBKMeans(7)._dist(X, Cr), torch.cdist(X, Cr) ** 2, atol=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    X = rand01(300, 40, 0.4, 11)
    kw = dict(sparsity=0.3, block_rows=100, random_state=2)
    full = ActivationAwareClustering(10, max_iter=5, **kw).fit(X)
    ck = tmp_path / "ck.pt"
    ActivationAwareClustering(10, max_iter=2, checkpoint=ck, **kw).fit(X)  # "killed" after 2 iterations
    res = ActivationAwareClustering(10, max_iter=5, checkpoint=ck, resume=True, **kw).fit(X)
    assert torch.equal(res.cluster_centers_, full.cluster_centers_)
    assert torch.equal(res.labels_, full.labels_) and res.n_iter_ == full.n_iter_
    assert res.objective_history_ == full.objective_history_
    with pytest.raises(ClusteringError, match="different configuration"):
        ActivationAwareClustering(10, max_iter=5, checkpoint=ck, resume=True, sparsity=0.2, block_rows=100).fit(X)


def test_select_random_rows_matches_artifact_rule():
    import random

    from clustering.select_centroids import select_random_rows

    X = rand01(200, 20, 0.55, 12)  # many rows with < 40% zeros
    C = select_random_rows(TensorSource(X), 15, seed=42, min_sparsity=0.4, scan=5, block_rows=50)
    ref = []
    for s in sorted(random.Random(42).sample(range(200), 15)):
        for r in range(s, min(s + 6, (s // 50 + 1) * 50)):
            if float((X[r] == 0).float().mean()) >= 0.4:
                ref.append(X[r])
                break
    assert len(ref) == 15 and torch.equal(C, torch.stack(ref))
    assert torch.all((C == 0).float().mean(1) >= 0.4)


def test_kmeanspp_init_sparsity():
    from clustering.select_centroids import select_kmeanspp

    X = rand01(300, 32, 0.5, 13)
    C = select_kmeanspp(TensorSource(X), 12, seed=0, min_sparsity=0.4)
    assert C.shape == (12, 32)
    assert torch.equal(C[0], X[int(X.sum(1).argmax())])  # artifact: the most active row first (unfiltered)
    assert torch.all((C[1:] == 0).float().mean(1) >= 0.4)
    assert torch.equal(C, select_kmeanspp(TensorSource(X), 12, seed=0, min_sparsity=0.4))


def test_bad_inputs_in_process(tmp_path):
    X = rand01(20, 16, 0.4, 14)
    with pytest.raises(ClusteringError, match="exceeds the number of rows"):
        ActivationAwareClustering(30).fit(X)
    with pytest.raises(CentroidError, match="width"):
        ActivationAwareClustering(2, block_rows=20).fit(X, init=torch.ones(2, 10))
    with pytest.raises(ClusteringError, match="0/1"):
        ActivationAwareClustering(2).fit(X * 2)


# ------------------------------------------------------------------------------------------
# pattern store + CLIs
# ------------------------------------------------------------------------------------------
def test_store_source_order_and_blocks(tmp_path):
    data = make_store(tmp_path / "st")
    src = StoreSource(tmp_path / "st", "gate_proj")
    assert src.n_rows == 3 * 80 and src.default_block_rows == 3 * 40
    blk = src.read_range(0, 120)  # block 0 = window 0 of every layer, layer-major
    assert torch.equal(blk, data["gate_proj"][:, :40].reshape(120, 48))
    one = StoreSource(tmp_path / "st", "down_proj", layer=2)
    assert torch.equal(one.read_range(0, 80), data["down_proj"][2])
    sub = StoreSource(tmp_path / "st", "gate_proj", max_rows=50, seed=3)
    assert sub.n_rows == 50 and torch.equal(sub.read_range(0, 50), StoreSource(tmp_path / "st", "gate_proj", max_rows=50, seed=3).read_range(0, 50))


def test_help_of_every_script(capsys):
    for name in SCRIPTS:
        mod = importlib.import_module(f"clustering.{name}")
        with pytest.raises(SystemExit) as e:
            mod.cli(["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--" in out and "usage" in out
        for f in dataclasses.fields(typing.get_type_hints(mod.main)["cfg"]):
            assert f"--{f.name}" in out.replace("--no_", "--")  # every option of the typed config is documented


@pytest.mark.parametrize("module", [False, True])
def test_runs_by_path_and_as_module_from_any_cwd(tmp_path, module):
    """`python clustering/x.py` and `python -m clustering.x` both work without PYTHONPATH, from another folder."""
    r = run_script("centroid_analysis", "--help", module=module, cwd=tmp_path)
    assert r.returncode == 0 and "--centroids" in r.stdout, r.stderr
    r = run_script("activation_aware_clustering", "--masks", tmp_path, "--proj", "gate_proj", "--k", 0, "--output",
                   tmp_path / "x.pt", module=module, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: --k: must be >= 1, got 0", r.stderr


def test_option_ranges_checked_before_reading_data(tmp_path, capsys):
    from clustering import activation_aware_clustering as awc
    from clustering import bmf, error_checking

    make_store(tmp_path / "store")
    save_centroids(tmp_path / "c.pt", rand01(4, 48, 0.5, 1), {"proj": "gate_proj"})
    base = ["--masks", tmp_path / "store", "--proj", "gate_proj"]
    for mod, extra, msg in ((awc, ["--k", 4, "--output", tmp_path / "a.pt", "--sparsity", 1.0],
                             "--sparsity: must be a fraction in [0.0, 1.0)"),
                            (awc, ["--k", 4, "--output", tmp_path / "a.pt", "--max_rows", 0], "--max_rows: must be >= 1"),
                            (bmf, ["--k", 4, "--output", tmp_path / "a.pt", "--seed_batch", 0], "--seed_batch: must be >= 1"),
                            (error_checking, ["--centroids", tmp_path / "c.pt", "--penalty", -1], "--penalty: must be >= 0")):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert mod.cli([str(a) for a in base + extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {msg}"), err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before anything was written
    # a missing store is refused by its declaration too, before any data is read
    assert awc.cli([str(a) for a in ["--masks", tmp_path / "missing_store", "--proj", "gate_proj", "--k", 4,
                                     "--output", tmp_path / "a.pt"]]) == 2
    assert "--masks: no such folder" in capsys.readouterr().err


def test_main_with_config_equals_cli(tmp_path):
    from awq.util.cli import to_argv
    from clustering.activation_aware_clustering import AWCConfig, cli, main

    make_store(tmp_path / "st")
    cfg = AWCConfig(masks=tmp_path / "st", proj="up_proj", k=5, output=tmp_path / "a.pt", seed=3, max_iter=2,
                    sparsity=0.3, progress=False)
    meta = main(cfg)
    assert cli(to_argv(dataclass_replace(cfg, output=tmp_path / "b.pt"))) == 0
    assert torch.equal(load_centroids(tmp_path / "a.pt")[0], load_centroids(tmp_path / "b.pt")[0])
    # what `python -m awq.reproduce --subprocess` runs: the same argv as its own process, from another folder
    r = run_script("activation_aware_clustering", *to_argv(dataclass_replace(cfg, output=tmp_path / "c.pt")),
                   module=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_centroids(tmp_path / "a.pt")[0], load_centroids(tmp_path / "c.pt")[0])
    assert meta["k"] == 5 and meta["config"]["params"]["sparsity"] == 0.3


def test_cli_pipeline_and_precision(tmp_path):
    data = make_store(tmp_path / "st")
    out = tmp_path / "awc.pt"
    r = run_script("activation_aware_clustering", "--masks", tmp_path / "st", "--proj", "gate_proj", "--k", 6,
                   "--seed", 0, "--output", out, "--max_iter", 3, "--no_progress")
    assert r.returncode == 0, r.stderr
    C, meta = load_centroids(out, 48)
    assert meta["method"] == "awc" and C.shape == (6, 48)
    assert json.loads(out.with_name("awc.results.json").read_text())["iterations"] >= 1
    r = run_script("error_checking", "--masks", tmp_path / "st", "--proj", "gate_proj", "--centroids", out,
                   "--output", tmp_path / "prec.json", "--no_progress")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "prec.json").read_text())
    A = data["gate_proj"].reshape(-1, 48)
    Cf = C.float()
    lab = ref_distance(A, Cf).argmin(1)
    tp = float((A * Cf[lab]).sum())
    assert res["precision"] == pytest.approx(tp / float(A.sum()))
    assert res["density"] == pytest.approx(float(Cf.mean()))
    for key in ("f1", "jaccard", "per_layer", "per_neuron_error"):
        assert key in res
    err = (A - Cf[lab]).abs().sum(0)
    assert res["per_neuron_error"]["all_errors"] == pytest.approx(err.tolist())


def test_two_processes_equal_one(tmp_path):
    make_store(tmp_path / "st", L=2, windows=3, seqlen=30)
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"awc{nproc}.pt"
        args = ["--masks", tmp_path / "st", "--proj", "up_proj", "--k", 5, "--seed", 1, "--output", out,
                "--max_iter", 3, "--no_progress"]
        r = run_script("activation_aware_clustering", *args, torchrun=nproc if nproc > 1 else 0)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(load_centroids(out)[0])
    assert torch.equal(outs[0], outs[1])


def test_cli_bad_inputs(tmp_path):
    make_store(tmp_path / "st")
    r = run_script("activation_aware_clustering", "--masks", tmp_path / "st", "--proj", "gate_proj", "--k", 10**6,
                   "--output", tmp_path / "x.pt")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    r = run_script("error_checking", "--masks", tmp_path / "st", "--proj", "gate_proj", "--centroids", bad)
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    torch.save(torch.full((3, 48), 0.5), bad)
    r = run_script("error_checking", "--masks", tmp_path / "st", "--proj", "gate_proj", "--centroids", bad)
    assert r.returncode == 2 and "non-binary" in r.stderr
    torch.save(torch.ones(3, 20), bad)
    r = run_script("error_checking", "--masks", tmp_path / "st", "--proj", "gate_proj", "--centroids", bad)
    assert r.returncode == 2 and "width 20" in r.stderr and "width 48" in r.stderr


def test_empty_store_rejected(tmp_path):
    make_store(tmp_path / "st", windows_done=0)
    with pytest.raises(ValueError, match="incomplete"):
        StoreSource(tmp_path / "st", "gate_proj")
    with pytest.raises(ValueError, match="empty|widths"):
        StoreSource(tmp_path / "st", "gate_proj", allow_partial=True)


def test_analysis_and_replace(tmp_path):
    from clustering.centroid_analysis import analyze
    from clustering.replace_centroid_based_on_sparsity import ReplaceConfig
    from clustering.replace_centroid_based_on_sparsity import main as replace_main

    C = rand01(6, 40, 0.5, 15)
    C[2] = 1  # sparsity 0 -> out of band
    C[4] = 0  # empty centroid -> out of band
    res = analyze(C)
    assert res["empty_centroids"] == 1 and res["all_ones_centroids"] == 1 and sum(res["histogram"]["counts"]) == 6
    src = tmp_path / "c.pt"
    save_centroids(src, C, {"method": "test"})
    with pytest.raises(ValueError, match="is the input"):  # the declaration's output-is-not-an-input check
        replace_main(ReplaceConfig(centroids=src, output=src, min_sparsity=0.3, max_sparsity=0.7))
    idx = replace_main(ReplaceConfig(centroids=src, output=tmp_path / "r.pt", min_sparsity=0.3, max_sparsity=0.7))
    new, _ = load_centroids(tmp_path / "r.pt")
    assert 2 in idx and 4 in idx
    sp = (new == 0).float().mean(1)
    assert torch.all((sp >= 0.3) & (sp <= 0.7))
    assert torch.equal(load_centroids(src)[0], C.to(torch.uint8))  # input untouched


@pytest.mark.parametrize("rule", ["hamming", "penalized"])
def test_precision_with_the_methods_own_rule_matches_reference(rule):
    from clustering.error_checking import evaluate

    g = torch.Generator().manual_seed(3)
    X = (torch.rand(200, 24, generator=g) < 0.5).float()
    C = (torch.rand(9, 24, generator=g) < 0.5).float()
    C[4] = 1.0  # an all-ones centroid wins every row under the active-only rule, not under Hamming
    res = evaluate(X, C, rule=rule, penalty=2.0)
    cov = act = 0.0
    for x in X:
        d = [float((x - c).abs().sum() + (2.0 * ((c == 1) & (x == 0)).sum() if rule == "penalized" else 0))
             for c in C]
        j = d.index(min(d))
        cov += float((x * C[j]).sum())
        act += float(x.sum())
    assert res["precision"] == pytest.approx(cov / act)
    assert evaluate(X, C)["precision"] == 1.0 > res["precision"]
