"""Bit-packing of {0,1} activation masks along their last axis (numpy and torch, any device).

``pack(mask)`` gives the bytes of ``numpy.packbits(mask != 0, axis=-1)``: big bit order, bit 7 of
byte 0 is neuron 0, the last byte zero-padded.  ``unpack(packed, width)`` is its inverse into a
{0,1} tensor of any dtype.  On an accelerator both directions run on the device (a multiply-sum
to pack, a 256 x 8 lookup table to unpack) so only the packed bytes cross the bus; on the CPU
they are numpy's ``packbits``/``unpackbits`` (torch's threaded element-wise ops are slow on a
busy CPU).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

__all__ = ["BIT_ORDER", "pack", "unpack", "packed_width"]

BIT_ORDER = "big"

_PACK_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_UNPACK_LUT: dict[torch.device, torch.Tensor] = {}


def packed_width(width: int) -> int:
    """Bytes of one packed row of ``width`` neurons: ``ceil(width / 8)``."""
    return (int(width) + 7) // 8


def _pack_torch(mask: torch.Tensor) -> torch.Tensor:
    """Pack on the tensor's device (used for accelerators: moves 8x fewer bytes to the host)."""
    m = mask != 0
    w = m.shape[-1]
    pad = (-w) % 8
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    dev = m.device
    if dev not in _PACK_WEIGHTS:
        _PACK_WEIGHTS[dev] = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=dev)
    m = m.reshape(*m.shape[:-1], (w + pad) // 8, 8).to(torch.uint8)
    return (m * _PACK_WEIGHTS[dev]).sum(-1, dtype=torch.uint8)


def pack(mask: Any) -> np.ndarray:
    """Bit-pack a mask along its last axis: bool/0-1 (any nonzero = 1) ``[..., w]`` -> uint8 ``[..., ceil(w/8)]``.

    Same bytes as ``numpy.packbits(mask != 0, axis=-1)`` (big bit order).  Accepts numpy arrays
    and torch tensors on any device (packed on the device, then copied to the host).
    """
    if isinstance(mask, torch.Tensor):
        if mask.device.type != "cpu":
            return _pack_torch(mask.detach()).cpu().numpy()
        if mask.dtype == torch.bfloat16:  # the only dtype here numpy lacks
            mask = mask.detach() != 0
        # numpy, not torch, for the comparison: torch's threaded ops are slow on a busy CPU
        mask = mask.detach().numpy()
    m = np.asarray(mask)
    if m.dtype.kind == "f" or m.dtype.kind == "c":
        m = m != 0
    # packbits treats any nonzero integer as a 1 bit, so integer/bool masks need no comparison
    return np.packbits(m, axis=-1)


def _unpack_lut(device: torch.device) -> torch.Tensor:
    if device not in _UNPACK_LUT:
        lut = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)  # [256, 8]
        _UNPACK_LUT[device] = torch.from_numpy(lut).to(device)
    return _UNPACK_LUT[device]


def _unpack_torch(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Lookup-table unpack on the tensor's device (the accelerator path of :func:`unpack`)."""
    out = _unpack_lut(t.device)[t.long()].reshape(*t.shape[:-1], t.shape[-1] * 8)
    if width != t.shape[-1] * 8:
        out = out[..., :width]
    return out.to(dtype).contiguous()


def unpack(
    packed: Any,
    width: int,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(width/8)]`` -> {0,1} tensor ``[..., width]`` of ``dtype``.

    On the CPU this is ``numpy.unpackbits`` (about 1.4 GB/s of packed data per core to uint8);
    other dtypes, and any ``out`` buffer, are filled in pieces of about 1 MB of packed rows so no
    full-size temporary is made.  Passing a reused ``out`` (shape ``[..., width]``, dtype
    ``dtype``) avoids page-faulting a fresh output for every block.  On an accelerator the packed
    bytes are moved first (8x fewer bytes) and expanded with a 256x8 lookup table on the device.
    """
    nbytes = packed_width(width)
    dev = torch.device(device) if device is not None else (out.device if out is not None else None)
    if isinstance(packed, torch.Tensor):
        if packed.dtype != torch.uint8:
            raise ValueError(f"unpack expects uint8 packed data, got {packed.dtype}")
        if dev is None:
            dev = packed.device
    else:
        packed = np.asarray(packed)
        if packed.dtype != np.uint8:
            raise ValueError(f"unpack expects uint8 packed data, got {packed.dtype}")
        if dev is None:
            dev = torch.device("cpu")
    if packed.shape[-1] != nbytes:
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes but width {width} needs {nbytes}")
    shape = (*packed.shape[:-1], width)
    if out is not None and (
        tuple(out.shape) != shape or out.dtype != dtype or out.device != dev or not out.is_contiguous()
    ):
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, need contiguous {shape} {dtype} on {dev}"
        )
    if dev.type != "cpu":
        res = _unpack_torch(torch.as_tensor(packed).to(dev, non_blocking=True), width, dtype)
        return res if out is None else out.copy_(res)
    arr = packed.cpu().numpy() if isinstance(packed, torch.Tensor) else packed
    if out is None and dtype in (torch.uint8, torch.bool):
        res = torch.from_numpy(np.unpackbits(arr, axis=-1, count=width))
        return res.view(torch.bool) if dtype == torch.bool else res
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    flat_in, flat_out = arr.reshape(-1, nbytes), out.view(-1, width)
    # numpy does the casts (torch's threaded copy_ is slow on busy CPUs); numpy has no bfloat16,
    # but {0, 1} in bfloat16 is the bit pattern {0, 0x3F80}: write bits * 0x3F80 into an int16 view
    if dtype == torch.bfloat16:
        np_out, scale = flat_out.view(torch.int16).numpy(), np.int16(0x3F80)
    else:
        np_out, scale = flat_out.numpy(), None
    step = max(1, (1 << 18) // nbytes)
    for a in range(0, flat_in.shape[0], step):
        bits = np.unpackbits(flat_in[a : a + step], axis=-1, count=width)
        if scale is None:
            np.copyto(np_out[a : a + step], bits, casting="unsafe")
        else:
            np.multiply(bits, scale, out=np_out[a : a + step], casting="unsafe")
    return out
