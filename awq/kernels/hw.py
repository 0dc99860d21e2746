"""Hardware-adaptive kernel choices: pick by a short one-time measurement, cache it, log it, allow overrides.

A path with several exact implementations (e.g. the 0/1 overlap GEMM of :func:`awq.store.centroids.overlap`:
int8 ``torch._int_mm`` or an fp32 GEMM) asks :func:`choose` which one to use.  The order is:

1. an explicit ``kernel=`` argument (a CLI's ``--kernel``), unless ``"auto"`` / None;
2. the environment variable ``AWQ_KERNEL_<NAME>`` (e.g. ``AWQ_KERNEL_OVERLAP=fp32``);
3. the cached choice for this machine: ``<cache dir>/hw/choices.json`` (cache dir as in
   :func:`awq.util.cache.cache_dir`: ``$AWQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/awq-sparsity``, else
   ``~/.cache/awq-sparsity``), keyed by CPU model + flags + torch version + thread count;
4. otherwise each candidate is timed (interleaved, median of a few calls), the fastest is stored in
   the cache (atomic write) and the choice is logged with the timings.

Why measure instead of reading flags: on AVX-512-VNNI CPUs ``torch._int_mm`` runs several times
faster than an fp32 GEMM of the same shape; on AVX2-only CPUs it runs ~20x slower (issue 14).  Where
the flags settle it, they do: a CPU without any int8 dot-product instructions (no AVX-512 BW/VNNI,
AVX-VNNI or AMX-INT8) gets the fp32 overlap GEMM without a measurement (see :func:`overlap_kernel`).
``AWQ_HW_FLAGS="avx2 fma"`` makes this process see only those flags (to exercise the AVX2-only
decision on any machine; the cache key includes the flags, so such a choice is stored apart).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from awq.util import env
from awq.util.cache import cache_dir
from awq.util.io import atomic_write_json

log = logging.getLogger(__name__)

_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                      "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve")
_memo: dict[str, str] = {}


def cpu_info() -> dict:
    """CPU model, the SIMD flags that matter here, torch's CPU capability and thread count."""
    return dict(_static_info(), threads=torch.get_num_threads())


@functools.lru_cache(maxsize=1)
def _static_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        cap = "unknown"
    return {"model": model, "flags": [f for f in _FLAGS_OF_INTEREST if f in flags], "torch_capability": cap,
            "torch": torch.__version__, "cores": os.cpu_count()}


def cpu_flags() -> tuple[str, ...]:
    """The flags of interest this process acts on: the CPU's, or ``$AWQ_HW_FLAGS`` (space separated) when set."""
    if env.is_set("AWQ_HW_FLAGS"):
        return tuple((env.get_str("AWQ_HW_FLAGS") or "").split())
    return tuple(_static_info()["flags"])


_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw")


def has_int8_dot(flags: Sequence[str]) -> bool:
    """Whether a CPU with ``flags`` has int8 dot-product instructions (AVX-512 BW/VNNI, AVX-VNNI, AMX-INT8) that
    make ``torch._int_mm`` competitive.  Without them (e.g. AVX2 only) it runs far below an fp32 GEMM."""
    return any(f in flags for f in _INT8_DOT_FLAGS)


_key_memo: dict[tuple, str] = {}


def machine_key() -> str:
    info = cpu_info()
    info["flags"] = list(cpu_flags())
    memo = (tuple(info["flags"]), info["threads"])
    if memo not in _key_memo:
        raw = json.dumps({k: info[k] for k in ("model", "flags", "torch_capability", "torch", "threads")},
                         sort_keys=True)
        _key_memo[memo] = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return _key_memo[memo]


def cache_file() -> Path:
    return cache_dir("hw") / "choices.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def time_candidates(candidates: Mapping[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved after one warm-up call each."""
    for f in candidates.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for k, f in candidates.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def choose(name: str, names: Sequence[str], make: Callable[[], Mapping[str, Callable[[], object]]],
           kernel: Optional[str] = None, repeats: int = 5) -> str:
    """The implementation (one of ``names``) to use for ``name``; see the module docstring for the order
    of precedence.  ``make()`` builds ``{name: zero-argument call}`` to time; it is called only when
    nothing is given or cached."""
    candidates = tuple(names)
    var = f"AWQ_KERNEL_{name.upper()}"
    for src, val in (("kernel argument", kernel), (var, env.get_str(var))):
        if val not in (None, "", "auto"):
            if val not in candidates:
                raise ValueError(f"{src}: unknown kernel '{val}' for {name} (choose from auto, {', '.join(names)})")
            return val
    key = f"{machine_key()}:{name}"
    if key in _memo and _memo[key] in candidates:
        return _memo[key]
    path = cache_file()
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and entry.get("choice") in candidates:
        _memo[key] = entry["choice"]
        log.debug("%s kernel: %s (cached in %s)", name, entry["choice"], path)
        return entry["choice"]
    times = time_candidates(make(), repeats)
    best = min(times, key=times.get)
    info = cpu_info()
    log.info("%s kernel: chose %s on %s [%s] (%s); cached in %s", name, best, info["model"], " ".join(info["flags"]),
             ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), path)

    data = _read_cache(path)  # re-read: another process may have added entries meanwhile
    data[key] = {"choice": best, "seconds": times, "cpu": info, "flags_used": list(cpu_flags()),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_json(path, data, "kernel choice cache")
    except OSError as e:  # a read-only cache must not stop the computation
        log.warning("cannot write the kernel choice cache %s: %s", path, e)
    _memo[key] = best
    return best


# ------------------------------------------------------------------------------------------------
# the clustering distance: overlap <a, c> of 0/1 rows
# ------------------------------------------------------------------------------------------------
OVERLAP_KERNELS = ("int8", "fp32")
FP32_EXACT_WIDTH = 2 ** 24  # fp32 holds every integer up to 2**24: sums of 0/1 products are exact below this width


def check_fp32_exact(width: int) -> None:
    """Refuse an fp32 overlap of rows ``width`` wide whose integer sums could exceed fp32's exact range."""
    if width >= FP32_EXACT_WIDTH:
        raise ValueError(f"fp32 overlap of width {width} is not exact (sums can reach 2**24); use the int8 kernel")


def overlap_int8(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    Ai = A if A.dtype == torch.int8 else A.to(torch.int8)
    Ci = C if C.dtype == torch.int8 else C.to(torch.int8)
    return torch._int_mm(Ai, Ci.T).to(torch.float32)


def overlap_fp32(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    check_fp32_exact(A.shape[1])
    Af = A if A.dtype == torch.float32 else A.float()
    Cf = C if C.dtype == torch.float32 else C.float()
    return Af @ Cf.T


def overlap_kernel(kernel: Optional[str] = None, width: int = 0) -> str:
    """``"int8"`` or ``"fp32"`` for a CPU overlap GEMM of rows ``width`` wide.

    Order: ``kernel`` / ``$AWQ_KERNEL_OVERLAP`` (checked: int8 needs ``torch._int_mm``, fp32 needs
    ``width < 2**24``); then the exactness bound (width >= 2**24: int8); then capability (no int8
    dot-product instructions, e.g. AVX2 only: fp32, logged once); else the cached measurement of
    :func:`choose`."""
    forced = kernel if kernel not in (None, "", "auto") else env.get_str("AWQ_KERNEL_OVERLAP")
    if forced not in (None, "", "auto"):
        if forced == "int8" and not hasattr(torch, "_int_mm"):
            raise ValueError("kernel 'int8' needs torch._int_mm, which this torch lacks")
        if forced == "fp32":
            check_fp32_exact(width)
        return choose("overlap", OVERLAP_KERNELS, _overlap_probes, forced)
    if not hasattr(torch, "_int_mm"):
        return "fp32"
    if width >= FP32_EXACT_WIDTH:
        return "int8"  # the fp32 path would not be exact
    flags = cpu_flags()
    if not has_int8_dot(flags):
        if "overlap:capability" not in _memo:
            _memo["overlap:capability"] = "fp32"
            log.info("overlap kernel: fp32 by capability (flags %s: no AVX-512 BW/VNNI, AVX-VNNI or AMX-INT8, so "
                     "torch._int_mm has no fast int8 dot product here)", " ".join(flags) or "none")
        return "fp32"
    return choose("overlap", OVERLAP_KERNELS, _overlap_probes, None)


def overlap_reason(kernel: Optional[str] = None, width: int = 1536) -> str:
    """One line saying which overlap kernel :func:`overlap_kernel` picks here and why (for bench output)."""
    forced = kernel if kernel not in (None, "", "auto") else env.get_str("AWQ_KERNEL_OVERLAP")
    choice = overlap_kernel(kernel, width)
    flags = " ".join(cpu_flags()) or "none"
    if forced not in (None, "", "auto"):
        return f"{choice} (forced by {'--kernel' if kernel not in (None, '', 'auto') else 'AWQ_KERNEL_OVERLAP'})"
    if not hasattr(torch, "_int_mm"):
        return "fp32 (this torch has no torch._int_mm)"
    if width >= FP32_EXACT_WIDTH:
        return "int8 (width >= 2**24: fp32 sums would not be exact)"
    if not has_int8_dot(cpu_flags()):
        return f"fp32 by capability (flags: {flags}; no int8 dot-product instructions, int8 GEMM runs far below fp32)"
    entry = _read_cache(cache_file()).get(f"{machine_key()}:overlap", {})
    secs = entry.get("seconds") or {}
    timed = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in secs.items())
    return f"{choice} by one-time measurement (flags: {flags}; probe {timed or 'cached'}; cache {cache_file()})"


def _overlap_probes() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    # a typical clustering block as the callers hand it over: float32 {0,1} rows, so the int8 candidate
    # pays its conversion as it does in use
    A = (torch.rand(2048, 1536, generator=g) < 0.5).float()
    C = (torch.rand(256, 1536, generator=g) < 0.5).float()
    return {"int8": lambda: overlap_int8(A, C), "fp32": lambda: overlap_fp32(A, C)}


# ------------------------------------------------------------------------------------------------
# thread count for small blocks: a few hundred small ops, where fork/join can cost more than the work
# ------------------------------------------------------------------------------------------------
THREAD_CHOICES = ("1", "all")
SMALL_BLOCK = 1 << 21  # block elements (rows x width) below which the thread count is chosen, not assumed


@contextlib.contextmanager
def threads_for(elements: int, kernel: Optional[str] = None) -> Iterator[int]:
    """Run the body with the thread count that suits a block of ``elements`` values: all of torch's threads
    for large blocks; for blocks below :data:`SMALL_BLOCK`, ``"1"`` or ``"all"`` as :func:`choose` picks
    (``kernel`` / ``$AWQ_KERNEL_THREADS`` override; else a cached one-time measurement of a small block's
    op mix).  Yields the count used; torch's setting is restored afterwards."""
    n = torch.get_num_threads()
    use = n
    if n > 1 and (elements < SMALL_BLOCK or kernel not in (None, "", "auto")):
        use = 1 if choose("threads", THREAD_CHOICES, _thread_probes, kernel) == "1" else n
    if use != n:
        torch.set_num_threads(use)
    try:
        yield use
    finally:
        if use != n:
            torch.set_num_threads(n)


def _thread_probes() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(2048, 128, generator=g) < 0.5).float()
    C = (torch.rand(16, 128, generator=g) < 0.5).float()
    lab = torch.randint(0, 16, (2048,), generator=g)
    n = torch.get_num_threads()

    def work(threads: int) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(threads)
            try:
                for _ in range(4):  # distance GEMM, row minimum, member sums, per-row sort: a small block's mix
                    D = X @ C.T
                    D.min(1)
                    S = torch.zeros(16, 128).index_add_(0, lab, X)
                    S.sort(1)
                return D
            finally:
                torch.set_num_threads(n)
        return run

    return {"1": work(1), "all": work(n)}
