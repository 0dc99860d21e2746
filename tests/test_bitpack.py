"""Bit packing of masks (awq.store.bitpack) against plain per-bit loops, on the CPU and (when present) an accelerator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from awq.store.bitpack import _pack_torch, _unpack_torch, pack, packed_width, unpack


# --------------------------------------------------------------------------------------------
# plain references
# --------------------------------------------------------------------------------------------
def ref_pack(mask: np.ndarray) -> np.ndarray:
    """Big bit order: bit 7 of byte j is element 8j."""
    n, w = mask.shape
    out = np.zeros((n, (w + 7) // 8), dtype=np.uint8)
    for i in range(n):
        for j in range(w):
            if mask[i, j] != 0:
                out[i, j // 8] |= 1 << (7 - j % 8)
    return out


def ref_unpack(packed: np.ndarray, width: int) -> np.ndarray:
    n = packed.shape[0]
    out = np.zeros((n, width), dtype=np.uint8)
    for i in range(n):
        for j in range(width):
            out[i, j] = (int(packed[i, j // 8]) >> (7 - j % 8)) & 1
    return out


@pytest.mark.parametrize("width", [1, 7, 8, 13, 64])
def test_pack_unpack_match_reference(width):
    rng = np.random.default_rng(width)
    mask = (rng.random((9, width)) < 0.4).astype(np.float32) * rng.normal(size=(9, width)).astype(np.float32)
    ref = ref_pack(mask)
    assert np.array_equal(pack(mask), ref)
    assert np.array_equal(pack(torch.from_numpy(mask)), ref)
    assert np.array_equal(pack(torch.from_numpy(mask).to(torch.bfloat16)), ref)
    assert np.array_equal(pack((mask != 0).astype(np.uint8) * 3), ref)  # any nonzero integer is a 1
    assert np.array_equal(pack(torch.from_numpy(mask != 0).to(torch.int8) * -1), ref)
    assert np.array_equal(_pack_torch(torch.from_numpy(mask)).numpy(), ref)  # accelerator path, run on CPU
    bits = ref_unpack(ref, width)
    for dtype in (torch.float32, torch.bfloat16, torch.uint8, torch.bool):
        got = unpack(ref, width, dtype=dtype)
        assert got.dtype == dtype and got.shape == (9, width)
        assert np.array_equal(got.to(torch.uint8).numpy(), bits)
    for dtype in (torch.float16, torch.int8, torch.bfloat16):  # into a reused buffer
        buf = torch.full((9, width), 7, dtype=dtype)
        assert unpack(ref, width, dtype=dtype, out=buf) is buf
        assert np.array_equal(buf.to(torch.uint8).numpy(), bits)
    with pytest.raises(ValueError, match="out is"):
        unpack(ref, width, dtype=torch.float32, out=torch.empty(9, width, dtype=torch.float16))
    got = _unpack_torch(torch.from_numpy(ref), width, torch.float16)
    assert np.array_equal(got.to(torch.uint8).numpy(), bits)
    with pytest.raises(ValueError):
        unpack(ref, width + 8)


def test_packed_width():
    assert [packed_width(w) for w in (1, 7, 8, 9, 16, 17)] == [1, 1, 1, 2, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [13, 4096])
def test_device_pack_unpack_match_reference(width):
    rng = np.random.default_rng(width)
    mask = rng.random((33, width)) < 0.3
    ref = np.packbits(mask, axis=-1)
    dev = torch.device("cuda")
    assert np.array_equal(pack(torch.from_numpy(mask).to(dev, torch.bfloat16)), ref)
    for dtype in (torch.bfloat16, torch.float32, torch.uint8):
        got = unpack(ref, width, dtype=dtype, device=dev)
        assert got.device.type == "cuda" and got.dtype == dtype
        assert np.array_equal(got.cpu().to(torch.uint8).numpy(), mask.astype(np.uint8))
