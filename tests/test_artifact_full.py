"""The full path's rows 6-8: importers from the commands' own JSON, their checks, times and commands in the table."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from awq.report import artifact
from awq.report import generate as report
from awq.report.artifact_run import predictor_steps, with_checked_in
from awq.report.importers import RunOutputError, import_predictor, import_sparse_mlp
from awq.report.refs import TARGETS

REPO = Path(__file__).resolve().parent.parent
PROJ = ("gate_proj", "up_proj", "down_proj")


def bench_json(tmp_path: Path, speedup50: float, roof: float = 2.0) -> Path:
    """A bench_sparse_mlp.py output made by its own reporter (bench.common.Report) from given timings."""
    from bench.common import Report, Timing

    rep = Report("bench_sparse_mlp", {"shapes": "smollm2-135m", "densities": "30,50", "threads": 1}, echo=False)
    dense = Timing([2e-3, 2.1e-3, 1.9e-3])
    for d, sp, r in ((0.3, 2.5, 3.33), (0.5, speedup50, roof)):
        t = Timing([x / sp for x in dense.samples])
        rep.timing(f"smollm2-135m mlp density={d * 100:g}%", t, nbytes=1e6, echo=False)
        rep.ratio(f"smollm2-135m mlp density={d * 100:g}%", dense, t, r)
    rep.data["notes"], rep.data["wall_s"] = ["machine loaded"], 42.0
    f = tmp_path / "bench.json"
    rep.write(f)
    return f


def test_sparse_mlp_import_keeps_config_machine_notes_time(tmp_path):
    ref = import_sparse_mlp(bench_json(tmp_path, 1.6), tmp_path / "ref")
    got = json.loads(ref.read_text())
    assert got["seconds"] == 42.0 and got["notes"] == ["machine loaded"] and got["system"]["cpus"] >= 1
    assert got["config"]["threads"] == 1 and "--threads 1" in got["command"]
    r50 = next(r for r in got["rows"] if r["density"] == 0.5)
    assert r50["mlp_speedup"] == pytest.approx(1.6) and r50["roofline_mlp"] == 2.0 and r50["mlp_valid"]
    fig, ok = artifact.check_speedup({"sparse_mlp": got}, None)
    assert ok and "1.60×" in fig
    assert artifact.step_seconds(next(c for c in artifact.CLAIMS if c.id == "6"), {"sparse_mlp": got}) == 42.0


def test_speedup_above_roofline_is_a_fail_not_a_figure(tmp_path):
    got = json.loads(import_sparse_mlp(bench_json(tmp_path, 2.2), tmp_path / "ref").read_text())
    r50 = next(r for r in got["rows"] if r["density"] == 0.5)
    assert r50["mlp_speedup"] is None and not r50["mlp_valid"]
    fig, ok = artifact.check_speedup({"sparse_mlp": got}, None)
    assert not ok and "ABOVE ROOFLINE" in fig and "2.20×" in fig
    table = report.all_blocks()["sparse_mlp_table"]({"sparse_mlp": got})
    assert "measurement error" in table and "2.20× (2.00×)" not in table
    # an older file without the flag: a figure above its roofline still fails
    old = {"rows": [{"shapes": "x", "density": 0.5, "mlp_speedup": 2.18, "roofline_mlp": 2.0}]}
    assert not artifact.check_speedup({"sparse_mlp": old}, None)[1]


def test_sparse_mlp_import_rejects_other_json(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"bench": "bench_decode"}))
    with pytest.raises(RunOutputError, match="not a bench_sparse_mlp.py output"):
        import_sparse_mlp(f, tmp_path)
    with pytest.raises(RunOutputError, match="no "):
        import_sparse_mlp(tmp_path / "missing.json", tmp_path)


def eval_json(recall_pred: float = 0.7) -> dict:
    """An evaluate() result whose 'overall' comes from EvalCounts on a tiny random case."""
    from awq.predictor.evaluate import EvalCounts

    g = torch.Generator().manual_seed(0)
    A = (torch.rand(64, 24, generator=g) < 0.4).float()
    C = (torch.rand(8, 24, generator=g) < 0.6).float()
    c = EvalCounts()
    c.add(A, C, None, torch.randn(64, 8, generator=g), torch.arange(5), 5)
    m = c.metrics(5)
    m["recall_pred"] = recall_pred
    m["recall_majority"], m["recall_oracle"] = 0.65, 0.75
    return {"topk": 5, "overall": {p: dict(m) for p in PROJ}, "cost": {"flop_fraction": 0.0475, "param_fraction": 0.05},
            "predictor": {"rank": 16, "trunk": "separate", "k": dict.fromkeys(PROJ, 8), "train": {"epochs": 8},
                          "train_store": {"split": "train", "tokens": 12288, "seqlen": 2048}},
            "store": {"split": "test", "tokens": 4096, "rows_evaluated": 4096}, "centroids": {},
            "system": {"cpu": "x", "cpus": 2}, "notes": ["load average 6 on 2 cpus"], "seconds": 9.0}


def test_predictor_import_sums_the_chain_and_checks(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(eval_json()))
    (d / "timings.json").write_text(json.dumps({"train_store": 100.0, "train": 30.5, "evaluate": 10.0}))
    got = json.loads(import_predictor(d, tmp_path / "ref").read_text())
    assert got["seconds"] == 140.5 and got["notes"] and got["system"]["cpus"] == 2
    assert got["per_proj"]["gate_proj"]["recall_predicted"] == 0.7 and got["mac_fraction"] == 0.0475
    claim = next(c for c in artifact.CLAIMS if c.id == "7")
    assert claim.check({"predictor": got}, None)[1]
    assert artifact.step_seconds(claim, {"predictor": got}) == 140.5
    text = report.all_blocks()["predictor_table"]({"predictor": got})
    assert "6 windows of the train part" in text and "2 windows of the test part" in text
    bad = eval_json(recall_pred=0.6)  # below the majority cluster
    (d / "eval.json").write_text(json.dumps(bad))
    assert not claim.check({"predictor": json.loads(import_predictor(d, tmp_path / "ref").read_text())}, None)[1]


def test_predictor_import_refuses_a_failed_chain(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(eval_json()))
    (tmp_path / "timings.json").write_text(json.dumps({"train_store": 100.0, "train": None}))
    with pytest.raises(RunOutputError, match="a step failed"):
        import_predictor(tmp_path, tmp_path / "ref")


def test_predictor_chain_commands_parse(tmp_path):
    """Every step of `python -m awq.artifact --predictor` is a valid command line of its tool."""
    from awq.experiments.entry import build_parser as entry_parser
    from awq.predictor.__main__ import build_parser as predictor_parser
    from awq.util.cli import build_parser as config_parser
    from clustering.activation_aware_clustering import AWCConfig

    steps = predictor_steps(tmp_path)
    assert [s[0] for s in steps] == ["train_store", "test_store", "cluster_gate", "cluster_up", "cluster_down",
                                     "train", "evaluate"]
    parsers = {"awq.entry": entry_parser(), "awq.methods.label_predictor": predictor_parser(),
               "clustering.activation_aware_clustering": config_parser(AWCConfig)}
    outputs = set()
    for name, argv, cwd, done in steps:
        assert argv[0] == "-m" and cwd == tmp_path
        parsers[argv[1]].parse_args(argv[2:])
        outputs.add(done)
    assert len(outputs) == len(steps)  # each step has its own completion marker
    train = next(s for s in steps if s[0] == "cluster_gate")[1]
    assert "train_store" in train[train.index("--masks") + 1]  # centroids from the train store, not the test windows


def test_full_table_rows_6_to_8_take_command_and_time_from_results(tmp_path):
    refs = report.load_refs(REPO / "results_ref")
    refs["sparse_mlp"] = json.loads(import_sparse_mlp(bench_json(tmp_path, 1.6), tmp_path).read_text())
    refs["frontier"] = dict(refs.get("frontier") or {"points": []}, seconds=3600.0,
                            fingerprint={"nsamples": 3})
    block = artifact.full_block(refs)
    row = {line.split(" | ")[0].strip("| "): line for line in block.splitlines()[2:]}
    assert "42 s" in row["6"] and refs["sparse_mlp"]["command"] in row["6"]
    assert "60.0 min" in row["8"] and "FRONTIER_NSAMPLES=3" in row["8"]
    assert all(line.endswith(("| PASS |", "| FAIL |")) for line in row.values())


def test_make_artifact_prints_every_row_with_a_verdict():
    """`make artifact`'s table on the checked-in quick run plus the checked-in full-path rows."""
    refs = report.load_refs(REPO / "results_ref")
    ev = with_checked_in(refs["quick"], refs)
    rows = artifact.evaluate(ev, ev)
    assert [r["id"] for r in rows] == [c.id for c in artifact.CLAIMS]
    lines = artifact.table(rows).splitlines()[2:]
    assert len(lines) == len(artifact.CLAIMS)
    assert all(line.endswith(("| PASS |", "| FAIL |")) and "not run" not in line for line in lines)


@pytest.mark.parametrize("block", ["artifact_full", "predictor_table", "sparse_mlp_table"])
def test_hand_edited_figure_in_artifact_fails_check(tmp_path, capsys, block):
    root = tmp_path / "proj"
    root.mkdir()
    for f in TARGETS:
        shutil.copy(REPO / f, root / f)
    shutil.copytree(REPO / "results_ref", root / "results_ref")
    art = root / "ARTIFACT.md"
    text = art.read_text()
    a, b = text.index(f"<!-- report:{block} -->"), text.index(f"<!-- /report:{block} -->")
    body = text[a:b]
    i = next(i for i, ch in enumerate(body) if ch.isdigit() and i > len(f"<!-- report:{block} -->"))
    edited = body[:i] + str((int(body[i]) + 1) % 10) + body[i + 1:]  # one digit of a figure changed by hand
    art.write_text(text[:a] + edited + text[b:])
    assert report.cli(["--check", "--root", str(root)]) == 1
    assert f"ARTIFACT.md: {block}" in capsys.readouterr().err
    assert report.cli(["--root", str(root)]) == 0 and art.read_text() == text


def test_bench_notes_state_a_loaded_machine():
    from bench.bench_sparse_mlp import notes

    busy = notes({"loadavg": 6.0, "cpus": 2}, ["run under nice"])
    assert busy[0] == "run under nice" and "shared with other jobs" in busy[1]
    assert "shared" not in notes({"loadavg": 0.1, "cpus": 2}, [])[0]


def test_predictor_eval_records_machine_and_load(monkeypatch):
    import os

    from awq.predictor.evaluate import machine_notes

    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    info, notes = machine_notes(["given"])
    assert info["cpus"] >= 1 and info["loadavg"] == 40.0 and notes[0] == "given" and "shared" in notes[1]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert machine_notes([]) == (dict(info, loadavg=0.0), [])
