"""awq.entry end to end on a tiny model, bad inputs, the lm-eval path, and the real default model."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from awq.experiments.entry import cli
from awq.load.arch import PROJS
from awq.store.thresholds import save_thresholds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def thr_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("thr") / "t.json"
    save_thresholds({"gate_proj": [0.02, 0.02], "up_proj": [0.02, 0.02], "down_proj": [0.0005, 0.0005]}, f)
    return f


def run_cli(args, capsys):
    rc = cli([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_end_to_end_tiny(tiny_model_dir, tiny_corpus, thr_file, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc, stdout, err = run_cli(["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32,
                               "--nsamples", 3, "--thresholds", thr_file, "--output_path", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1
    assert res["tokens"] == 3 * 31 and res["nsamples"] == 3 and res["seqlen"] == 32
    for p in PROJS:
        ms = res["measured_sparsity"][p]
        assert 0.0 < ms["mean"] < 1.0 and len(ms["per_layer"]) == 2
    assert res["dataset"]["source"] == str(tiny_corpus / "wiki.test.raw") or "wiki.test.raw" in res["dataset"]["source"]
    assert res["thresholds"]["sha256"] and res["model"]["num_layers"] == 2
    assert res["config"]["nsamples"] == 3 and "torch" in res["versions"]
    assert res["tokens_per_s"] > 0 and res["wall_time_s"] > 0
    assert "ppl=" in stdout

    # dense run scores the same windows with a different (finite) perplexity and ~0 sparsity
    out2 = tmp_path / "dense.json"
    rc, _, err = run_cli(["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32,
                          "--nsamples", 3, "--dense", "--output_path", out2], capsys)
    assert rc == 0, err
    dense = json.loads(out2.read_text())
    assert dense["tokens"] == res["tokens"] and dense["ppl"] != res["ppl"]
    assert dense["measured_sparsity"]["gate_proj"]["mean"] < 0.01
    assert dense["thresholds"]["dense"] is True


@pytest.mark.parametrize("case,match", [
    ("missing_model", "--model_path: no such file or folder"),
    ("bad_gguf", "not a GGUF"),
    ("not_a_model_dir", "without config.json"),
    ("bad_json", "not valid JSON"),
    ("layer_mismatch", "has 3 layers but the model has 2"),
    ("nsamples", "exceeds the"),
    ("seqlen", "exceeds the model's context"),
    ("missing_data", "--data_path: no such file or folder"),
])
def test_bad_inputs_one_line_errors(case, match, tiny_model_dir, tiny_corpus, thr_file, tmp_path, capsys):
    args = ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 1,
            "--thresholds", thr_file]

    def setv(flag, val):
        args[args.index(flag) + 1] = val

    if case == "missing_model":
        setv("--model_path", tmp_path / "nope")
    elif case == "bad_gguf":
        g = tmp_path / "junk.gguf"
        g.write_bytes(b"NOTGGUF" * 10)
        setv("--model_path", g)
    elif case == "not_a_model_dir":
        setv("--model_path", tmp_path)
    elif case == "bad_json":
        f = tmp_path / "t.json"
        f.write_text("{oops")
        setv("--thresholds", f)
    elif case == "layer_mismatch":
        f = tmp_path / "t3.json"
        save_thresholds({p: [0.1] * 3 for p in PROJS}, f)
        setv("--thresholds", f)
    elif case == "nsamples":
        setv("--nsamples", 100000)
    elif case == "seqlen":
        setv("--seqlen", 100000)
    elif case == "missing_data":
        setv("--data_path", tmp_path / "no_such_corpus.raw")
    rc, _, err = run_cli(args, capsys)
    assert rc == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


def test_unsupported_architecture_cli(tmp_path, tiny_corpus, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import tiny_tokenizer

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    rc, _, err = run_cli(["--model_path", d, "--data_path", tiny_corpus, "--dense", "--seqlen", 16], capsys)
    assert rc == 2 and "GPT2MLP" in err and "Traceback" not in err


def test_lm_eval_local_task(tiny_model_dir, thr_file, tmp_path, capsys, monkeypatch):
    """Other --tasks go through lm-eval 0.4 (HFLM over the patched model), offline, on a local YAML task."""
    data = tmp_path / "tiny_mc.jsonl"
    rows = [{"question": f"Which word follows 'quick brown' number {i}?", "choices": ["fox", "dog", "cat"],
             "answer": i % 3} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tdir = tmp_path / "tasks"
    tdir.mkdir()
    (tdir / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "lm.json"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rc, stdout, err = run_cli(["--model_path", tiny_model_dir, "--tasks", "tiny_mc", "--thresholds", thr_file,
                               "--lm_eval_include_path", tdir, "--output_path", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    acc = res["lm_eval"]["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and "ppl" not in res
    assert "tiny_mc" in stdout


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "awq.entry", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    for flag in ("--model_path", "--tasks", "--seqlen", "--nsamples", "--data_path", "--thresholds", "--dense",
                 "--dtype", "--device", "--output_path", "--dump_masks", "--dump_inputs", "--centroids"):
        assert flag in r.stdout


@pytest.mark.integration
def test_real_default_model_short_window(tmp_path, capsys):
    """The embedded SmolLM2-135M-Instruct, shipped 50% thresholds, one short window of the offline corpus."""
    pytest.importorskip("gguf")
    from awq.load.models import ModelError, default_gguf_path

    try:
        default_gguf_path()
    except ModelError as e:
        pytest.skip(str(e))
    out = tmp_path / "real.json"
    rc, stdout, err = run_cli(["--seqlen", 256, "--nsamples", 2, "--no_hub", "--output_path", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["model"]["name"] == "SmolLM2-135M-Instruct" and res["model"]["num_layers"] == 30
    assert res["dataset"]["substitute"] is True and "wikitext" not in res["dataset"]["name"]
    assert 2 < res["ppl"] < 200, res["ppl"]
    for p in PROJS:
        assert 0.40 < res["measured_sparsity"][p]["mean"] < 0.60


def test_dump_masks_through_entry_and_rerun(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path, capsys):
    import hashlib

    import numpy as np

    from awq.store.pattern_store import PatternStore, unpack

    store = tmp_path / "store"
    args = ["--model_path", tiny_model_dir, "--data_path", tiny_corpus, "--seqlen", 32, "--nsamples", 3,
            "--thresholds", tiny_thresholds, "--dump_masks", store, "--dump_inputs", "--output_path", tmp_path / "a.json"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    first = json.loads((tmp_path / "a.json").read_text())
    ps = PatternStore(store)
    assert ps.num_layers == 2 and ps.n_tokens == 3 * 32
    assert ps.widths == {"gate_proj": 128, "up_proj": 128, "down_proj": 64}
    # the recorded masks' density agrees with the measured sparsity of the same run
    for p in PROJS:
        dens = np.mean([unpack(np.asarray(ps.layer(p, l)), ps.widths[p]).mean().item() for l in range(2)])
        assert abs((1 - dens) - first["measured_sparsity"][p]["mean"]) < 1e-6
    assert ps.inputs(0).shape == (96, 64)
    digest = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(store.rglob("*.npy"))}
    # rerunning the same command finds the store complete: same perplexity, store untouched
    args[-1] = tmp_path / "b.json"
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["ppl"] == pytest.approx(first["ppl"], rel=1e-9)
    assert second["measured_sparsity"] == first["measured_sparsity"]
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(store.rglob("*.npy"))} == digest
    # a different seqlen into the same store is refused with a clear message
    args[args.index("--seqlen") + 1] = 16
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "seqlen" in err and "Traceback" not in err
