"""``python -m awq.report``: regenerate every results figure in README.md, ARTIFACT.md and docs/*.md from results JSON.

A generated block sits between markers, each on its own line::

    <!-- report:NAME -->
    ... (rewritten by this command) ...
    <!-- /report:NAME -->

Blocks are made from the checked-in summaries in ``results_ref/`` (each file names its command in its
``provenance``: command, config, package versions, git commit, import time; :mod:`awq.report.provenance`).
``--check`` rewrites nothing and exits 1 naming every block that differs from what the summaries produce (a
number edited by hand, or a results file updated without rerunning the report) and every results file without
its provenance.  A fresh run is imported first with ``--import_reproduce DIR``, ``--import_frontier CSV NAME``,
``--merge_frontier_quality CSV NAME`` (kl/top1 added to a checked-in frontier),
``--import_sparse_mlp JSON``, ``--import_predictor DIR``, ``--import_decode JSON NAME``, ``--import_bench JSON
[NAME]`` or ``--import_run_default JSON`` (:mod:`awq.report.importers`; ``--command`` records the command as
typed instead of the one rebuilt from the output).
"""
from __future__ import annotations

import logging
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from awq.report import provenance
from awq.report.artifact import ARTIFACT_BLOCKS
from awq.report.bench import BENCH_BLOCKS, BENCH_REFS, import_bench
from awq.report.decode import DECODE_REFS, decode_block, import_decode
from awq.report.importers import (
    RunOutputError,
    import_frontier,
    import_predictor,
    import_reproduce,
    import_run_default,
    import_sparse_mlp,
    merge_frontier_quality,
)
from awq.report.refs import REF_FILES, ReportError, load_refs, target_files
from awq.report.summaries import cluster_findings, half_read, headline, quant_headline
from awq.report.tables import by_format_block, frontier, predictor_table, sparse_mlp_table
from awq.util import paths
from awq.util.cli import ConfigError, fail, opt, parse_config, setup_logging
from awq.util.cli import build_parser as build_config_parser
from awq.util.env import markdown_table
from awq.util.io import atomic_write_text

log = logging.getLogger("awq.report.generate")

MARK = re.compile(r"<!-- report:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)
SHORT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def para(text: str, width: int = 118) -> str:
    """One paragraph, re-wrapped at the README's line width."""
    return textwrap.fill(" ".join(text.split()), width=width, break_long_words=False, break_on_hyphens=False) + "\n"


def _prec(rep: dict, method: str, proj: str, k: int, s: Optional[float] = None, rule: str = "active_only") -> dict:
    for r in rep["precision"]:
        if (r["method"], r["proj"], r["k"], r["rule"]) == (method, proj, k, rule) and (
                s is None or abs((r["sparsity"] or 0) - s) < 1e-9):
            return r
    raise ReportError(f"reproduce.json has no precision row {method}/{rule}/{proj}/K={k}/s={s}")


def _swap(rep: dict, k: int, s: float) -> dict:
    return rep["runs"][f"swap_awc_k{k}_s{round(100 * s)}"]


def _ks(rep: dict) -> list[int]:
    return sorted({int(n.split("_k")[1].split("_")[0]) for n in rep["runs"] if n.startswith("swap_awc_")})


def results_setup(refs: dict) -> str:
    rep = refs["reproduce"]
    c, tok = rep["config"], rep["runs"]["dense"]["tokens"]
    rows = c["extract_nsamples"] * c["seqlen"] * c["num_layers"]
    return para(f"The numbers here come from that command on **{rep['model']}** (fp32, CPU), shipped 50% thresholds, on "
            f"the **offline Wikipedia substitute** (not WikiText-2: the hub is unreachable here): {c['ppl_nsamples']} "
            f"windows × {c['seqlen']} tokens ({tok:,} scored tokens) per perplexity run; patterns extracted from the "
            f"same {c['extract_nsamples']} test windows ({rows:,} rows per projection = {c['extract_nsamples']} × "
            f"{c['seqlen']} tokens × {c['num_layers']} layers); each clustering run on a deterministic sample of "
            f"{c['max_rows']:,} rows (one window × {c['num_layers']} layers, the artifact's chunk size), AWC with "
            f"{c['max_iter']} iterations (the artifact used 10), baselines with {c['baseline_max_iter']}; precision "
            f"evaluated on another deterministic sample of {c['eval_rows']:,} rows.")


def swap_ppl(refs: dict) -> str:
    rep = refs["reproduce"]
    ks, ss = _ks(rep), rep["config"]["sparsities"]
    head = para(f"**Centroid-swap (oracle) perplexity** (dense {rep['runs']['dense']['ppl']:.2f}; threshold-only at 50%: "
            f"{rep['runs']['threshold_50']['ppl']:.2f}). Paper, Mistral-7B: threshold-only\n6.45; K=256 → 2048 at 40% "
            f"centroid sparsity 933.78 → 58.84; 12.49 at K=8192 and 20%.") + "\n"
    lines = ["| centroid sparsity | " + " | ".join(f"K={k}" if i == 0 else str(k) for i, k in enumerate(ks)) + " |",
             "|---" * (len(ks) + 1) + "|"]
    for s in ss:
        lines.append(f"| {100 * s:.0f}% | " + " | ".join(f"{_swap(rep, k, s)['ppl']:.0f}" for k in ks) + " |")
    return head + "\n".join(lines) + "\n"


def sweep(refs: dict) -> str:
    runs = refs["reproduce"]["runs"]
    pts = sorted((int(n.split("_")[1]), r["ppl"]) for n, r in runs.items() if re.fullmatch(r"threshold_\d+", n))
    text = ("Threshold-only sweep (the training-free baseline, same windows): "
            + " · ".join(f"{p}%: {v:.1f}" for p, v in pts) + ".")
    pred = [(n, r) for n, r in runs.items() if n.startswith("predicted_k")]
    for n, r in pred:
        text += (f" With predicted clusters (low-rank predictor,\nK={n.split('_k')[1]}, 40% sparse centroids, mask = "
                 f"C[label] over the unthresholded output): {r['ppl']:.0f}.")
    return para(text)


def _cell(r: dict) -> str:
    return f"{100 * r['precision']:.1f}% (d={r['density']:.2f}, F1={r['f1']:.2f})"


PAPER_PRECISION = ("Paper (Mistral-7B, WikiText-2, K=2048; gate / up / down): AWC 79.34 / 65 / 64%; BMF 70.62 / "
                   "60.79 / 48.74%; BRB-KMeans 69.57 / 59.90 / 46.74%.\n")


def precision(refs: dict) -> str:
    rep = refs["reproduce"]
    bk, ks = rep["config"]["baseline_k"], _ks(rep)
    lines = ["| method (assignment rule) | gate | up | down |", "|---|---|---|---|"]
    spec = [(f"AWC {100 * s:.0f}% sparse (active-only)", "awc", bk, s, "active_only") for s in rep["config"]["sparsities"]]
    spec += [(f"AWC 40% sparse, K={k}", "awc", k, 0.4, "active_only") for k in (ks[0], ks[-1]) if k != bk]
    for label, m, own in (("BMF", "bmf", "hamming"), ("BRB-KMeans", "brbkmeans", "hamming"),
                          ("Penalized BRB-KMeans", "penalized_brbkmeans", "penalized")):
        spec += [(f"{label} (own {'Hamming ' if own == 'hamming' else ''}rule)", m, bk, None, own),
                 (f"{label} (active-only rule)", m, bk, None, "active_only")]
    for label, m, k, s, rule in spec:
        lines.append(f"| {label} | " + " | ".join(_cell(_prec(rep, m, p, k, s, rule)) for p in SHORT) + " |")
    return "\n".join(lines) + "\n\n" + PAPER_PRECISION


def analysis(refs: dict) -> str:
    rep = refs["reproduce"]
    runs, c, bk = rep["runs"], rep["config"], rep["config"]["baseline_k"]
    awc, bmf = _prec(rep, "awc", "gate_proj", bk, 0.4), _prec(rep, "bmf", "gate_proj", bk, None, "hamming")
    holds = all(_prec(rep, "awc", p, bk, 0.4)["precision"] > _prec(rep, b, p, bk, None, "hamming")["precision"]
                for p in SHORT for b in ("bmf", "brbkmeans"))
    dense, thr = runs["dense"]["ppl"], runs["threshold_50"]["ppl"]
    eff = [v for n, r in runs.items() if n.startswith("swap_") for p, v in (r["effective_sparsity"] or {}).items()
           if p in ("gate_proj", "up_proj")]
    ks, s0 = _ks(rep), min(c["sparsities"])
    by_k = {k: _swap(rep, k, s0)["ppl"] for k in ks}
    kbest = min(by_k, key=by_k.get)
    worse = ks[-1] != kbest and by_k[ks[-1]] > by_k[kbest]
    own = [100 * _prec(rep, b, p, bk, None, "hamming")["precision"] for b in ("bmf", "brbkmeans") for p in SHORT]
    return para(
        f"**What this says.** The paper's precision ordering {'holds' if holds else 'does not hold everywhere'} at "
        f"this scale: AWC covers more of the true active set than\nthe Hamming baselines at K={bk} (gate "
        f"{100 * awc['precision']:.1f}% vs {100 * bmf['precision']:.1f}%), but at a higher centroid density "
        f"({awc['density']:.2f} vs {bmf['density']:.2f}), and by F1 the\nbaselines are "
        f"{'on par or slightly ahead' if bmf['f1'] >= awc['f1'] else 'behind'} (gate {bmf['f1']:.2f} vs "
        f"{awc['f1']:.2f}): the precision gain is largely bought with density. But a 135M-parameter\nmodel is far "
        f"more fragile than Mistral-7B: thresholding alone at 50% already raises perplexity {thr / dense:.1f}× "
        f"({dense:.1f} → {thr:.1f}; the\npaper's Mistral loses 23%), and any centroid mask on top (effective gate/up "
        f"sparsity {100 * min(eff):.0f}–{100 * max(eff):.0f}%) costs one to three\norders of magnitude, far above "
        f"the threshold-only curve at the same effective sparsity (third plot). More centroids\nhelp only mildly "
        f"({100 * s0:.0f}% sparse: {by_k[ks[0]]:.0f} at K={ks[0]} → {by_k[kbest]:.0f} at K={kbest}"
        + (f"; K={ks[-1]} is worse again, with only {c['max_rows'] // ks[-1]} sampled rows per\ncentroid" if worse
           else "") + "). The predictor recovers most of the oracle's recall (see the predictor section) but, "
        "masking the\nunthresholded output, it keeps small activations and drops a quarter of the large ones, which "
        "this model does not\nsurvive. Under the paper's active-only rule BMF/BRB-KMeans score a meaningless ~100%, "
        "because one dense centroid\ncovers every row; with their own nearest-centroid rule they score "
        f"{min(own):.0f}–{max(own):.0f}%, the comparison the plot shows.")


def walltime(refs: dict) -> str:
    rep = refs["reproduce"]
    t, runs, prec = rep["timings_s"], rep["runs"], rep["precision"]
    n_thr = sum(1 for n in runs if n == "dense" or re.fullmatch(r"threshold_\d+", n))
    n_swap = sum(1 for n in runs if n.startswith("swap_"))
    methods = {(r["method"], r["proj"], r["k"], r["sparsity"]) for r in prec}
    n_awc = sum(1 for m in methods if m[0] == "awc")
    total = sum(t.values())
    return para(f"Wall time of this run (2-core CPU, shared with other jobs most of the time): step 1 (dense, "
            f"threshold-only and the\n20–70% sweep: {n_thr} runs) {t['1_ppl_dense_threshold']:,.0f} s; step 2 "
            f"extraction {t['2_extract']:,.0f} s; step 3 clustering ({n_awc} AWC + {len(methods) - n_awc} baseline "
            f"runs) {t['3_cluster']:,.0f} s; step 4\nprecision ({len(prec)} evaluations) {t['4_precision']:,.0f} s; "
            f"step 5 centroid-swap perplexity ({n_swap} runs) {t['5_swap_ppl']:,.0f} s; the predicted-cluster run "
            f"about\n{t['6_predicted_ppl']:,.0f} s: about {total / 60:.0f} minutes in all, dominated by the "
            f"perplexity runs.")


def make_run(refs: dict) -> str:
    """The README's opening figure: what ``make run`` prints (``results_ref/run_default.json``)."""
    r = refs["run_default"]
    sp = " ".join(f"{SHORT[p]}={100 * v:.2f}%" for p, v in r["sparsity"].items())
    ds = f"dataset={r['dataset']}{' (substitute)' if 'substitute' in r['dataset'] else ''}" if r.get("dataset") else "..."
    line = (f"`ppl={r['ppl']:.4f} tokens={r['tokens']} windows={r['nsamples']} {ds} sparsity: {sp} "
            f"mlp_weight_read={r['weight_read_fraction']:.3f}`\n")
    if r.get("wall_time_s"):
        line += (f"\n(the checked-in run: {r['nsamples']} windows of {r['seqlen']} tokens in {r['wall_time_s'] / 60:.1f} "
                 f"min of wall time, as the run recorded it, on the shared 2-core machine)\n")
    return line


def all_blocks() -> dict[str, Callable[[dict], str]]:
    return {"results_setup": results_setup, "swap_ppl": swap_ppl, "sweep": sweep, "precision": precision,
            "analysis": analysis, "walltime": walltime, "make_run": make_run, "frontier": frontier,
            "frontier_qwen": lambda refs: frontier(refs, "frontier_qwen"),
            "frontier_cluster": lambda refs: frontier(refs, "frontier_cluster"),
            "frontier_cluster_qwen": lambda refs: frontier(refs, "frontier_cluster_qwen"),
            "frontier_prompt": lambda refs: frontier(refs, "frontier_prompt"),
            "frontier_quant": lambda refs: by_format_block(refs, "frontier_quant"),
            "frontier_quant_qwen": lambda refs: by_format_block(refs, "frontier_quant_qwen"),
            "quant_headline": quant_headline,
            "predictor_table": predictor_table, "sparse_mlp_table": sparse_mlp_table, **ARTIFACT_BLOCKS,
            **{name: decode_block(name) for name in DECODE_REFS}, **BENCH_BLOCKS,
            "headline": headline, "cluster_findings": cluster_findings, "half_read": half_read,
            "env_table": lambda refs: markdown_table() + "\n"}


# ---------------------------------------------------------------------------------------------
# rewriting
# ---------------------------------------------------------------------------------------------
def render(text: str, refs: dict, where: str = "text") -> tuple[str, list[str]]:
    """-> (text with every marked block regenerated, names of the blocks that changed)."""
    blocks = all_blocks()
    opened = re.findall(r"<!-- report:([\w-]+) -->", text)
    closed = re.findall(r"<!-- /report:([\w-]+) -->", text)
    if sorted(opened) != sorted(closed):
        raise ReportError(f"{where}: unbalanced report markers (open {opened}, close {closed})")
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in blocks:
            raise ReportError(f"{where}: unknown report block '{name}' (known: {', '.join(sorted(blocks))})")
        body = blocks[name](refs)
        if body != m.group("body"):
            changed.append(name)
        return f"<!-- report:{name} -->\n{body}<!-- /report:{name} -->"

    return MARK.sub(sub, text), changed


def run(root: Optional[Path] = None, check: bool = False, ref_dir: Optional[Path] = None) -> dict[str, list[str]]:
    """Regenerate (or with ``check`` only compare) the marked blocks of README.md, ARTIFACT.md and docs/*.md
    under ``root``."""
    root = Path(root) if root else paths.project_root()
    refs = load_refs(ref_dir or paths.results_ref_dir(root))
    out: dict[str, list[str]] = {}
    for name in target_files(root):
        f = root / name
        if not f.is_file():
            continue
        new, changed = render(f.read_text(), refs, where=name)
        out[name] = changed
        if changed and not check:
            atomic_write_text(f, new)
    return out


FRONTIER_REFS = tuple(n for n in REF_FILES if n.startswith("frontier"))


def _bench_args(args: list) -> None:
    if len(args) > 2:
        raise ReportError("takes JSON [NAME]")
    if len(args) == 2 and args[1] not in BENCH_REFS:
        raise ReportError(f"NAME must be one of {', '.join(BENCH_REFS)}, got {args[1]!r}")


def _ref_name(names: tuple[str, ...]) -> Callable[[list], None]:
    """A check of ``[FILE, NAME]`` pairs: NAME one of ``names``."""
    def check(pair: list) -> None:
        if pair[1] not in names:
            raise ReportError(f"NAME must be one of {', '.join(names)}, got {pair[1]!r}")
    return check


@dataclass
class ReportConfig:
    """Options of ``python -m awq.report``."""

    check: bool = opt(False, help="rewrite nothing; exit 1 naming every stale block")
    root: Optional[Path] = opt(None, help="project root holding README.md / ARTIFACT.md (default: this checkout or "
                               "$AWQ_PROJECT_ROOT)", kind="in_dir")
    results: Optional[Path] = opt(None, help="summaries directory (default <root>/results_ref)", kind="in_dir")
    import_reproduce: Optional[Path] = opt(None, metavar="DIR", kind="in_dir",
                                           help="first copy DIR/summary.json (a fresh `make reproduce`) into "
                                           "results_ref/reproduce.json")
    import_frontier: Optional[list[str]] = opt(None, nargs=2, metavar=("CSV", "NAME"), kind=("in_file", None),
                                               max_mb=256, check=_ref_name(FRONTIER_REFS),
                                               help="first copy a frontier.csv into results_ref/NAME.json (NAME: "
                                               + ", ".join(FRONTIER_REFS) + ")")
    merge_frontier_quality: Optional[list[str]] = opt(None, nargs=2, metavar=("CSV", "NAME"),
                                                      kind=("in_file", None), max_mb=256,
                                                      check=_ref_name(FRONTIER_REFS),
                                                      help="first add kl/top1 of a frontier.csv to the points of "
                                                      "results_ref/NAME.json, keeping their decode speed where the "
                                                      "PPL agrees (NAME: " + ", ".join(FRONTIER_REFS) + ")")
    import_sparse_mlp: Optional[Path] = opt(None, metavar="JSON", kind="in_file", max_mb=256,
                                            help="first copy a `bench/bench_sparse_mlp.py --output JSON` run into "
                                            "results_ref/sparse_mlp.json")
    import_predictor: Optional[Path] = opt(None, metavar="DIR", kind="in_dir",
                                           help="first copy a `python -m awq.artifact --predictor` run (DIR/eval.json "
                                           "+ DIR/timings.json, default results/artifact_full/predictor) into "
                                           "results_ref/predictor.json")
    import_decode: Optional[list[str]] = opt(None, nargs=2, metavar=("JSON", "NAME"), kind=("in_file", None),
                                             max_mb=256, check=_ref_name(DECODE_REFS),
                                             help="first copy a `bench/bench_decode.py --output JSON` run into "
                                             "results_ref/NAME.json (NAME: " + ", ".join(DECODE_REFS) + ")")
    import_bench: Optional[list[str]] = opt(None, nargs="+", metavar="JSON [NAME]", kind=("in_file", None),
                                            max_mb=256, check=_bench_args,
                                            help="first copy a `bench/<script>.py --output JSON` run into "
                                            "results_ref/NAME.json (NAME: " + ", ".join(BENCH_REFS) + "; default the "
                                            "bench's name)")
    import_run_default: Optional[Path] = opt(None, metavar="JSON", kind="in_file", max_mb=256,
                                             help="first copy `make run`'s results JSON (default "
                                             "results/run_default.json) into results_ref/run_default.json (the "
                                             "README's first figure)")
    command: Optional[str] = opt(None, help="with one --import_*: the command that produced the run, as typed "
                                 "(recorded in its provenance; default: rebuilt from what the run recorded)")


def cli(argv: Optional[list[str]] = None) -> int:
    p = build_config_parser(ReportConfig, prog="python -m awq.report", description=__doc__.split("\n\n")[0])
    try:
        a, _ = parse_config(ReportConfig, argv, p)
        imports = [k for k in ("import_reproduce", "import_frontier", "merge_frontier_quality", "import_sparse_mlp",
                               "import_predictor", "import_decode", "import_bench", "import_run_default")
                   if getattr(a, k)]
        if a.command is not None and len(imports) != 1:
            raise ConfigError("--command: goes with exactly one --import_* option")
    except ConfigError as e:
        fail(str(e))
        return 2

    setup_logging("INFO", fmt="%(levelname)s %(name)s: %(message)s")
    if a.results is None and a.root is not None:
        a.results = paths.results_ref_dir(a.root)
    try:
        cmd = a.command
        if a.import_reproduce:
            log.info("imported %s", import_reproduce(a.import_reproduce, a.results, cmd))
        if a.import_frontier:
            log.info("imported %s", import_frontier(Path(a.import_frontier[0]), a.import_frontier[1], a.results, cmd))
        if a.merge_frontier_quality:
            csv_path, name = a.merge_frontier_quality
            log.info("merged kl/top1 into %s: %s", name, merge_frontier_quality(Path(csv_path), name, a.results, cmd))
        if a.import_sparse_mlp:
            log.info("imported %s", import_sparse_mlp(a.import_sparse_mlp, a.results, cmd))
        if a.import_predictor:
            log.info("imported %s", import_predictor(a.import_predictor, a.results, cmd))
        if a.import_decode:
            log.info("imported %s", import_decode(Path(a.import_decode[0]), a.import_decode[1], a.results, cmd))
        if a.import_bench:
            log.info("imported %s", import_bench(Path(a.import_bench[0]), (a.import_bench[1:] or [None])[0],
                                                 a.results, cmd))
        if a.import_run_default:
            log.info("imported %s", import_run_default(a.import_run_default, a.results, cmd))
        res = run(a.root, check=a.check, ref_dir=a.results)
        ref_dir = a.results or paths.results_ref_dir(a.root)
        missing = provenance.problems(ref_dir) if a.check else []
    except (ReportError, RunOutputError, KeyError, OSError) as e:
        fail(str(e) if not isinstance(e, KeyError) else f"results file lacks {e}")
        return 2
    stale = [f"{f}: {n}" for f, names in res.items() for n in names]
    if a.check:
        if stale:
            print("stale report blocks (rerun `python -m awq.report`): " + "; ".join(stale), file=sys.stderr)
        if missing:
            print("results files without their provenance (import them with `python -m awq.report --import_*`): "
                  + "; ".join(missing), file=sys.stderr)
        if stale or missing:
            return 1
        print(f"report blocks up to date: {', '.join(res) or 'no targets'}")
        return 0
    print(f"rewrote {len(stale)} block(s)" + (": " + "; ".join(stale) if stale else "") + f" in {', '.join(res)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
