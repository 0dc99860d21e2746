"""awq.kernels.hw: kernel choice by measurement (cached, overridable); both overlap kernels exact."""
from __future__ import annotations

import json

import pytest
import torch

from awq.kernels import hw
from awq.store.centroids import overlap


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AWQ_KERNEL_OVERLAP", raising=False)
    monkeypatch.delenv("AWQ_KERNEL_TOY", raising=False)
    monkeypatch.delenv("AWQ_HW_FLAGS", raising=False)
    hw._memo.clear()
    yield tmp_path
    hw._memo.clear()


def _reference_overlap(A, C):
    return torch.tensor([[sum(int(a) * int(c) for a, c in zip(ra, rc)) for rc in C.tolist()] for ra in A.tolist()],
                        dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.float32])
def test_overlap_kernels_identical_and_exact(dtype, fresh_cache):
    g = torch.Generator().manual_seed(0)
    A = (torch.rand(37, 70, generator=g) < 0.4).to(dtype)
    C = (torch.rand(9, 70, generator=g) < 0.6).to(dtype)
    ref = _reference_overlap(A, C)
    outs = {k: overlap(A, C, kernel=k) for k in ("int8", "fp32", "auto")}
    for k, v in outs.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, ref), k


def test_choice_is_measured_once_then_cached(fresh_cache):
    calls = {"fast": 0, "slow": 0}

    def make():
        def fast():
            calls["fast"] += 1

        def slow():
            calls["slow"] += 1
            torch.ones(200_000).sum()
            return sum(range(20_000))
        return {"fast": fast, "slow": slow}

    assert hw.choose("toy", ("fast", "slow"), make) == "fast"
    n = dict(calls)
    assert n["fast"] > 0 and n["slow"] > 0
    data = json.loads(hw.cache_file().read_text())
    entry = data[f"{hw.machine_key()}:toy"]
    assert entry["choice"] == "fast" and set(entry["seconds"]) == {"fast", "slow"}
    hw._memo.clear()  # a new process: the file answers, nothing is timed again
    assert hw.choose("toy", ("fast", "slow"), make) == "fast"
    assert calls == n


def test_override_argument_and_env(fresh_cache, monkeypatch):
    def make():
        raise AssertionError("must not measure when overridden")

    assert hw.choose("toy", ("fast", "slow"), make, kernel="slow") == "slow"
    monkeypatch.setenv("AWQ_KERNEL_TOY", "fast")
    assert hw.choose("toy", ("fast", "slow"), make) == "fast"
    assert hw.choose("toy", ("fast", "slow"), make, kernel="slow") == "slow"  # the argument wins
    with pytest.raises(ValueError, match="unknown kernel"):
        hw.choose("toy", ("fast", "slow"), make, kernel="gpu")
    assert not hw.cache_file().exists()


def test_overlap_kernel_cached(fresh_cache, monkeypatch):
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma avx512bw avx512_vnni")  # a CPU where only a measurement decides
    k = hw.overlap_kernel(None, 1536)
    assert k in hw.OVERLAP_KERNELS
    assert json.loads(hw.cache_file().read_text())[f"{hw.machine_key()}:overlap"]["choice"] == k
    assert hw.overlap_kernel(None, hw.FP32_EXACT_WIDTH) == "int8"  # fp32 would not be exact there
