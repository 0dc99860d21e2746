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
option), ``positional`` (an argument without ``--``), and what :mod:`awq.util.validate` checks: ``kind``
(device, tasks, in_file, in_dir, in_path, model, centroids, out_file, out_dir, fraction, seed), ``words``
(literal values that are not paths), ``max_mb``, ``include_from``, ``check`` (a callable refusing a value with
a one-line ``ValueError``).  :func:`check_config` checks every option by its declaration with a one-line
:class:`ConfigError` (``--option: what is wrong``) -- ranges, finiteness, choices, kinds, and that no output
option names an input -- and :func:`parse_config` runs it right after parsing, before any model is loaded.
Parsing errors (an unknown option, a missing one, ``--n three``) are the same one-line :class:`ConfigError`
(:class:`OneLineParser`), never argparse's usage text and ``SystemExit``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from awq.util.validate import (INPUT_KINDS, KINDS, OUTPUT_KINDS, ConfigError, check_outputs_not_inputs,
                                check_value, input_paths, label)

__all__ = ["ConfigError", "OneLineParser", "opt", "build_parser", "check_config", "parse_config", "given_options",
           "to_argv", "run_cli", "setup_logging", "option_fields", "fail"]

T = TypeVar("T")
_SCALARS = (bool, int, float, str, Path)


def fail(message: str) -> None:
    """Print the one ``error: ...`` line of a refused command (the first line of ``message``) on stderr."""
    first = str(message).splitlines()[0] if str(message).strip() else "failed"
    print(f"error: {first}", file=sys.stderr)


def _one_line(message: str) -> str:
    """argparse's messages as ``--option: what is wrong``."""
    m = message.strip()
    if m.startswith("argument "):
        names, _, rest = m[len("argument "):].partition(": ")
        name = names.split("/")[0]
        if rest.startswith("ignored explicit argument"):
            rest = f"takes no value, got {rest.split(' ', 3)[-1]}"
        elif rest == "expected one argument":
            rest = "needs a value"
        return f"{name}: {rest}"
    if m.startswith("the following arguments are required: "):
        missing = m.split(": ", 1)[1]
        first = missing.split(", ")[0]
        return f"{first}: required" + (f" (missing: {missing})" if ", " in missing else "")
    if m.startswith("unrecognized arguments: "):
        args = m.split(": ", 1)[1]
        return f"{args.split()[0]}: unknown option (unrecognized: {args})"
    return m


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a one-line :class:`ConfigError` naming the option (no usage text, no
    ``SystemExit``): the command prints ``error: --option: ...`` and exits 2 like any other refusal."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(_one_line(message))


def opt(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
        choices: Optional[Sequence[Any]] = None, metavar: Optional[str] = None, min: Optional[float] = None,
        max: Optional[float] = None, gt: Optional[float] = None, lt: Optional[float] = None,
        nargs: Optional[str | int] = None, cli: bool = True, kind: Optional[str] = None,
        words: Optional[Sequence[str]] = None, max_mb: Optional[float] = None, include_from: Optional[str] = None,
        check: Optional[Callable[[Any], Any]] = None, positional: bool = False,
        aliases: Sequence[str] = (), append: bool = False) -> Any:
    """A dataclass field carrying its command-line description and checks (see the module doc)."""
    for k in (kind if isinstance(kind, tuple) else (kind,)):  # a tuple: one kind per position (nargs=N)
        if k is not None and k not in KINDS:
            raise TypeError(f"unknown option kind {k!r} (known: {', '.join(KINDS)})")
    meta: dict[str, Any] = {"help": help, "cli": cli}
    for k, v in (("choices", choices), ("metavar", metavar), ("min", min), ("max", max), ("gt", gt), ("lt", lt),
                 ("nargs", nargs), ("kind", kind), ("words", words), ("max_mb", max_mb),
                 ("include_from", include_from), ("check", check)):
        if v is not None:
            meta[k] = tuple(v) if k in ("choices", "words") else v
    if positional:
        meta["positional"] = True
    if aliases:
        meta["aliases"] = tuple(aliases)  # other spellings of the flag, e.g. ("--reps",)
    if append:
        meta["append"] = True  # a list option given once per value: --note A --note B
    if kind == "fraction":
        lo, hi = meta.get("min", meta.get("gt")), meta.get("max", meta.get("lt"))
        if lo is None or hi is None or lo < 0 or hi > 1:
            raise TypeError("a fraction option declares its range inside [0, 1] (min/gt and max/lt)")
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


def option_fields(cls: type) -> list[tuple[dataclasses.Field, type, bool, bool]]:
    """(field, scalar type, optional, is a list) of every command-line option of config class ``cls``."""
    return _fields(cls)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool, bool]]:
    hints = typing.get_type_hints(cls)  # slow (evaluates string annotations): once per class
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


def _path(text: str) -> Path:
    """``Path`` that refuses an empty value (``Path("")`` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return Path(text)


_path.__name__ = "path"


def _scalar(tp: type) -> Callable[[str], Any]:
    return _path if tp is Path else tp


def _list_parser(inner: type, name: str) -> Callable[[str], list]:
    conv = _scalar(inner)

    def parse(text: str) -> list:
        try:
            return [conv(v.strip()) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {inner.__name__} values, got {text!r}") from None
    parse.__name__ = f"comma-separated {inner.__name__} list"
    return parse


def build_parser(cls: type, *, prog: Optional[str] = None, description: Optional[str] = None,
                 parser: Optional[argparse.ArgumentParser] = None, suppress_defaults: bool = False,
                 formatter_class: type = argparse.HelpFormatter) -> argparse.ArgumentParser:
    """An ``argparse`` parser (:class:`OneLineParser`) with one option per field of dataclass ``cls`` (in field
    order).  Choices are checked by :func:`check_config` (one message for scalars and list elements alike).

    ``suppress_defaults``: options not given on the command line are absent from the namespace
    (see :func:`given_options`), for configs whose defaults depend on other options (presets).
    """
    p = parser or OneLineParser(prog=prog, description=description, formatter_class=formatter_class)
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
            if is_list and m.get("append"):
                kw["type"], kw["action"] = _scalar(tp), "append"
            elif is_list and "nargs" in m:  # space-separated values (e.g. nargs="+")
                kw["type"], kw["nargs"] = _scalar(tp), m["nargs"]
            else:
                kw["type"] = _list_parser(tp, f.name) if is_list else _scalar(tp)
            if "metavar" in m:
                kw["metavar"] = m["metavar"]
            elif "choices" in m and len(m["choices"]) <= 12:
                kw["metavar"] = "{" + ",".join(map(str, m["choices"])) + "}"
            if not _has_default(f):
                kw["required"] = True
        if suppress_defaults:
            kw["default"] = argparse.SUPPRESS
        elif _has_default(f):
            kw["default"] = _default(f)
        if m.get("positional"):
            kw.pop("dest")
            kw.pop("required", None)
            if _has_default(f):
                kw["nargs"] = "?"
            p.add_argument(f.name, **kw)
        else:
            p.add_argument(flag, *m.get("aliases", ()), **kw)
    return p


def _positions(f: dataclasses.Field, value: Any) -> list[tuple[Any, Any]]:
    """(kind, value) of each element of an option's value (a tuple ``kind``: one kind per position)."""
    kind = f.metadata.get("kind")
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(kind, tuple):
        return [(kind[i] if i < len(kind) else None, x) for i, x in enumerate(vals)]
    return [(kind, x) for x in vals]


def check_config(cfg: T) -> T:
    """Check every option of ``cfg`` by its declaration (:mod:`awq.util.validate`): choices, numeric ranges and
    finiteness, kinds (devices, task names, input and output paths), then that no output option names one of
    the inputs.  :class:`ConfigError` (one line) names the option."""
    fields_ = _fields(type(cfg))
    for f, tp, _optional, is_list in fields_:
        v = getattr(cfg, f.name)
        if v is None:
            continue
        vals = list(v) if is_list else [v]
        name = label(f.name, bool(f.metadata.get("positional")))
        if is_list and not vals and not (_has_default(f) and _default(f) == []):  # given as ''
            raise ConfigError(f"{name}: is empty")
        meta = dict(f.metadata)
        kinds = meta.get("kind")
        if is_list:
            meta.pop("check", None)  # a list option's check sees the whole list, after its elements
        for i, x in enumerate(vals):
            if isinstance(kinds, tuple):
                meta["kind"] = kinds[i] if i < len(kinds) else None
            check_value(name, x, tp, meta, lambda other: getattr(cfg, other, None))
        if is_list and f.metadata.get("check") is not None:
            check_value(name, None, type(None), {"check": f.metadata["check"]}, lambda other: None, whole=vals)
    inputs = [p for f, *_ in fields_ for k, x in _positions(f, getattr(cfg, f.name)) if k in INPUT_KINDS
              for p in input_paths(k, x, f.metadata.get("words") or ())]
    outputs = [(label(f.name), x) for f, *_ in fields_ for k, x in _positions(f, getattr(cfg, f.name))
               if k in OUTPUT_KINDS]
    if inputs and outputs:
        check_outputs_not_inputs(outputs, inputs)
    return cfg


def given_options(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` present in ``ns`` (with ``suppress_defaults``: those given on the command line)."""
    return {f.name: getattr(ns, f.name) for f, *_ in _fields(cls) if hasattr(ns, f.name)}


def parse_config(cls: type[T], argv: Optional[Sequence[str]] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` into a checked ``cls`` instance (plus the namespace, for extra options); every problem is
    one :class:`ConfigError` line."""
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
        elif is_list and f.metadata.get("append"):
            for x in v:
                argv += [f"--{f.name}", str(x)]
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
    try:
        cfg, _ = parse_config(cls, argv, build_parser(cls, prog=prog, description=description))
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging()
    try:
        main(cfg)
    except errors as e:
        fail(str(e))
        return 2
    return 0
