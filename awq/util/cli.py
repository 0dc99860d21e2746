"""Command lines generated from config dataclasses: every option is declared once, as a field.

A CLI's options are the fields of a dataclass; :func:`opt` attaches the help text and checks::

    @dataclass
    class Config:
        seqlen: int = opt(2048, help="window length in tokens (default 2048)", min=2)
        dtype: Optional[str] = opt(None, help="model dtype", choices=["float32", "float16"])
        dense: bool = opt(False, help="no thresholding")

    def main(cfg: Config) -> dict: ...                 # the typed entry point (library use)

    def cli(argv=None) -> int:                         # the thin command line
        return run_cli(Config, main, argv, prog="python -m pkg.mod", description=...)

Field -> option rules (:func:`build_parser`): ``--<name>``; no default -> required; ``bool`` with
default False -> ``--<name>`` (store_true), with default True -> ``--no_<name>`` (store_false);
``int`` / ``float`` / ``str`` / ``Path`` (``Optional[...]`` allowed) -> that type;
``list[int|float|str|Path]`` -> one comma-separated value (``nargs="+"``: space-separated values).
Metadata: ``help``, ``choices``,
``metavar``, ``min`` / ``max`` (inclusive), ``gt`` / ``lt`` (exclusive), ``cli=False`` (not an
option).  :func:`check_config` checks choices and ranges with a one-line :class:`ConfigError`;
:func:`parse_config` runs it right after parsing, before any model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

__all__ = ["ConfigError", "opt", "build_parser", "check_config", "parse_config", "given_options", "to_argv",
           "run_cli", "setup_logging"]

T = TypeVar("T")
_SCALARS = (bool, int, float, str, Path)


class ConfigError(ValueError):
    """An option value is out of range or not allowed (one line, names the option)."""


def opt(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
        choices: Optional[Sequence[Any]] = None, metavar: Optional[str] = None, min: Optional[float] = None,
        max: Optional[float] = None, gt: Optional[float] = None, lt: Optional[float] = None,
        nargs: Optional[str] = None, cli: bool = True) -> Any:
    """A dataclass field carrying its command-line description (see the module doc)."""
    meta = {"help": help, "cli": cli}
    for k, v in (("choices", choices), ("metavar", metavar), ("min", min), ("max", max), ("gt", gt), ("lt", lt),
                 ("nargs", nargs)):
        if v is not None:
            meta[k] = tuple(v) if k == "choices" else v
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _kind(tp: Any) -> tuple[type, bool, bool]:
    """-> (scalar type, optional, is a list)."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {tp}")
        optional, tp, origin = True, args[0], typing.get_origin(args[0])
    if origin in (list, tuple):
        (inner, *_rest) = typing.get_args(tp)
        if inner not in _SCALARS:
            raise TypeError(f"unsupported list element type {inner}")
        return inner, optional, True
    if tp not in _SCALARS:
        raise TypeError(f"unsupported option type {tp}")
    return tp, optional, False


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool, bool]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False or not f.init:
            continue
        out.append((f, *_kind(hints[f.name])))
    return out


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _list_parser(inner: type, name: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [inner(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {inner.__name__} values, got {text!r}") from None
    parse.__name__ = f"comma-separated {inner.__name__} list"
    return parse


def build_parser(cls: type, *, prog: Optional[str] = None, description: Optional[str] = None,
                 parser: Optional[argparse.ArgumentParser] = None, suppress_defaults: bool = False,
                 formatter_class: type = argparse.HelpFormatter) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one option per field of dataclass ``cls`` (in field order).

    ``suppress_defaults``: options not given on the command line are absent from the namespace
    (see :func:`given_options`), for configs whose defaults depend on other options (presets).
    """
    p = parser or argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter_class)
    for f, tp, _optional, is_list in _fields(cls):
        m = f.metadata
        kw: dict[str, Any] = {"help": m.get("help"), "dest": f.name}
        flag = f"--{f.name}"
        if tp is bool and not is_list:
            dflt = bool(_default(f))
            if dflt:
                flag = f"--no_{f.name}"
            kw["action"] = "store_false" if dflt else "store_true"
        else:
            if is_list and "nargs" in m:  # space-separated values (e.g. nargs="+")
                kw["type"], kw["nargs"] = tp, m["nargs"]
            else:
                kw["type"] = _list_parser(tp, f.name) if is_list else tp
            if "choices" in m:
                kw["choices"] = list(m["choices"])
            if "metavar" in m:
                kw["metavar"] = m["metavar"]
            if not _has_default(f):
                kw["required"] = True
        if suppress_defaults:
            kw["default"] = argparse.SUPPRESS
        elif _has_default(f):
            kw["default"] = _default(f)
        p.add_argument(flag, **kw)
    return p


def check_config(cfg: T) -> T:
    """Check choices and numeric ranges declared in the field metadata; :class:`ConfigError` names the option."""
    for f, tp, _optional, is_list in _fields(type(cfg)):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        m = f.metadata
        vals = list(v) if is_list else [v]
        if is_list and not vals:
            raise ConfigError(f"--{f.name} is empty")
        for x in vals:
            if "choices" in m and x not in m["choices"]:
                raise ConfigError(f"--{f.name} must be one of {', '.join(map(str, m['choices']))}, got {x!r}")
            if tp is float and not math.isfinite(x):
                raise ConfigError(f"--{f.name} must be a finite number, got {x}")
            if tp in (int, float) and not isinstance(x, bool):
                for key, ok, word in (("min", lambda a, b: a >= b, ">="), ("max", lambda a, b: a <= b, "<="),
                                      ("gt", lambda a, b: a > b, ">"), ("lt", lambda a, b: a < b, "<")):
                    if key in m and not ok(x, m[key]):
                        raise ConfigError(f"--{f.name} must be {word} {m[key]}, got {x}")
    return cfg


def given_options(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` present in ``ns`` (with ``suppress_defaults``: those given on the command line)."""
    return {f.name: getattr(ns, f.name) for f, *_ in _fields(cls) if hasattr(ns, f.name)}


def parse_config(cls: type[T], argv: Optional[Sequence[str]] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` into a checked ``cls`` instance (plus the namespace, for extra options)."""
    p = parser or build_parser(cls)
    ns = p.parse_args(None if argv is None else [str(a) for a in argv])
    return check_config(cls(**given_options(cls, ns))), ns


def to_argv(cfg: Any) -> list[str]:
    """The command line that :func:`parse_config` turns back into ``cfg`` (options at their default omitted)."""
    argv: list[str] = []
    for f, tp, _optional, is_list in _fields(type(cfg)):
        v = getattr(cfg, f.name)
        if _has_default(f) and v == _default(f):
            continue
        if tp is bool and not is_list:
            argv.append(f"--no_{f.name}" if _default(f) else f"--{f.name}")
        elif v is None:
            raise ConfigError(f"--{f.name} cannot be given as None on a command line")
        elif is_list and "nargs" in f.metadata:
            argv += [f"--{f.name}", *map(str, v)]
        else:
            argv += [f"--{f.name}", ",".join(map(str, v)) if is_list else str(v)]
    return argv


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted, so a CLI run in-process
    (tests, ``awq.experiments.reproduce``) never leaves a handler bound to a stream that is closed later."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str | int = "INFO", fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Log to the current stderr; replaces earlier root handlers (``force``). transformers' own handler is turned off
    and its records go through the root handler (same format, never a stale stream)."""
    lvl = getattr(logging, level) if isinstance(level, str) else level
    logging.basicConfig(level=lvl, format=fmt, handlers=[_StderrHandler()], force=True)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()


def run_cli(cls: type[T], main: Callable[[T], Any], argv: Optional[Sequence[str]] = None, *,
            prog: Optional[str] = None, description: Optional[str] = None,
            errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> int:
    """Parse, check, run ``main(cfg)``; bad input (``errors``) -> one ``error: ...`` line on stderr, exit 2."""
    setup_logging()
    try:
        cfg, _ = parse_config(cls, argv, build_parser(cls, prog=prog, description=description))
        main(cfg)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
