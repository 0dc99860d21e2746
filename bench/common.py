"""Shared benchmark helpers: interleaved timing, rooflines, an honest reporter, the best dense baseline.

Every script in ``bench/`` (and any new one, e.g. ``bench_decode.py``) uses these so that no figure
can quietly lie:

* :func:`interleaved` -- warm up, then time the variants round-robin (``A B A B ...``; with more
  variants ``A B C A B C ...``) for ``repeats`` rounds, so background load hits every variant alike.
  Returns one :class:`Timing` (all samples in run order, median / min / max / quartiles) per variant.
* :func:`roofline_speedup` -- the largest speedup that reading fewer bytes can give:
  ``(dense_bytes + fixed_bytes) / (sparse_bytes + fixed_bytes)``, where ``fixed_bytes`` is the part
  that stays dense (attention, KV cache, LM head, ...).  :func:`swiglu_bytes` gives the MLP part.
* :class:`Report` -- prints a header (CPU model, avx2/avx512/vnni/bf16/amx flags, threads, load),
  timings with their spread and effective GB/s (so a slow dense baseline is visible), and each
  speedup next to its roofline.  A ratio above its roofline is never presented as a result: it is
  printed and stored as ``ABOVE ROOFLINE: measurement error`` (``"speedup": null``, ``"valid": false``
  in the JSON).  :meth:`Report.write` stores everything plus the config atomically (``awq.util.io``).
* :class:`FusedDenseMLP` / :func:`best_dense` -- the dense SwiGLU baseline to beat: ``F.linear`` on
  contiguous weights with one fused ``[2F, H]`` gate+up matmul; time it beside the HF module and
  use the faster one as *the* dense baseline.
* :func:`stream_bandwidth_gbs` -- this machine's DRAM read bandwidth (sum over a large tensor).

Scripts run as ``python bench/bench_x.py`` put the repository root on ``sys.path`` and then
``from bench.common import ...`` (see bench_sparse_mlp.py); tests import ``bench.common`` directly.

Typical use::

    rep = Report("bench_x", {"threads": 1, ...})              # prints the header
    t = interleaved({"dense": f_dense, "sparse": f_sparse}, repeats=11, warmup=2)
    rep.timing("dense", t["dense"], nbytes=dense_bytes)        # median [min-max], GB/s
    rep.ratio("mlp 50%", t["dense"], t["sparse"], roofline_speedup(dense_bytes, sparse_bytes))
    rep.write(args.output)                                     # no-op for None
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from awq.util.cli import ConfigError, build_parser, check_config, fail, given_options, setup_logging

log = logging.getLogger(__name__)

ABOVE_ROOFLINE = "ABOVE ROOFLINE: measurement error"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    if not xs:
        raise ValueError("quantile of an empty sequence")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    """Seconds per call of one variant, one sample per timed round, in run order."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def q1(self) -> float:
        return quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return quantile(self.samples, 0.75)

    def scaled(self, factor: float) -> "Timing":
        """Each sample times ``factor`` (e.g. 1/blocks for the time per block)."""
        return Timing([s * factor for s in self.samples])

    def summary(self) -> dict[str, float]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "q1_s": self.q1,
                "q3_s": self.q3, "n": len(self.samples)}


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time ``fns`` round-robin: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    calling every fn once in the mapping's order (A B A B ...).  Returns ``{name: Timing}``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not fns:
        raise ValueError("nothing to time")
    for _ in range(max(0, warmup)):
        for f in fns.values():
            f()
    out = {k: Timing() for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            out[k].samples.append(clock() - t0)
    return out


def stream_bandwidth_gbs(mb: int = 1024, repeats: int = 5) -> float:
    """DRAM read bandwidth in GB/s: median time of summing an fp32 tensor of ``mb`` MiB."""
    a = torch.ones(mb * 2**20 // 4)
    t = interleaved({"sum": lambda: a.sum()}, repeats, warmup=1)["sum"].median
    return a.numel() * 4 / t / 1e9


# --------------------------------------------------------------------------------------------
# rooflines
# --------------------------------------------------------------------------------------------
def swiglu_bytes(hidden: int, active: int, nbytes: int) -> int:
    """Weight bytes one SwiGLU block reads per token with ``active`` intermediate neurons (gate row,
    up row and down column of each: ``3 * hidden * active * nbytes``)."""
    return 3 * hidden * active * nbytes


def roofline_speedup(dense_bytes: float, sparse_bytes: float, fixed_bytes: float = 0.0) -> float:
    """Upper bound on dense time / sparse time when time is proportional to bytes read:
    ``(dense + fixed) / (sparse + fixed)``; ``fixed_bytes`` is read by both (stays dense)."""
    if min(dense_bytes, sparse_bytes, fixed_bytes) < 0:
        raise ValueError("byte counts must be non-negative")
    if sparse_bytes + fixed_bytes <= 0:
        raise ValueError("the sparse variant reads no bytes: the roofline is unbounded")
    return (dense_bytes + fixed_bytes) / (sparse_bytes + fixed_bytes)


def check_ratio(measured: float, roofline: Optional[float], tol: float = 0.0) -> str:
    """``"ok"``, or :data:`ABOVE_ROOFLINE` when ``measured > roofline * (1 + tol)``."""
    if roofline is not None and measured > roofline * (1.0 + tol):
        return ABOVE_ROOFLINE
    return "ok"


# --------------------------------------------------------------------------------------------
# system description
# --------------------------------------------------------------------------------------------
def system_info() -> dict[str, Any]:
    """CPU model, the SIMD flags that matter here, core and thread counts, load, torch build (from awq.kernels.hw)."""
    from awq.kernels.hw import cpu_info

    c = cpu_info()
    return {"cpu": c["model"], "flags": c["flags"], "cpus": c["cores"], "torch_threads": c["threads"],
            "torch": c["torch"], "torch_cpu_capability": c["torch_capability"],
            "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def header_line(name: str, info: Mapping[str, Any]) -> str:
    flags = " ".join(info["flags"]) or "none of " + "/".join(CPU_FLAGS)
    return (f"# {name} | cpu: {info['cpu']} | flags: {flags} | torch threads {info['torch_threads']} of "
            f"{info['cpus']} cpus | torch {info['torch']} ({info['torch_cpu_capability']}) | "
            f"load average {info['loadavg']}")


# --------------------------------------------------------------------------------------------
# reporter
# --------------------------------------------------------------------------------------------
def _ms(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t < 0.01 else f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.2f} s"


class Report:
    """Prints and collects a benchmark's figures; :meth:`write` stores them as JSON with the config.

    Call after ``torch.set_num_threads`` so that the header shows the thread count used."""

    def __init__(self, name: str, config: Mapping[str, Any], tol: float = 0.0, echo: bool = True) -> None:
        self.name, self.tol, self.echo = name, tol, echo
        self.data: dict[str, Any] = {"bench": name, "config": dict(config), "system": system_info(),
                                     "timings": {}, "ratios": {}, "figures": {}, "lines": []}
        self.emit(header_line(name, self.data["system"]))

    def emit(self, line: str) -> str:
        """Print one line (flushed) and keep it in the JSON."""
        self.data["lines"].append(line)
        if self.echo:
            print(line, flush=True)
        return line

    def figure(self, key: str, value: Any) -> None:
        """Store any other figure (not printed)."""
        self.data["figures"][key] = value

    def timing(self, name: str, t: Timing, nbytes: Optional[float] = None, echo: bool = True) -> dict:
        """Record a timing; with ``nbytes`` (bytes read per call) also its effective GB/s."""
        rec = t.summary()
        line = f"{name}: median {_ms(t.median)} [min {_ms(t.min)}, max {_ms(t.max)}, n={len(t.samples)}]"
        if nbytes is not None:
            rec["bytes"] = nbytes
            rec["gbs"] = nbytes / t.median / 1e9
            line += f" = {rec['gbs']:.1f} GB/s effective"
        self.data["timings"][name] = rec
        if echo:
            self.emit(line)
        return rec

    def ratio(self, name: str, base: Timing, variant: Timing, roofline: Optional[float],
              note: str = "", what: str = "speedup") -> dict:
        """``base.median / variant.median`` beside its roofline (an upper bound; None: no bound known).

        The spread is that of the per-round paired ratios (rounds are interleaved, so pairs share
        the load).  A ratio above the roofline is flagged, not reported."""
        measured = base.median / variant.median
        pairs = [b / v for b, v in zip(base.samples, variant.samples)]
        status = check_ratio(measured, roofline, self.tol)
        valid = status == "ok"
        rec = {what: measured if valid else None, "measured_ratio": measured, "roofline": roofline,
               "status": status, "valid": valid, "paired_min": min(pairs), "paired_q1": quantile(pairs, 0.25),
               "paired_median": statistics.median(pairs),
               "paired_q3": quantile(pairs, 0.75), "paired_max": max(pairs),
               "base_median_s": base.median, "variant_median_s": variant.median}
        roof = "no roofline" if roofline is None else f"roofline {roofline:.2f}x"
        if valid:
            frac = "" if roofline is None else f" = {100 * measured / roofline:.0f}% of roofline"
            line = (f"{name}: {what} {measured:.2f}x [paired IQR {rec['paired_q1']:.2f}-{rec['paired_q3']:.2f}, "
                    f"range {rec['paired_min']:.2f}-{rec['paired_max']:.2f}] | {roof}{frac}")
        else:
            line = f"{name}: {ABOVE_ROOFLINE} (measured {measured:.2f}x > {roof}; not a result)"
        if note:
            line += f" | {note}"
        self.data["ratios"][name] = rec
        self.emit(line)
        return rec

    def flagged(self) -> list[str]:
        return [k for k, r in self.data["ratios"].items() if not r["valid"]]

    def write(self, path: Optional[str | Path]) -> None:
        """Write the JSON (atomically) if ``path`` is given."""
        if path is None:
            return
        from awq.util.io import atomic_write_json

        self.data["system"]["loadavg_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        atomic_write_json(path, self.data)


# --------------------------------------------------------------------------------------------
# the dense baseline
# --------------------------------------------------------------------------------------------
class FusedDenseMLP(nn.Module):
    """Dense SwiGLU with contiguous weights: ``down(act(g) * u)`` where ``[g; u] = x @ W_gu^T`` is one
    ``F.linear`` over the fused ``[2F, H]`` gate+up matrix (one pass over x, one GEMV/GEMM call)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        with torch.no_grad():
            self.w_gu = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                                     requires_grad=False)
            self.w_d = nn.Parameter(mlp.down_proj.weight.detach().contiguous().clone(), requires_grad=False)
        self.act_fn = mlp.act_fn
        self.inter = mlp.gate_proj.weight.shape[0]
        if any(getattr(p, "bias", None) is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ValueError("FusedDenseMLP: biased projections are not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = F.linear(x, self.w_gu)
        return F.linear(self.act_fn(gu[..., :self.inter]) * gu[..., self.inter:], self.w_d)


def best_dense(timings: Mapping[str, Timing], candidates: Sequence[str]) -> str:
    """Name of the dense candidate with the lowest median time."""
    return min(candidates, key=lambda k: timings[k].median)


# --------------------------------------------------------------------------------------------
# command-line plumbing shared by the bench scripts
# --------------------------------------------------------------------------------------------
def parse_bench(cls: type, argv: Optional[Sequence[str]], *, prog: Optional[str] = None,
                description: Optional[str] = None, **quick_defaults: Any):
    """Parse ``argv`` into a checked config ``cls`` (options declared with ``awq.util.cli.opt``, checked by kind
    before any work; a problem is one :class:`awq.util.cli.ConfigError` line).  With ``--quick``,
    ``quick_defaults`` replace the defaults (options given explicitly still win)."""
    p = build_parser(cls, prog=prog, description=description, suppress_defaults=True)
    given = given_options(cls, p.parse_args(None if argv is None else [str(a) for a in argv]))
    if given.get("quick"):
        given = {**quick_defaults, **given}
    return check_config(cls(**given))


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None,
            level: int = logging.WARNING, errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """Run a bench ``main(argv)``; bad input -> one ``error: ...`` line on stderr and exit code 2."""
    setup_logging(level, fmt="%(asctime)s %(levelname)s %(message)s")
    try:
        main(argv)
    except (ConfigError, *errors) as e:
        fail(str(e))
        return 2
    return 0
