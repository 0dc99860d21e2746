"""Build and load the project's C++ CPU kernels (``csrc/*.cpp``) with ``torch.utils.cpp_extension.load``.

A kernel is compiled once per (source text, flags, torch version, host CPU) and cached under
``<cache root>/torch_extensions`` (:mod:`awq.util.cache`): the build
directory's name carries a hash of all four, so a ``-march=native`` build is never reused on
another CPU or after an edit of the source.  Loading logs one line: the module it loaded, or why
it could not (no source file, no compiler, no ninja, a build error) -- the caller then uses its
pure torch path.

The sources are found in the repository (``<repo>/csrc``, an editable install such as
``make install``) or, in a regular install, as package data (``awq/csrc``, see setup.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from awq.kernels.hw import cpu_flags
from awq.util import env
from awq.util.cache import cache_root

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parents[1]  # awq/
SOURCE_DIRS: tuple[Path, ...] = (_PKG.parent / "csrc", _PKG / "csrc")  # repo / editable, then package data


def cache_dir() -> Path:
    """Where the compiled extensions live (one folder per build key): ``<cache root>/torch_extensions``."""
    return cache_root() / "torch_extensions"


def cpu_tag() -> str:
    """Identify the host CPU (architecture + feature flags) so that native builds are never shared."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return flags


def find_source(filename: str) -> Optional[Path]:
    """``csrc/<filename>`` from the repository or the installed package, or None."""
    for d in SOURCE_DIRS:
        p = d / filename
        if p.is_file():
            return p
    return None


def build_key(source_text: str, cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    import torch

    blob = source_text + " ".join(cflags) + " ".join(ldflags) + torch.__version__ + cpu_tag()
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


def march_flag() -> str:
    """The ``-march`` of every C++ kernel: ``-march=native``, or, when ``$AWQ_HW_FLAGS`` (``awq.kernels.hw``) hides
    AVX-512 on an x86 CPU to emulate an older one, the instruction set those flags name:
    ``-march=haswell`` (AVX2, FMA, POPCNT, BMI2: an AVX2-only CPU) or the generic ``-march=x86-64``, so the
    kernels are built and measured as on such a CPU (under their own build key)."""
    if not env.is_set("AWQ_HW_FLAGS") or platform.machine().lower() not in ("x86_64", "amd64"):
        return "-march=native"
    flags = set(cpu_flags())
    if "avx512f" in flags:
        return "-march=native"
    return "-march=haswell" if {"avx2", "fma"} <= flags else "-march=x86-64"


def source_text(srcs: Sequence[Path]) -> str:
    """The text a build depends on: the sources and every header beside them (``csrc/*.h``)."""
    headers = sorted({h for s in srcs for h in s.parent.glob("*.h")})
    return "".join(p.read_text() for p in [*srcs, *headers])


def load_cpp_extension(stem: str, filename: str | Sequence[str], cflags: Sequence[str], ldflags: Sequence[str] = (),
                       what: str = "C++") -> Optional[ModuleType]:
    """Compile (or reuse) ``csrc/<filename>`` (or several sources into one module) as module
    ``<stem>_<key>``; None if that is impossible.

    ``what`` names the kernel in the log line (``"<what> C++ kernel unavailable (...)"``).
    Never raises for a build problem: the caller falls back to its pure torch path.
    """
    names = [filename] if isinstance(filename, str) else list(filename)
    srcs = [find_source(n) for n in names]
    missing = [n for n, s in zip(names, srcs) if s is None]
    if missing:
        log.warning("%s C++ kernel unavailable (source csrc/%s not found in %s); using the pure torch path",
                    what, missing[0], " or ".join(str(d) for d in SOURCE_DIRS))
        return None
    try:
        import torch.utils.cpp_extension as ext

        name = f"{stem}_{build_key(source_text(srcs), cflags, ldflags)}"
        build = cache_dir() / name
        build.mkdir(parents=True, exist_ok=True)
        # torch's own build lock is a plain file that a killed build leaves behind, after which every later load
        # waits for it forever; an OS lock (released when its process dies) serialises our builds instead, and
        # under it any torch lock file left in the folder is stale
        with open(build / ".build.flock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            stale = build / "lock"
            if stale.exists():
                log.warning("removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            mod = ext.load(name=name, sources=[str(s) for s in srcs], extra_cflags=list(cflags),
                           extra_ldflags=list(ldflags), build_directory=str(build), verbose=False)
    except Exception as e:  # compiler missing, ninja missing, build error, unwritable cache ...
        log.warning("%s C++ kernel unavailable (%s: %s); using the pure torch path", what, type(e).__name__,
                    _last_line(e))
        return None
    log.info("%s C++ kernel loaded: %s (from %s, built in %s)", what, name, ", ".join(map(str, srcs)), build)
    return mod
