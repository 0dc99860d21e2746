"""awq.report: the marked blocks of README.md, ARTIFACT.md and docs/*.md equal what the checked-in results produce, a
hand edit is caught, and every results_ref file (and every import) carries its provenance."""
import json
import re
import shutil
from pathlib import Path

import pytest

from awq.report import generate as report
from awq.report import provenance

REPO = Path(__file__).resolve().parent.parent


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "docs").mkdir(parents=True)
    for f in report.target_files(REPO):
        shutil.copy(REPO / f, root / f)
    shutil.copytree(REPO / "results_ref", root / "results_ref")
    return root


def holder(root: Path, name: str) -> Path:
    """The target file holding block ``name`` (the first one, in target order)."""
    return next(root / f for f in report.target_files(root) if f"<!-- report:{name} -->" in (root / f).read_text())


def test_check_passes_on_the_tree(capsys):
    assert report.cli(["--check", "--root", str(REPO)]) == 0, capsys.readouterr().err
    res = report.run(REPO, check=True)
    assert set(res) == set(report.target_files(REPO)) and not any(res.values())
    assert {"README.md", "ARTIFACT.md", "docs/results.md", "docs/frontier.md"} <= set(res)


def test_every_block_is_marked_in_a_target():
    text = "".join((REPO / f).read_text() for f in report.target_files(REPO))
    for name in report.all_blocks():
        assert f"<!-- report:{name} -->" in text and f"<!-- /report:{name} -->" in text, name


def test_results_ref_is_small():
    assert sum(f.stat().st_size for f in (REPO / "results_ref").rglob("*") if f.is_file()) < 1_000_000


def _edit_in_block(text: str, name: str, old: str, new: str) -> str:
    a = text.index(f"<!-- report:{name} -->")
    b = text.index(f"<!-- /report:{name} -->")
    assert old in text[a:b]
    return text[:a] + text[a:b].replace(old, new, 1) + text[b:]


def test_hand_edited_number_fails_check_and_report_restores_it(tmp_path, capsys):
    root = copy_tree(tmp_path)
    readme = holder(root, "precision")
    original = readme.read_text()
    # the first precision cell, e.g. "91.0%", edited by hand
    a = original.index("<!-- report:precision -->")
    cell = original[a:].split("| AWC 20% sparse (active-only) | ")[1].split("%")[0]
    edited = _edit_in_block(original, "precision", f"| {cell}%", f"| {float(cell) + 1:.1f}%")
    readme.write_text(edited)
    assert report.cli(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{readme.relative_to(root)}: precision" in err and "swap_ppl" not in err
    assert readme.read_text() == edited  # --check rewrites nothing
    assert report.cli(["--root", str(root)]) == 0
    assert readme.read_text() == original
    assert report.cli(["--check", "--root", str(root)]) == 0


def test_artifact_table_edit_fails_check(tmp_path, capsys):
    root = copy_tree(tmp_path)
    art = root / "ARTIFACT.md"
    text = art.read_text()
    art.write_text(_edit_in_block(text, "artifact_full", "| PASS |", "| FAIL |"))
    assert report.cli(["--check", "--root", str(root)]) == 1
    assert "ARTIFACT.md: artifact_full" in capsys.readouterr().err


def test_updated_results_file_makes_tables_stale(tmp_path, capsys):
    root = copy_tree(tmp_path)
    f = root / "results_ref" / "reproduce.json"
    rep = json.loads(f.read_text())
    rep["runs"]["dense"]["ppl"] *= 1.5
    f.write_text(json.dumps(rep))
    assert report.cli(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "swap_ppl" in err and "analysis" in err and "precision" not in err
    assert report.cli(["--root", str(root)]) == 0
    assert f"dense {rep['runs']['dense']['ppl']:.2f}" in holder(root, "swap_ppl").read_text()


def test_bad_markers_are_one_line_errors(tmp_path, capsys):
    refs = report.load_refs(REPO / "results_ref")
    with pytest.raises(report.ReportError, match="unknown report block 'nope'"):
        report.render("<!-- report:nope -->\nx\n<!-- /report:nope -->\n", refs)
    with pytest.raises(report.ReportError, match="unbalanced"):
        report.render("<!-- report:precision -->\nx\n", refs)
    root = copy_tree(tmp_path)
    shutil.rmtree(root / "results_ref")
    assert report.cli(["--check", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no ") and "\n" not in err


def test_import_reproduce_slims_a_summary_and_sums_resumed_timings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"config": {"seqlen": 16, "ppl_nsamples": 1, "extract_nsamples": 1, "ks": [4], "sparsities": [0.4],
                          "baseline_k": 4, "max_rows": 64, "eval_rows": 64, "max_iter": 1, "baseline_max_iter": 1},
               "runs": {"dense": {"ppl": 3.0, "tokens": 15, "dataset": "d", "substitute": True,
                                  "measured_sparsity": {}, "effective_sparsity": None, "file": "x"}},
               "precision": [{"method": "awc", "rule": "active_only", "proj": "gate_proj", "k": 4, "sparsity": 0.4,
                              "precision": 0.5, "density": 0.6, "f1": 0.5, "jaccard": 0.3, "rows": 64, "file": "y"}],
               "timings_s": {"1_ppl_dense_threshold": 0.1}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "runs").mkdir()
    (run / "runs" / "dense.json").write_text(json.dumps({"ppl": 3.0, "versions": {"torch": "9.9.9"}}))
    (run / "timings.json").write_text(json.dumps({"t1": {"1_ppl_dense_threshold": 10.0, "3_cluster": 2.0},
                                                  "t2": {"1_ppl_dense_threshold": 0.5, "3_cluster": 30.0}}))
    ref = report.import_reproduce(run, tmp_path / "ref")
    got = json.loads(ref.read_text())
    assert got["timings_s"] == {"1_ppl_dense_threshold": 10.5, "3_cluster": 32.0}
    assert got["runs"] == {"dense": {"ppl": 3.0, "tokens": 15, "effective_sparsity": None}}
    assert "file" not in got["precision"][0] and got["config"]["baseline_k"] == 4
    p = got["provenance"]
    assert p["command"] == "python -m awq.reproduce" and p["config"]["seqlen"] == 16
    assert p["versions"]["torch"] == "9.9.9" and p["versions_from"] in ("run", "run+import")


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------
def test_every_results_ref_file_records_its_provenance():
    files = sorted((REPO / "results_ref").glob("*.json"))
    assert files and provenance.problems(REPO / "results_ref") == []
    for f in files:
        p = json.loads(f.read_text())["provenance"]
        assert set(provenance.FIELDS) <= set(p), f.name
        assert isinstance(p["command"], str) and p["command"].strip(), f.name
        assert isinstance(p["config"], dict) and p["config"], f.name
        assert isinstance(p["versions"], dict) or (p["versions"] is None and p.get("versions_note")), f.name
        if p["git_commit"] is None:
            assert p.get("git_commit_note"), f.name
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"]) and p["git_commit_from"] in ("run", "import"), f.name
        assert isinstance(p["imported_at"], str) or (p["imported_at"] is None and p.get("imported_at_note")), f.name


def test_check_fails_on_a_results_file_without_provenance(tmp_path, capsys):
    root = copy_tree(tmp_path)
    f = root / "results_ref" / "predictor.json"
    data = json.loads(f.read_text())
    del data["provenance"]["git_commit"]
    f.write_text(json.dumps(data))
    assert report.cli(["--check", "--root", str(root)]) == 1
    assert "predictor.json: provenance lacks git_commit" in capsys.readouterr().err
    data.pop("provenance")
    f.write_text(json.dumps(data))
    assert provenance.problems(root / "results_ref") == ["predictor.json: no provenance"]


def test_git_state_of_this_checkout():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    g = provenance.git_state(REPO)
    assert re.fullmatch(r"[0-9a-f]{40}", g["commit"]) and isinstance(g["dirty"], bool)
    assert provenance.git_state(REPO / "no_such_dir") == {"commit": None, "dirty": None}


def test_argv_of_lists_the_options_that_were_set():
    cfg = {"tasks": "wikitext", "nsamples": 24, "dense": False, "dump_inputs": True, "centroids": None, "ks": [1, 2],
           "data_path": ""}
    assert provenance.argv_of(cfg) == " --tasks wikitext --nsamples 24 --dump_inputs --ks 1,2"
    assert provenance.argv_of(cfg, skip=("tasks", "ks")) == " --nsamples 24 --dump_inputs"


def _entry_results(tmp_path: Path, ppl: float = 3.25) -> Path:
    f = tmp_path / "run.json"
    f.write_text(json.dumps({
        "model": {"name": "Tiny"}, "config": {"tasks": "wikitext", "nsamples": 2, "seqlen": 16, "dense": False,
                                               "output_path": str(f), "thresholds": None},
        "versions": {"python": "3.11.0", "torch": "9.9.9"}, "ppl": ppl, "tokens": 30, "nsamples": 2, "seqlen": 16,
        "dataset": {"name": "enwiki-2016-substitute", "substitute": True},
        "measured_sparsity": {p: {"mean": 0.5 + i / 100, "per_layer": [0.5]} for i, p in
                              enumerate(("gate_proj", "up_proj", "down_proj"))},
        "weight_read": {"weight_read_fraction": 0.75}, "wall_time_s": 90.0, "tokens_per_s": 1.0}))
    return f


def test_import_run_default_slims_the_results_and_records_provenance(tmp_path):
    ref = report.import_run_default(_entry_results(tmp_path), tmp_path / "ref")
    got = json.loads(ref.read_text())
    assert got["ppl"] == 3.25 and got["tokens"] == 30 and got["weight_read_fraction"] == 0.75
    assert got["sparsity"] == {"gate_proj": 0.5, "up_proj": 0.51, "down_proj": 0.52}
    p = got["provenance"]
    assert p["command"].startswith("python -m awq.entry --tasks wikitext --nsamples 2 --seqlen 16 --output_path ")
    assert "--dense" not in p["command"] and "--thresholds" not in p["command"]
    assert p["config"]["nsamples"] == 2 and p["versions"]["torch"] == "9.9.9" and p["versions_from"] in ("run", "run+import")
    assert p["git_commit"] is None and p["git_commit_note"] and p["imported_at"]  # tmp_path is no git checkout
    assert provenance.problems(tmp_path / "ref") == []
    block = report.make_run({"run_default": got})
    run = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**run, "git_commit": "ab" * 20}))
    p2 = json.loads(report.import_run_default(tmp_path / "run.json", tmp_path / "ref").read_text())["provenance"]
    assert p2["git_commit"] == "ab" * 20 and p2["git_commit_from"] == "run"  # a commit the run recorded wins
    assert block.startswith("`ppl=3.2500 tokens=30 windows=2 dataset=enwiki-2016-substitute (substitute) sparsity: "
                            "gate=50.00% up=51.00% down=52.00% mlp_weight_read=0.750`")
    assert "1.5 min" in block


def test_import_run_default_from_the_cli_then_check(tmp_path, capsys):
    root = copy_tree(tmp_path)
    run = _entry_results(tmp_path, ppl=42.0)
    assert report.cli(["--check", "--root", str(root)]) == 0
    assert report.cli(["--import_run_default", str(run), "--command", "make run", "--root", str(root)]) == 0
    got = json.loads((root / "results_ref" / "run_default.json").read_text())
    assert got["provenance"]["command"] == "make run" and got["ppl"] == 42.0
    assert "`ppl=42.0000 tokens=30" in (root / "README.md").read_text()
    assert report.cli(["--check", "--root", str(root)]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ppl": 1.0, "config": {"tasks": "wikitext"}}))
    assert report.cli(["--import_run_default", str(bad), "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not an `awq.entry` perplexity results JSON" in err and "\n" not in err
    assert report.cli(["--command", "make run", "--root", str(root)]) == 2  # --command needs one --import_*
    assert capsys.readouterr().err.strip() == "error: --command: goes with exactly one --import_* option"


def test_import_bench_and_its_block(tmp_path):
    refs = report.load_refs(REPO / "results_ref")
    assert "No checked-in run yet" in report.all_blocks()["bench_predictor"]({k: v for k, v in refs.items()
                                                                                if k != "bench_predictor"})
    b = {"bench": "bench_ppl", "config": {"nsamples": 1, "seqlen": 64, "quick": True, "threads": None,
                                          "output": str(tmp_path / "b.json"), "thresholds_file": "x"},
         "system": {"cpu": "CPU X", "flags": ["avx2"], "cpus": 2, "torch_threads": 2, "torch": "9.9.9",
                    "loadavg": 1.5, "loadavg_end": 2.5},
         "timings": {}, "ratios": {}, "figures": {},
         "lines": ["# bench_ppl | cpu: CPU X | ...", "dense: median 1.0 ms", "thresholded vs dense: ABOVE ROOFLINE"]}
    (tmp_path / "b.json").write_text(json.dumps(b))
    ref = report.import_bench(tmp_path / "b.json", None, tmp_path / "ref")
    got = json.loads(ref.read_text())
    assert ref.name == "bench_ppl.json" and got["provenance"]["versions"]["torch"] == "9.9.9"
    assert got["provenance"]["command"].startswith("python bench/bench_ppl.py --nsamples 1 --seqlen 64 --quick --output ")
    block = report.all_blocks()["bench_ppl"]({"bench_ppl": got})
    assert "CPU `CPU X`" in block and "load average 1.5 at start, 2.5 at the end" in block
    assert "dense: median 1.0 ms\nthresholded vs dense: ABOVE ROOFLINE\n```" in block and "# bench_ppl |" not in block
    with pytest.raises(report.RunOutputError, match="NAME must be one of"):
        report.import_bench(tmp_path / "b.json", "bench_nope", tmp_path / "ref")
    with pytest.raises(report.RunOutputError, match="is not a bench_clustering.py output"):
        report.import_bench(tmp_path / "b.json", "bench_clustering", tmp_path / "ref")


def test_artifact_save_reference_records_provenance(tmp_path, capsys):
    from awq.report import artifact

    root = tmp_path / "proj"
    shutil.copytree(REPO / "results_ref", root / "results_ref")
    (root / "results" / "artifact").mkdir(parents=True)
    (root / "results" / "artifact" / "flow_extract.json").write_text(json.dumps({"versions": {"torch": "9.9.9"}}))
    artifact.cli(["--root", str(root), "--no_run", "--save_reference"])  # nothing ran: rows FAIL, the file is written
    capsys.readouterr()
    p = json.loads((root / "results_ref" / "quick.json").read_text())["provenance"]
    assert p["command"] == "python -m awq.artifact --save_reference --no_run"
    assert set(p["config"]["steps"]) == {"reproduce", "flow_extract", "flow_cluster", "flow_centroids", "sparse_mlp"}
    assert p["config"]["steps"]["flow_cluster"] == "python activation_aware_clustering.py (in clustering)"
    assert p["config"]["steps"]["reproduce"].endswith("--out results/artifact/reproduce_quick")
    assert p["versions"]["torch"] == "9.9.9" and provenance.problems(root / "results_ref") == []


def test_quant_speed_sentence_ratios():
    """The README's quantised-speed clause: time ratios of the rows it names, the fastest method row reading at most
    half the MLP bytes (gathered rows and heavier rows left out)."""
    from awq.report.decode_quant import speed_clause, speed_sentence

    def row(ms):
        return {"median_s": ms / 1e3, "min_s": ms / 1e3, "max_s": ms / 1e3}

    data = {"system": {"cpu": "CPU X"},
            "timings": {"llama.cpp Q8_0 per token": row(10.0), "lean dense Q8_0 per token": row(5.0),
                        "lean gathered d=0.5 Q8_0 per token": row(2.0), "lean teal d=0.5 Q8_0 per token": row(6.25),
                        "lean cats d=0.25 Q8_0 per token": row(4.0)},
            "figures": {"lean gathered d=0.5 Q8_0 weight_read_fraction": 0.5,
                        "lean teal d=0.5 Q8_0 weight_read_fraction": 0.46,
                        "lean cats d=0.25 Q8_0 weight_read_fraction": 0.51}}
    assert speed_clause(data, "Q8_0") == ("Q8_0: lean dense 2.00x llama.cpp, fastest sparse row `teal d=0.5` 1.60x "
                                          "llama.cpp = 0.80x lean dense")
    assert speed_clause(data, "Q4_1") == ""
    assert "SmolLM2-135M (CPU X): Q8_0: lean dense 2.00x" in speed_sentence({"decode_quant_smollm2": data})
    assert speed_sentence({}) == ""
