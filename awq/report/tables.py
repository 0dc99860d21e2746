"""Generated tables of the beyond-the-paper results: the cluster predictor, the sparse MLP speedup and the frontiers.

Blocks ``predictor_table`` (from ``results_ref/predictor.json``, written by ``python -m awq.report
--import_predictor``), ``sparse_mlp_table`` (from ``results_ref/sparse_mlp.json``, ``--import_sparse_mlp``) and
``frontier`` (one table per ``results_ref/frontier*.json``),
registered in :func:`awq.report.generate.all_blocks`.  A speedup the bench flagged as above its roofline is shown
as a measurement error, never as a speedup.
"""
from __future__ import annotations

SHORT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _t(sec) -> str:
    return "—" if sec is None else (f"{sec:.0f} s" if sec < 120 else f"{sec / 60:.1f} min")


def predictor_table(refs: dict) -> str:
    pr = refs["predictor"]
    k, per = pr.get("topk", 5), pr["per_proj"]
    cfg = pr.get("config", {})
    ks = sorted(set((pr["k"] if isinstance(pr["k"], dict) else {"": pr["k"]}).values()))
    train = cfg.get("train_store", {})
    test = cfg.get("test_store", {})
    tr_w = (train.get("tokens") or 0) // (train.get("seqlen") or 2048)
    te_w = (test.get("tokens") or 0) // (train.get("seqlen") or 2048)
    times = pr.get("timings_s") or {}
    cmd = pr.get("command", "python -m awq.predictor evaluate")
    head = (f"Measured with `{cmd}` (train store: {tr_w} windows of the "
            f"train part; test store: {te_w} windows of the test part; AWC centroids K={'/'.join(map(str, ks))}, 40% "
            f"sparse, clustered on the train store; rank {pr['rank']}, {100 * pr['mac_fraction']:.2f}% of the MLP's "
            f"MACs, {100 * pr['param_fraction']:.2f}% of its parameters"
            + (f"; training {_t(times.get('train'))}, the whole chain {_t(pr.get('seconds'))}" if times else "")
            + (" on 2 cores shared with other jobs" if pr.get("notes") else "") + "):\n\n")
    lines = [f"| proj | top-1 (majority) | top-{k} | recall: predicted / best of top-{k} / oracle / majority class |",
             "|---|---|---|---|"]
    gaps = []
    for p, m in per.items():
        lines.append(f"| {SHORT.get(p, p)} | {100 * m['top1']:.1f}% ({100 * m['top1_majority']:.1f}%) | "
                     f"{100 * m[f'top{k}']:.1f}% | {100 * m['recall_predicted']:.1f}% / "
                     f"{100 * m[f'recall_top{k}']:.1f}% "
                     f"/ {100 * m['recall_oracle']:.1f}% / {100 * m['recall_majority']:.1f}% |")
        gap = m["recall_oracle"] - m["recall_majority"]
        if gap > 0:
            gaps.append(f"{100 * (m['recall_predicted'] - m['recall_majority']) / gap:.0f}% ({SHORT.get(p, p)})")
    tail = ("\n\nThe predictor closes " + ", ".join(gaps) + " of the recall gap between the majority cluster and the "
            "oracle.\n") if gaps else "\n"
    return head + "\n".join(lines) + tail


def _ratio(r: dict, what: str) -> str:
    sp, roof = r.get(f"{what}_speedup"), r.get(f"roofline_{what}")
    if f"roofline_{what}" not in r:
        return "—"
    if sp is None or (roof is not None and sp > roof):  # flagged by the bench (or an older file): not a result
        meas = r.get(f"{what}_measured_ratio", sp)
        return f"above roofline ({meas:.2f}× > {roof:.2f}×): measurement error" if meas is not None else "invalid"
    return f"{sp:.2f}× ({roof:.2f}×)"


def sparse_mlp_table(refs: dict) -> str:
    sm = refs["sparse_mlp"]
    sysinfo, notes = sm.get("system", {}), sm.get("notes", [])
    head = (f"`{sm.get('command', 'python bench/bench_sparse_mlp.py')}` ({sysinfo.get('cpu', 'CPU')}, "
            f"{sysinfo.get('torch_threads', '?')} thread, fp32; {_t(sm.get('seconds'))}"
            + (f"; {notes[-1]}" if notes else "") + "):\n\n")
    lines = ["| shapes | density | MLP block (roofline) | decode step (roofline) |", "|---|---|---|---|"]
    for r in sm["rows"]:
        lines.append(f"| {r['shapes']} | {100 * r['density']:.0f}% | {_ratio(r, 'mlp')} | {_ratio(r, 'step')} |")
    return head + "\n".join(lines) + "\n"


FRONTIER_ORDER = ("dense", "paper", "paper_gate", "paper_up", "paper_gate_up", "paper_down", "cats", "teal", "wina",
                  "teal_greedy", "wina_greedy", "larosa", "larosa_folded", "larosa_folded_wina", "larosa_folded_greedy",
                  "larosa_topk", "rsparse", "scap", "lowbit_rank", "griffin", "griffin_lowbit", "griffin_centroid",
                  "cluster_lowbit", "neuron_predictor", "cluster_oracle", "cluster_predicted", "cluster_thresh",
                  "cluster_ideal_oracle", "cluster_thresh_oracle", "cluster_hthresh", "cluster_hthresh_oracle",
                  "cluster_neuron", "cluster_neuron_oracle", "cluster_union2", "cluster_union4", "cluster_hot",
                  "cluster_pooled_oracle", "cluster_binary_oracle")


def _speed_cell(q: dict) -> str:
    if q.get("roofline") is None:
        return "–"
    if q.get("decode_speedup") is None:
        return f"above roofline ({q['roofline']:.2f}×): measurement error"
    return f"{q['decode_speedup']:.2f}× ({q['roofline']:.2f}×)"


def frontier(refs: dict, key: str = "frontier") -> str:
    """Frontier table (one row per method: its sweep) and the winners at <= 0.5 and <= 0.3 of the weights read (F32
    points); then, when the run has other weight formats, their points by whole-step bytes per token."""
    pts = [q for q in refs[key]["points"] if q.get("weights", "f32") == "f32"]
    order = {m: i for i, m in enumerate(FRONTIER_ORDER)}
    by: dict[str, list[dict]] = {}
    for q in sorted(pts, key=lambda q: (order.get(q["method"], 99), q["param"])):
        by.setdefault(q["method"], []).append(q)
    speed = any(q.get("roofline") is not None for q in pts)
    qual = any(q.get("kl") is not None for q in pts)  # KL / top-1 against dense (awq.experiments.quality)
    lines = ["| method | density swept | MLP weight read / token | PPL |" + (" KL vs dense | top-1 = dense |" if qual else "")
             + (" decode speedup (roofline) |" if speed else ""),
             "|---|---|---|---|" + ("---|---|" if qual else "") + ("---|" if speed else "")]
    for m, qs in by.items():
        tag = "" if all(q["realizable"] for q in qs) else " (oracle)"
        dens = " / ".join(f"{q['param']:g}" for q in qs)
        reads = " / ".join(f"{q['weight_read_fraction']:.3f}" for q in qs)
        ppls = " / ".join(f"{q['ppl']:,.1f}" for q in qs)
        row = f"| `{m}`{tag} | {dens} | {reads} | {ppls} |"
        if qual:
            row += (" " + " / ".join("–" if q.get("kl") is None else f"{q['kl']:.3f}" for q in qs) + " | "
                    + " / ".join("–" if q.get("top1") is None else f"{100 * q['top1']:.0f}%" for q in qs) + " |")
        if speed:
            row += " " + " / ".join(_speed_cell(q) for q in qs) + " |"
        lines.append(row)
    dense = next((q["ppl"] for q in pts if q["method"] == "dense"), None)
    out = "\n".join(lines) + "\n\n"
    for budget in (0.5, 0.3):
        ok = [q for q in pts if q["realizable"] and q["method"] != "dense" and q["weight_read_fraction"] <= budget + 0.01]
        if not ok:
            out += f"At most {budget:.0%} of the MLP weights read: no point of the sweep reaches it.\n"
            continue
        best = min(ok, key=lambda q: q["ppl"])
        rest = sorted(ok, key=lambda q: q["ppl"])
        runner = next((q for q in rest if q["method"] != best["method"]), None)
        out += (f"At most {budget:.0%} of the MLP weights read (+0.01): best `{best['method']}` "
                f"(density {best['param']:g}, reads {best['weight_read_fraction']:.3f}) at PPL {best['ppl']:,.1f}"
                + (f" ({best['ppl'] / dense:.2f}x dense)" if dense else "")
                + (f", KL {best['kl']:.3f}, top-1 {100 * best['top1']:.0f}%" if best.get("kl") is not None else "")
                + (f"; next `{runner['method']}` at PPL {runner['ppl']:,.1f}" if runner else "") + ".\n")
    return out + by_format(refs[key]["points"])


def by_format(points: list[dict]) -> str:
    """The realizable points of every weight format ordered by whole-step weight MB per token (empty for an F32-only
    run): at equal bytes, a lower-bit dense model or a higher-bit sparse one?"""
    if all(q.get("weights", "f32") == "f32" for q in points):
        return ""
    pts = sorted((q for q in points if q["realizable"] and q.get("bytes_per_token") is not None),
                 key=lambda q: q["bytes_per_token"])
    lines = ["", "By weight format, realizable points ordered by weight bytes read per token (whole step: attention, "
             "LM head and MLP x read fraction; perplexity on the dequantised weights):", "",
             "| weights | method | density | MLP weight read | MB/token | PPL |", "|---|---|---|---|---|---|"]
    for q in pts:
        lines.append(f"| {q.get('weights', 'f32')} | `{q['method']}` | {q['param']:g} | {q['weight_read_fraction']:.3f} | "
                     f"{q['bytes_per_token'] / 1e6:.1f} | {q['ppl']:,.2f} |")
    return "\n".join(lines) + "\n"


def by_format_block(refs: dict, key: str) -> str:
    """docs/frontier.md's quantised frontier of one model (``results_ref/<key>.json``): its points by weight bytes
    per token, or the commands that make it."""
    if key not in refs:
        model = "" if key == "frontier_quant" else " --model_path qwen2.5-coder-0.5b"
        return (f"No checked-in run yet: `python -m awq.frontier{model} --weights q8_0,q4_1 --methods dense,teal,wina,"
                f"cats --densities 0.3,0.5 --out F`, then `python -m awq.report --import_frontier F/frontier.csv {key}`.\n")
    return by_format(refs[key]["points"]).lstrip("\n")
