"""The one atomic write: every file this project produces goes through here.

Each writer writes to a unique temporary file in the destination's folder (``mkstemp``: two
concurrent writers never share a temp name), flushes and ``fsync``\\ s it, then ``os.replace``\\ s it
over the destination (atomic on POSIX), and finally fsyncs the folder so the rename survives a
crash. A reader therefore sees the old file or the new one, never a truncated one. On any error
the temporary file is removed.

``OutputError`` is raised (one line, naming the path) when the destination cannot be written:
an existing directory at the path, a parent that cannot be created, no permission; ``DiskFullError`` (one line
naming the file, the disk's mount point and its free space) when the disk fills while writing -- the temporary
file is removed, so the destination keeps its old content.

Guards used by every CLI before it computes: :func:`check_output_path` (writable file path),
:func:`check_not_input` (an output never resolves to an input file nor into an input folder such as
a pattern store), and :func:`output_lock` (an advisory ``fcntl.flock`` on ``<dir>/.lock`` or
``.<file>.lock`` beside it; a second concurrent writer is refused with :class:`LockedError`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = [
    "OutputError", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
    "atomic_torch_save", "atomic_save_safetensors", "check_output_path", "file_sha256", "fsync_dir",
    "LockedError", "output_lock", "check_not_input", "is_pattern_store", "DiskFullError", "is_disk_full",
    "disk_full_error", "disk_full_as_error",
]


class OutputError(OSError):
    """An output path cannot be written (message names the path)."""


class LockedError(OutputError):
    """Another process holds the advisory lock of an output file or folder."""


class DiskFullError(OutputError):
    """The disk (or quota) holding an output is full; the message names the file and the disk."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "File too large")


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is a full disk: ``ENOSPC``/``EDQUOT``/``EFBIG``, also as
    wrapped by torch (a ``RuntimeError`` from an ``OSError``) or safetensors (``... (os error 28)``)."""
    x: Optional[BaseException] = e
    for _ in range(8):
        if x is None:
            return False
        if isinstance(x, OSError) and x.errno in _FULL_ERRNOS:
            return True
        if any(w in str(x) for w in _FULL_WORDS):
            return True
        x = x.__cause__ or x.__context__
    return False


def _mount_point(path: Path) -> Path:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    dev = p.stat().st_dev
    while p.parent != p and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_error(path: str | Path, what: str = "output") -> DiskFullError:
    """The one-line error for a write of ``what`` at ``path`` that ran out of space: names the file, the disk
    (its mount point) and what is free there."""
    path = Path(path)
    try:
        disk = _mount_point(path.parent)
        usage = shutil.disk_usage(disk)
        where = f"the disk mounted at {disk} is full ({_size(usage.total)}, {_size(usage.free)} free now)"
    except OSError:
        where = f"the disk holding {path.parent} is full"
    return DiskFullError(f"{what} {path}: no space left: {where}; free space there or write elsewhere "
                         "(nothing half-written was kept: a rerun resumes from the last complete step)")


@contextlib.contextmanager
def disk_full_as_error(path: str | Path, what: str = "output") -> Iterator[None]:
    """Turn a full-disk failure inside the block into :class:`DiskFullError` (one line naming ``path`` and the
    disk); other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # torch / safetensors wrap the OSError
        if is_disk_full(e):
            raise disk_full_error(path, what) from None
        raise


def _lock_file(target: Path, folder: Optional[bool]) -> Path:
    folder = target.is_dir() if folder is None else folder
    return target / ".lock" if folder else target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def output_lock(target: str | Path, what: str = "output", folder: Optional[bool] = None) -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``target`` (a folder: ``target/.lock``; a file: ``.NAME.lock`` beside it;
    ``folder`` forces the choice, e.g. for a folder not created yet).

    Non-blocking: if another process holds it, :class:`LockedError` (one line) is raised at once.
    The lock file is left in place (removing it would race with a third writer); the lock itself
    disappears with the process, so a killed run never leaves a stale lock behind.
    """
    import fcntl

    target = Path(target)
    lock = _lock_file(target, folder)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f"cannot create the lock file {lock} of {what} {target}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{what} {target} is in use by another process (lock {lock} is held); "
                              "wait for it to finish or use another output") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        yield lock
    finally:
        os.close(fd)  # releases the flock


def is_pattern_store(path: str | Path) -> bool:
    """True for a folder holding a pattern store's ``meta.json`` (the stores of ``awq.store.pattern_store``)."""
    return (Path(path) / "meta.json").is_file() and Path(path).is_dir()


def _resolve(p: str | Path) -> Path:
    try:
        return Path(p).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(Path(p).expanduser()))


def check_not_input(output: str | Path, inputs: "list[str | Path | None]", what: str = "output") -> Path:
    """Refuse (one-line :class:`OutputError`) an ``output`` that is one of ``inputs`` or lies inside
    an input folder (e.g. a pattern store) -- symlinks and ``..`` resolved. Returns ``output``."""
    out = _resolve(output)
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = _resolve(inp)
        if out == src:
            raise OutputError(f"{what} {output} is the input {inp}: refusing to overwrite an input")
        if src.is_dir() and src in out.parents:
            kind = "pattern store" if is_pattern_store(src) else "folder"
            raise OutputError(f"{what} {output} lies inside the input {kind} {inp}: refusing to write there")
        if out.exists() and src.exists():
            try:
                if os.path.samefile(out, src):
                    raise OutputError(f"{what} {output} is the input {inp} (same file): refusing to overwrite it")
            except OSError:
                pass
    for parent in (out, *out.parents):
        if is_pattern_store(parent) and parent != out:
            raise OutputError(f"{what} {output} lies inside the pattern store {parent}: refusing to write there")
    return Path(output)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that a rename inside it is durable (best effort off POSIX)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_path(path: str | Path, what: str = "output") -> Path:
    """Fail early, in one line, when ``path`` cannot become a file: call before long work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} path {path} is a directory, not a file")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder of {what} {path}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{what} folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} exists and is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "output") -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; on success it replaces ``path`` atomically.

    The body writes the temporary file by any means (numpy, torch, safetensors ...). The file is
    fsynced before the rename and the folder after it; on an exception it is removed.
    """
    path = check_output_path(path, what)
    with disk_full_as_error(path, what):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield tmp_path
        _commit(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            raise disk_full_error(path, what) from None  # one line naming the file and the disk (space now free)
        raise
    fsync_dir(path.parent)


def _commit(tmp: Path, path: Path) -> None:
    """fsync the finished temporary file and rename it over ``path`` (the one place a file becomes visible)."""
    with open(tmp, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "output") -> Path:
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, what: str = "output") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_json(path: str | Path, obj: Any, what: str = "output", indent: Optional[int] = 2) -> Path:
    """JSON with a trailing newline; non-JSON values (paths, dtypes) are written with ``str``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n", what)


def atomic_torch_save(obj: Any, path: str | Path, what: str = "output") -> Path:
    import torch

    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object: torch would otherwise write the random temp name into the archive
    return Path(path)


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: Optional[dict[str, str]] = None,
                            what: str = "output") -> Path:
    from safetensors.torch import save_file

    with atomic_path(path, what) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def read_safetensors(path: str | Path, fmt: str, what: str, error: type = ValueError) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file whose metadata ``format`` is ``fmt``; ``error(one line)``
    for a missing, unreadable or other-format file (``what`` names the kind in the message)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{what} file {path} is not a readable safetensors file: {e}") from None
    if md.get("format") != fmt:
        raise error(f"{path} is not a {what} file (metadata format={md.get('format')!r})")
    return md, tensors


def atomic_write_with(path: str | Path, writer: Callable[[Path], None], what: str = "output") -> Path:
    """Atomic write through any ``writer(tmp_path)`` callable."""
    with atomic_path(path, what) as tmp:
        writer(tmp)
    return Path(path)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
