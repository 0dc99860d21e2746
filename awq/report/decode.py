"""Generated decode-speed tables (docs/kernels.md "Decode speed"): one block per model from a bench_decode JSON.

``results_ref/decode_<model>.json`` is the JSON ``bench/bench_decode.py --output`` writes, copied as is
(``python -m awq.report --import_decode FILE NAME``).  The block lists every row (tok/s, spread, ms per
token, weight bytes per token), then each sparse row's speedup against the fastest dense baseline beside
its roofline (a ratio the bench flagged as above its roofline is shown as a measurement error), and the
two checks: lean dense time / llama.cpp F32 time, and whether the best sparse row at
<= 50% of the MLP's weights read is faster than llama.cpp F32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from awq.report import provenance
from awq.report.decode_quant import QUANT_COMMANDS, formats, not_measured, quant_tables
from awq.report.importers import RunOutputError, _load, _ref, _root, bench_versions
from awq.util.io import atomic_write_json

DECODE_REFS = ("decode_smollm2", "decode_qwen", "decode_smollm2_avx2",  # _avx2: AWQ_HW_FLAGS + AVX2 llama.cpp
               "decode_quant_smollm2", "decode_quant_qwen", "decode_quant_smollm2_avx2", "decode_quant_qwen_avx2")
_SUFFIX = " per token"


def _rows(data: dict) -> dict[str, dict]:
    return {k[: -len(_SUFFIX)]: v for k, v in data["timings"].items() if k.endswith(_SUFFIX)}


def _read(data: dict, name: str) -> Optional[float]:
    return data.get("figures", {}).get(f"{name} weight_read_fraction")


def _ratio_cell(rec: Optional[dict]) -> str:
    if rec is None:
        return "—"
    roof = rec.get("roofline")
    if not rec.get("valid", False):
        return f"above roofline ({rec['measured_ratio']:.2f}× > {roof:.2f}×): measurement error"
    return f"{rec['measured_ratio']:.2f}× ({roof:.2f}×)" if roof else f"{rec['measured_ratio']:.2f}×"


def decode_table(data: dict) -> str:
    """Markdown for one bench_decode JSON (rows per weight format: awq.report.decode_quant)."""
    cfg, sysinfo, rows = data["config"], data["system"], _rows(data)
    labels = formats(data)
    rows = {n: t for n, t in rows.items() if not any(n.endswith(" " + lab) for lab in labels)}
    cmd = (data.get("provenance") or {}).get("command") or f"python bench/bench_decode.py{_args(cfg)}"
    head = (f"`{cmd}` — CPU `{sysinfo['cpu']}`, flags "
            f"{' '.join(sysinfo['flags'])}, {cfg['threads']} thread(s) of {sysinfo['cpus']}, torch "
            f"{sysinfo['torch']}; load average {sysinfo.get('loadavg')} at start, "
            f"{sysinfo.get('loadavg_end')} at the end; {cfg['prompt_tokens']}-token prompt, {cfg['new_tokens']} new "
            f"tokens, {cfg['repeats']} interleaved repeats, medians [min - max]:\n\n")
    builds = [ln for ln in data.get("lines", [])  # what each side was built for (bench_decode header lines)
              if (ln.startswith("CPU ") and "this project's kernels" in ln)
              or (ln.startswith("llama.cpp ") and "built for" in ln)]
    if builds:
        head += "".join(f"* {ln}\n" for ln in builds) + "\n"
    if labels:
        head += "".join(f"* {ln}\n" for ln in data.get("lines", []) if ln.startswith("last-level cache")
                        or any(ln.startswith(f"{lab}: weights ") for lab in labels)) + "\n"
    if not rows:
        return head + quant_tables(data)
    lines = ["| row | MLP weight read | tok/s [min - max] | ms/token | weight MB/token | vs fastest dense (roofline) "
             "| vs lean dense, same decoder (roofline) |", "|---|---|---|---|---|---|---|"]
    dense = [k for k in ("lean dense", "llama.cpp F32", "lean dense-kernel") if k in rows]
    best = min(dense, key=lambda k: rows[k]["median_s"]) if dense else None
    for name, t in rows.items():
        read = _read(data, name)
        if read is None and name.startswith("lean gathered d="):
            read = float(name.split("=")[1])
        rec = data["ratios"].get(f"{name} vs {best}")
        own = data["ratios"].get(f"{name} vs lean dense")
        mb = f"{t['bytes'] / 1e6:.0f}" if t.get("bytes") else "—"
        lines.append(f"| {name} | {'—' if read is None else f'{read:.3f}'} | {1 / t['median_s']:.2f} "
                     f"[{1 / t['max_s']:.2f} - {1 / t['min_s']:.2f}] | {t['median_s'] * 1e3:.1f} | {mb} | {_ratio_cell(rec)} | {_ratio_cell(own)} |")
    out = head + "\n".join(lines) + "\n"
    notes = []
    f32 = rows.get("llama.cpp F32")
    if f32 and "lean dense" in rows:
        x = rows["lean dense"]["median_s"] / f32["median_s"]
        notes.append(f"lean dense time per token = {x:.2f}× llama.cpp F32's (target ≤ 1.5×: "
                     f"{'met' if x <= 1.5 else 'not met'})")
    half = fastest_half(data)
    if half:
        n, t, f = half
        notes.append(f"fastest row reading ≤ 50% of the MLP weights: {n}, {1 / t:.2f} tok/s, "
                     f"{'faster' if t < f else 'NOT faster'} than llama.cpp F32 dense "
                     f"({1 / f:.2f} tok/s; {f / t:.2f}×)")
    flagged = [k for k, r in data["ratios"].items() if not r.get("valid", True)]
    if flagged:
        notes.append("flagged by the bench as above their roofline (measurement errors, not results): "
                     + "; ".join(flagged))
    if notes:
        out += "\n" + "\n".join(f"* {n}" for n in notes) + "\n"
    return out + ("\n" + quant_tables(data) if labels else "")


def fastest_half(data: dict) -> Optional[tuple[str, float, float]]:
    """(row, its median s/token, llama.cpp F32's) of the fastest lean row reading <= 50% of the MLP weights."""
    labels = formats(data)
    rows = {n: t for n, t in _rows(data).items() if not any(n.endswith(" " + lab) for lab in labels)}
    f32 = rows.get("llama.cpp F32")
    cands = [(n, t) for n, t in rows.items() if n.startswith("lean ") and (_read(data, n) or 1.0) <= 0.5]
    if not f32 or not cands:
        return None
    n, t = min(cands, key=lambda c: c[1]["median_s"])
    return n, t["median_s"], f32["median_s"]


def _args(cfg: dict) -> str:
    parts = []
    for k in ("model_path", "threads", "weights", "densities", "methods", "prompt_tokens", "new_tokens", "repeats",
              "ppl_check", "llama_cpp_path"):
        v = cfg.get(k)
        if v is not None:
            parts.append(f" --{k} {','.join(map(str, v)) if isinstance(v, list) else v}")
    return "".join(parts)


def decode_block(key: str):
    def block(refs: dict) -> str:
        if key in QUANT_COMMANDS and key not in refs:
            return not_measured(key)
        return decode_table(refs[key])
    return block


def import_decode(bench_json: Path, name: str, ref_dir: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """A ``bench/bench_decode.py --output F`` JSON -> ``results_ref/<name>.json`` (name in DECODE_REFS), as is plus
    its ``provenance``."""
    if name not in DECODE_REFS:
        raise RunOutputError(f"--import_decode NAME must be one of {', '.join(DECODE_REFS)}, got {name!r}")
    f = Path(bench_json)
    b = _load(f, "run `python bench/bench_decode.py --output FILE` first")
    if b.get("bench") != "bench_decode" or not _rows(b):
        raise RunOutputError(f"{f} is not a bench_decode.py output with timings")
    b["provenance"] = provenance.make(command or f"python bench/bench_decode.py{_args(b['config'])}", b["config"],
                                      bench_versions(b), run_commit=b.get("git_commit"),
                                      root=_root(ref_dir))
    ref = _ref(ref_dir, name)
    atomic_write_json(ref, b)
    return ref
