"""Outputs of ``python -m awq.frontier``: ``frontier.csv``, a markdown table and the frontier plot.

The plot has four panels over the same x axis (MLP weight bytes read per token): perplexity in full (log
scale), perplexity zoomed on the region users care about (up to ``ZOOM`` x dense, linear), the mean KL
divergence from dense (log scale) and the top-1 agreement with dense."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

from awq.experiments.plots import _plt
from awq.util.io import atomic_path, atomic_write_text

CSV_COLUMNS = ("model", "method", "param", "weight_read_fraction", "ppl", "kl", "top1", "tokens", "realizable",
               "decode_speedup", "roofline", "protocol", "weights", "bytes_per_token")
FORMAT_ORDER = ("f32", "q8_0", "q4_1", "q4_0")
ZOOM = 3.0  # the zoomed PPL panel shows up to this multiple of dense


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def sort_points(points: list[dict], order: Optional[list[str]] = None) -> list[dict]:
    rank = {m: i for i, m in enumerate(order or [])}
    fmt = {f: i for i, f in enumerate(FORMAT_ORDER)}
    return sorted(points, key=lambda p: (fmt.get(p.get("weights", "f32"), len(fmt)), rank.get(p["method"], len(rank)),
                                         p["method"], p["param"]))


def write_csv(points: list[dict], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in points:
        w.writerow([_cell(p.get(c)) for c in CSV_COLUMNS])
    return atomic_write_text(path, buf.getvalue(), "frontier CSV")


def markdown(points: list[dict]) -> str:
    dense = next((p["ppl"] for p in points if p["method"] == "dense" and p.get("weights", "f32") == "f32"), None)
    lines = ["| method | weights | density | weight read / MLP | of which extra | MB/token | PPL | vs F32 dense | KL vs dense "
             "| top-1 = dense | realizable | decode speedup | roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        rel = f"{p['ppl'] / dense:.2f}x" if dense else "–"
        mb = "–" if p.get("bytes_per_token") is None else f"{p['bytes_per_token'] / 1e6:.1f}"
        sp = "–" if p.get("decode_speedup") is None else f"{p['decode_speedup']:.2f}x"
        if p.get("decode_status"):
            r = p.get("decode_measured_ratio")
            st = p["decode_status"].replace("|", "\\|")  # a '|' in a reason would split the table cell
            sp = st if r is None else f"{st} ({r:.2f}x)"
        rf = "–" if p.get("roofline") is None else f"{p['roofline']:.2f}x"
        kl = "–" if p.get("kl") is None else f"{p['kl']:.4f}"
        t1 = "–" if p.get("top1") is None else f"{100 * p['top1']:.1f}%"
        lines.append(f"| {p['method']} | {p.get('weights', 'f32')} | {p['param']:.2f} | {p['weight_read_fraction']:.3f} | "
                     f"{p.get('extra', 0.0):.3f} | {mb} | {p['ppl']:.2f} | {rel} | {kl} | {t1} | {'yes' if p['realizable'] else 'no (oracle)'} | {sp} | {rf} |")
    return "\n".join(lines) + "\n"


def write_markdown(points: list[dict], path: Path, header: str = "") -> Path:
    return atomic_write_text(path, header + markdown(points), "frontier table")


def plot(points: list[dict], path: Path, model: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), sharex=True)
    (ax_ppl, ax_zoom), (ax_kl, ax_top1) = axes
    methods = []
    for p in points:
        if p["method"] not in methods:
            methods.append(p["method"])
    cmap = plt.get_cmap("tab20")
    dense = next((p for p in points if p["method"] == "dense"), None)
    for k, m in enumerate(methods):
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["weight_read_fraction"])
        if m == "dense":
            for ax in (ax_ppl, ax_zoom):
                ax.axhline(pts[0]["ppl"], color="black", ls="--", lw=1, label=f"dense ({pts[0]['ppl']:.2f})")
            ax_top1.axhline(100.0, color="black", ls="--", lw=1)
            continue
        oracle = not pts[0]["realizable"]
        col = cmap(k % 20)
        style = dict(marker="o", color=col, markerfacecolor="none" if oracle else col, ls=":" if oracle else "-")
        label = f"{m} (oracle: needs the true mask)" if oracle else m
        x = [p["weight_read_fraction"] for p in pts]
        ax_ppl.plot(x, [p["ppl"] for p in pts], label=label, **style)
        ax_zoom.plot(x, [p["ppl"] for p in pts], **style)
        q = [p for p in pts if p.get("kl") is not None and p.get("top1") is not None]
        if q:
            xq = [p["weight_read_fraction"] for p in q]
            ax_kl.plot(xq, [max(p["kl"], 1e-6) for p in q], **style)
            ax_top1.plot(xq, [100 * p["top1"] for p in q], **style)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity (log scale)")
    ax_ppl.set_title("perplexity")
    if dense is not None:
        ok = [p["ppl"] for p in points if finite(p["ppl"])]
        ax_zoom.set_ylim(0.97 * min(ok + [dense["ppl"]]), ZOOM * dense["ppl"])
        ax_zoom.set_title(f"perplexity up to {ZOOM:g}x dense")
    ax_zoom.set_ylabel("perplexity")
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("mean KL(dense || method), nats (log scale)")
    ax_kl.set_title("KL divergence from dense")
    ax_top1.set_ylabel("top-1 token = dense's (% of tokens)")
    ax_top1.set_title("top-1 agreement with dense")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("MLP weight bytes read per token / MLP weight bytes (batch-1 decode)")
    fig.legend(*ax_ppl.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(0.995, 0.5))
    fig.suptitle(f"Sparsity frontier: {model}")
    fig.tight_layout()
    with atomic_path(path, "frontier plot") as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bytes(points: list[dict], path: Path, model: str) -> Path:
    """Perplexity against the whole step's weight bytes per token, one colour per method, one marker per weight
    format: at equal bytes, a lower-bit dense model or a higher-bit sparse one?"""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods, fmts = [], []
    for p in points:
        if p["method"] not in methods:
            methods.append(p["method"])
        if p.get("weights", "f32") not in fmts:
            fmts.append(p.get("weights", "f32"))
    marks = dict(zip(FORMAT_ORDER, "osD^"))
    cmap = plt.get_cmap("tab20")
    for k, m in enumerate(methods):
        col = "black" if m == "dense" else cmap(k % 20)
        for f in fmts:
            pts = sorted((p for p in points if p["method"] == m and p.get("weights", "f32") == f
                          and p.get("bytes_per_token") is not None), key=lambda p: p["bytes_per_token"])
            if not pts:
                continue
            oracle = not pts[0]["realizable"]
            ax.plot([p["bytes_per_token"] / 1e6 for p in pts], [p["ppl"] for p in pts], marker=marks.get(f, "x"),
                    color=col, markerfacecolor="none" if oracle else col, ls=":" if oracle else "-",
                    label=f"{m} {f}" + (" (oracle)" if oracle else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight MB read per token, whole step (attention + LM head + MLP x read fraction)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Frontier by weight format: {model} (markers: " + ", ".join(f"{marks.get(f, 'x')} {f}" for f in fmts)
                 + ")", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    with atomic_path(path, "frontier plot") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def finite(v: float) -> bool:
    return v is not None and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))
