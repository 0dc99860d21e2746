"""bench_decode rows per weight format (``--weights q8_0,q4_1,...``; issue 19).

For a format ``FMT`` (``q8_0``, ``q4_0``, ``q4_1``; ``FMT:HEAD`` gives the LM head its own format, e.g.
``q4_1:q8_0`` = the shipped SmolLM2 file's layout) the bench adds, all timed in the same interleaved rounds:

* ``llama.cpp FMT``: llama-cpp-python on a GGUF of the same weights in that format: the source GGUF itself
  when it already is that (``shipped``), else one written by :func:`awq.load.quant_gguf.write_quant_gguf`
  (blocks the source holds in that format copied, the rest quantised by ggml's reference quantiser);
* ``lean dense FMT``: :class:`awq.decode.lean.LeanDecoder` with ``weights=FMT`` reading the raw blocks of that
  same file (every linear of the step quantised, one C++ call per token);
* ``lean <method> d=X FMT``: the same decoder with the method's modules (calibrated once, as the F32 rows),
  on its quantised sparse kernels; bytes per token from the counts of the timed steps (quants of the rows
  read + the block scales they need).

Each row's weight bytes per token and GB/s; each sparse row's speedup against llama.cpp and against the
lean dense step at its format, beside its roofline; the issue-19 checks; and the decode-path check
(teacher-forced perplexity through the kernels vs the batched evaluation on the same dequantised weights).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from awq.decode.check import decode_path_check
from awq.decode.lean import LeanDecoder
from awq.decode.quant import QuantDecodeError
from awq.load.data import load_corpus, tokenize_windows
from awq.load.quant_formats import get_format
from awq.load.quant_gguf import ensure_quant_gguf

log = logging.getLogger("bench_decode")


def parse_weights(spec: str) -> list[tuple[str, str, str]]:
    """``"f32,q8_0,q4_1:q8_0"`` -> ``[(label, fmt, head_fmt)]`` (``f32``: ``("F32", "f32", "f32")``); a
    ValueError names a bad or repeated format."""
    out = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        if part == "f32":
            out.append(("F32", "f32", "f32"))
            continue
        fmt, _, head = part.partition(":")
        f, h = get_format(fmt).name, get_format(head or fmt).name
        label = f.upper() if h == f else f"{f.upper()}+{h.upper()} head"
        out.append((label, f, h))
    if not out:
        raise ValueError("no weight format given (f32, q8_0, q4_0, q4_1 or FMT:HEAD)")
    labels = [lab for lab, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a weight format is given twice in {spec!r}")
    return out


def llc_bytes() -> Optional[int]:
    """The last-level cache size of CPU 0 (sysfs), or None."""
    best = None
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((idx / "level").read_text())
            size = (idx / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        val = int(size.rstrip("KMG")) * mult
        if best is None or level > best[0]:
            best = (level, val)
    return None if best is None else best[1]


def gguf_formats(path: Path) -> tuple[set, Optional[int]]:
    """(ggml types of the decoder layers' 2-D weights, type of the head / tied embedding) of a GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))
    lin, head = set(), None
    names = {t.name: t for t in r.tensors}
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            lin.add(int(t.tensor_type))
    h = names.get("output.weight") or names.get("token_embd.weight")
    if h is not None:
        head = int(h.tensor_type)
    return lin, head


def format_gguf(src: Path, fmt: str, head: str) -> tuple[Path, str]:
    """The GGUF of the same weights in (fmt, head): the source when it already is, else a written one."""
    lin, h = gguf_formats(src)
    if lin == {get_format(fmt).ggml_type} and h == get_format(head).ggml_type:
        return src, "shipped"
    return ensure_quant_gguf(src, fmt, head), "written by awq.load.quant_gguf from the source GGUF"


def quant_runner(dec, mlps, sink: dict):
    """A lean runner on a quantised decoder that also meters the bytes its decode steps read."""
    def run(ids: list[int], new: int) -> tuple[float, list[int]]:
        dec.set_mlps(mlps)
        dec._ensure(len(ids) + new)
        logits = dec.prefill(torch.tensor(ids))
        dec._q.c.reset_counts()
        out = [int(torch.argmax(logits))]
        t0 = time.perf_counter()
        for _ in range(new - 1):
            logits = dec.step(out[-1])
            out.append(int(torch.argmax(logits)))
        s = (time.perf_counter() - t0) / (new - 1)
        sink.update(dec._q.read_stats(new - 1))
        return s, out
    return run


def add_format_rows(label: str, fmt: str, head: str, model, src: Optional[Path], llama_cpp, a, method_mods: dict,
                    runners: dict, nbytes: dict, stats: dict, rep, llama_runner, capacity: int) -> dict:
    """Rows of one weight format; returns the format's record (decoders, GGUF) for the checks after timing."""
    path, origin = (None, "")
    if src is not None:
        path, origin = format_gguf(src, fmt, head)
    dec = LeanDecoder(model, capacity=capacity, weights=fmt, head_weights=head, weights_gguf=path)
    qs = dec._q
    dense = qs.dense_bytes()
    src_line = ", ".join(f"{n} {k}" for k, n in sorted(qs.qw.sources.items()))
    rep.emit(f"{label}: weights {dense['total'] / 1e6:.1f} MB per token (attention {dense['attn'] / 1e6:.1f}, "
             f"MLP {dense['mlp'] / 1e6:.1f}, LM head {dense['head'] / 1e6:.1f}); "
             + (f"GGUF {path} ({origin}); lean decoder's blocks: {src_line}" if path else
                f"no GGUF (llama.cpp row skipped); blocks {src_line}"))
    names = []
    if llama_cpp is not None and path is not None:
        key = f"llama.cpp {label}"
        runners[key] = llama_runner(path, a.threads, capacity + 8)
        nbytes[key] = dense["total"]
        names.append(key)
    key = f"lean dense {label}"
    st: dict = {}
    runners[key] = quant_runner(dec, None, st)
    nbytes[key] = dense["total"]
    stats[key] = st
    names.append(key)
    for mkey, mods in method_mods.items():
        key = f"{mkey} {label}"
        try:
            dec.set_mlps(mods)
        except QuantDecodeError as e:
            rep.emit(f"{key}: not timed ({e})")
            continue
        finally:
            dec.set_mlps(None)
        st = {}
        runners[key] = quant_runner(dec, mods, st)
        stats[key] = st
        names.append(key)
    return {"dec": dec, "label": label, "dense": dense, "names": names, "path": path}


def report_format(rec: dict, times: dict, nbytes: dict, stats: dict, rep, roofline_speedup) -> None:
    """After timing: bytes of the sparse rows, ratios beside rooflines, the issue-19 checks of one format."""
    label = rec["label"]
    names = [n for n in rec["names"] if n in times]
    for n in names:  # metered bytes of the sparse rows
        st = stats.get(n)
        if st and not n.startswith(f"lean dense {label}") and "total_bytes" in st:
            nbytes[n] = st["total_bytes"]
            rep.figure(f"{n} weight_read_fraction", st["mlp_fraction"])
            rep.figure(f"{n} weight_count_fraction", st["mlp_weight_fraction"])
    llama = f"llama.cpp {label}"
    lean = f"lean dense {label}"
    for n in names:
        t = times[n]
        gbs = nbytes[n] / t.median / 1e9 if n in nbytes else float("nan")
        rep.figure(f"{n} gbs", gbs)
        rep.timing(f"{n} per token", t, nbytes.get(n), echo=False)
        st = stats.get(n) or {}
        extra = (f"  MLP bytes read {st['mlp_fraction']:.3f} (weights {st['mlp_weight_fraction']:.3f})"
                 if st and n != lean and "mlp_fraction" in st else "")
        rep.emit(f"{n:34s} {1 / t.median:7.2f} tok/s  [{1 / t.max:.2f} - {1 / t.min:.2f}]  {t.median * 1e3:6.2f} ms/token"
                 f"  {nbytes.get(n, 0) / 1e6:6.1f} MB/token  {gbs:5.1f} GB/s{extra}")
    if llama in times and lean in times:
        x = times[lean].median / times[llama].median
        rep.figure(f"lean_dense_over_llama_time {label}", x)
        rep.emit(f"{label}: lean dense time per token = {x:.2f}x llama.cpp's (issue 19 target <= 1.1x: "
                 f"{'met' if x <= 1.1 else 'NOT met'})")
    sparse = [n for n in names if n not in (llama, lean)]
    # the roofline against a base is the bytes ratio against the FASTER dense row (as the F32 rows: the fastest
    # dense implementation is taken to read at the achievable bandwidth), times how much slower the base is
    dense_rows = [b for b in (llama, lean) if b in times]
    best = min(dense_rows, key=lambda b: times[b].median) if dense_rows else None
    for n in sparse:
        for base in dense_rows:
            roof = roofline_speedup(nbytes[best], nbytes[n]) * times[base].median / times[best].median
            rep.ratio(f"{n} vs {base}", times[base], times[n], roof)
    half = {n: stats[n]["mlp_fraction"] for n in sparse if stats.get(n) and stats[n].get("mlp_fraction", 2) <= 0.5
            and not n.startswith("lean gathered")}
    if llama in times:
        if half:
            win = min(half, key=lambda k: times[k].median)
            x = times[llama].median / times[win].median
            rep.figure(f"best_sparse_le_half_over_llama_speed {label}", x)
            rep.emit(f"{label}: best realizable sparse row at <= 50% of the MLP bytes read: {win} (read {half[win]:.3f}), "
                     f"{1 / times[win].median:.2f} tok/s = {x:.2f}x llama.cpp {label} dense (issue 19 target >= 1.2x: "
                     f"{'met' if x >= 1.2 else 'NOT met'})")
        else:
            rep.emit(f"{label}: no method row reads <= 50% of the MLP bytes: the issue 19 sparse target is not measured")


def decode_path_checks(model, tok, a, fmt_recs: list, f32_dec, method_mods: dict, rep) -> None:
    """Teacher-forced perplexity through each decoder's kernels vs the batched evaluation (same weights)."""
    ids = tokenize_windows(tok, load_corpus("test", a.data_path).text, a.ppl_check, max_windows=1)[0]
    decs = ([("F32", f32_dec)] if f32_dec is not None else []) + [(r["label"], r["dec"]) for r in fmt_recs]
    for label, dec in decs:
        for mkey, mods in [("lean dense", None)] + list(method_mods.items()):
            if mkey.startswith("lean gathered"):
                continue
            try:
                r = decode_path_check(model, dec, ids, mods, sensitivity=True)
            except QuantDecodeError as e:
                rep.emit(f"decode-path check {mkey} {label}: skipped ({e})")
                continue
            ok = r["rel_diff"] <= 0.005
            rep.figure(f"decode_path {mkey} {label}", r)
            rep.emit(f"decode-path check {mkey} {label}: ppl batched {r['ppl_batched']:.4f}, one token at a time "
                     f"through the kernels {r['ppl_decode']:.4f} ({100 * r['rel_diff']:.3f}% apart, {r['tokens']} tokens; "
                     f"<= 0.5%: {'pass' if ok else 'FAIL'}); the batched evaluation itself moves "
                     f"{100 * r['sensitivity']:.3f}% with its weights scaled by 1 +- 2^-23 (float rounding)")
