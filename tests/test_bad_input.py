"""Bad input through the real command lines (issue 12): every case exits 2 with ONE ``error:`` line
naming the problem, before any work where it can, and leaves every input file byte-identical.

Classes: (1) a run never resumes/reuses another run's work (stores, reproduce dirs, predictors,
centroid files of another projection); (2) no output over an input or into a store; (3) non-finite
numbers refused; (4) outputs checked before computing; (5) a second writer is refused; (6) a
truncated results file is named; (7) bounded memory (prefix tokenization equals full
tokenization, the clustering block guard); (9) a centroid directory with a checkpoint works.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from awq.store.centroids import load_centroids, save_centroids
from awq.util.io import output_lock
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_clustering import make_store


# ---- helpers -------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (lock files excluded: they hold no data)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if not f.name.endswith(".lock"):
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_error(err: str, *words: str) -> str:
    """Exactly one ``error:`` line, no traceback, naming ``words``."""
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def refused(capsys, rc: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    return one_error(err, *words)


def entry(*args) -> int:
    from awq.experiments.entry import cli

    return cli([str(a) for a in args])


def save_model(d: Path, seed: int) -> Path:
    d.mkdir(parents=True)
    tok = tiny_tokenizer()
    tiny_model("mistral", seed=seed, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two different tiny models in folders of the same name."""
    root = tmp_path_factory.mktemp("models")
    return save_model(root / "a" / "model", 0), save_model(root / "b" / "model", 1)


@pytest.fixture()
def store(tmp_path):
    s = tmp_path / "store"
    make_store(s)
    return s


def awc(*args) -> int:
    from clustering.activation_aware_clustering import cli

    return cli([str(a) for a in args])


@pytest.fixture()
def centroids(store, capsys):
    out = store.parent / "c" / "awc_up.pt"
    assert awc("--masks", store, "--proj", "up_proj", "--k", 4, "--output", out, "--max_iter", 1,
               "--no_progress") == 0
    capsys.readouterr()
    return out


# ---- (1) identity ---------------------------------------------------------------------------
def test_store_of_another_model_with_the_same_name_is_refused(two_models, tiny_corpus, tiny_thresholds, tmp_path,
                                                                capsys):
    a, b = two_models
    st = tmp_path / "store"
    common = ["--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1, "--thresholds", tiny_thresholds,
              "--dump_masks", st]
    assert entry("--model_path", a, *common) == 0
    capsys.readouterr()
    before = snapshot(st, b, tiny_thresholds)
    refused(capsys, entry("--model_path", b, *common), str(st), "model_fingerprint")
    assert snapshot(st, b, tiny_thresholds) == before
    assert entry("--model_path", a, *common) == 0  # the same model resumes (here: finds it complete)


def reproduce(*args) -> int:
    from awq.experiments.reproduce import cli

    return cli([str(a) for a in args])


def test_reproduce_dir_of_another_run_is_refused(two_models, tiny_thresholds, tmp_path, capsys):
    a, b = two_models
    short = tmp_path / "short"
    short.mkdir()
    (short / "wiki.test.raw").write_text("too short\n")
    out = tmp_path / "rep"
    common = ["--quick", "--out", out, "--data_path", short, "--thresholds", tiny_thresholds, "--seqlen", 32]
    refused(capsys, reproduce("--model_path", a, *common), "fewer than one window")  # claims the dir, then fails
    fp = out / "fingerprint.json"
    assert json.loads(fp.read_text())["model"]["path"] == str(a.resolve())
    before = snapshot(out, short, tiny_thresholds)
    refused(capsys, reproduce("--model_path", b, *common), str(out), "another run", "model", "--force")
    refused(capsys, reproduce("--model_path", a, "--seed", 7, *common), "--seed")
    assert snapshot(out, short, tiny_thresholds) == before
    # (6) a truncated results file is named in one line, before any step runs
    (out / "timings.json").write_text('{"2026-01-01T00:00:00": {"1_ppl')
    refused(capsys, reproduce("--model_path", a, *common), "timings.json", "truncated")
    # --force starts over with the other model
    refused(capsys, reproduce("--model_path", b, "--force", *common), "fewer than one window")
    assert json.loads(fp.read_text())["model"]["path"] == str(b.resolve())
    assert not (out / "timings.json").exists()
    # a directory with results but no fingerprint (an unknown run) is refused too
    legacy = tmp_path / "legacy"
    (legacy / "runs").mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    refused(capsys, reproduce("--model_path", a, "--quick", "--out", legacy, "--data_path", short), "unknown run")


def test_centroids_of_another_projection_are_refused(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    gate = tmp_path / "gate.pt"
    save_centroids(gate, (torch.rand(4, 128, generator=g) < 0.5).to(torch.uint8), {"proj": "gate_proj"})
    before = snapshot(tmp_path)
    refused(capsys, entry("--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1,
                          "--thresholds", tiny_thresholds, "--centroids", f"up={gate}"), str(gate), "gate_proj",
            "up_proj")
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def predictor(tiny_model_dir, tmp_path_factory):
    """A predictor trained on the tiny model's masks, with its centroid files."""
    from transformers import AutoModelForCausalLM

    from awq.load.arch import PROJS
    from awq.methods.base import sparsify_
    from awq.methods.paper_mlp import SparsityConfig
    from awq.methods.recording import record_masks
    from awq.predictor import train as PT
    from awq.store.bitpack import unpack
    from awq.store.pattern_store import PatternStore

    d = tmp_path_factory.mktemp("pred")
    model = sparsify_(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                      SparsityConfig(thresholds={p: [0.02, 0.02] for p in PROJS}))
    win = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with record_masks(model, d / "store", meta={"model": "tiny"}, total_windows=2, seqlen=32,
                      record_inputs=True) as rec:
        for i in range(2):
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
    PT.train(d / "store", ",".join(spec), d / "pred.safetensors", PT.TrainConfig(epochs=1, batch_size=32, seed=0))
    return d


def test_predictor_checks_its_training_centroids_without_the_option(predictor, tiny_model_dir, tiny_corpus,
                                                                      tmp_path, capsys):
    import shutil

    d = tmp_path / "pred"
    shutil.copytree(predictor, d)  # the predictor names the original files: regenerate those
    gate = predictor / "gate_proj.pt"
    saved = gate.read_bytes()
    try:
        c, meta = load_centroids(gate)
        save_centroids(gate, 1 - c, meta)  # "the training centroids were regenerated"
        before = snapshot(predictor, tiny_model_dir)
        args = ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1,
                "--dense", "--predictor", predictor / "pred.safetensors"]
        refused(capsys, entry(*args), str(gate), "not the gate_proj set")
        assert snapshot(predictor, tiny_model_dir) == before
    finally:
        gate.write_bytes(saved)
        gate.with_suffix(".json").write_text((d / "gate_proj.json").read_text())


def test_non_finite_predictor_weights_are_refused(predictor, tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from safetensors import safe_open

    from awq.methods.label_predictor import save_tensors

    with safe_open(str(predictor / "pred.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["awq_predictor"])
    tensors["layers.1.w1"][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, tensors, meta)
    before = snapshot(bad)
    refused(capsys, entry("--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1,
                          "--dense", "--predictor", bad), "layers.1.w1", "non-finite")
    assert snapshot(bad) == before


# ---- (2) no output over an input --------------------------------------------------------------
def test_clustering_outputs_never_replace_an_input(store, centroids, capsys):
    from clustering.centroid_analysis import cli as analysis
    from clustering.error_checking import cli as precision
    from clustering.replace_centroid_based_on_sparsity import cli as replace

    before = snapshot(store.parent)
    common = ["--masks", store, "--proj", "up_proj"]
    side = centroids.with_suffix(".json")
    refused(capsys, awc(*common, "--k", 4, "--output", centroids.with_name("x.json")), "must not end in .json")
    refused(capsys, awc(*common, "--k", 4, "--output", store / "meta.json"), "pattern store")
    refused(capsys, awc(*common, "--k", 4, "--output", store / "up_proj" / "c.pt"), "pattern store")
    refused(capsys, awc(*common, "--k", 4, "--output", centroids, "--init", centroids), "input")
    refused(capsys, precision([*map(str, common), "--centroids", str(centroids), "--output", str(centroids)]), "input")
    refused(capsys, precision([*map(str, common), "--centroids", str(centroids), "--output", str(side)]), "input")
    refused(capsys, precision([*map(str, common), "--centroids", str(centroids), "--output",
                               str(store / "meta.json")]), "pattern store")
    refused(capsys, analysis(["--centroids", str(centroids), "--output", str(centroids)]), "input")
    link = centroids.parent / "alias.pt"
    link.symlink_to(centroids)
    refused(capsys, analysis(["--centroids", str(link), "--output", str(centroids)]), "input")
    refused(capsys, replace(["--centroids", str(centroids), "--output", str(side)]), str(side))
    assert snapshot(store.parent) == before | snapshot(link)


# ---- (3) numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(store, centroids, value, capsys):
    from clustering.error_checking import cli as precision
    from clustering.penalized_brbkmeans import cli as penalized

    before = snapshot(store.parent)
    refused(capsys, penalized(["--masks", str(store), "--proj", "up_proj", "--k", "4", f"--penalty={value}",
                               "--output", str(store.parent / "p.pt")]), "--penalty")
    refused(capsys, precision(["--masks", str(store), "--proj", "up_proj", "--centroids", str(centroids),
                               "--rule", "penalized", f"--penalty={value}"]), "--penalty")
    assert snapshot(store.parent) == before


def test_non_finite_thresholds_and_negative_counts_are_refused(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from awq.load.arch import PROJS
    from awq.methods.calibration import cli as calibrate

    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({p: {"layer_0": 0.1, "layer_1": float("nan") if p == "up_proj" else 0.1}
                               for p in PROJS}))
    before = snapshot(thr, tiny_model_dir)
    refused(capsys, entry("--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1,
                          "--thresholds", thr), "up_proj")
    refused(capsys, calibrate(["--sparsity", "0.5", "--nsamples", "-1", "--output", str(tmp_path / "t.json")]),
            "--nsamples")
    refused(capsys, entry("--batch_size", -3), "--batch_size")
    assert snapshot(thr, tiny_model_dir) == before


def test_predictor_train_options_are_range_checked(predictor, tmp_path, capsys):
    from awq.predictor.__main__ import main as predictor_cli

    spec = ",".join(f"{p}={predictor / f'{p}_proj.pt'}" for p in ("gate", "up", "down"))
    before = snapshot(predictor)
    for opt, val in (("--lr", "nan"), ("--epochs", "0"), ("--val_fraction", "1.5"), ("--weight_decay", "inf")):
        rc = predictor_cli(["train", "--masks", str(predictor / "store"), "--centroids", spec,
                            "--output", str(tmp_path / "p.safetensors"), opt, val])
        refused(capsys, rc, opt)
    rc = predictor_cli(["train", "--masks", str(predictor / "store"), "--centroids", spec,
                        "--output", str(predictor / "gate_proj.pt")])
    refused(capsys, rc, "input")
    assert snapshot(predictor) == before


# ---- (4) outputs checked before computing ----------------------------------------------------------
def test_bad_output_paths_fail_before_the_work(store, centroids, tiny_model_dir, tmp_path, capsys):
    from awq.methods.calibration import cli as calibrate
    from clustering.error_checking import cli as precision

    before = snapshot(store.parent)
    adir = tmp_path / "a_dir.pt"
    adir.mkdir()
    refused(capsys, awc("--masks", store, "--proj", "up_proj", "--k", 4, "--output", adir), "is a directory")
    refused(capsys, awc("--masks", store, "--proj", "up_proj", "--k", 4, "--output", centroids / "x.pt"),
            "cannot create the folder")
    refused(capsys, precision(["--masks", str(store), "--proj", "up_proj", "--centroids", str(centroids),
                               "--output", str(adir)]), "is a directory")
    # calibrate: refused before the model is loaded (a missing model would be the other error)
    refused(capsys, calibrate(["--sparsity", "0.5", "--model_path", str(tmp_path / "no_such_model"),
                               "--output", str(adir)]), "is a directory")
    refused(capsys, reproduce("--quick", "--out", centroids, "--model_path", tiny_model_dir), "cannot create")
    assert snapshot(store.parent) == before
    assert not [p for p in tmp_path.rglob("*.tmp")]


# ---- (5) one writer at a time ----------------------------------------------------------------------
def test_a_second_writer_is_refused(store, tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path, capsys):
    before = snapshot(store)
    out = tmp_path / "busy.pt"
    with output_lock(out, folder=False):
        refused(capsys, awc("--masks", store, "--proj", "up_proj", "--k", 4, "--output", out), "in use")
    assert not out.exists()
    st = tmp_path / "rec"
    st.mkdir()
    with output_lock(st, folder=True):
        refused(capsys, entry("--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32,
                              "--nsamples", 1, "--thresholds", tiny_thresholds, "--dump_masks", st), "in use")
    rep = tmp_path / "rep"
    with output_lock(rep, folder=True):
        refused(capsys, reproduce("--quick", "--out", rep, "--model_path", tiny_model_dir), "in use")
    assert snapshot(store) == before


# ---- (7) bounded memory --------------------------------------------------------------------------
def test_prefix_tokenization_equals_full_tokenization():
    from awq.load.data import tokenize_windows

    tok = tiny_tokenizer()
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "=", "@-@", "activation", "sparsity", "\n", " \n", "12", ",", "."]
    text = " ".join(rng.choice(words) for _ in range(60000))
    full = tokenize_windows(tok, text, 16)
    for seqlen, n in ((16, 1), (16, 7), (16, 300), (37, 5)):
        ref = tokenize_windows(tok, text, seqlen)[:n]
        got = tokenize_windows(tok, text, seqlen, max_windows=n)
        assert torch.equal(got, ref), (seqlen, n)
    assert torch.equal(tokenize_windows(tok, text, 16, max_windows=10 ** 9), full)  # more than exists: all


def test_prefix_tokenization_reads_only_a_prefix(monkeypatch):
    from awq.load.data import tokenize_windows

    tok = tiny_tokenizer()
    lengths = []
    cls = type(tok)
    orig = cls.__call__

    def spy(self, text, *a, **kw):
        lengths.append(len(text))
        return orig(self, text, *a, **kw)

    monkeypatch.setattr(cls, "__call__", spy)
    text = "the quick brown fox jumps . \n" * 200000  # ~5.8 MB
    tokenize_windows(tok, text, 64, max_windows=1)
    assert lengths and max(lengths) < len(text) // 100


def test_clustering_block_guard(store, tmp_path, monkeypatch, capsys):
    from clustering.brbkmeans import cli as brb

    before = snapshot(store)
    monkeypatch.setenv("AWQ_CLUSTER_MEMORY_GB", str(10 * 1000 / 2**30))  # ~10 kB: a 120-row block (~29 kB) does not fit
    refused(capsys, awc("--masks", store, "--proj", "up_proj", "--k", 4, "--output", tmp_path / "a.pt"),
            "memory budget", "--block_rows")
    monkeypatch.setenv("AWQ_CLUSTER_MEMORY_GB", "nan")
    refused(capsys, awc("--masks", store, "--proj", "up_proj", "--k", 4, "--output", tmp_path / "a.pt"),
            "AWQ_CLUSTER_MEMORY_GB")
    # a block-invariant method shrinks its blocks instead, to the same result
    monkeypatch.setenv("AWQ_CLUSTER_MEMORY_GB", str(10 * 1000 / 2**30))
    assert brb(["--masks", str(store), "--proj", "up_proj", "--k", "4", "--output", str(tmp_path / "small.pt"),
                "--no_progress"]) == 0
    monkeypatch.delenv("AWQ_CLUSTER_MEMORY_GB")
    assert brb(["--masks", str(store), "--proj", "up_proj", "--k", "4", "--output", str(tmp_path / "big.pt"),
                "--no_progress"]) == 0
    small = json.loads((tmp_path / "small.results.json").read_text())
    big = json.loads((tmp_path / "big.results.json").read_text())
    assert small["config"]["block_rows"] < big["config"]["block_rows"]
    assert torch.equal(load_centroids(tmp_path / "small.pt")[0], load_centroids(tmp_path / "big.pt")[0])
    assert snapshot(store) == before


# ---- (9) a centroid directory with a clustering checkpoint -------------------------------------------
def test_centroid_directory_with_checkpoints(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "cents"
    for short, proj, w in (("gate", "gate_proj", 128), ("up", "up_proj", 128), ("down", "down_proj", 64)):
        C = (torch.rand(4, w, generator=g) < 0.6).to(torch.uint8)
        save_centroids(d / f"awc_{short}_k4.pt", C, {"proj": proj})
        torch.save({"fingerprint": "x", "it": 1, "C": C.float()}, d / f"awc_{short}_k4.ckpt.pt")
    out = tmp_path / "res.json"
    rc = entry("--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1,
               "--thresholds", tiny_thresholds, "--centroids", d, "--output_path", out)
    assert rc == 0, capsys.readouterr().err
    files = json.loads(out.read_text())["centroids"]["files"]
    assert {Path(f["path"]).name for f in files.values()} == {"awc_gate_k4.pt", "awc_up_k4.pt", "awc_down_k4.pt"}
