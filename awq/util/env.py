"""Every environment variable the project reads, declared once: name, kind, default and meaning.

Code reads a variable only through :func:`get` (or the typed helpers), which refuses an undeclared name
and a malformed value in one line (:class:`EnvError`), so this table is complete by construction.
``docs/environment.md`` is generated from :data:`VARIABLES` (``python -m awq.report``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional


class EnvError(ValueError):
    """A malformed environment variable (one-line message naming it)."""


@dataclass(frozen=True)
class Var:
    name: str
    kind: str  # "str", "path", "int", "float", "bool", "choice"
    default: Any
    help: str
    choices: tuple[str, ...] = ()


VARIABLES: dict[str, Var] = {v.name: v for v in (
    Var("AWQ_CACHE_DIR", "path", None, "cache root (converted models, corpus, kernel builds, hardware choices, "
        "file hashes, default predictors); else $XDG_CACHE_HOME/awq-sparsity, else ~/.cache/awq-sparsity"),
    Var("XDG_CACHE_HOME", "path", None, "standard user cache folder; the cache root is its awq-sparsity/ folder"),
    Var("AWQ_PROJECT_ROOT", "path", None, "project root for default result paths (else the checkout holding awq/)"),
    Var("AWQ_HUB_HOST", "str", None, "host[:port] probed to decide whether the Hugging Face hub is reachable "
        "(default huggingface.co:443)"),
    *(Var(n, "str", None, "1/true: never contact the Hugging Face hub (Hugging Face's own variable; set by the "
          "project when the hub is unreachable)") for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")),
    Var("AWQ_HW_FLAGS", "str", None, "CPU flags this process sees instead of the real ones, e.g. \"avx2 fma\": "
        "choices and C++ builds as on an AVX2-only CPU (-march=haswell)"),
    Var("AWQ_KERNEL_<NAME>", "str", None, "the implementation awq.kernels.hw.choose uses for NAME instead of "
        "measuring, e.g. AWQ_KERNEL_OVERLAP=int8|fp32 (centroid-swap GEMM), AWQ_KERNEL_AWC=popcount|gemm (AWC "
        "iteration), AWQ_KERNEL_THREADS=1|all (threads of a small clustering block)"),
    Var("AWQ_SPARSE_KERNEL", "choice", "auto", "sparse MLP kernels: \"torch\" forces the pure torch path",
        ("auto", "torch", "cpp")),
    Var("AWQ_SPARSE_MIN_BYTES", "int", 1 << 18, "weight bytes per thread below which a C++ kernel runs on fewer "
        "threads"),
    Var("AWQ_DECODE_GEMV", "choice", "auto", "one-row products of the lean decoder", ("auto", "torch", "cpp")),
    Var("AWQ_DECODE_FUSED", "bool", True, "the lean decoder's one-C++-call-per-layer step (0: the eager step)"),
    Var("AWQ_QUANT_ROWS_PER_PASS", "choice", "auto", "rows per pass of the quantised rows GEMV "
        "(csrc/quant_simd.h; auto: measured per format on this machine, awq.kernels.quant.choose_rows_per_pass)", ("auto", "1", "2", "4")),
    Var("AWQ_QUANT_SPARSE_LAYOUT", "choice", "tcols", "what the quantised sparse MLP kernels read for input "
        "channels: tcols (the weights requantised with blocks along the outputs; reads = active inputs exactly) or "
        "cols (the file's own blocks stored input-major; an active input reads its whole 32-input block's scales)",
        ("tcols", "cols")),
    Var("AWQ_CLUSTER_MEMORY_GB", "float", None, "memory budget of one clustering block (else a quarter of the "
        "free RAM up to 8 GiB, or half the free GPU memory)"),
)}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _parse(v: Var, raw: str) -> Any:
    text = raw.strip()
    if v.kind in ("str", "path"):
        return text or None
    if v.kind == "bool":
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise EnvError(f"{v.name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")
    if v.kind == "choice":
        low = text.lower() or str(v.default)
        if low not in v.choices:
            raise EnvError(f"{v.name}={raw!r} is not one of {', '.join(v.choices)}")
        return low
    try:
        num = int(text) if v.kind == "int" else float(text)
    except ValueError:
        raise EnvError(f"{v.name}={raw!r} is not {'an integer' if v.kind == 'int' else 'a number'}") from None
    if not math.isfinite(num) or num <= 0:
        raise EnvError(f"{v.name}={raw!r} must be a positive finite number")
    return num


def declared(name: str) -> Var:
    """The declaration of ``name``: its own, or its family's (``AWQ_KERNEL_<NAME>``)."""
    v = VARIABLES.get(name)
    if v is None:
        v = next((f for f in VARIABLES.values() if f.name.endswith(">") and name.startswith(f.name.split("<")[0])),
                 None)
    if v is None:
        raise KeyError(f"environment variable {name} is not declared in awq.util.env.VARIABLES")
    return v


def get(name: str) -> Any:
    """The value of a declared variable (parsed by its kind), or its default when unset."""
    v = declared(name)
    raw = os.environ.get(name)
    return v.default if raw is None else _parse(dataclasses.replace(v, name=name), raw)


def get_str(name: str) -> Optional[str]:
    val = get(name)
    return None if val is None else str(val)


def is_set(name: str) -> bool:
    declared(name)
    return os.environ.get(name) is not None


def markdown_table() -> str:
    """The table of docs/environment.md."""
    rows = ["| variable | kind | default | what it does |", "|---|---|---|---|"]
    for v in VARIABLES.values():
        kind = f"one of {', '.join(v.choices)}" if v.choices else v.kind
        rows.append(f"| `{v.name}` | {kind} | {'—' if v.default is None else f'`{v.default}`'} | {v.help} |")
    return "\n".join(rows)
