"""Option values checked by kind, before any work: one :class:`ConfigError` line ``--option: what is wrong``.

A config field declares its kind with ``awq.util.cli.opt(..., kind=...)``; :func:`awq.util.cli.check_config`
calls :func:`check_value` for it right after parsing (and on library use), so a bad name or path is refused
before a model, a corpus or a store is opened.  The kinds:

==============  ==================================================================================================
``device``      parsed by ``torch.device`` (cpu, cuda, cuda:N); ``cuda`` without CUDA, or a GPU index that does not
                exist, is refused (``words`` such as ``auto`` are accepted as they are)
``tasks``       comma-separated lm-eval task names (``wikitext`` is the project's own perplexity task): checked
                against lm-eval's task registry (plus ``include_from``: the option naming a folder of extra task
                YAMLs).  lm-eval is imported only when a name other than ``wikitext`` is given; the registry's
                names are cached per lm-eval version under the cache root (indexing takes ~15 s once)
``in_file``     an input file: exists, a regular file (a device, a FIFO or a socket is refused, never opened),
                readable, not empty, at most ``max_mb`` MiB when declared; ``words`` are literal values that are
                not paths (``--init random``)
``in_dir``      an input folder: exists, a directory, readable
``in_path``     either of the two
``model``       an existing path is checked as ``in_path`` (then by ``check``); anything else is left to ``check``
                (aliases, hub ids)
``centroids``   ``gate=FILE,up=FILE,down=FILE`` (each FILE an ``in_file``) or a folder
``out_file``    an output file: not a folder, not a device/FIFO, its folder exists or can be created and is
                writable (nothing is created by the check), and not one of the command's inputs
``out_dir``     an output folder: not a file, creatable and writable, not one of the command's inputs
``fraction``    a float in the declared range inside [0, 1] (0.5 = 50%); a percent such as 50 or 1.5 is refused,
                never reinterpreted
``seed``        an integer in [0, 2**32 - 1]
==============  ==================================================================================================

Every option, kind or not: floats must be finite; integers lie in [-2**31, 2**31 - 1] unless declared otherwise;
strings and paths must not be empty; ``check`` (a callable declared with the option) may refuse a value with a
one-line ``ValueError`` (used where the rule lives in a higher layer: the method registry, model aliases).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from awq.util.cache import cache_dir
from awq.util.io import OutputError, atomic_write_json, check_not_input

__all__ = ["ConfigError", "KINDS", "INPUT_KINDS", "OUTPUT_KINDS", "INT_LIMIT", "SEED_MAX", "check_value",
           "check_number", "check_device", "check_tasks", "check_input_path", "check_output_file",
           "check_output_dir", "input_paths", "lm_eval_task_names", "label", "check_outputs_not_inputs"]

INT_LIMIT = 2 ** 31 - 1
SEED_MAX = 2 ** 32 - 1
INPUT_KINDS = ("in_file", "in_dir", "in_path", "model", "centroids")
OUTPUT_KINDS = ("out_file", "out_dir")
KINDS = ("device", "tasks", *INPUT_KINDS, *OUTPUT_KINDS, "fraction", "seed")
BUILTIN_TASKS = ("wikitext",)


class ConfigError(ValueError):
    """An option value is out of range or not allowed (one line, names the option)."""


def label(name: str, positional: bool = False) -> str:
    """How messages name an option: ``--name`` (a positional argument: ``name``)."""
    return name if positional or name.startswith("-") else f"--{name}"


def _err(name: str, what: str) -> ConfigError:
    """``name``: the option as :func:`label` shows it."""
    return ConfigError(f"{name}: {what}")


# ---- numbers -------------------------------------------------------------------------------------------------
def check_number(name: str, x: Any, tp: type, meta: dict) -> None:
    """Finite, integer where declared int, inside the declared (or default) range."""
    if isinstance(x, bool):
        return
    kind = meta.get("kind")
    if tp is float:
        if not math.isfinite(x):
            raise _err(name, f"must be a finite number, got {x}")
    lo_default, hi_default = (0, SEED_MAX) if kind == "seed" else (-INT_LIMIT - 1, INT_LIMIT)
    if tp is int:
        if "min" not in meta and "gt" not in meta and x < lo_default:
            raise _err(name, f"must be >= {lo_default}, got {x}")
        if "max" not in meta and "lt" not in meta and x > hi_default:
            raise _err(name, f"must be <= {hi_default}, got {x}")
    for key, ok, word in (("min", lambda a, b: a >= b, ">="), ("max", lambda a, b: a <= b, "<="),
                          ("gt", lambda a, b: a > b, ">"), ("lt", lambda a, b: a < b, "<")):
        if key in meta and not ok(x, meta[key]):
            if kind == "fraction":
                lo = f"[{meta['min']}" if "min" in meta else f"({meta.get('gt', 0)}"
                hi = f"{meta['max']}]" if "max" in meta else f"{meta.get('lt', 1)})"
                raise _err(name, f"must be a fraction in {lo}, {hi} (0.5 means 50%; percents are not accepted), "
                                 f"got {x}")
            raise _err(name, f"must be {word} {meta[key]}, got {x}")


# ---- devices -------------------------------------------------------------------------------------------------
def check_device(name: str, value: str, words: Sequence[str] = ()) -> None:
    """``torch.device`` parses it and it exists here (cpu; cuda only with CUDA, an index below the GPU count)."""
    import torch

    if value in words:
        return
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise _err(name, f"{value!r} is not a device (use cpu, cuda or cuda:N"
                         f"{''.join(', ' + w for w in words)})") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise _err(name, f"device type {dev.type!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise _err(name, f"{value}: CUDA is not available on this machine")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise _err(name, f"{value}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")


# ---- lm-eval task names --------------------------------------------------------------------------------------
_TASK_NAMES: dict[str, frozenset[str]] = {}


def _registry_key() -> str:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return ""


def lm_eval_task_names(include_path: Optional[str] = None) -> frozenset[str]:
    """Every task, group and tag name lm-eval knows (its own registry, ``TaskManager.all_tasks``).

    The default registry's names are cached per lm-eval version in ``<cache root>/lm_eval/tasks-<version>.json``
    (indexing it takes seconds); an ``include_path`` folder is indexed on its own each time.
    """
    version = _registry_key()
    if not version:
        raise ConfigError("lm-eval is not installed: tasks other than wikitext need it (pip install lm_eval)")
    key = f"{version}|{include_path or ''}"
    if key in _TASK_NAMES:
        return _TASK_NAMES[key]
    names: set[str] = set()
    cache = cache_dir("lm_eval") / f"tasks-{re.sub(r'[^A-Za-z0-9.]+', '_', version)}.json"
    try:
        names = set(json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError):
        names = set()
    if not names:
        from lm_eval.tasks import TaskManager

        names = set(TaskManager().all_tasks)
        try:
            atomic_write_json(cache, sorted(names), what="lm-eval task name cache", indent=None)
        except OSError:
            pass
    if include_path:
        from lm_eval.tasks import TaskManager

        names |= set(TaskManager(include_path=include_path, include_defaults=False).all_tasks)
    _TASK_NAMES[key] = frozenset(names)
    return _TASK_NAMES[key]


def check_tasks(name: str, value: str, include_path: Optional[str] = None) -> None:
    tasks = [t.strip() for t in value.split(",")]
    if not any(tasks):
        raise _err(name, "no task named")
    if "" in tasks:
        raise _err(name, f"empty task name in {value!r}")
    other = [t for t in tasks if t not in BUILTIN_TASKS]
    if not other:
        return
    try:
        known = lm_eval_task_names(include_path)
    except ConfigError as e:
        raise _err(name, str(e)) from None
    bad = [t for t in other if t not in known]
    if bad:
        close = sorted(k for k in known if bad[0].lower() in k.lower())[:5]
        raise _err(name, f"unknown lm-eval task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}"
                         + (f" (similar: {', '.join(close)})" if close else "")
                         + " (python -m lm_eval --tasks list shows them)")


# ---- input paths ---------------------------------------------------------------------------------------------
def _kind_of(mode: int) -> str:
    for test, word in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def check_input_path(name: str, value: str | Path, want: str = "in_path", max_mb: Optional[float] = None) -> Path:
    """An existing, readable regular file (``in_file``), folder (``in_dir``) or either (``in_path``); stat only:
    a device or a pipe is never opened."""
    p = Path(value).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _err(name, f"no such {'file' if want == 'in_file' else 'folder' if want == 'in_dir' else 'file or folder'}: "
                         f"{value}") from None
    except NotADirectoryError:
        raise _err(name, f"{value}: a parent of it is a file, not a folder") from None
    except (OSError, ValueError) as e:
        raise _err(name, f"cannot read {value}: {getattr(e, 'strerror', None) or e}") from None
    is_dir, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
    if want == "in_dir" and not is_dir:
        raise _err(name, f"{value} is {'a file' if is_file else _kind_of(st.st_mode)}, not a folder")
    if want == "in_file" and not is_file:
        raise _err(name, f"{value} is {'a directory' if is_dir else _kind_of(st.st_mode)}, not a regular file")
    if not (is_dir or is_file):
        raise _err(name, f"{value} is {_kind_of(st.st_mode)}: refusing to read it")
    if not os.access(p, os.R_OK | (os.X_OK if is_dir else 0)):
        raise _err(name, f"{value} is not readable (permissions)")
    if is_file:
        if st.st_size == 0:
            raise _err(name, f"{value} is empty")
        if max_mb is not None and st.st_size > max_mb * 2 ** 20:
            raise _err(name, f"{value} is {st.st_size / 2 ** 20:.0f} MiB, more than the {max_mb:g} MiB such a file "
                             "can be: is it the right file?")
    return p


def _check_centroids(name: str, value: str) -> list[Path]:
    if "=" not in value:
        return [check_input_path(name, value, "in_dir")]
    out = []
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, path = part.partition("=")
        if not sep or not path.strip():
            raise _err(name, f"bad entry {part!r}: want gate=FILE,up=FILE,down=FILE or a folder")
        out.append(check_input_path(name, path.strip(), "in_file"))
    if not out:
        raise _err(name, "no centroid file named")
    return out


def input_paths(kind: Optional[str], value: Any, words: Sequence[str] = ()) -> list[Path]:
    """The paths an input option's value names (for the output-is-not-an-input check)."""
    if value is None or kind not in INPUT_KINDS:
        return []
    out = []
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        s = str(v)
        if not s or s in words:
            continue
        if kind == "centroids" and "=" in s:
            out += [Path(part.partition("=")[2].strip()) for part in s.split(",") if "=" in part]
        else:
            out.append(Path(s))
    return out


# ---- output paths --------------------------------------------------------------------------------------------
def _nearest_existing(p: Path) -> tuple[Path, os.stat_result]:
    """The path itself or its nearest existing ancestor, with its stat (every missing part is to be created)."""
    q = p
    while True:
        try:
            return q, q.stat()
        except FileNotFoundError:
            if q.parent == q:
                raise
            q = q.parent


def _check_creatable(name: str, p: Path, value: Any, what: str) -> None:
    try:
        anc, st = _nearest_existing(p.parent if what == "file" else p)
    except NotADirectoryError:
        raise _err(name, f"cannot create the folder of {value}: a parent of it is a file") from None
    except (OSError, ValueError) as e:
        raise _err(name, f"cannot use {value}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _err(name, f"cannot create the folder of {value}: {anc} is a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise _err(name, f"{value}: the folder {anc} is not writable")


def check_output_file(name: str, value: str | Path) -> Path:
    """A file that can be written: not a folder or device, its folder exists (or can be created) and is
    writable.  Nothing is created."""
    p = Path(value).expanduser()
    if str(value).endswith(("/", os.sep)):
        raise _err(name, f"{value} names a directory, not a file")
    try:
        st = p.stat()
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise _err(name, f"cannot create the folder of {value}: a parent of it is a file") from None
    except (OSError, ValueError) as e:
        raise _err(name, f"cannot use {value}: {getattr(e, 'strerror', None) or e}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise _err(name, f"{value} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise _err(name, f"{value} is {_kind_of(st.st_mode)}: refusing to write there")
        if not os.access(p, os.W_OK):
            raise _err(name, f"{value} exists and is not writable")
    _check_creatable(name, p, value, "file")
    return p


def check_output_dir(name: str, value: str | Path) -> Path:
    """A folder that can be written: an existing writable folder, or one that can be created."""
    p = Path(value).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise _err(name, f"cannot create the folder {value}: a parent of it is a file") from None
    except (OSError, ValueError) as e:
        raise _err(name, f"cannot use {value}: {getattr(e, 'strerror', None) or e}") from None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise _err(name, f"cannot create the folder {value}: it is "
                             f"{'a file' if stat.S_ISREG(st.st_mode) else _kind_of(st.st_mode)}")
        if not os.access(p, os.W_OK | os.X_OK):
            raise _err(name, f"the folder {value} is not writable")
        return p
    _check_creatable(name, p, value, "folder")
    return p


# ---- one value -----------------------------------------------------------------------------------------------
def check_value(name: str, x: Any, tp: type, meta: dict, get: Callable[[str], Any], whole: Any = None) -> None:
    """Check one (scalar) value of option ``name`` (as messages show it: ``--x``) by its declared kind;
    ``get(other)`` reads another option; ``whole``: only run ``meta["check"]`` on this (a list option's value)."""
    if whole is not None:
        x = whole
    kind = meta.get("kind")
    words = tuple(meta.get("words") or ())
    if tp in (int, float):
        check_number(name, x, tp, meta)
    elif tp in (str, Path):
        s = str(x)
        if not s.strip() and s not in words:
            raise _err(name, "is empty")
        if "choices" in meta and x not in meta["choices"]:
            shown = ", ".join(map(str, meta["choices"]))
            raise _err(name, f"{x!r} is not one of {shown}")
        if kind == "device":
            check_device(name, s, words)
        elif kind == "tasks":
            inc = get(meta["include_from"]) if meta.get("include_from") else None
            check_tasks(name, s, str(inc) if inc else None)
        elif kind == "centroids":
            _check_centroids(name, s)
        elif kind == "model":
            if Path(s).expanduser().exists() or s.startswith((".", "/", "~")) or s.lower().endswith(".gguf"):
                check_input_path(name, s, "in_path")
        elif kind in ("in_file", "in_dir", "in_path"):
            if s not in words:
                try:
                    check_input_path(name, s, kind, meta.get("max_mb"))
                except ConfigError as e:
                    if words and "no such" in str(e):
                        raise _err(name, f"{s!r}: no such {'file' if kind == 'in_file' else 'path'}, and not one "
                                         f"of {', '.join(words)}") from None
                    raise
        elif kind == "out_file":
            check_output_file(name, s)
        elif kind == "out_dir":
            check_output_dir(name, s)
    if "choices" in meta and tp in (int, float) and x not in meta["choices"]:
        raise _err(name, f"{x!r} is not one of {', '.join(map(str, meta['choices']))}")
    check = meta.get("check")
    if check is not None:
        try:
            check(x)
        except ConfigError:
            raise
        except (ValueError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _err(name, msg.removeprefix(f"{name} ").removeprefix(f"{name}: ")) from None


def check_outputs_not_inputs(outputs: Iterable[tuple[str, Any]], inputs: list[Path]) -> None:
    """No output option names (or lies inside) an input, nor lies inside a pattern store."""
    for name, value in outputs:
        if value is None:
            continue
        try:
            check_not_input(value, list(inputs), name)
        except OutputError as e:
            raise ConfigError(str(e).replace(f"{name} ", f"{name}: ", 1)) from None
