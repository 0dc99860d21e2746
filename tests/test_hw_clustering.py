"""Hardware-adaptive clustering kernels (issue 14): every kernel choice gives the plain fp32 reference's
result, the fp32 exactness bound is guarded, the AVX2-only decision is taken by capability, the codebook
routes through awq.kernels.hw, and the fast assignment / quantile paths match plainly written references."""
from __future__ import annotations

import pytest
import torch

from awq.kernels import hw
from awq.methods.codebook import CentroidCodebook
from clustering.activation_aware_clustering import ActivationAwareClustering
from clustering.assignment import _global_assign_torch, global_balanced_assign
from clustering.awc_iteration import row_quantile
from clustering.distance import block_distance


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    for v in ("AWQ_KERNEL_OVERLAP", "AWQ_KERNEL_THREADS", "AWQ_HW_FLAGS"):
        monkeypatch.delenv(v, raising=False)
    hw._memo.clear()
    yield tmp_path
    hw._memo.clear()


def rand01(n, f, p, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, f, generator=g) < p).to(dtype)


def ref_distance(X, C):
    """|a| - <a, c> with plain Python integers."""
    return torch.tensor([[sum(a) - sum(x * y for x, y in zip(a, c)) for c in C.int().tolist()]
                         for a in X.int().tolist()], dtype=torch.float32)


from tests.test_clustering import ref_global  # noqa: E402  (the plain proposal rounds)


# ---------------------------------------------------------------------------------------------
# distance kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.bool, torch.uint8])
def test_block_distance_every_kernel_equals_plain_reference(dtype, fresh_cache):
    X, C = rand01(53, 70, 0.45, 1, dtype), rand01(11, 70, 0.6, 2)
    ref = ref_distance(X, C)
    for kernel in ("int8", "fp32", "auto"):
        D = block_distance(X, C, kernel)
        assert D.dtype == torch.float32 and torch.equal(D, ref), kernel
    assert block_distance(X[:0], C).shape == (0, 11)


def test_fp32_exactness_bound_is_guarded(fresh_cache):
    hw.check_fp32_exact(hw.FP32_EXACT_WIDTH - 1)
    with pytest.raises(ValueError, match="not exact"):
        hw.check_fp32_exact(hw.FP32_EXACT_WIDTH)
    with pytest.raises(ValueError, match="not exact"):
        hw.overlap_kernel("fp32", hw.FP32_EXACT_WIDTH)
    assert hw.overlap_kernel(None, hw.FP32_EXACT_WIDTH) == "int8"  # auto never picks an inexact kernel
    # just below the bound fp32 is still exact: a sum of 2**24 - 1 ones
    ones = torch.ones(1, hw.FP32_EXACT_WIDTH - 1)
    assert float(hw.overlap_fp32(ones, ones)[0, 0]) == hw.FP32_EXACT_WIDTH - 1


def test_avx2_only_cpu_gets_fp32_by_capability_without_measuring(fresh_cache, monkeypatch):
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma")

    def no_probe():
        raise AssertionError("an AVX2-only CPU must not need a measurement")

    monkeypatch.setattr(hw, "_overlap_probes", no_probe)
    assert hw.overlap_kernel(None, 1536) == "fp32"
    assert "capability" in hw.overlap_reason(None, 1536)
    assert hw.overlap_kernel("int8", 1536) == "int8"  # an explicit choice still wins
    assert not hw.cache_file().exists()
    X, C = rand01(40, 33, 0.5, 3), rand01(5, 33, 0.5, 4)
    assert torch.equal(block_distance(X, C), ref_distance(X, C))


def test_vnni_cpu_decides_by_measurement_and_caches(fresh_cache, monkeypatch):
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma avx512f avx512bw avx512_vnni")
    calls = []

    def probes():
        calls.append(1)
        return {"int8": lambda: None, "fp32": lambda: sum(range(20000))}

    monkeypatch.setattr(hw, "_overlap_probes", probes)
    assert hw.overlap_kernel(None, 1536) == "int8"
    hw._memo.clear()
    assert hw.overlap_kernel(None, 1536) == "int8" and len(calls) == 1  # second answer from the cache file
    assert "measurement" in hw.overlap_reason(None, 1536)


# ---------------------------------------------------------------------------------------------
# the codebook routes through awq.kernels.hw
# ---------------------------------------------------------------------------------------------
def test_codebook_labels_identical_for_every_kernel_and_routed(fresh_cache, monkeypatch):
    C = rand01(9, 48, 0.5, 5)
    C[3] = C[1]  # a tie: the lowest index must win
    y = torch.randn(3, 17, 48) * rand01(51, 48, 0.4, 6).view(3, 17, 48)
    a = (y.reshape(-1, 48) != 0).int()
    ref = torch.tensor([max(range(9), key=lambda j: (int((r * C[j].int()).sum()), -j)) for r in a])
    real_int_mm = torch._int_mm
    used = []
    monkeypatch.setattr(torch, "_int_mm", lambda *t: used.append(1) or real_int_mm(*t))
    for kernel in ("int8", "fp32", None):
        used.clear()
        lab = CentroidCodebook(C, "gate_proj", 1, kernel=kernel).labels(y, None, 0)
        assert torch.equal(lab, ref), kernel
        if kernel is not None:
            assert bool(used) == (kernel == "int8"), kernel  # the chosen kernel is the one that ran
    monkeypatch.setenv("AWQ_KERNEL_OVERLAP", "fp32")
    used.clear()
    assert torch.equal(CentroidCodebook(C, "up_proj", 1).labels(y, None, 0), ref) and not used


# ---------------------------------------------------------------------------------------------
# assignment, quantile, thread choice
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,cap,seed", [(200, 40, 4, 0), (300, 64, 5, 1), (97, 9, 11, 2), (64, 30, 2, 3)])
def test_global_assignment_paths_match_reference(n, k, cap, seed):
    D = torch.randint(0, 4, (n, k), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    ref = ref_global(D, cap)
    assert global_balanced_assign(D, cap).tolist() == ref  # numpy path (CPU)
    assert _global_assign_torch(D, cap).tolist() == ref  # torch path (other devices)


def test_row_quantile_partition_equals_torch_quantile():
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 9, (13, 301), generator=g).float() / 9
    for p in (0.0, 0.2, 0.3, 0.4, 0.5, 0.999):
        assert torch.equal(row_quantile(s, p), torch.quantile(s, p, dim=1)), p


def test_threads_for_restores_and_obeys_override(fresh_cache):
    n = torch.get_num_threads()
    with hw.threads_for(10, "1") as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with hw.threads_for(hw.SMALL_BLOCK) as used:  # large blocks: all threads, nothing measured
        assert used == n
    assert not hw.cache_file().exists()


def test_awc_result_independent_of_kernel_and_threads(fresh_cache):
    X = rand01(240, 40, 0.4, 9)
    kw = dict(max_iter=3, sparsity=0.3, block_rows=120, random_state=1)
    runs = [ActivationAwareClustering(8, kernel=kern, threads=th, **kw).fit(X)
            for kern in ("int8", "fp32") for th in ("1", "all")]
    for r in runs[1:]:
        assert torch.equal(r.cluster_centers_, runs[0].cluster_centers_)
        assert torch.equal(r.labels_, runs[0].labels_)
        assert r.objective_history_ == runs[0].objective_history_
