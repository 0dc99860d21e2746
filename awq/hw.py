"""Hardware-adaptive kernel choices: pick by a short one-time measurement, cache it, log it, allow overrides.

A path with several exact implementations (e.g. the 0/1 overlap GEMM of :func:`awq.centroids.overlap`:
int8 ``torch._int_mm`` or an fp32 GEMM) asks :func:`choose` which one to use.  The order is:

1. an explicit ``kernel=`` argument (a CLI's ``--kernel``), unless ``"auto"`` / None;
2. the environment variable ``AWQ_KERNEL_<NAME>`` (e.g. ``AWQ_KERNEL_OVERLAP=fp32``);
3. the cached choice for this machine: ``<cache dir>/hw/choices.json`` (cache dir as in
   :func:`awq.hub.cache_dir`: ``$AWQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/awq-sparsity``, else
   ``~/.cache/awq-sparsity``), keyed by CPU model + flags + torch version + thread count;
4. otherwise each candidate is timed (interleaved, median of a few calls), the fastest is stored in
   the cache (atomic write) and the choice is logged with the timings.

Why measure instead of reading flags: on AVX-512-VNNI CPUs ``torch._int_mm`` runs several times
faster than an fp32 GEMM of the same shape; on AVX2-only CPUs it runs ~20x slower (issue 14).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

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


def machine_key() -> str:
    info = cpu_info()
    raw = json.dumps({k: info[k] for k in ("model", "flags", "torch_capability", "torch", "threads")}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cache_file() -> Path:
    from awq.hub import cache_dir

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
    env = f"AWQ_KERNEL_{name.upper()}"
    for src, val in (("kernel argument", kernel), (env, os.environ.get(env))):
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
    from awq.io import atomic_write_json

    data = _read_cache(path)  # re-read: another process may have added entries meanwhile
    data[key] = {"choice": best, "seconds": times, "cpu": info, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
FP32_EXACT_WIDTH = 2 ** 24  # fp32 sums of 0/1 products are exact below this


def overlap_int8(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    Ai = A if A.dtype == torch.int8 else A.to(torch.int8)
    Ci = C if C.dtype == torch.int8 else C.to(torch.int8)
    return torch._int_mm(Ai, Ci.T).to(torch.float32)


def overlap_fp32(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    Af = A if A.dtype == torch.float32 else A.float()
    Cf = C if C.dtype == torch.float32 else C.float()
    return Af @ Cf.T


def overlap_kernel(kernel: Optional[str] = None, width: int = 0) -> str:
    """``"int8"`` or ``"fp32"`` for a CPU overlap GEMM of rows ``width`` wide (see :func:`choose`)."""
    if not hasattr(torch, "_int_mm"):
        if kernel == "int8":
            raise ValueError("kernel 'int8' needs torch._int_mm, which this torch lacks")
        return "fp32"
    if width >= FP32_EXACT_WIDTH:
        return "int8"  # the fp32 path would not be exact
    return choose("overlap", OVERLAP_KERNELS, _overlap_probes, kernel)


def _overlap_probes() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    A = (torch.rand(2048, 1536, generator=g) < 0.5).to(torch.int8)  # a typical clustering block
    C = (torch.rand(256, 1536, generator=g) < 0.5).to(torch.int8)
    return {"int8": lambda: overlap_int8(A, C), "fp32": lambda: overlap_fp32(A, C)}
