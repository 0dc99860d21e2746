"""Generated decode tables per weight format (docs/kernels.md "Decode on quantised weights", issue 19).

Reads the JSON of ``bench/bench_decode.py --weights f32,q8_0,... --output F`` (imported with
``python -m awq.report --import_decode F NAME``): one table per format with the llama.cpp row at that
format, the lean dense row and the method rows, each with tok/s, weight MB and GB/s per token and its
speedup against llama.cpp and against the lean dense step at that format beside the roofline; then the
issue-19 checks, whether the weights fit the last-level cache, and the decode-path checks.
"""
from __future__ import annotations

import re

_SUFFIX = " per token"
_RUN = ("python bench/bench_decode.py --threads 2 --weights q8_0,q4_1,q4_1:q8_0 --densities 0.5 "
        "--methods teal=0.5,wina=0.5,cats=0.25 --prompt_tokens 256 --new_tokens 128 --repeats 3")
_AVX2 = "AWQ_HW_FLAGS=\"avx2 fma\" "
QUANT_COMMANDS = {  # the run each quantised decode table comes from (shown until one is imported)
    "decode_quant_smollm2": _RUN,
    "decode_quant_qwen": _RUN.replace("--threads 2", "--model_path qwen2.5-coder-0.5b --threads 2")
                                .replace("q4_1:q8_0", "q4_0"),
    "decode_quant_smollm2_avx2": _AVX2 + _RUN + " --llama_cpp_path /path/to/llama_avx2",
    "decode_quant_qwen_avx2": _AVX2 + _RUN.replace("--threads 2", "--model_path qwen2.5-coder-0.5b --threads 2")
                                          .replace("q4_1:q8_0", "q4_0") + " --llama_cpp_path /path/to/llama_avx2",
}


def not_measured(name: str) -> str:
    """The block of a quantised decode table without a checked-in run."""
    return (f"No checked-in run yet: `{QUANT_COMMANDS[name]} --output F`, then `python -m awq.report --import_decode "
            f"F {name}` and `python -m awq.report` put its tables here.\n")


def formats(data: dict) -> list[str]:
    """The format labels of a bench_decode JSON (``Q8_0``, ``Q4_1``, ``Q4_1+Q8_0 head`` ...), in run order."""
    out = []
    for k in data.get("timings", {}):
        m = re.match(r"lean dense (.+) per token$", k)
        if m:
            out.append(m.group(1))
    return out


def _cell(rec) -> str:
    if rec is None:
        return "—"
    roof = rec.get("roofline")
    if not rec.get("valid", False):
        return f"above roofline ({rec['measured_ratio']:.2f}× > {roof:.2f}×): measurement error"
    return f"{rec['measured_ratio']:.2f}× ({roof:.2f}×)" if roof else f"{rec['measured_ratio']:.2f}×"


def fastest_half_row(data: dict, label: str):
    """The fastest method row of a format reading at most half the MLP bytes (gathered rows left out), or None."""
    t, fig = data.get("timings", {}), data.get("figures", {})
    rows = [k[: -len(_SUFFIX)] for k in t if k.endswith(f" {label}{_SUFFIX}")]
    cands = [n for n in rows if n.startswith("lean ") and not n.startswith(("lean dense", "lean gathered"))
             and (fig.get(f"{n} weight_read_fraction") or 2) <= 0.5]
    return min(cands, key=lambda n: t[n + _SUFFIX]["median_s"]) if cands else None


def format_table(data: dict, label: str) -> str:
    t = data["timings"]
    fig = data.get("figures", {})
    rows = [k[: -len(_SUFFIX)] for k in t if k.endswith(f" {label}{_SUFFIX}")]
    llama, lean = f"llama.cpp {label}", f"lean dense {label}"
    lines = [f"**{label}**", "",
             "| row | MLP bytes read (weights) | tok/s [min - max] | ms/token | weight MB/token | GB/s "
             "| vs llama.cpp (roofline) | vs lean dense (roofline) |", "|---|---|---|---|---|---|---|---|"]
    for n in rows:
        r = t[f"{n}{_SUFFIX}"]
        rf, wf = fig.get(f"{n} weight_read_fraction"), fig.get(f"{n} weight_count_fraction")
        read = "—" if rf is None else f"{rf:.3f} ({wf:.3f})"
        mb = f"{r['bytes'] / 1e6:.0f}" if r.get("bytes") else "—"
        gbs = f"{r['gbs']:.1f}" if r.get("gbs") else "—"
        ratios = data.get("ratios", {})
        lines.append(f"| {n} | {read} | {1 / r['median_s']:.2f} [{1 / r['max_s']:.2f} - {1 / r['min_s']:.2f}] | "
                     f"{r['median_s'] * 1e3:.2f} | {mb} | {gbs} | {_cell(ratios.get(f'{n} vs {llama}'))} | "
                     f"{_cell(ratios.get(f'{n} vs {lean}'))} |")
    notes = []
    x = fig.get(f"lean_dense_over_llama_time {label}")
    if x is not None:
        notes.append(f"lean dense time per token = {x:.2f}× llama.cpp's (target ≤ 1.1×: {'met' if x <= 1.1 else 'not met'})")
    win = fastest_half_row(data, label)
    if llama + _SUFFIX in t:
        if win:
            sp = t[llama + _SUFFIX]["median_s"] / t[win + _SUFFIX]["median_s"]
            notes.append(f"fastest method row reading ≤ 50% of the MLP bytes: {win} "
                         f"({fig[f'{win} weight_read_fraction']:.3f}), {sp:.2f}× llama.cpp {label} dense "
                         f"(target ≥ 1.2×: {'met' if sp >= 1.2 else 'not met'})")
        else:
            notes.append("no method row reads ≤ 50% of the MLP bytes at this format")
    fits = fig.get(f"fits_llc {label}")
    if fits is not None:
        notes.append("weights per token fit in the last-level cache (LLC-resident)" if fits
                     else "weights per token exceed the last-level cache (streamed from DRAM)")
    for k, v in fig.items():
        if k.startswith("decode_path ") and k.endswith(f" {label}"):
            name = k[len("decode_path "):]
            ok = v["rel_diff"] <= 0.005
            notes.append(f"decode-path check {name}: ppl batched {v['ppl_batched']:.3f}, token by token through the "
                         f"kernels {v['ppl_decode']:.3f} ({100 * v['rel_diff']:.2f}% apart, {v['tokens']} tokens: "
                         f"{'pass' if ok else 'FAIL'}"
                         + (f"; float rounding of the weights alone moves the batched figure {100 * v['sensitivity']:.2f}%"
                            if v.get("sensitivity") is not None else "") + ")")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(f"* {n}" for n in notes) + "\n" if notes else "")


def quant_tables(data: dict) -> str:
    return "\n".join(format_table(data, lab) for lab in formats(data))


SPEED_MODELS = (("decode_quant_smollm2", "SmolLM2-135M"), ("decode_quant_qwen", "Qwen2.5-Coder-0.5B"))


def speed_clause(data: dict, label: str) -> str:
    """``Q8_0: lean dense 1.71x llama.cpp, fastest method row (<= half the MLP bytes) 1.45x llama.cpp = 0.85x
    lean dense`` for one format of one bench_decode run ("" when a row is missing)."""
    t = data.get("timings", {})
    llama, lean = t.get(f"llama.cpp {label}{_SUFFIX}"), t.get(f"lean dense {label}{_SUFFIX}")
    if llama is None or lean is None:
        return ""
    out = f"{label}: lean dense {llama['median_s'] / lean['median_s']:.2f}x llama.cpp"
    win = fastest_half_row(data, label)
    if win:
        w = t[win + _SUFFIX]["median_s"]
        out += (f", fastest sparse row `{win[len('lean '):].replace(' ' + label, '')}` {llama['median_s'] / w:.2f}x "
                f"llama.cpp = {lean['median_s'] / w:.2f}x lean dense")
    return out


def speed_sentence(refs: dict) -> str:
    """The README's sentence on quantised decode speed (tok/s ratios of the checked-in bench_decode runs)."""
    parts = []
    for key, name in SPEED_MODELS:
        if key not in refs:
            continue
        data = refs[key]
        clauses = [c for lab in formats(data) if "head" not in lab and (c := speed_clause(data, lab))]
        if clauses:
            cpu = data.get("system", {}).get("cpu", "")
            parts.append(f"{name} ({cpu}): " + "; ".join(clauses))
    if not parts:
        return ""
    return ("Batch-1 decode on quantised weights, 2 threads, against llama.cpp at the same format on the same "
            "blocks (`bench/bench_decode.py --weights ...`, tables in docs/kernels.md): "
            + ". ".join(parts) + ".\n")
