"""Benchmark the pattern store: recording overhead, store size, streaming read throughput and peak RSS.

    python bench/bench_extract.py                         # random SmolLM2-135M-shaped Llama, 3 windows of 2048
    python bench/bench_extract.py --model_path PATH       # a real model through awq.load.models.load_model

Prints: tokens/s of the thresholded model with and without mask recording (ratio, target >= 0.8),
store bytes vs n_tokens x layers x sum(ceil(width/8)) (ratio, target <= 1.02), and for a full
pooled pass over one projection unpacked block by block: GB/s of packed data (target >= 1) and
the pass's peak RSS, measured in a fresh process on stores of two sizes (RSS must not grow with
the store).  The read passes run from the page cache (the stores were just written).
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awq.load.arch import PROJS, decoder_layers  # noqa: E402
from awq.load.models import check_model_path  # noqa: E402
from awq.methods.base import sparsify_  # noqa: E402
from awq.methods.paper_mlp import SparsityConfig  # noqa: E402
from awq.methods.recording import add_observer, record_masks, remove_observer  # noqa: E402
from awq.store.bitpack import unpack  # noqa: E402
from awq.store.pattern_store import PatternStore, StoreWriter  # noqa: E402
from awq.store.thresholds import load_thresholds  # noqa: E402
from awq.util.cli import ConfigError, fail, opt  # noqa: E402
from bench.common import parse_bench  # noqa: E402

log = logging.getLogger("bench_extract")


def peak_rss_mb() -> float:
    """VmHWM of this process in MB (falls back to ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def random_llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, seqlen: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=max(seqlen, 2048),
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def calibrate_median_thresholds(model, vocab: int, tokens: int = 256) -> dict[str, list[float]]:
    """Per-layer median |output| of each projection on random tokens (~50% sparsity)."""
    sparsify_(model, SparsityConfig(thresholds=None))
    med: dict[str, dict[int, float]] = {p: {} for p in PROJS}

    def obs(layer, name, y):
        if name in med:
            med[name][layer] = float(y.detach().abs().float().flatten().median())

    add_observer(model, obs)
    with torch.no_grad():
        model(torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)))
    remove_observer(model, obs)
    return {p: [med[p][l] for l in range(len(med[p]))] for p in PROJS}


def forward_s(model, batch: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(batch)
    return time.perf_counter() - t0


def time_interleaved(model, windows: torch.Tensor, store: Path, name: str) -> tuple[float, float, float]:
    """Seconds for all windows without and with recording, interleaved window by window so that
    both see the same machine load, and the recorder's own seconds (observer calls + end_window,
    which includes the data sync and the meta.json commit)."""
    t_plain = t_rec = t_own = 0.0
    n, seqlen = windows.shape
    with record_masks(model, store, meta={"model": name}, total_windows=n, seqlen=seqlen) as rec:
        remove_observer(model, rec.observe)

        def timed(layer, kind, y):
            nonlocal t_own
            t0 = time.perf_counter()
            rec.observe(layer, kind, y)
            t_own += time.perf_counter() - t0

        for i in range(windows.shape[0]):
            t_plain += forward_s(model, windows[i : i + 1])
            add_observer(model, timed)
            t0 = time.perf_counter()
            rec.start_window(i)
            with torch.no_grad():
                model(windows[i : i + 1])
            t1 = time.perf_counter()
            rec.end_window(i, {"window": i})
            t2 = time.perf_counter()
            t_rec += t2 - t0
            t_own += t2 - t1
            remove_observer(model, timed)
    return t_plain, t_rec, t_own


# --------------------------------------------------------------------------------------------
# read pass (run in a fresh process so that its peak RSS is its own)
# --------------------------------------------------------------------------------------------
def read_pass(store: str, proj: str, block_rows: int, dtype: str) -> dict:
    base = peak_rss_mb()
    reset_ok = reset_peak_rss()
    st = PatternStore(store)
    width = st.widths[proj]
    tdtype = getattr(torch, dtype)
    nbytes, rows, ones = 0, 0, 0
    buf: Optional[torch.Tensor] = None
    t0, c0 = time.perf_counter(), time.process_time()
    for _ids, packed in st.iter_blocks(proj, block_rows=block_rows):
        if tdtype in (torch.uint8, torch.bool):
            bits = unpack(packed, width, dtype=tdtype)  # one numpy call, fastest without a buffer
        else:  # reuse one output buffer (no page faults for a fresh block each time)
            if buf is None or buf.shape[0] != packed.shape[0]:
                buf = torch.empty(packed.shape[0], width, dtype=tdtype)
            bits = unpack(packed, width, dtype=tdtype, out=buf)
        ones += int(bits[:1].sum())  # touch the result
        nbytes += packed.nbytes
        rows += packed.shape[0]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {
        "store": store, "proj": proj, "rows": rows, "packed_gb": nbytes / 1e9, "seconds": dt,
        "gb_per_s": nbytes / 1e9 / dt, "gb_per_cpu_s": nbytes / 1e9 / dc, "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base,
        "peak_reset": reset_ok, "unpack_dtype": dtype,
    }


def run_read_pass_subprocess(store: Path, proj: str, block_rows: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--read_pass", str(store), "--proj", proj, "--block_rows", str(block_rows),
           "--unpack_dtype", dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def synthetic_store(path: Path, layers: int, widths: dict[str, int], gate_mb: float, seqlen: int = 2048) -> Path:
    """A store whose pooled gate_proj holds about gate_mb MB of random packed rows."""
    row = (widths["gate_proj"] + 7) // 8
    windows = max(1, int(round(gate_mb * 1e6 / (row * layers * seqlen))))
    rng = np.random.default_rng(0)
    blocks = {p: rng.integers(0, 256, (seqlen, (w + 7) // 8), dtype=np.uint8) for p, w in widths.items()}
    w = StoreWriter(path, meta={"model": "synthetic"}, total_windows=windows, seqlen=seqlen, num_layers=layers)
    for i in range(windows):
        for l in range(layers):
            for p in PROJS:
                w.write(p, l, i, np.roll(blocks[p], i + l, axis=0), width=widths[p])
        w.end_window(i)
    w.close()
    return path


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
def main(
    model_path: Optional[str] = None,
    default_model: bool = False,
    thresholds: Optional[str] = None,
    corpus: bool = False,
    hidden: int = 576,
    intermediate: int = 1536,
    layers: int = 30,
    heads: int = 9,
    kv_heads: int = 3,
    vocab: int = 49152,
    seqlen: int = 2048,
    windows: int = 3,
    threads: Optional[int] = None,
    read_sizes_mb: tuple[float, ...] = (256.0, 1024.0),
    block_rows: int = 16384,
    unpack_dtypes: tuple[str, ...] = ("uint8",),
    workdir: Optional[str] = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    tok = None
    if model_path or default_model:
        from awq.load.models import load_model

        model, tok, info = load_model(model_path, device="cpu")
        vocab = model.config.vocab_size
        name = f"{info.name} ({info.dtype})"
    else:
        model = random_llama(hidden, intermediate, layers, heads, kv_heads, vocab, seqlen)
        name = f"random-llama h{hidden} i{intermediate} L{layers}"
    if thresholds:
        thr = load_thresholds(thresholds, num_layers=len(decoder_layers(model)))
        name += f", thresholds {Path(thresholds).name}"
    else:
        thr = calibrate_median_thresholds(model, vocab)
        name += ", median thresholds"
    sparsify_(model, SparsityConfig(thresholds=thr))
    n_layers = len(thr["gate_proj"])
    if corpus:
        if tok is None:
            raise ValueError("--corpus needs a real model (--default_model or --model_path) for its tokenizer")
        from awq.load.data import load_corpus, tokenize_windows

        text = load_corpus("test")
        data = tokenize_windows(tok, text.text, seqlen)
        name += f", {text.name} test ({data.shape[0]} windows)"
        data = data[:windows] if windows > 0 else data
        windows = data.shape[0]
    else:
        data = torch.randint(0, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench_extract_"))
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "recorded"
    shutil.rmtree(store, ignore_errors=True)
    res: dict = {"model": name, "layers": n_layers, "seqlen": seqlen, "windows": windows,
                 "threads": torch.get_num_threads()}
    try:
        forward_s(model, data[:1])  # warm-up
        t_plain, t_rec, t_own = time_interleaved(model, data, store, name)
        ntok = windows * seqlen
        res.update(tok_s_plain=ntok / t_plain, tok_s_record=ntok / t_rec, ratio=t_plain / t_rec,
                   recorder_seconds=t_own, recorder_share=t_own / t_rec)
        print(f"model: {name}, {n_layers} layers, {windows} windows x {seqlen} tokens, {res['threads']} threads")
        print(f"thresholded tokens/s: {res['tok_s_plain']:.1f} without recording, {res['tok_s_record']:.1f} with "
              f"-> ratio {res['ratio']:.3f} (target >= 0.8); the recorder's own time (packing, writes, syncs) "
              f"is {t_own:.2f} s = {100 * t_own / t_rec:.1f}% of the recorded run")

        st = PatternStore(store)
        ideal = st.n_tokens * st.num_layers * sum((w + 7) // 8 for w in st.widths.values())
        have = store_bytes(store)
        res.update(store_bytes=have, ideal_bytes=ideal, size_ratio=have / ideal)
        print(f"store size: {have} bytes vs n_tokens x layers x sum(ceil(w/8)) = {ideal} -> ratio "
              f"{have / ideal:.5f} (target <= 1.02)")

        widths = dict(st.widths)
        passes = []
        for mb in read_sizes_mb:
            syn = synthetic_store(tmp / f"synthetic_{int(mb)}MB", n_layers, widths, mb)
            for dt in unpack_dtypes:
                r = run_read_pass_subprocess(syn, "gate_proj", block_rows, dt)
                passes.append(r)
                print(f"pooled gate_proj read+unpack({dt}) of {r['packed_gb']:.3f} GB packed ({r['rows']} rows): "
                      f"{r['gb_per_s']:.2f} GB/s packed (per CPU-second of the process: {r['gb_per_cpu_s']:.2f}), "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(process before the pass: {r['rss_before_mb']:.0f} MB)")
            shutil.rmtree(syn, ignore_errors=True)
        res["read_passes"] = passes
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return res


UNPACK_DTYPES = ("uint8", "bool", "float16", "bfloat16", "float32")


@dataclass
class ExtractBenchConfig:
    """Options of ``python bench/bench_extract.py``."""

    model_path: Optional[str] = opt(None, help="real model for awq.load.models.load_model (default: random Llama)",
                                    kind="model", check=check_model_path)
    default_model: bool = opt(False, help="use the project's default model (embedded GGUF)")
    thresholds: Optional[str] = opt(None, help="thresholds JSON for the model (default: per-layer median |output| on "
                                    "random tokens)", kind="in_file", max_mb=64)
    corpus: bool = opt(False, help="time windows of the test corpus (awq.load.data.load_corpus) instead of random "
                       "tokens")
    hidden: int = opt(576, help="random model hidden size (SmolLM2-135M: 576)", min=1)
    intermediate: int = opt(1536, help="random model MLP width (SmolLM2-135M: 1536)", min=1)
    layers: int = opt(30, help="random model decoder layers (SmolLM2-135M: 30)", min=1)
    heads: int = opt(9, help="random model attention heads", min=1)
    kv_heads: int = opt(3, help="random model key/value heads", min=1)
    vocab: int = opt(49152, help="random model vocabulary size", min=2)
    seqlen: int = opt(2048, help="tokens per window", min=2)
    windows: int = opt(3, help="windows timed with and without recording (with --corpus: 0 = the whole test split)",
                       min=0)
    threads: Optional[int] = opt(None, help="torch threads (default: torch's choice)", min=1)
    read_sizes_mb: list[float] = opt(default_factory=lambda: [256.0, 1024.0], gt=0,
                                     help="comma-separated sizes (MB of pooled gate_proj) of the synthetic stores for "
                                     "the read pass")
    block_rows: int = opt(16384, help="rows per block in the read pass (16384 x 1536 bits unpacked stays "
                          "cache-friendly)", min=1)
    unpack_dtypes: list[str] = opt(default_factory=lambda: ["uint8"], choices=UNPACK_DTYPES,
                                   help="comma-separated torch dtypes to unpack to in the read pass")
    workdir: Optional[str] = opt(None, help="where to write the stores (default: a temporary directory)",
                                 kind="out_dir")
    json: bool = opt(False, help="also print all figures as one JSON line")
    read_pass: Optional[str] = opt(None, help="(internal) time one read pass over this store and print JSON",
                                   kind="in_dir")
    proj: str = opt("gate_proj", help="(internal) projection of --read_pass", choices=PROJS)
    unpack_dtype: str = opt("uint8", help="(internal) dtype of --read_pass", choices=UNPACK_DTYPES)


def cli(argv: Optional[list[str]] = None) -> int:
    try:
        a = parse_bench(ExtractBenchConfig, argv, prog="python bench/bench_extract.py",
                        description="Pattern-store benchmark (recording overhead, size, read throughput)")
    except ConfigError as e:
        fail(str(e))
        return 2
    logging.basicConfig(level=logging.WARNING)
    if a.read_pass:
        print(json.dumps(read_pass(a.read_pass, a.proj, a.block_rows, a.unpack_dtype)))
        return 0
    try:
        out = main(
            a.model_path, a.default_model, a.thresholds, a.corpus, a.hidden, a.intermediate, a.layers, a.heads,
            a.kv_heads, a.vocab, a.seqlen, a.windows, a.threads, tuple(a.read_sizes_mb), a.block_rows,
            tuple(a.unpack_dtypes), a.workdir,
        )
    except (ValueError, OSError) as e:
        fail(str(e))
        return 2
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
