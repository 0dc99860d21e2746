"""Plots of a reproduce summary: precision by method (Fig. 4a), PPL vs K (Fig. 4b), PPL vs sparsity."""
from __future__ import annotations

from pathlib import Path

from awq.load.arch import PROJS
from awq.util.io import atomic_path

LABELS = {"awc": "AWC (ours, paper's method)", "bmf": "BMF", "brbkmeans": "BRB-KMeans",
          "penalized_brbkmeans": "Penalized BRB-KMeans"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_path(path, "plot") as tmp:  # never a truncated PNG
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def plot_precision(summary: dict, path: Path) -> Path:
    plt = _plt()
    prec = summary["precision"]
    bk = summary["config"]["baseline_k"]
    sp = max(summary["config"]["sparsities"])
    chosen = {}
    for r in prec:
        if r["k"] != bk:
            continue
        if r["method"] == "awc" and abs((r["sparsity"] or 0) - sp) > 1e-9:
            continue
        # baselines are shown with their own nearest-centroid rule when it was evaluated
        if (r["method"], r["proj"]) in chosen and r.get("rule", "active_only") == "active_only":
            continue
        chosen[(r["method"], r["proj"])] = r
    if not chosen:  # baseline K was above the data: fall back to the largest K present
        bk = max(r["k"] for r in prec)
        chosen = {(r["method"], r["proj"]): r for r in prec if r["k"] == bk and
                  (r["method"] != "awc" or abs((r["sparsity"] or 0) - sp) < 1e-9)}
    methods = [m for m in LABELS if any(key[0] == m for key in chosen)]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs, ys, dens = [], [], []
        for j, p in enumerate(PROJS):
            r = chosen.get((m, p))
            if r:
                xs.append(j + (i - (len(methods) - 1) / 2) * w)
                ys.append(100 * r["precision"])
                dens.append(r["density"])
        rule = next((chosen[(m, p)].get("rule", "active_only") for p in PROJS if (m, p) in chosen), "active_only")
        bars = ax.bar(xs, ys, width=w, label=LABELS[m] + (f" @ {100 * sp:.0f}% sparse" if m == "awc" else "")
                      + ("" if rule == "active_only" else f" ({rule} assignment)"))
        for b, d in zip(bars, dens):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"d={d:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(3), [p.replace("_proj", "") for p in PROJS])
    ax.set_ylabel("clustering precision (% of true active neurons covered)")
    ax.set_ylim(0, 110)
    ax.set_title(f"Clustering precision at K={bk} (d = centroid density)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _ppl_runs(summary: dict):
    runs = summary["runs"]
    swaps = {}
    for name, r in runs.items():
        if name.startswith("swap_awc_k"):
            k = int(name.split("_k")[1].split("_")[0])
            s = int(name.split("_s")[-1]) / 100
            swaps[(k, s)] = r
    return runs, swaps


def plot_ppl_vs_k(summary: dict, path: Path) -> Path:
    plt = _plt()
    runs, swaps = _ppl_runs(summary)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in sorted({s for _, s in swaps}):
        ks = sorted(k for k, ss in swaps if ss == s)
        ax.plot(ks, [swaps[(k, s)]["ppl"] for k in ks], marker="o", label=f"AWC centroids, {100 * s:.0f}% sparse")
    for name, r in runs.items():
        if name.startswith("predicted_"):
            k = int(name.split("_k")[-1].split("_")[0])
            ax.scatter([k], [r["ppl"]], marker="*", s=150, color="red", zorder=5,
                       label=f"predicted clusters (low-rank predictor), K={k}")
    if "threshold_50" in runs:
        ax.axhline(runs["threshold_50"]["ppl"], color="k", ls="--", label="threshold-only (50%)")
    if "dense" in runs:
        ax.axhline(runs["dense"]["ppl"], color="gray", ls=":", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of centroids K (per projection, shared by all layers)")
    ax.set_ylabel("perplexity (log scale)")
    any_run = next(iter(runs.values()), None)
    corpus = f"{any_run['dataset']} ({any_run['tokens']} tokens)" if any_run else ""
    ax.set_title(f"Centroid-swap (oracle) perplexity vs K — {corpus}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def plot_ppl_vs_sparsity(summary: dict, path: Path) -> Path:
    plt = _plt()
    runs, swaps = _ppl_runs(summary)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    thr = sorted(((r["measured_sparsity"]["gate_proj"] + r["measured_sparsity"]["up_proj"]) / 2 * 100, r["ppl"])
                 for n, r in runs.items() if n.startswith("threshold_"))
    pts = thr
    if "dense" in runs:
        pts = [(100 * (runs["dense"]["measured_sparsity"]["gate_proj"] + runs["dense"]["measured_sparsity"]["up_proj"])
                / 2, runs["dense"]["ppl"])] + thr
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--o", label="dense + thresholds only (20..70%)")
    for s in sorted({s for _, s in swaps}):
        xs, ys, ks = [], [], []
        for (k, ss), r in sorted(swaps.items()):
            eff = r.get("effective_sparsity") or {}
            if ss != s or "gate_proj" not in eff or "up_proj" not in eff:
                continue
            xs.append(100 * (eff["gate_proj"] + eff["up_proj"]) / 2)
            ys.append(r["ppl"])
            ks.append(k)
        ax.plot(xs, ys, marker="o", label=f"threshold 50% + AWC centroids {100 * s:.0f}% sparse")
        for x, y, k in zip(xs, ys, ks):
            ax.annotate(f"K={k}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("effective sparsity of the gate/up outputs (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity vs effective MLP sparsity", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def plot_all(summary: dict, plots_dir: Path) -> list[Path]:
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    out = []
    if summary["precision"]:
        out.append(plot_precision(summary, plots_dir / "fig4a_precision_by_method.png"))
    out.append(plot_ppl_vs_k(summary, plots_dir / "fig4b_ppl_vs_k.png"))
    out.append(plot_ppl_vs_sparsity(summary, plots_dir / "ppl_vs_effective_sparsity.png"))
    return out
