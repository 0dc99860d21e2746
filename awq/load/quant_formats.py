"""ggml's block formats Q8_0, Q4_0 and Q4_1 for the quantised decoder (:mod:`awq.decode.quant`).

A weight matrix ``W [R, C]`` (``R`` output rows, ``C`` inputs, ``C`` a multiple of 32) is cut along each
row into blocks of 32 consecutive inputs; a block stores a float16 scale ``d`` (Q4_1 also a float16
minimum ``m``) and 32 small integers ``q``:

=======  ======================================  ===========  ===============
format   value of entry ``j`` of a block          block bytes  bits per weight
=======  ======================================  ===========  ===============
Q8_0     ``d * q_j``, ``q_j`` int8                34           8.5
Q4_0     ``d * (q_j - 8)``, ``q_j`` in 0..15      18           4.5
Q4_1     ``d * q_j + m``, ``q_j`` in 0..15        20           5.0
=======  ======================================  ===========  ===============

ggml's byte layout of one block: ``d`` (2 bytes), [``m`` (2 bytes)], then the quants: Q8_0 32 int8;
Q4_0/Q4_1 16 bytes, byte ``j`` holding entry ``j`` in its low nibble and entry ``j + 16`` in its high
nibble.  :class:`QTensor` keeps the same bytes split into planes -- ``qs`` (the quant bytes of all
blocks, row-major, in ggml's order), ``d`` and ``m`` (float16 ``[R, C/32]``) -- so the planes and the
GGUF blocks convert both ways without loss (:meth:`QTensor.from_ggml`, :meth:`QTensor.to_ggml`).
The C++ kernels (``csrc/quant_kernels.cpp``, :mod:`awq.kernels.quant`) repack the planes once into their own orders (nibble
groups, a transposed copy for input-channel sparsity); those repacks move bits, never change a value,
and keep the bits per weight above; the sparse kernels' input-major copy is either the same blocks stored
input-major or the weights requantised with blocks along the outputs (:mod:`awq.decode.tcols`, see
:data:`LAYOUT_NOTE`).

Quantisation is ``gguf.quants.quantize`` (bit-identical to ggml's reference ``quantize_row_*_ref``) and
the reference dequantisation ``gguf.quants.dequantize``; :func:`dequantize` here is a torch version of
it, tested equal.  :func:`gguf_qtensor` takes a tensor's raw blocks straight out of a GGUF file, with
no dequantise / requantise round trip when the file already holds that format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from awq.kernels.quant import BLOCK


class QuantFormatError(ValueError):
    """Unsupported format or shape (one-line message)."""


@dataclass(frozen=True)
class Format:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_bytes: int  # bytes of one 32-entry block in ggml's layout
    has_min: bool

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / BLOCK

    @property
    def quant_bytes(self) -> int:
        """Bytes of a block's quants (32 int8, or 16 bytes of nibbles)."""
        return self.block_bytes - (4 if self.has_min else 2)


# ggml type ids: Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 (gguf.GGMLQuantizationType)
FORMATS: dict[str, Format] = {
    "q8_0": Format("q8_0", 8, 34, False),
    "q4_0": Format("q4_0", 2, 18, False),
    "q4_1": Format("q4_1", 3, 20, True),
}
WEIGHT_FORMATS: tuple[str, ...] = ("f32", *FORMATS)  # what a decoder's weights can be
LAYOUT_NOTE = ("row-major: ggml's blocks (bits per weight as the format); tcols (input-channel sparsity, the "
               "default): the weights requantised in the same format with blocks along the outputs, stored "
               "input-major, the same bits per weight, an active input reads exactly its own quants and scales; "
               "cols (AWQ_QUANT_SPARSE_LAYOUT=cols): the file's own quants and block scales stored input-major, "
               "the same bits per weight, but a token that reads any input of a 32-input block reads that "
               "block's scales")


def get_format(name: str) -> Format:
    f = FORMATS.get(str(name).lower())
    if f is None:
        raise QuantFormatError(f"unknown weight format '{name}' (choose from {', '.join(FORMATS)})")
    return f


def bits_per_weight(name: str) -> float:
    """Bits per weight of a weight format (``f32``: 32)."""
    return 32.0 if str(name).lower() == "f32" else get_format(name).bits_per_weight


def _check_cols(C: int, what: str = "tensor") -> None:
    if C % BLOCK:
        raise QuantFormatError(f"{what}: {C} inputs per row is not a multiple of the block size {BLOCK}")


@dataclass
class QTensor:
    """A block-quantised ``[R, C]`` matrix as planes of ggml's blocks (see the module docstring)."""

    fmt: str
    shape: tuple[int, int]
    qs: torch.Tensor  # uint8 [R, C] (Q8_0, int8 bit patterns) or [R, C/2] (Q4_*)
    d: torch.Tensor  # float16 [R, C/32]
    m: Optional[torch.Tensor] = None  # float16 [R, C/32] (Q4_1)

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def nbytes(self) -> int:
        """Storage bytes (equal to the GGUF tensor's)."""
        R, C = self.shape
        return R * (C // BLOCK) * self.format.block_bytes

    # -- ggml's block bytes ------------------------------------------------------------------
    @classmethod
    def from_ggml(cls, raw: np.ndarray | torch.Tensor, fmt: str, shape: tuple[int, int]) -> "QTensor":
        """Planes of the blocks ``raw`` (uint8, ``R * C/32`` blocks in ggml's layout, row-major)."""
        f = get_format(fmt)
        R, C = int(shape[0]), int(shape[1])
        _check_cols(C)
        nb = C // BLOCK
        a = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).reshape(-1)
        if a.numel() != R * nb * f.block_bytes:
            raise QuantFormatError(f"{fmt} tensor of shape {R}x{C} needs {R * nb * f.block_bytes} bytes, "
                                   f"got {a.numel()}")
        blocks = a.view(R * nb, f.block_bytes)
        d = blocks[:, 0:2].contiguous().view(torch.float16).view(R, nb)
        m = blocks[:, 2:4].contiguous().view(torch.float16).view(R, nb) if f.has_min else None
        qs = blocks[:, f.block_bytes - f.quant_bytes:].contiguous().view(R, nb * f.quant_bytes)
        return cls(f.name, (R, C), qs, d, m)

    def to_ggml(self) -> np.ndarray:
        """The blocks in ggml's layout: uint8 ``[R, C/32 * block_bytes]`` (a GGUF tensor's data)."""
        f = self.format
        R, C = self.shape
        nb = C // BLOCK
        parts = [self.d.reshape(R * nb, 1).view(torch.uint8)]
        if f.has_min:
            parts.append(self.m.reshape(R * nb, 1).view(torch.uint8))
        parts.append(self.qs.reshape(R * nb, f.quant_bytes))
        return torch.cat(parts, dim=1).reshape(R, nb * f.block_bytes).numpy()

    # -- values ------------------------------------------------------------------------------
    def quants(self) -> torch.Tensor:
        """The integer quants ``[R, C]`` (int16): Q8_0 as stored, Q4_* in 0..15, entries in row order."""
        R, C = self.shape
        if self.fmt == "q8_0":
            return self.qs.view(torch.int8).to(torch.int16).reshape(R, C)
        b = self.qs.reshape(R, C // BLOCK, BLOCK // 2).to(torch.int16)
        return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(R, C)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]``, equal to ``gguf.quants.dequantize`` of the same blocks."""
        R, C = self.shape
        nb = C // BLOCK
        q = self.quants().to(torch.float32).reshape(R, nb, BLOCK)
        d = self.d.to(torch.float32).reshape(R, nb, 1)
        if self.fmt == "q8_0":
            w = q * d
        elif self.fmt == "q4_0":
            w = d * (q - 8.0)
        else:
            w = d * q + self.m.to(torch.float32).reshape(R, nb, 1)
        return w.reshape(R, C)

    def rows(self, idx: torch.Tensor | np.ndarray | list) -> "QTensor":
        """The rows ``idx`` (any order, e.g. a permutation): whole rows of blocks, values unchanged."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return QTensor(self.fmt, (int(idx.numel()), self.shape[1]), self.qs[idx].contiguous(),
                       self.d[idx].contiguous(), None if self.m is None else self.m[idx].contiguous())

    @staticmethod
    def cat(parts: list["QTensor"]) -> "QTensor":
        """Row-wise concatenation of matrices of one format and width."""
        f, C = parts[0].fmt, parts[0].shape[1]
        if any(p.fmt != f or p.shape[1] != C for p in parts):
            raise QuantFormatError("cat: all parts need the same format and width")
        R = sum(p.shape[0] for p in parts)
        m = torch.cat([p.m for p in parts]) if parts[0].m is not None else None
        return QTensor(f, (R, C), torch.cat([p.qs for p in parts]).contiguous(),
                       torch.cat([p.d for p in parts]).contiguous(), m)


def quantize(w: torch.Tensor, fmt: str) -> QTensor:
    """``w [R, C]`` (float) quantised by ``gguf.quants.quantize`` (ggml's reference quantiser), as planes."""
    import gguf

    f = get_format(fmt)
    if w.dim() != 2:
        raise QuantFormatError(f"quantize: a 2-D weight is needed, got shape {tuple(w.shape)}")
    R, C = w.shape
    _check_cols(C, "quantize")
    a = w.detach().to("cpu", torch.float32).contiguous().numpy()
    raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType(f.ggml_type))
    return QTensor.from_ggml(raw, f.name, (R, C))


def dequantize(qt: QTensor) -> torch.Tensor:
    return qt.dequantize()


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: the values a quantised kernel reads."""
    return quantize(w, fmt).dequantize().to(w.dtype)


def format_of_ggml_type(t: int) -> Optional[str]:
    """The format name of a ggml type id (None: not one of Q8_0 / Q4_0 / Q4_1)."""
    for f in FORMATS.values():
        if f.ggml_type == int(t):
            return f.name
    return None


def gguf_qtensor(tensor, fmt: str) -> QTensor:
    """A GGUF reader tensor (``gguf.GGUFReader(...).tensors[i]``) as a ``fmt`` QTensor: its raw blocks when
    the file holds that format (no round trip), else its values dequantised and quantised to ``fmt``."""
    from gguf.quants import dequantize as gg_deq

    if len(tensor.shape) != 2:
        raise QuantFormatError(f"{tensor.name}: a 2-D tensor is needed, got shape {list(tensor.shape)}")
    shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # ggml lists (C, R)
    if format_of_ggml_type(tensor.tensor_type) == get_format(fmt).name:
        return QTensor.from_ggml(tensor.data, fmt, shape)
    vals = np.asarray(gg_deq(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    return quantize(torch.from_numpy(vals), fmt)


def gguf_values(tensor) -> torch.Tensor:
    """A GGUF reader tensor's values (dequantised by ``gguf``), float32, shaped ``[R, C]`` (or ``[C]``)."""
    from gguf.quants import dequantize as gg_deq

    vals = np.asarray(gg_deq(tensor.data, tensor.tensor_type), dtype=np.float32)
    shape = [int(x) for x in reversed(list(tensor.shape))]
    return torch.from_numpy(vals.reshape(shape).copy())
