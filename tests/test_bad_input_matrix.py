"""The bad-input matrix (issue 22): every command line, every declared option, the bad values of its kind.

The cases are generated from the declarations (``awq.util.cli.opt`` fields of each CLI's config dataclass): a
new option is covered the moment it is declared, and a new CLI module fails :func:`test_every_cli_is_in_the_matrix`
until it is added to :data:`CLIS`.  Each case replaces one option of a valid base command line by one bad value
(or omits a required option, or adds an unknown one) and calls the CLI's ``cli(argv)`` in this process, stderr
captured.  Each must return exit code 2 with exactly ONE stderr line ``error: <option>: ...`` naming the option,
no traceback, within a few seconds, leave every input file byte-identical and create no file.  A few cases that
need a real process (exit code of ``python -m``, a FIFO never opened, refused before the model loads) run as
subprocesses in :func:`test_bad_input_in_real_processes`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from awq.store.centroids import save_centroids
from awq.util.cli import option_fields
from awq.util.validate import INT_LIMIT, KINDS, SEED_MAX, lm_eval_task_names
from tests.test_clustering import make_store

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 5.0  # "within a few seconds": a refusal comes before any work
ALARM_SECONDS = 30  # a case that is not refused and starts work is stopped here (and fails)


# ---- the CLIs ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cli:
    name: str  # how a user runs it
    module: str  # where its cli lives
    func: str  # the cli function of ``module``
    config: str  # the config class (in ``module`` unless dotted)
    base: Callable[["Files"], list[str]]  # a valid command line (the bad value replaces one option of it)
    prefix: tuple[str, ...] = ()  # a sub-command

    def config_class(self) -> type:
        mod, _, cls = self.config.rpartition(".")
        return getattr(importlib.import_module(mod or self.module), cls)

    def run(self, argv: list[str]) -> int:
        return getattr(importlib.import_module(self.module), self.func)(list(self.prefix) + argv)


@dataclasses.dataclass
class Files:
    """Valid inputs every base command line can use (they must stay byte-identical) and a scratch folder."""

    root: Path
    model: Path
    corpus: Path
    thresholds: Path
    store: Path
    centroids: dict[str, Path]
    predictor: Path
    scratch: Path

    def spec(self) -> str:
        return ",".join(f"{p.split('_')[0]}={f}" for p, f in self.centroids.items())

    def out(self, name: str) -> str:
        return str(self.scratch / "out" / name)


def _clustering(tool: str, config: str, extra: Callable[[Files], list[str]] = lambda f: []) -> Cli:
    return Cli(f"python -m clustering.{tool}", f"clustering.{tool}", "cli", config,
               lambda f: ["--masks", str(f.store), "--proj", "up_proj", *extra(f)])


CLIS: list[Cli] = [
    Cli("python -m awq.entry", "awq.experiments.entry", "cli", "EntryConfig",
        lambda f: ["--model_path", str(f.model), "--data_path", str(f.corpus), "--thresholds", str(f.thresholds),
                   "--seqlen", "32", "--nsamples", "1", "--output_path", f.out("entry.json")]),
    Cli("python -m awq.calibrate", "awq.methods.calibration", "cli", "CalibrateConfig",
        lambda f: ["--sparsity", "0.5", "--output", f.out("thr.json"), "--model_path", str(f.model), "--data_path",
                   str(f.corpus), "--seqlen", "32", "--nsamples", "1"]),
    Cli("python -m awq.frontier", "awq.experiments.frontier", "cli", "FrontierConfig",
        lambda f: ["--model_path", str(f.model), "--data_path", str(f.corpus), "--out", f.out("frontier"),
                   "--plots_dir", f.out("plots"), "--methods", "dense", "--nsamples", "1", "--calib_nsamples", "1",
                   "--seqlen", "32"]),
    Cli("python -m awq.reproduce", "awq.experiments.reproduce", "cli", "ReproduceConfig",
        lambda f: ["--quick", "--out", f.out("rep"), "--model_path", str(f.model), "--data_path", str(f.corpus),
                   "--thresholds", str(f.thresholds), "--seqlen", "32"]),
    Cli("python -m awq.generate", "awq.decode.generate", "cli", "GenerateConfig",
        lambda f: ["--model_path", str(f.model), "--data_path", str(f.corpus), "--max_new_tokens", "2",
                   "--calib_seqlen", "16"]),
    Cli("python -m awq.cluster_predictor", "awq.predictor.cluster_files", "cli", "FitConfig",
        lambda f: ["--output", f.out("cp.safetensors"), "--model_path", str(f.model), "--data_path", str(f.corpus),
                   "--seqlen", "32", "--calib_nsamples", "1"]),
    Cli("python -m awq.predictor train", "awq.predictor.__main__", "main", "awq.predictor.train.TrainOptions",
        lambda f: ["--masks", str(f.store), "--centroids", f.spec(), "--output", f.out("p.safetensors")],
        prefix=("train",)),
    Cli("python -m awq.predictor evaluate", "awq.predictor.__main__", "main",
        "awq.predictor.evaluate.EvaluateOptions",
        lambda f: ["--masks", str(f.store), "--predictor", str(f.predictor), "--output", f.out("eval.json")],
        prefix=("evaluate",)),
    Cli("python -m awq.models fetch", "awq.load.models", "cli", "FetchConfig",
        lambda f: ["qwen2.5-coder-0.5b", "--find_links", str(f.scratch / "empty")], prefix=("fetch",)),
    Cli("python -m awq.models list", "awq.load.models", "cli", "ListConfig", lambda f: [], prefix=("list",)),
    Cli("python -m awq.report", "awq.report.generate", "cli", "ReportConfig",
        lambda f: ["--check", "--root", str(f.scratch / "empty"), "--results", str(f.scratch / "empty")]),
    Cli("python -m awq.artifact", "awq.report.artifact", "cli", "ArtifactConfig",
        lambda f: ["--no_run", "--root", str(f.scratch / "empty")]),
    Cli("python -m awq.load.data", "awq.load.data", "cli", "DataConfig",
        lambda f: ["--data_path", str(f.corpus), "--no_hub"]),
    _clustering("activation_aware_clustering", "AWCConfig",
                lambda f: ["--k", "4", "--output", f.out("awc.pt"), "--max_iter", "1", "--no_progress"]),
    _clustering("bmf", "BMFConfig", lambda f: ["--k", "4", "--output", f.out("bmf.pt"), "--max_iter", "1"]),
    _clustering("brbkmeans", "BRBKMeansConfig", lambda f: ["--k", "4", "--output", f.out("brb.pt"), "--max_iter", "1"]),
    _clustering("penalized_brbkmeans", "PenalizedConfig",
                lambda f: ["--k", "4", "--output", f.out("pen.pt"), "--max_iter", "1"]),
    _clustering("select_centroids", "SelectConfig", lambda f: ["--k", "4", "--output", f.out("sel.pt")]),
    _clustering("error_checking", "PrecisionConfig",
                lambda f: ["--centroids", str(f.centroids["up_proj"]), "--output", f.out("prec.json")]),
    Cli("python -m clustering.centroid_analysis", "clustering.centroid_analysis", "cli", "AnalysisConfig",
        lambda f: ["--centroids", str(f.centroids["up_proj"]), "--output", f.out("an.json")]),
    Cli("python -m clustering.replace_centroid_based_on_sparsity", "clustering.replace_centroid_based_on_sparsity",
        "cli", "ReplaceConfig", lambda f: ["--centroids", str(f.centroids["up_proj"]), "--output", f.out("rep.pt")]),
    Cli("python -m clustering.import_chunks", "clustering.import_chunks", "cli", "ImportConfig",
        lambda f: ["--chunks", str(f.scratch / "empty"), "--output", f.out("imported")]),
    Cli("python bench/bench_clustering.py", "bench.bench_clustering", "cli", "ClusteringBenchConfig",
        lambda f: ["--quick", "--threads", "1", "--no_sklearn", "--repeats", "1"]),
    Cli("python bench/bench_decode.py", "bench.bench_decode", "main", "DecodeBenchConfig",
        lambda f: ["--model_path", str(f.model), "--data_path", str(f.corpus), "--threads", "1", "--repeats", "1",
                   "--prompt_tokens", "4", "--new_tokens", "2", "--methods", "none", "--output", f.out("dec.json")]),
    Cli("python bench/bench_extract.py", "bench.bench_extract", "cli", "ExtractBenchConfig",
        lambda f: ["--hidden", "16", "--intermediate", "32", "--layers", "1", "--heads", "2", "--kv_heads", "1",
                   "--vocab", "64", "--seqlen", "8", "--windows", "1", "--read_sizes_mb", "0.01", "--workdir",
                   f.out("extract")]),
    Cli("python bench/bench_lowbit_rank.py", "bench.bench_lowbit_rank", "cli", "LowbitBenchConfig",
        lambda f: ["--quick", "--threads", "1"]),
    Cli("python bench/bench_ppl.py", "bench.bench_ppl", "cli", "PplBenchConfig",
        lambda f: ["--quick", "--model_path", str(f.model), "--data_path", str(f.corpus), "--thresholds",
                   str(f.thresholds), "--seqlen", "32", "--threads", "1"]),
    Cli("python bench/bench_predictor.py", "bench.bench_predictor", "cli", "PredictorBenchConfig",
        lambda f: ["--quick", "--threads", "1"]),
    Cli("python bench/bench_sparse_mlp.py", "bench.bench_sparse_mlp", "cli", "SparseMlpBenchConfig",
        lambda f: ["--quick", "--no_step", "--threads", "1"]),
]


# ---- bad values, by kind and type ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Bad:
    """Where the bad things live (created once)."""

    missing: str
    folder: str
    file: str  # a regular, non-empty file that is not what any option wants by content
    empty: str
    fifo: str
    device: str = "/dev/zero"
    null: str = "/dev/null"


def _range_bad(meta: dict, tp: type) -> list[str]:
    out = []
    for key in ("min", "gt"):
        if key in meta:
            lo = meta[key]
            out.append(str(lo - 1 if tp is int and key == "min" else lo if key == "gt" else lo - 0.5))
    for key in ("max", "lt"):
        if key in meta:
            hi = meta[key]
            out.append(str(hi + 1 if tp is int and key == "max" else hi if key == "lt" else hi + 0.5))
    return out


def bad_values(meta: dict, tp: type, kind: Optional[str], bad: Bad, inputs: dict[str, list[str]]) -> list[str]:
    """The bad values of one (scalar) option: by its type, its declared range and choices, and its kind."""
    return [v for v in _bad_values(meta, tp, kind, bad, inputs) if v not in (meta.get("words") or ())]


def _bad_values(meta: dict, tp: type, kind: Optional[str], bad: Bad, inputs: dict[str, list[str]]) -> list[str]:
    if tp is int:
        vals = ["abc", "1.5", "", "nan"] + _range_bad(meta, int)
        if kind == "seed":
            vals += ["-1", str(SEED_MAX + 1)]
        else:
            if "min" not in meta and "gt" not in meta:
                vals.append(str(-INT_LIMIT - 2))
            if "max" not in meta and "lt" not in meta:
                vals.append(str(INT_LIMIT + 1))
        if "choices" in meta:
            vals.append(str(max(meta["choices"]) + 1000))
        return vals
    if tp is float:
        vals = ["abc", "", "nan", "inf", "-inf"] + _range_bad(meta, float)
        if kind == "fraction":
            vals += ["1.5", "50", "-0.1"]
        return vals
    if tp is bool:
        return []  # a flag: its bad form is "--flag=value" (see cases())
    # str / Path
    vals = [""]
    if "choices" in meta:
        vals.append("no_such_choice_xyz")
    if kind is None and meta.get("check") is not None:  # a rule of a higher layer (e.g. --protocol, --methods)
        vals.append("no_such_value_xyz")
    if kind == "device":
        vals += ["tpu", "cpu:x", "gpu", "cuda:99" if torch.cuda.is_available() else "cuda"]
    elif kind == "tasks":
        vals += ["no_such_task_xyz", "wikitext,", ","]
    elif kind in ("in_file", "in_dir", "in_path", "model"):
        vals += [bad.missing, bad.device, bad.fifo]
        if kind == "in_file":
            vals += [bad.folder, bad.empty]
        if kind == "in_dir":
            vals.append(bad.file)
        if kind == "model":
            vals += [bad.folder, bad.file]  # a folder without config.json, a file that is not a GGUF
    elif kind == "centroids":
        vals += [f"gate={bad.missing}", f"gate={bad.folder}", f"up={bad.device}", f"up={bad.fifo}", bad.fifo,
                 bad.missing, "up", bad.folder]
    elif kind == "out_file":
        vals += [bad.folder, f"{bad.file}/x.json", bad.null, bad.fifo, bad.folder + "/"]
        vals += inputs.get("file", [])[:2]
    elif kind == "out_dir":
        vals += [bad.file, f"{bad.file}/sub", bad.null, bad.fifo]
        vals += inputs.get("dir", [])[:2]
    return vals


def _given(argv: list[str], cls: type) -> dict[str, list[str]]:
    """option name -> the argv values given for it in ``argv`` (positional: under its name)."""
    flags = {f"--{f.name}": f for f, *_ in option_fields(cls)}
    out: dict[str, list[str]] = {}
    i = 0
    positional = [f.name for f, *_ in option_fields(cls) if f.metadata.get("positional")]
    while i < len(argv):
        a = argv[i]
        if a in flags:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out[flags[a].name] = argv[i + 1: j]
            i = j
        elif not a.startswith("--") and positional:
            out[positional.pop(0)] = [a]
            i += 1
        else:
            i += 1
    return out


def _replace(argv: list[str], cls: type, name: str, values: Optional[list[str]]) -> list[str]:
    """``argv`` with option ``name`` given ``values`` (None: left out)."""
    fields = {f.name: f for f, *_ in option_fields(cls)}
    positional = bool(fields[name].metadata.get("positional"))
    given = _given(argv, cls)
    out, i = [], 0
    flags = {f"--{n}" for n in fields}
    while i < len(argv):
        a = argv[i]
        if a == f"--{name}":
            j = i + 1
            while j < len(argv) and argv[j] not in flags:
                j += 1
            i = j
            continue
        if positional and a in given.get(name, []) and not a.startswith("--"):
            i += 1
            continue
        out.append(a)
        i += 1
    if values is None:
        return out
    return (list(values) + out) if positional else out + [f"--{name}", *values]


def cases(cli: Cli, files: Files, bad: Bad) -> list[tuple[str, list[str], str]]:
    """(label the error must name, argv, what is bad) for every option of ``cli``, generated from its declaration."""
    cls = cli.config_class()
    base = cli.base(files)
    given = _given(base, cls)
    kinds = {f.name: f.metadata.get("kind") for f, *_ in option_fields(cls)}
    inputs: dict[str, list[str]] = {"file": [], "dir": []}
    for name, vals in given.items():
        k = kinds.get(name)
        for v in vals:
            if k in ("in_file", "in_dir", "in_path", "model") and os.path.exists(v):
                inputs["dir" if os.path.isdir(v) else "file"].append(v)
            if k == "centroids":
                inputs["file"] += [part.partition("=")[2] for part in v.split(",") if "=" in part]
    if any(f.metadata.get("kind") == "in_dir" and f.name == "masks" for f, *_ in option_fields(cls)):
        inputs["file"].append(str(files.store / "meta.json"))  # an output inside a pattern store
    out = []
    for f, tp, _optional, is_list in option_fields(cls):
        m = dict(f.metadata)
        positional = bool(m.get("positional"))
        label = f.name if positional else f"--{f.name}"
        if tp is bool and not is_list:
            flag = f"--no_{f.name}" if (f.default is True) else f"--{f.name}"
            out.append((flag, _replace(base, cls, f.name, None) + [f"{flag}=1"], f"{flag}=1"))
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and not positional:
            out.append((label, _replace(base, cls, f.name, None), "left out (required)"))
        kind = m.get("kind")
        if is_list and isinstance(kind, tuple):  # one kind per position (nargs=N)
            good = given.get(f.name) or [str(files.store / "meta.json"), "x"]
            for i, k in enumerate(kind):
                for v in bad_values(m, tp, k, bad, inputs):
                    vals = list(good)
                    vals[i] = v
                    out.append((label, _replace(base, cls, f.name, vals), f"position {i}: {v!r}"))
            if m.get("check") is not None:
                vals = list(good)
                vals[-1] = "no_such_name_xyz"
                out.append((label, _replace(base, cls, f.name, vals), "a name that is not allowed"))
            continue
        for v in bad_values(m, tp, kind, bad, inputs):
            out.append((label, _replace(base, cls, f.name, [v]), repr(v)))
        if is_list and not m.get("nargs") and not m.get("append") and tp in (int, float):
            out.append((label, _replace(base, cls, f.name, ["1,abc"]), "'1,abc'"))
    out.append(("--no_such_option_xyz", base + ["--no_such_option_xyz", "1"], "an unknown option"))
    return out


# ---- running a case -------------------------------------------------------------------------------------------------
class _Alarm(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Alarm()


def run_case(cli: Cli, argv: list[str]) -> tuple[Any, str, str, float]:
    """(exit code or the exception raised, stdout, stderr, seconds) of ``cli`` on ``argv`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(ALARM_SECONDS)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc: Any = cli.run(argv)
    except _Alarm:
        rc = f"still running after {ALARM_SECONDS} s (not refused: the work started)"
    except SystemExit as e:
        rc = f"SystemExit({e.code})"
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        rc = f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0


def input_files(paths: list[Path]) -> list[str]:
    """Every file under ``paths`` (lock files excluded: they hold no data)."""
    return [str(p) for root in paths for p in ([root] if root.is_file() else sorted(root.rglob("*")))
            if p.is_file() and not p.name.endswith(".lock")]


def stats(files: list[str]) -> list[tuple]:
    """(size, mtime, inode) of each file: any write or replacement changes it."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def digest(files: list[str]) -> dict[str, str]:
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


def listing(root: Path) -> set[str]:
    return {os.path.join(d, n) for d, dirs, names in os.walk(root) for n in dirs + names}


# ---- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tiny_model_dir, tiny_corpus, tiny_thresholds, tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("matrix")
    store = root / "store"
    make_store(store, L=2, windows=2, seqlen=16, widths={"gate_proj": 128, "up_proj": 128, "down_proj": 64})
    g = torch.Generator().manual_seed(0)
    cents = {}
    for proj, w in (("gate_proj", 128), ("up_proj", 128), ("down_proj", 64)):
        cents[proj] = root / "cents" / f"{proj}.pt"
        save_centroids(cents[proj], (torch.rand(4, w, generator=g) < 0.5).to(torch.uint8), {"proj": proj})
    pred = root / "pred.safetensors"
    pred.write_bytes(b"not a predictor, but a regular non-empty file")
    scratch = root / "scratch"
    (scratch / "empty").mkdir(parents=True)
    (scratch / "out").mkdir()
    return Files(root, tiny_model_dir, tiny_corpus, tiny_thresholds, store, cents, pred, scratch)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Bad:
    d = tmp_path_factory.mktemp("bad")
    (d / "a_folder").mkdir()
    (d / "a_file.txt").write_text("some text\n")
    (d / "empty.json").write_bytes(b"")
    os.mkfifo(d / "a_fifo")
    return Bad(str(d / "no" / "such" / "path.json"), str(d / "a_folder"), str(d / "a_file.txt"),
               str(d / "empty.json"), str(d / "a_fifo"))


# ---- tests ----------------------------------------------------------------------------------------------------------
def _cli_modules() -> set[str]:
    """Every command line of the project: awq's command modules and __main__s, clustering tools, bench scripts."""
    mods = set()
    for p in (REPO / "awq").glob("*.py"):
        text = p.read_text()
        if "def cli" in text or "import cli" in text:
            src = next((line.split()[1] for line in text.splitlines() if line.startswith("from awq.")
                        and line.endswith("import cli")), None)
            if src:
                mods.add(src)
    for p in (REPO / "awq").rglob("__main__.py"):
        mods.add(".".join(p.relative_to(REPO).with_suffix("").parts))
    for p in list((REPO / "clustering").glob("*.py")) + list((REPO / "bench").glob("bench_*.py")) + \
            list((REPO / "awq").rglob("*.py")):
        if "\ndef cli(" in p.read_text() and p.name != "cli.py":
            mods.add(".".join(p.relative_to(REPO).with_suffix("").parts))
    return mods


def test_every_cli_is_in_the_matrix():
    covered = {c.module for c in CLIS} | {"awq.report.__main__"}  # report's __main__ is awq.report.generate.cli
    assert (REPO / "awq/report/__main__.py").read_text().count("from awq.report.generate import cli") == 1
    missing = _cli_modules() - covered
    assert not missing, f"command lines without bad-input cases (add them to CLIS): {sorted(missing)}"
    # every config class of a covered module is in the table (a sub-command added later is noticed)
    for mod in {c.module for c in CLIS}:
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod
                    and any("help" in f.metadata for f in dataclasses.fields(obj))):
                assert any(c.config_class() is obj for c in CLIS), f"{mod}.{name} has options but no matrix entry"


PATHLIKE = ("path", "dir", "file", "output", "out", "masks", "centroids", "thresholds", "predictor", "gguf", "root",
            "results", "chunks", "init", "device", "tasks", "store", "import_", "workdir", "links", "read_pass")


def test_every_path_like_option_declares_its_kind():
    """An option whose name says it is a path, a device or task names must declare what it is (or its choices)."""
    for c in CLIS:
        for f, tp, _o, _l in option_fields(c.config_class()):
            m = f.metadata
            if tp in (str, Path) and any(w in f.name for w in PATHLIKE):
                assert m.get("kind") or m.get("choices") or m.get("check"), f"{c.name} --{f.name}: no kind declared"
            if tp is Path:
                assert m.get("kind"), f"{c.name} --{f.name}: a Path option without a kind"
            assert m.get("kind") is None or all(k is None or k in KINDS for k in
                                                (m["kind"] if isinstance(m["kind"], tuple) else (m["kind"],)))


def test_base_command_lines_pass_validation(files):
    """The matrix's base command lines are valid, so each case's refusal is about its one bad value."""
    from awq.util.cli import build_parser, check_config, given_options

    for c in CLIS:
        cls = c.config_class()
        p = build_parser(cls, suppress_defaults=True)
        ns = p.parse_args(c.base(files))
        check_config(cls(**given_options(cls, ns)))


def test_bad_input_matrix(files, bad, capsys):
    roots = [files.model, files.corpus, files.thresholds, files.store, files.centroids["up_proj"].parent,
             files.predictor]
    inputs = input_files(roots)
    before = digest(inputs)
    lm_eval_task_names()  # the registry's names are indexed once (~15 s, cached per lm-eval version): not a case
    out_dir = files.scratch
    n, failures, t_all, slowest = 0, [], time.perf_counter(), (0.0, "")
    per_cli = {}
    for c in CLIS:
        t_cli = time.perf_counter()
        for label, argv, what in cases(c, files, bad):
            st0, ls0 = stats(inputs), listing(out_dir)
            rc, out, err, secs = run_case(c, argv)
            n += 1
            slowest = max(slowest, (secs, f"{c.name} {label} {what}"))
            lines = [line for line in err.splitlines() if line.strip()]
            why = None
            if rc != 2:
                why = f"exit {rc!r}"
            elif len(lines) != 1:
                why = f"{len(lines)} stderr lines"
            elif not lines[0].startswith("error: ") or label not in lines[0]:
                why = f"the line does not name {label}"
            elif "Traceback" in err:
                why = "a traceback"
            elif secs > CASE_SECONDS:
                why = f"took {secs:.1f} s"
            elif stats(inputs) != st0:
                why = "an input changed"
            elif listing(out_dir) != ls0:
                why = f"created {sorted(listing(out_dir) - ls0)[:3]}"
            if why:
                failures.append(f"{c.name} {label} = {what}: {why}; stderr: {err.strip()[-300:]!r}")
        per_cli[c.name] = time.perf_counter() - t_cli
    took = time.perf_counter() - t_all
    with capsys.disabled():  # shown by a plain `make test` too
        print(f"\nbad-input matrix: {n} cases over {len(CLIS)} command lines in {took:.1f} s "
              f"(slowest case {slowest[0]:.2f} s: {slowest[1]}); {len(failures)} failed")
    assert input_files(roots) == inputs and digest(inputs) == before, "an input file changed"
    assert not failures, f"{len(failures)} of {n} cases not refused as required:\n" + "\n".join(failures[:40])
    assert n >= 300


# ---- a few cases in real processes ------------------------------------------------------------------------------
def test_bad_input_in_real_processes(files, bad, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "thr_{pct}.json"
    runs = {  # the three classes, each through `python -m` (exit code, nothing printed besides the line)
        "calibrate --sparsity 1.5": [sys.executable, "-m", "awq.calibrate", "--sparsity", "1.5", "--output", str(out),
                                     "--model_path", str(files.model), "--data_path", str(files.corpus)],
        "entry --tasks no_such_task": [sys.executable, "-m", "awq.entry", "--tasks", "wikitext,no_such_task_xyz",
                                       "--model_path", str(files.model)],
        "entry --thresholds FIFO": [sys.executable, "-m", "awq.entry", "--thresholds", bad.fifo,
                                    "--model_path", str(files.model)],
    }
    want = {"calibrate --sparsity 1.5": "--sparsity", "entry --tasks no_such_task": "--tasks",
            "entry --thresholds FIFO": "--thresholds"}
    procs = {k: subprocess.Popen(v, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in runs.items()}
    for k, p in procs.items():
        _, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {want[k]}:"), (k, err)
    assert not list(tmp_path.iterdir())  # no thresholds file: 1.5 is refused, never read as 2%
