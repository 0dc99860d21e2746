"""The artifact checklist's PASS/FAIL logic on synthetic results, and the no-argument clustering defaults."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awq.report import artifact
from awq.util import paths

REPO = Path(__file__).resolve().parent.parent
PROJ = ("gate_proj", "up_proj", "down_proj")


def synthetic() -> dict:
    """Evidence in which every claim holds."""
    runs = {"dense": {"ppl": 20.0}, "threshold_50": {"ppl": 50.0, "measured_sparsity": dict.fromkeys(PROJ, 0.505)},
            "extract": {"ppl": 50.0}}
    for k, base in ((64, 900.0), (256, 400.0)):
        for s, f in ((20, 1.0), (40, 3.0)):
            runs[f"swap_awc_k{k}_s{s}"] = {"ppl": base * f}
    prec = []
    for p in PROJ:
        prec += [{"method": "awc", "rule": "active_only", "proj": p, "k": 256, "sparsity": 0.4, "precision": 0.72},
                 {"method": "bmf", "rule": "hamming", "proj": p, "k": 256, "sparsity": None, "precision": 0.63},
                 {"method": "brbkmeans", "rule": "hamming", "proj": p, "k": 256, "sparsity": None, "precision": 0.62},
                 {"method": "bmf", "rule": "active_only", "proj": p, "k": 256, "sparsity": None, "precision": 1.0}]
    return {
        "reproduce": {"config": {"baseline_k": 256}, "runs": runs, "precision": prec},
        "store": {"windows_done": 4, "windows_total": 4, "seqlen": 512, "num_layers": 30},
        "flow": {"threshold_ppl": 50.0, "swap_ppl": 900.0,
                 "centroids": {p: {"k": 2048, "density": 0.6} for p in PROJ}},
        "sparse_mlp": {"rows": [{"shapes": "smollm2-135m", "density": 0.5, "mlp_speedup": 1.8}]},
        "predictor": {"mac_fraction": 0.0475, "per_proj": {p: {"recall_predicted": 0.7, "recall_majority": 0.65,
                                                                "recall_oracle": 0.75} for p in PROJ}},
        "frontier": {"points": [{"method": "paper", "param": 0.5, "weight_read_fraction": 0.75, "ppl": 55.0},
                                {"method": "teal", "param": 0.5, "weight_read_fraction": 0.5, "ppl": 33.0}]},
    }


def verdicts(ev, ref=None) -> dict:
    return {r["id"]: r["pass"] for r in artifact.evaluate(ev, ref)}


def test_all_pass_on_consistent_results():
    v = verdicts(synthetic(), synthetic())
    assert v == {c.id: True for c in artifact.CLAIMS}
    assert "FAIL" not in artifact.table(artifact.evaluate(synthetic()))


def _break(path, value):
    ev = synthetic()
    d = ev
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return ev


@pytest.mark.parametrize("claim,path,value", [
    ("1", ("reproduce", "runs", "threshold_50", "measured_sparsity", "down_proj"), 0.56),  # outside 50 ± 3
    ("1", ("reproduce", "runs", "dense", "ppl"), 60.0),                                    # thresholding "helps"
    ("2", ("reproduce", "runs", "extract", "ppl"), 50.01),                                 # recording changed PPL
    ("2", ("store", "windows_done"), 3),                                                   # store incomplete
    ("4", ("reproduce", "runs", "swap_awc_k256_s20", "ppl"), 5000.0),                      # 20% worse than 40%
    ("4", ("reproduce", "runs", "swap_awc_k256_s40", "ppl"), 2800.0),                      # more K does not help
    ("5", ("flow", "swap_ppl"), 40.0),                                                     # below threshold-only
    ("5", ("flow", "centroids", "up_proj", "density"), 0.8),                               # not 40% sparse
    ("6", ("sparse_mlp", "rows", 0, "mlp_speedup"), 1.1),
    ("7", ("predictor", "per_proj", "up_proj", "recall_predicted"), 0.6),                  # below majority
    ("8", ("frontier", "points", 1, "ppl"), 60.0),                                          # TEAL not dominating
])
def test_each_criterion_can_fail(claim, path, value):
    v = verdicts(_break(path, value))
    assert not v[claim]
    assert all(ok for cid, ok in v.items() if cid != claim)


def test_precision_ordering_fails_on_one_projection():
    ev = synthetic()
    for r in ev["reproduce"]["precision"]:
        if r["method"] == "awc" and r["proj"] == "down_proj":
            r["precision"] = 0.625  # above BRB-KMeans, below BMF
    assert not verdicts(ev)["3"]


def test_tolerance_against_checked_in_figure():
    ref = synthetic()
    ev = synthetic()
    ev["reproduce"]["runs"]["threshold_50"]["ppl"] = 50.0 * 1.019
    ev["reproduce"]["runs"]["extract"]["ppl"] = 50.0 * 1.019
    assert verdicts(ev, ref)["1"]
    ev["reproduce"]["runs"]["threshold_50"]["ppl"] = ev["reproduce"]["runs"]["extract"]["ppl"] = 50.0 * 1.03
    assert not verdicts(ev, ref)["1"]


def test_missing_evidence_is_a_fail_not_a_crash():
    rows = artifact.evaluate({})
    assert all(not r["pass"] and r["measured"].startswith("not run") for r in rows)
    one_sparsity = copy.deepcopy(synthetic())
    one_sparsity["reproduce"]["runs"] = {n: r for n, r in one_sparsity["reproduce"]["runs"].items() if "_s20" not in n}
    assert not verdicts(one_sparsity)["4"]


# ------------------------------------------------------------------------------------------
# no-argument clustering on a tiny store under a temporary project root
# ------------------------------------------------------------------------------------------
def make_store(path, L=2, windows=2, seqlen=40, seed=0):
    from awq.store.pattern_store import StoreWriter, pack

    widths = {"gate_proj": 48, "up_proj": 48, "down_proj": 24}
    g = torch.Generator().manual_seed(seed)
    wr = StoreWriter(path, meta={"model": "test"}, total_windows=windows, seqlen=seqlen, num_layers=L)
    for win in range(windows):
        for p, w in widths.items():
            for layer in range(L):
                wr.write(p, layer, win, pack((torch.rand(seqlen, w, generator=g) < 0.35).float()), width=w)
        wr.end_window(win)
    wr.close()


def test_paths_resolve_against_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    assert paths.default_store() == tmp_path.resolve() / "results" / "masks"
    assert paths.default_centroid_dir() == tmp_path.resolve() / "results" / "centroids" / "awc"
    monkeypatch.delenv(paths.ROOT_ENV)
    assert paths.project_root() == REPO
    assert paths.fill_bare_option(["--dump_masks"], "--dump_masks", "S") == ["--dump_masks", "S"]
    assert paths.fill_bare_option(["--dump_masks", "--nsamples", "2"], "--dump_masks", "S") == \
        ["--dump_masks", "S", "--nsamples", "2"]
    assert paths.fill_bare_option(["--dump_masks", "D"], "--dump_masks", "S") == ["--dump_masks", "D"]


def test_defaults_equal_an_explicit_run(tmp_path):
    from awq.methods.codebook import parse_centroid_spec
    from clustering.activation_aware_clustering import ArtifactSettings, AWCConfig, main, run_defaults

    make_store(tmp_path / "results" / "masks")
    st = ArtifactSettings(k=6, max_rows=None, max_iter=2)
    out = run_defaults(tmp_path, st)
    assert out == tmp_path / "results" / "centroids" / "awc"
    assert sorted(f.name for f in out.glob("*.pt")) == ["down_proj.pt", "gate_proj.pt", "up_proj.pt"]
    assert set(parse_centroid_spec(str(out))) == set(PROJ)  # what awq.entry --centroids DIR reads
    for p in PROJ:
        ref = tmp_path / "ref" / f"{p}.pt"
        main(AWCConfig(masks=tmp_path / "results" / "masks", proj=p, k=6, output=ref, sparsity=0.4, max_iter=2,
                       seed=42, progress=False))
        got, want = torch.load(out / f"{p}.pt", weights_only=True), torch.load(ref, weights_only=True)
        assert torch.equal(got["centroids"], want["centroids"])
        width = got["centroids"].shape[1]  # the update keeps the values above the interpolated 40% quantile
        assert got["centroids"].shape[0] == 6 and got["centroids"].float().mean(1).max() <= 0.6 + 1 / width


def _script(cwd, root, module=False):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({paths.ROOT_ENV: str(root), "OMP_NUM_THREADS": "1"})
    target = ["-m", "clustering.activation_aware_clustering"] if module else \
        [str(Path(cwd, "activation_aware_clustering.py") if cwd == REPO / "clustering" else
             REPO / "clustering" / "activation_aware_clustering.py")]
    return subprocess.run([sys.executable, *target], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["root", "clustering", "module"])
def test_no_store_says_which_command(tmp_path, where):
    cwd = {"root": REPO, "clustering": REPO / "clustering", "module": tmp_path}[where]
    r = _script(cwd, tmp_path / "empty_project", module=where == "module")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "python -m awq.entry --dump_masks" in lines[0]
    assert str(tmp_path / "empty_project" / "results" / "masks") in lines[0]


def test_no_arguments_from_inside_clustering(tmp_path):
    make_store(tmp_path / "results" / "masks")  # one block = 2 layers x 40 tokens = 80 rows: K is lowered to 80
    r = _script(REPO / "clustering", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "results" / "centroids" / "awc"
    assert str(out) in r.stdout.strip().splitlines()[-1]
    assert sorted(f.name for f in out.glob("*.pt")) == ["down_proj.pt", "gate_proj.pt", "up_proj.pt"]
    c = torch.load(out / "gate_proj.pt", weights_only=True)
    assert c["centroids"].shape == (80, 48) and c["meta"]["sparsity"] == 0.4
