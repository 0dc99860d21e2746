"""Write a GGUF of the same weights in one block format (Q8_0 / Q4_0 / Q4_1), for llama.cpp to run.

:func:`write_quant_gguf` copies a GGUF's metadata and tokenizer and writes every 2-D weight (the
decoder layers' linears, the token embedding / LM head) in the asked format: a tensor the source
already holds in that format is copied block for block; any other is dequantised by ``gguf`` and
quantised by ``gguf.quants.quantize`` (ggml's reference quantiser).  Norms and biases stay F32.
:class:`awq.decode.lean.LeanDecoder` given the written file (``weights_gguf=``) takes the same raw blocks,
so llama.cpp and the lean decoder read bit-identical weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from awq.load.models import default_gguf_path, resolve_alias
from awq.load.packed_gguf import ensure_packed_gguf
from awq.load.quant_formats import get_format
from awq.util.cache import cache_dir
from awq.util.io import atomic_path

log = logging.getLogger(__name__)

# gguf.LlamaFileType of a file whose linears are in the format
_FILE_TYPE = {"q8_0": 7, "q4_0": 2, "q4_1": 3}


def copy_fields(r: Any, w: Any, file_type: int) -> None:
    """Copy every metadata field of a GGUF being read into one being written, but the architecture (given to the
    writer) and the reader's own GGUF.* fields, with ``general.file_type`` set to ``file_type``."""
    import gguf

    for fld in r.fields.values():
        if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
            continue
        vt = fld.types[0]
        val = file_type if fld.name == gguf.Keys.General.FILE_TYPE else fld.contents()
        w.add_key_value(fld.name, val, vt, sub_type=fld.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)


def quant_gguf_name(src: Path, fmt: str, head_fmt: Optional[str] = None) -> str:
    head = get_format(head_fmt or fmt).name
    tail = "" if head == get_format(fmt).name else f"-head{head.upper()}"
    return f"{Path(src).stem}-{get_format(fmt).name.upper()}{tail}.gguf"


def _is_head(name: str) -> bool:
    return name in ("token_embd.weight", "output.weight")


def write_quant_gguf(src: str | Path, dst: str | Path, fmt: str, head_fmt: Optional[str] = None) -> Path:
    """``src`` rewritten with its linears in ``fmt`` and its embedding / LM head in ``head_fmt`` (default
    ``fmt``), atomically; returns ``dst``."""
    import gguf
    from gguf.quants import dequantize, quantize

    f = get_format(fmt)
    hf = get_format(head_fmt or fmt)
    r = gguf.GGUFReader(str(src))
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    copied = requant = 0
    with atomic_path(Path(dst), f"{f.name} GGUF") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        copy_fields(r, w, _FILE_TYPE[f.name])
        for t in r.tensors:
            shape = [int(x) for x in reversed(list(t.shape))]  # numpy order [R, C]
            if len(shape) != 2:
                arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
                w.add_tensor(t.name, arr)
                continue
            target = hf if _is_head(t.name) else f
            qtype = gguf.GGMLQuantizationType(target.ggml_type)
            if t.tensor_type == qtype:
                raw = np.array(t.data, dtype=np.uint8, copy=True)
                copied += 1
            else:
                vals = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
                raw = quantize(vals, qtype)
                requant += 1
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s: %d tensors copied as %s blocks, %d quantised", dst, copied, f.name, requant)
    return Path(dst)


def ensure_quant_gguf(src: str | Path, fmt: str, head_fmt: Optional[str] = None) -> Path:
    """The cached GGUF of ``src`` in ``fmt`` (written once under the project cache's ``gguf/``)."""
    dst = cache_dir("gguf") / quant_gguf_name(Path(src), fmt, head_fmt)
    if not dst.is_file():
        log.info("writing %s (once)", dst)
        write_quant_gguf(src, dst, fmt, head_fmt)
    return dst


def gguf_source(model_path: Optional[str]) -> Optional[Path]:
    """The GGUF a ``--model_path`` loads from (the default model, an alias of a packed model, a .gguf), or None
    (a Hugging Face folder or hub id): where the quantised decoder and the frontier take raw blocks from."""
    if model_path is None:
        return default_gguf_path()
    if str(model_path).endswith(".gguf"):
        return Path(model_path)
    alias = None if Path(model_path).expanduser().exists() else resolve_alias(model_path)
    if alias is None:
        return None
    return default_gguf_path() if alias[0] == "default" else Path(ensure_packed_gguf(alias[1]))
