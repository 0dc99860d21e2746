"""awq.report.generate: the marked README/ARTIFACT blocks equal what the checked-in results produce, and a hand edit is caught."""
import json
import shutil
from pathlib import Path

import pytest

from awq.report import generate as report

REPO = Path(__file__).resolve().parent.parent


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    for f in report.TARGETS:
        shutil.copy(REPO / f, root / f)
    shutil.copytree(REPO / "results_ref", root / "results_ref")
    return root


def test_check_passes_on_the_tree(capsys):
    assert report.cli(["--check", "--root", str(REPO)]) == 0, capsys.readouterr().err
    res = report.run(REPO, check=True)
    assert set(res) == set(report.TARGETS) and not any(res.values())


def test_every_block_is_marked_in_a_target():
    text = "".join((REPO / f).read_text() for f in report.TARGETS)
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
    readme = root / "README.md"
    original = readme.read_text()
    # the first precision cell, e.g. "91.0%", edited by hand
    a = original.index("<!-- report:precision -->")
    cell = original[a:].split("| AWC 20% sparse (active-only) | ")[1].split("%")[0]
    edited = _edit_in_block(original, "precision", f"| {cell}%", f"| {float(cell) + 1:.1f}%")
    readme.write_text(edited)
    assert report.cli(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "README.md: precision" in err and "swap_ppl" not in err
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
    assert f"dense {rep['runs']['dense']['ppl']:.2f}" in (root / "README.md").read_text()


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
    (run / "timings.json").write_text(json.dumps({"t1": {"1_ppl_dense_threshold": 10.0, "3_cluster": 2.0},
                                                  "t2": {"1_ppl_dense_threshold": 0.5, "3_cluster": 30.0}}))
    ref = report.import_reproduce(run, tmp_path / "ref")
    got = json.loads(ref.read_text())
    assert got["timings_s"] == {"1_ppl_dense_threshold": 10.5, "3_cluster": 32.0}
    assert got["runs"] == {"dense": {"ppl": 3.0, "tokens": 15, "effective_sparsity": None}}
    assert "file" not in got["precision"][0] and got["config"]["baseline_k"] == 4
