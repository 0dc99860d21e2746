"""``python -m awq.reproduce``: the paper's experiments end to end on one model and corpus.

Steps (each resumable: a finished step's output file makes it skip on a rerun of the same run --
``DIR/fingerprint.json`` records what produced the directory and another run is refused, see
:mod:`awq.experiments.reproduce_state`; ``--force`` starts over):

1. dense and threshold-only perplexity (and, where shipped, the threshold sweep 20..70%);
2. activation-mask extraction into a pattern store (test part);
3. clustering of gate/up/down with AWC at every K x centroid sparsity, and with BMF, BRB-KMeans and
   penalized BRB-KMeans at the baseline K;
4. precision / density / F1 / Jaccard of every centroid set;
5. centroid-swap (oracle) perplexity for every AWC set;
6. ``results`` (one JSON per run, ``summary.csv``, ``summary.json``) and plots.

Clustering calls the typed ``main(Config)`` of the ``clustering`` tools in process (``--subprocess``: each
as ``python -m clustering.<tool>`` with the equivalent command line).  ``--quick`` is a few-minute
version (used by CI on a tiny model).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from awq.experiments import entry
from awq.experiments.plots import plot_all
from awq.experiments.reproduce_state import check_or_claim, read_json, run_fingerprint
from awq.load.arch import PROJS
from awq.load.models import DEFAULT_MODEL_NAME, check_model_path
from awq.store.pattern_store import PatternStore
from awq.store.thresholds import shipped_thresholds
from awq.util.cli import ConfigError, build_parser, check_config, fail, given_options, opt, setup_logging, to_argv
from awq.util.io import atomic_write_json, atomic_write_text, check_output_path, output_lock
from clustering.activation_aware_clustering import AWCConfig
from clustering.error_checking import PrecisionConfig

log = logging.getLogger("awq.experiments.reproduce")

PROJ_SHORT = {p: p.split("_")[0] for p in PROJS}  # gate_proj -> gate
BASELINES = {"bmf": "BMFConfig", "brbkmeans": "BRBKMeansConfig", "penalized_brbkmeans": "PenalizedConfig"}
OWN_RULE = {"bmf": "hamming", "brbkmeans": "hamming", "penalized_brbkmeans": "penalized"}

# the paper's Mistral-7B numbers, for reference beside ours
PAPER = {
    "precision": {"awc": {"gate_proj": 0.7934, "up_proj": 0.65, "down_proj": 0.64},
                  "bmf": {"gate_proj": 0.7062, "up_proj": 0.6079, "down_proj": 0.4874},
                  "brbkmeans": {"gate_proj": 0.6957, "up_proj": 0.5990, "down_proj": 0.4674}},
    "ppl_threshold_only": 6.45,
}


@dataclass
class ReproduceConfig:
    """Options of ``python -m awq.reproduce`` (each field is one command-line option, see awq.util.cli)."""

    out: Path = opt(Path("results/reproduce"), help="results directory (default results/reproduce, "
                    "results/reproduce_quick with --quick)", kind="out_dir")
    plots_dir: Optional[Path] = opt(None, help="where the PNGs go (default <out>/plots)", kind="out_dir")
    model_path: Optional[str] = opt(None, help="model (default: the embedded SmolLM2-135M-Instruct)", kind="model",
                                    check=check_model_path)
    data_path: Optional[str] = opt(None, help="local corpus (see awq.entry --help)", kind="in_path")
    thresholds: Optional[str] = opt(None, help="thresholds JSON (default: the shipped 50%% file)", kind="in_file",
                                    max_mb=64)
    seqlen: int = opt(2048, min=2, help="window length (default 2048; 512 with --quick)")
    ppl_nsamples: int = opt(8, min=1, help="windows scored per perplexity run (default 8; 4 with --quick)")
    extract_nsamples: int = opt(8, min=1, help="windows recorded into the pattern store (default 8; 4 with --quick)")
    ks: list[int] = opt(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192], min=1,
                        help="comma-separated K values (default 256,...,8192; 64,256 with --quick)")
    sparsities: list[float] = opt(default_factory=lambda: [0.2, 0.3, 0.4], min=0.0, lt=1.0, kind="fraction",
                                  help="comma-separated centroid sparsities (default 0.2,0.3,0.4; 0.4 with --quick)")
    baseline_k: int = opt(2048, min=1, help="K for BMF/BRB-KMeans/penalized (default 2048; 256 with --quick)")
    max_rows: Optional[int] = opt(61440, min=1, help="rows sampled per clustering run (default 61440 = one "
                                  "2048-token window x 30 layers; 16384 with --quick)")
    eval_rows: Optional[int] = opt(131072, min=1, help="rows sampled per precision evaluation (default 131072; "
                                   "16384 with --quick)")
    max_iter: int = opt(3, min=0, help="AWC iterations (default 3; 2 with --quick; the artifact used 10)")
    baseline_max_iter: int = opt(10, min=0, help="baseline iterations (default 10; 3 with --quick)")
    sweep: bool = opt(True, help="skip the threshold sweep (20..70%%; always skipped with --quick)")
    seed: int = opt(42, help="random seed of every clustering run (default 42)", kind="seed")
    device: Optional[str] = opt(None, help="device for model and clustering (default auto / cpu)", kind="device",
                                words=("auto",))
    quick: bool = opt(False, help="a few-minute version: small K, few windows, short seqlen")
    subprocess: bool = opt(False, help="run each clustering tool in its own process (python -m clustering.<tool>)")
    predictor: Optional[str] = opt(None, help="a trained cluster predictor file (python -m awq.predictor train): adds a predicted-cluster "
                                   "perplexity run beside the oracle ones", kind="in_file")
    force: bool = opt(False, help="start over: delete this tool's outputs in --out first (needed when --out holds "
                      "the results of another model, corpus, thresholds or options)")

    @classmethod
    def quick_preset(cls, **over) -> "ReproduceConfig":
        base = dict(out=Path("results/reproduce_quick"), seqlen=512, ppl_nsamples=4, extract_nsamples=4, ks=[64, 256], sparsities=[0.4], baseline_k=256,
                    max_rows=16384, eval_rows=16384, max_iter=2, baseline_max_iter=3, sweep=False, quick=True)
        base.update({k: v for k, v in over.items() if v is not None})
        return cls(**base)


class Reproducer:
    def __init__(self, cfg: ReproduceConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.plots = Path(cfg.plots_dir) if cfg.plots_dir else self.out / "plots"
        self.runs = self.out / "runs"
        self.cents = self.out / "centroids"
        self.prec = self.out / "precision"
        self.store = self.out / "store"
        self.timings: dict[str, float] = {}
        self._pattern_rows: Optional[int] = None

    # ---------------------------------------------------------------------------------------
    def _timed(self, name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        log.info("step %s done in %.1f s", name, self.timings[name])

    def _entry(self, out: Path, **kw) -> dict:
        if out.is_file():
            log.info("skip (done): %s", out)
            return read_json(out)

        cfg = entry.EntryConfig(model_path=self.cfg.model_path, data_path=self.cfg.data_path, seqlen=self.cfg.seqlen,
                                device=self.cfg.device, output_path=str(out), no_hub=False, **kw)
        return entry.main(cfg)

    def _tool(self, module: str, cfg: Any) -> None:
        """Run ``clustering.<module>.main(cfg)`` unless its output exists (``--subprocess``: as a process)."""
        output = Path(cfg.output)
        if output.is_file():
            log.info("skip (done): %s", output)
            return
        argv = to_argv(cfg)
        log.info("run: python -m clustering.%s %s", module, " ".join(argv))
        if self.cfg.subprocess:
            r = subprocess.run([sys.executable, "-m", f"clustering.{module}", *argv], capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"clustering.{module} failed (exit {r.returncode}): {' | '.join(tail)}")
            return
        importlib.import_module(f"clustering.{module}").main(cfg)

    def _rows(self) -> int:
        if self._pattern_rows is None:
            self._pattern_rows = PatternStore(self.store).n_rows("down_proj")
        return self._pattern_rows

    def _ks(self) -> list[int]:
        rows = min(self._rows(), self.cfg.max_rows or self._rows())
        ks = [k for k in self.cfg.ks if k <= rows]
        if len(ks) < len(self.cfg.ks):
            log.warning("K limited by the data (%d rows): dropped %s", rows, [k for k in self.cfg.ks if k > rows])
        return ks

    # ---------------------------------------------------------------------------------------
    def step_ppl(self) -> None:
        thr = {"thresholds": self.cfg.thresholds} if self.cfg.thresholds else {}
        self._entry(self.runs / "dense.json", dense=True, nsamples=self.cfg.ppl_nsamples)
        self._entry(self.runs / "threshold_50.json", nsamples=self.cfg.ppl_nsamples, **thr)
        if self.cfg.sweep and not self.cfg.thresholds:
            name = Path(self.cfg.model_path).name if self.cfg.model_path else DEFAULT_MODEL_NAME
            for pct in (20, 30, 40, 60, 70):
                f = shipped_thresholds(name, pct)
                if f is not None:
                    self._entry(self.runs / f"threshold_{pct}.json", nsamples=self.cfg.ppl_nsamples, thresholds=str(f))

    def step_extract(self) -> None:
        # the step's last output is runs/extract.json (a complete store alone is not: a run killed after the store's
        # last window but before that file would otherwise never write it); entry resumes or finds the store complete
        if (self.runs / "extract.json").is_file():
            log.info("skip (done): %s", self.store)
            return
        thr = {"thresholds": self.cfg.thresholds} if self.cfg.thresholds else {}

        entry.main(entry.EntryConfig(model_path=self.cfg.model_path, data_path=self.cfg.data_path, seqlen=self.cfg.seqlen,
                         device=self.cfg.device, nsamples=self.cfg.extract_nsamples, dump_masks=str(self.store),
                         output_path=str(self.runs / "extract.json"), **thr))

    def _common(self, proj: str, **kw) -> dict:
        """Store options shared by every clustering / precision run."""
        device = "cpu" if self.cfg.device in (None, "auto") else self.cfg.device  # clustering: cpu unless named
        return dict(masks=self.store, proj=proj, seed=self.cfg.seed, device=device,
                    progress=False, **kw)

    def awc_file(self, proj: str, k: int, s: float) -> Path:
        return self.cents / f"awc_{PROJ_SHORT[proj]}_k{k}_s{round(100 * s)}.pt"

    def step_cluster(self) -> None:
        for proj in PROJ_SHORT:
            for k in self._ks():
                for s in self.cfg.sparsities:
                    self._tool("activation_aware_clustering", AWCConfig(
                        **self._common(proj, k=k, max_rows=self.cfg.max_rows, output=self.awc_file(proj, k, s)),
                        sparsity=s, max_iter=self.cfg.max_iter))
            if self.cfg.baseline_k <= min(self._rows(), self.cfg.max_rows or self._rows()):
                for name, cfg_cls in BASELINES.items():
                    cls = getattr(importlib.import_module(f"clustering.{name}"), cfg_cls)
                    out = self.cents / f"{name}_{PROJ_SHORT[proj]}_k{self.cfg.baseline_k}.pt"
                    self._tool(name, cls(**self._common(proj, k=self.cfg.baseline_k, max_rows=self.cfg.max_rows,
                                                        output=out), max_iter=self.cfg.baseline_max_iter))

    def step_precision(self) -> None:
        for f in sorted(self.cents.glob("*.pt")):
            if f.name.endswith(".ckpt.pt"):
                continue
            proj = {v: k for k, v in PROJ_SHORT.items()}[f.stem.split("_k")[0].split("_")[-1]]
            common = self._common(proj, centroids=f, max_rows=self.cfg.eval_rows)
            self._tool("error_checking", PrecisionConfig(**common, output=self.prec / f"{f.stem}.json"))
            # baselines also with their own nearest-centroid rule: under the paper's active-only rule a dense
            # centroid (which Hamming k-means produces) covers every row and scores a meaningless 100%
            own = OWN_RULE.get(f.stem.split("_gate")[0].split("_up")[0].split("_down")[0])
            if own:
                self._tool("error_checking", PrecisionConfig(**common, output=self.prec / f"{f.stem}.own.json",
                                                             rule=own))

    def step_swap(self) -> None:
        thr = {"thresholds": self.cfg.thresholds} if self.cfg.thresholds else {}
        for k in self._ks():
            for s in self.cfg.sparsities:
                spec = ",".join(f"{PROJ_SHORT[p]}={self.awc_file(p, k, s)}" for p in PROJ_SHORT)
                self._entry(self.runs / f"swap_awc_k{k}_s{round(100 * s)}.json", nsamples=self.cfg.ppl_nsamples,
                            centroids=spec, **thr)

    def step_predicted(self) -> None:
        """Perplexity with clusters chosen by a trained predictor (no access to the true mask)."""
        if not self.cfg.predictor:
            return
        from safetensors import safe_open

        with safe_open(self.cfg.predictor, "pt") as f:
            meta = json.loads(f.metadata().get("awq_predictor", "{}"))
        k = max(meta.get("k", {}).values() or [0]) if isinstance(meta.get("k"), dict) else meta.get("k", 0)
        thr = {"thresholds": self.cfg.thresholds} if self.cfg.thresholds else {}
        self._entry(self.runs / f"predicted_k{k}.json", nsamples=self.cfg.ppl_nsamples, predictor=self.cfg.predictor,
                    **thr)

    # ---------------------------------------------------------------------------------------
    def summarize(self) -> dict:
        rows = []
        for f in sorted(self.prec.glob("*.json")):
            r = read_json(f)
            stem = f.stem.removesuffix(".own")
            method = stem.split("_gate")[0].split("_up")[0].split("_down")[0]
            k = int(stem.split("_k")[1].split("_")[0])
            s = int(stem.split("_s")[-1]) / 100 if method == "awc" else None
            rows.append({"kind": "precision", "method": method, "rule": r.get("rule", "active_only"),
                         "proj": r["proj"], "k": k, "sparsity": s,
                         "precision": r["precision"], "density": r["density"], "f1": r["f1"],
                         "jaccard": r["jaccard"], "rows": r["rows"], "file": str(f)})
        runs = {}
        for f in sorted(self.runs.glob("*.json")):
            r = read_json(f)
            if "ppl" not in r:
                continue
            eff = {}
            for p, st in r.get("centroids", {}).get("run_stats", {}).items():
                eff[p] = st["effective_sparsity"]
            runs[f.stem] = {"ppl": r["ppl"], "tokens": r["tokens"], "dataset": r["dataset"]["name"],
                            "substitute": r["dataset"]["substitute"],
                            "measured_sparsity": {p: v["mean"] for p, v in r["measured_sparsity"].items()},
                            "effective_sparsity": eff or None, "file": str(f)}
            rows.append({"kind": "ppl", "method": f.stem, "ppl": r["ppl"], "tokens": r["tokens"],
                         **{f"eff_{PROJ_SHORT[p]}": v for p, v in eff.items()}, "file": str(f)})
        summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.cfg).items()},
                   "runs": runs, "precision": [r for r in rows if r["kind"] == "precision"],
                   "timings_s": self.timings, "paper_mistral7b": PAPER}
        atomic_write_json(self.out / "summary.json", summary)
        atomic_write_text(self.out / "results.md", results_markdown(summary))
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        fh = io.StringIO(newline="")
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.out / "summary.csv", fh.getvalue())
        return summary

    def plot(self, summary: dict) -> list[Path]:
        return plot_all(summary, self.plots)

    def run(self) -> dict:
        """Check the directory (writable, not in use, made by this same run), then run every step."""
        check_output_path(self.out / "summary.json", "results directory")
        fp = run_fingerprint(self.cfg)  # before the lock: hashing a big model for the first time takes a while
        with output_lock(self.out, "results directory", folder=True):
            check_or_claim(self.out, fp, self.cfg.force, self.plots)
            if (self.out / "timings.json").is_file():  # appended to at the end: fail now, not after the work
                read_json(self.out / "timings.json", "timings file")
            for d in (self.out, self.plots, self.runs, self.cents, self.prec):
                d.mkdir(parents=True, exist_ok=True)
            return self._run()

    def _run(self) -> dict:
        atomic_write_json(self.out / "config.json",
                          {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.cfg).items()})
        self._timed("1_ppl_dense_threshold", self.step_ppl)
        self._timed("2_extract", self.step_extract)
        self._timed("3_cluster", self.step_cluster)
        self._timed("4_precision", self.step_precision)
        self._timed("5_swap_ppl", self.step_swap)
        self._timed("6_predicted_ppl", self.step_predicted)
        summary = self.summarize()
        paths = self.plot(summary)
        log.info("summary: %s; plots: %s", self.out / "summary.csv", ", ".join(str(p) for p in paths))
        timings_file = self.out / "timings.json"
        old = read_json(timings_file, "timings file") if timings_file.is_file() else {}
        old[time.strftime("%Y-%m-%dT%H:%M:%S")] = self.timings
        atomic_write_json(timings_file, old)
        return summary


def results_markdown(summary: dict) -> str:
    """Markdown tables of a summary (the run's results.md; docs/results.md shows the checked-in run)."""
    runs, prec = summary["runs"], summary["precision"]
    lines = []
    any_run = next(iter(runs.values()), None)
    if any_run:
        lines.append(f"Corpus: {any_run['dataset']}{' (offline substitute, not WikiText-2)' if any_run['substitute'] else ''}, "
                     f"{any_run['tokens']} scored tokens per perplexity run.\n")
    lines += ["| run | PPL | measured sparsity gate / up / down | effective sparsity gate / up / down |",
              "|---|---|---|---|"]

    def pct(d: Optional[dict]) -> str:
        return " / ".join(f"{100 * d[p]:.1f}%" for p in PROJ_SHORT if p in d) if d else "–"

    for name, r in sorted(runs.items(), key=lambda kv: kv[0]):
        lines.append(f"| {name} | {r['ppl']:.2f} | {pct(r['measured_sparsity'])} | {pct(r['effective_sparsity'])} |")
    lines += ["", "| method | assignment rule | K | centroid sparsity | proj | precision | density | F1 | Jaccard |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(prec, key=lambda r: (r["method"] != "awc", r["method"], r["rule"], r["k"], r["sparsity"] or 0,
                                         list(PROJ_SHORT).index(r["proj"]))):
        s = f"{100 * r['sparsity']:.0f}%" if r["sparsity"] is not None else "–"
        lines.append(f"| {r['method']} | {r['rule']} | {r['k']} | {s} | {PROJ_SHORT[r['proj']]} | "
                     f"{100 * r['precision']:.2f}% | "
                     f"{r['density']:.3f} | {r['f1']:.3f} | {r['jaccard']:.3f} |")
    if summary.get("timings_s"):
        lines += ["", "Wall time per step of this invocation (s; finished steps are skipped): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())]
    return "\n".join(lines) + "\n"


def main(cfg: ReproduceConfig) -> dict:
    return Reproducer(cfg).run()


def cli(argv: Optional[list[str]] = None) -> int:
    p = build_parser(ReproduceConfig, prog="python -m awq.reproduce", description=__doc__.split("\n\n")[0],
                     suppress_defaults=True)  # only the options given: --quick presets the others
    try:
        given = given_options(ReproduceConfig, p.parse_args(argv))
        cfg = check_config(ReproduceConfig.quick_preset(**given) if given.get("quick") else ReproduceConfig(**given))
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging("INFO")
    try:
        main(cfg)
    except (ValueError, RuntimeError, OSError) as e:  # awq.experiments.reproduce_state.ReproduceError, OutputError, LockedError
        fail(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
