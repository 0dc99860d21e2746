"""Generated summaries across results files: the README's headline table and the cluster-method findings.

* ``headline`` (README.md): per method, its best point at about half the MLP weights read per token on both
  models (``results_ref/frontier.json``, ``frontier_qwen.json``), and the fastest decode row at that budget
  against llama.cpp (``decode_smollm2.json``, ``decode_qwen.json``).
* ``quant_headline`` (README.md) and ``frontier_quant`` (docs/frontier.md): the frontier at several weight formats
  (``frontier_quant.json``, ``frontier_quant_qwen.json``): at the bytes per token of the lowest-bit dense model,
  the best sparse point of a higher-bit format, and the sparse points at that format.
* ``cluster_findings`` (docs/frontier.md): what the cluster-method frontiers (``frontier_cluster.json``,
  ``frontier_cluster_qwen.json``) say, each statement computed from their points (a statement whose points are
  missing is left out).
"""
from __future__ import annotations

from typing import Optional

from awq.report.decode import fastest_half
from awq.report.decode_quant import speed_sentence

HALF, THIRD = 0.51, 0.31  # read budgets 0.5 and 0.3, +0.01 as the frontier tables
HEADLINE = ("dense", "paper", "teal", "wina", "cats", "larosa", "teal_greedy", "larosa_folded", "scap", "rsparse",
            "lowbit_rank", "neuron_predictor", "cluster_thresh", "cluster_lowbit", "cluster_predicted", "cluster_oracle",
            "cluster_ideal_oracle")
MODELS = (("frontier", "SmolLM2-135M"), ("frontier_qwen", "Qwen2.5-Coder-0.5B"))


def best_at(pts: list[dict], method: str, budget: float = HALF) -> Optional[dict]:
    """The method's lowest-PPL point reading at most ``budget``; if none does, its lowest-read point
    (the paper's thresholds: the 50% file, the shipped operating point)."""
    qs = [q for q in pts if q["method"] == method]
    if not qs:
        return None
    if method == "paper":
        return next((q for q in qs if abs(q["param"] - 0.5) < 1e-9), min(qs, key=lambda q: q["weight_read_fraction"]))
    ok = [q for q in qs if q["weight_read_fraction"] <= budget]
    return min(ok, key=lambda q: q["ppl"]) if ok else min(qs, key=lambda q: q["weight_read_fraction"])


def headline(refs: dict) -> str:
    models = [(k, name) for k, name in MODELS if k in refs]
    lines = ["| method |" + "".join(f" {n}: MLP weight read | PPL |" for _, n in models),
             "|---|" + "---|---|" * len(models)]
    for m in HEADLINE:
        cells, any_pt, oracle = [], False, False
        for k, _ in models:
            q = best_at(refs[k]["points"], m)
            if q is None:
                cells += ["—", "—"]
                continue
            any_pt, oracle = True, oracle or not q["realizable"]
            cells += [f"{q['weight_read_fraction']:.2f}" + (f" (density {q['param']:g})" if m != "dense" else ""),
                      f"{q['ppl']:,.1f}"]
        if any_pt:
            lines.append(f"| `{m}`{' (oracle)' if oracle else ''} | " + " | ".join(cells) + " |")
    windows = ", ".join(f"{n} {refs[k]['fingerprint'].get('nsamples', '?')}" for k, n in models)
    out = "\n".join(lines) + f"\n\nTest windows of 2048 tokens per point: {windows}."
    speed = []
    for k, name in (("decode_smollm2", "SmolLM2-135M"), ("decode_qwen", "Qwen2.5-Coder-0.5B")):
        half = fastest_half(refs[k]) if k in refs else None
        if half:
            n, t, f = half
            speed.append(f"{name} `{n}` {1 / t:.1f} tok/s, {f / t:.2f}× llama.cpp F32 on the same fp32 weights")
    if speed:
        out += (" Batch-1 decode, fastest row reading ≤ 0.5 of the MLP weights (`bench/bench_decode.py`, 2 threads): "
                + "; ".join(speed) + ".")
    return out + "\n"


def _best_realizable(pts: list[dict], budget: float, cluster: Optional[bool] = None) -> Optional[dict]:
    ok = [q for q in pts if q["realizable"] and q["method"] != "dense" and q["weight_read_fraction"] <= budget
          and (cluster is None or q["method"].startswith("cluster_") == cluster)]
    return min(ok, key=lambda q: q["ppl"]) if ok else None


def _pt(pts: list[dict], method: str, param: float) -> Optional[dict]:
    return next((q for q in pts if q["method"] == method and abs(q["param"] - param) < 1e-9), None)


def _near(pts: list[dict], method: str, read: float) -> Optional[dict]:
    qs = [q for q in pts if q["method"] == method]
    return min(qs, key=lambda q: abs(q["weight_read_fraction"] - read)) if qs else None


def _p(q: dict) -> str:
    return f"{q['ppl']:,.1f}"


def _model_findings(pts: list[dict], name: str) -> list[str]:
    out = []
    dense = next((q["ppl"] for q in pts if q["method"] == "dense"), None)
    c, o = _best_realizable(pts, 0.55, True), _best_realizable(pts, 0.55, False)
    if c and o:  # issue 21's bar: a cluster-based realizable point within 1.1x of the best at <= 0.55 read
        out.append(f"{name}, ≤ 0.55 read: best realizable cluster point `{c['method']}` PPL {_p(c)} is "
                   f"{c['ppl'] / o['ppl']:.2f}x the best realizable point (`{o['method']}` PPL {_p(o)}, "
                   f"{o['weight_read_fraction']:.3f} read" + (f", {o['ppl'] / dense:.2f}x dense" if dense else "") + ").")
    for budget, label in ((HALF, "0.5"), (THIRD, "0.3")):
        c, o = _best_realizable(pts, budget, True), _best_realizable(pts, budget, False)
        if c and o:
            rel = "better than" if c["ppl"] < o["ppl"] else "worse than"
            out.append(f"{name}, ≤ {label} read: best realizable cluster point `{c['method']}` PPL {_p(c)} "
                       f"({c['weight_read_fraction']:.3f} read), {rel} the best other method `{o['method']}` PPL "
                       f"{_p(o)} ({o['weight_read_fraction']:.3f}).")
    ideal = [q for q in (_pt(pts, "cluster_ideal_oracle", 0.5), _pt(pts, "cluster_ideal_oracle", 0.3)) if q]
    if ideal and dense:
        out.append(f"{name}, neuron-mask bound (`cluster_ideal_oracle`: per-token |h| threshold, each projection "
                   "read only where kept): " + ", ".join(f"PPL {_p(q)} at {q['weight_read_fraction']:.2f} read"
                                                         for q in ideal) + f" (dense {dense:,.1f}).")
    no, io = _pt(pts, "cluster_neuron_oracle", 0.5), _pt(pts, "cluster_ideal_oracle", 0.5)
    if no and io:
        out.append(f"{name}, the codebook's cost: the best of the K = 64 centroids per layer, picked by the oracle "
                   f"(`cluster_neuron_oracle`), gives PPL {_p(no)} at 0.5 where the per-token ideal gives {_p(io)}.")
    pairs = [(r, o) for r, o in (("cluster_neuron", "cluster_neuron_oracle"), ("cluster_thresh", "cluster_thresh_oracle"),
                                 ("cluster_hthresh", "cluster_hthresh_oracle"))
             if _pt(pts, r, 0.5) and _pt(pts, o, 0.5)]
    if pairs:
        out.append(f"{name}, the router's cost at 0.5 (routed − oracle pick): " + ", ".join(
            f"`{r}` {_pt(pts, r, 0.5)['ppl'] - _pt(pts, o, 0.5)['ppl']:+,.1f} PPL" for r, o in pairs) + ".")
    base_o, base_r = _pt(pts, "cluster_neuron_oracle", 0.5), _pt(pts, "cluster_neuron", 0.5)
    abl = [(m, b) for m, b in (("cluster_pooled_oracle", base_o), ("cluster_binary_oracle", base_o),
                               ("cluster_hot", base_r), ("cluster_union2", base_r), ("cluster_union4", base_r))
           if b and _pt(pts, m, 0.5)]
    if abl:
        out.append(f"{name}, ablations at 0.5 against their base (`cluster_neuron_oracle` / `cluster_neuron`): " + ", ".join(
            f"`{m}` {_p(_pt(pts, m, 0.5))} vs {_p(b)} ({_pt(pts, m, 0.5)['weight_read_fraction']:.2f} read)"
            for m, b in abl) + ".")
    ks = [(k, _near(pts, m, 0.5)) for k, m in ((64, "cluster_thresh"), (128, "cluster_thresh_k128"),
                                               (256, "cluster_thresh_k256"))]
    ks = [(k, q) for k, q in ks if q]
    if len(ks) > 1:
        out.append(f"{name}, K sweep of `cluster_thresh` at equal total read (router included): " + " → ".join(
            f"K={k}: {_p(q)} ({q['weight_read_fraction']:.3f})" for k, q in ks) + "; with the oracle pick: "
            + ", ".join(f"`{m}` {_p(a)} → {_p(b)} (K=64 → 256)" for m in ("cluster_neuron_oracle", "cluster_thresh_oracle")
                        for a, b in [(_pt(pts, m, 0.5), _near(pts, f"{m}_k256", 0.5))] if a and b) + ".")
    return out


def _q(q: dict) -> str:
    return (f"`{q['method']}` (density {q['param']:g}, {q['weight_read_fraction']:.3f} read) PPL {_p(q)}"
            + (f", KL {q['kl']:.3f}, top-1 {100 * q['top1']:.0f}%" if q.get("kl") is not None else ""))


HALF_READ = (("frontier", "SmolLM2-135M", "standard"), ("frontier_qwen", "Qwen2.5-Coder-0.5B", "standard"),
             ("frontier_prompt", "SmolLM2-135M", "prompt"))


def half_read(refs: dict) -> str:
    """Issue 21's bars, computed from the frontier files: the best realizable point at <= 0.50 of the MLP weights
    read against 1.25x dense, and the best cluster-based one at <= 0.55 against 1.1x that best."""
    items = []
    for key, name, proto in HALF_READ:
        if key not in refs:
            continue
        pts = refs[key]["points"]
        dense = next((q["ppl"] for q in pts if q["method"] == "dense"), None)
        best = _best_realizable(pts, 0.50)
        if not (dense and best):
            continue
        tag = "standard protocol" if proto == "standard" else f"protocol {pts[0].get('protocol', 'prompt')}"
        line = (f"{name} ({tag}, dense PPL {dense:,.2f}): best realizable at ≤ 0.50 read {_q(best)} = "
                f"{best['ppl'] / dense:.2f}x dense ({'within' if best['ppl'] <= 1.25 * dense else 'above'} 1.25x)")
        c = min((q for q in pts if q["realizable"] and q["weight_read_fraction"] <= 0.55
                 and (q["method"].startswith("cluster_") or "centroid" in q["method"])),
                key=lambda q: q["ppl"], default=None)
        b55 = _best_realizable(pts, 0.55)
        if c and b55:
            line += (f"; best cluster-based at ≤ 0.55 read {_q(c)} = {c['ppl'] / b55['ppl']:.2f}x the best there "
                     f"(`{b55['method']}`; {'within' if c['ppl'] <= 1.1 * b55['ppl'] else 'above'} 1.1x)")
        lar = _near(pts, "larosa", 0.5)
        fold = _near(pts, "larosa_folded", 0.5)
        if lar and fold:
            line += (f"; LaRoSA with its rotation read every step {_q(lar)}, folded into the weights {_q(fold)}")
        items.append(line + ".")
    return "".join(f"* {s}\n" for s in items) or "No frontier checked in.\n"


def cluster_findings(refs: dict) -> str:
    items = []
    for key, name in (("frontier_cluster", "SmolLM2-135M"), ("frontier_cluster_qwen", "Qwen2.5-Coder-0.5B")):
        if key in refs:
            items += _model_findings(refs[key]["points"], name)
    return "".join(f"* {s}\n" for s in items) or "No cluster frontier checked in.\n"


QUANT_MODELS = (("frontier_quant", "SmolLM2-135M"), ("frontier_quant_qwen", "Qwen2.5-Coder-0.5B"))


def _fmt(q: dict) -> str:
    return str(q.get("weights", "f32")).upper()


def quant_sentence(points: list[dict], name: str) -> Optional[str]:
    """At the weight bytes per token of the lowest-byte dense format: the best realizable sparse point of another
    format reading no more, and the best sparse point at that format reading at most half the MLP weights; None
    for a run with fewer than two dense formats."""
    pts = [q for q in points if q["realizable"] and q.get("bytes_per_token") is not None]
    dense = [q for q in pts if q["method"] == "dense"]
    if len({_fmt(q) for q in dense}) < 2:
        return None
    low = min(dense, key=lambda q: q["bytes_per_token"])
    mb = low["bytes_per_token"] / 1e6
    out = f"{name}: dense {_fmt(low)} reads {mb:.1f} MB of weights per token at PPL {low['ppl']:.2f}"
    rivals = [q for q in pts if q["method"] != "dense" and _fmt(q) != _fmt(low)
              and q["bytes_per_token"] <= low["bytes_per_token"]]
    if rivals:
        b = min(rivals, key=lambda q: q["ppl"])
        out += (f"; the best sparse point of a higher-bit format reading no more, `{b['method']}` d={b['param']:g} at "
                f"{_fmt(b)} ({b['bytes_per_token'] / 1e6:.1f} MB), has PPL {b['ppl']:.2f}, "
                + ("better" if b["ppl"] < low["ppl"] else "worse"))
    else:
        out += "; no sparse point of a higher-bit format reads that little"
    same = [q for q in pts if q["method"] != "dense" and _fmt(q) == _fmt(low) and q["weight_read_fraction"] <= HALF]
    if same:
        s = min(same, key=lambda q: q["ppl"])
        out += (f"; sparse at {_fmt(low)} itself, `{s['method']}` d={s['param']:g} reads {s['bytes_per_token'] / 1e6:.1f}"
                f" MB at PPL {s['ppl']:.2f} ({s['ppl'] / low['ppl']:.2f}x its dense)")
    return out + "."


def quant_headline(refs: dict) -> str:
    """The README's sentence on the quantised frontier (one clause per model with a run)."""
    parts = [t for k, n in QUANT_MODELS if k in refs and (t := quant_sentence(refs[k]["points"], n))]
    if not parts:
        return ("No quantised frontier checked in yet: `python -m awq.frontier --weights q8_0,q4_1 ...`, then "
                "`python -m awq.report --import_frontier CSV frontier_quant`.\n")
    return ("At equal weight bytes per token (frontier at Q8_0 and Q4_1): " + " ".join(parts) + "\n\n"
            + speed_sentence(refs))
