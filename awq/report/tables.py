"""Generated tables of the beyond-the-paper results: the cluster predictor and the sparse MLP speedup.

Blocks ``predictor_table`` (from ``results_ref/predictor.json``, written by ``python -m awq.report
--import_predictor``) and ``sparse_mlp_table`` (from ``results_ref/sparse_mlp.json``, ``--import_sparse_mlp``),
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
