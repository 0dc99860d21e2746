"""The compiled AWC iteration (csrc/cluster_kernels.cpp, clustering/cluster_kernel.py) against plainly written
references and against the torch iteration: packing, popcount distances (vector and scalar paths, odd widths),
both balanced assignments (ties, K=1), member counts (empty clusters, more than 255 members), the centroid
update (bit-identical), whole blocks and whole fits; the AVX2-only build; the cached, overridable choice."""
from __future__ import annotations

import itertools

import pytest
import torch

from awq.kernels import cluster as kc
from awq.kernels import hw
from clustering import cluster_kernel as ck
from clustering.activation_aware_clustering import ActivationAwareClustering
from clustering.awc_iteration import awc_update, torch_block
from tests.test_clustering import ref_greedy
from tests.test_hw_clustering import ref_distance, ref_global

mod = kc.kernel()
pytestmark = pytest.mark.skipif(mod is None, reason="the C++ AWC kernel cannot be built here (no compiler)")
WIDTHS = (1, 7, 63, 64, 65, 130, 255, 256, 300, 1000)


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    for v in ("AWQ_KERNEL_AWC", "AWQ_KERNEL_OVERLAP", "AWQ_KERNEL_THREADS", "AWQ_HW_FLAGS"):
        monkeypatch.delenv(v, raising=False)
    hw._memo.clear()
    yield tmp_path
    hw._memo.clear()


@pytest.fixture()
def both_paths():
    """Run the body once with the vector popcount path and once with the scalar one."""
    yield (True, False)
    mod.set_vector(True)


def rand01(n, f, p, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, f, generator=g) < p).to(dtype)


def ref_pack(X):
    n, F = X.shape
    out = []
    for row in (X != 0).tolist():
        words = []
        for w in range((F + 63) // 64):
            v = sum(1 << j for j, b in enumerate(row[64 * w: 64 * w + 64]) if b)
            words.append(v - (1 << 64) if v >= 1 << 63 else v)  # as int64
        out.append(words)
    return torch.tensor(out, dtype=torch.int64).reshape(n, (F + 63) // 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int8, torch.bool])
def test_pack_rows_equals_reference(dtype):
    for F in WIDTHS:
        X = rand01(9, F, 0.5, F, dtype)
        assert torch.equal(mod.pack_rows(X), ref_pack(X)), (dtype, F)


def test_distance_vector_and_scalar_paths_equal_reference(both_paths):
    for (i, F), k in itertools.product(enumerate(WIDTHS), (1, 3, 9)):
        X, C = rand01(4 * 5 + 3, F, 0.45, i), rand01(k, F, 0.6, 100 + i)  # a partial row block at the end
        ref = ref_distance(X, C)
        for vec in both_paths:
            mod.set_vector(vec)
            D = mod.distance(mod.pack_rows(X), mod.pack_rows(C))
            assert D.dtype == torch.int32 and torch.equal(D.float(), ref), (F, k, vec)
    X = torch.ones(5, 64 * 260)  # > 31 vectors of 4 and of 8 words: the byte counters are flushed
    assert torch.equal(mod.distance(mod.pack_rows(X), mod.pack_rows(torch.zeros(2, 64 * 260))),
                       torch.full((5, 2), 64 * 260, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bool])
def test_block_distance_popcount_equals_reference(dtype):
    from clustering.distance import block_distance

    X, C = rand01(41, 130, 0.45, 3, dtype), rand01(6, 130, 0.6, 4)
    D = block_distance(X, C, "popcount")
    assert D.dtype == torch.float32 and torch.equal(D, ref_distance(X, C))


@pytest.mark.parametrize("n,k,cap,seed,hi", [(200, 40, 4, 0, 4), (300, 64, 5, 1, 4), (97, 9, 11, 2, 4),
                                             (64, 30, 2, 3, 4), (50, 1, 50, 4, 4), (50, 1, 20, 5, 4), (120, 7, 0, 6, 4),
                                             (300, 20, 12, 7, 2000), (400, 5, 60, 8, 30)])
def test_assignments_equal_references_with_ties(n, k, cap, seed, hi):
    # hi = 4: many ties, accepted by the distance histogram; hi = 2000: few proposals per value, by selection
    D = torch.randint(0, hi, (n, k), generator=torch.Generator().manual_seed(seed))
    assert mod.assign_global(D, cap).tolist() == (ref_global(D.float(), cap) if cap > 0 else [-1] * n)
    assert mod.assign_greedy(D, cap).tolist() == (ref_greedy(D.float(), cap) if cap > 0 else [-1] * n)


def test_member_counts_equal_plain_sums():
    for F in (1, 65, 300):
        X = rand01(700, F, 0.5, F)
        lab = torch.randint(-1, 4, (700,), generator=torch.Generator().manual_seed(F))
        lab[lab == 2] = 0  # cluster 2 empty; cluster 0 gets > 255 members (counter flush)
        S = mod.member_counts(mod.pack_rows(X), lab, 5, F)
        ref = torch.stack([X[lab == c].sum(0) for c in range(5)])
        assert torch.equal(S, ref) and int((lab == 0).sum()) > 255, F


def test_update_bit_identical_to_torch():
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        k, F, cap = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (30, 300, 40))
        C = rand01(k, F, 0.5, seed)
        counts = torch.randint(0, cap + 1, (k,), generator=g)  # some clusters empty: kept
        S = torch.minimum(torch.floor(torch.rand(k, F, generator=g) * (counts[:, None] + 1)), counts[:, None].float())
        for t, p, chunk in itertools.product((1, 3, 250), (0.0, 0.3, 0.4, 0.77), (2048, 4)):
            got = mod.awc_update(C, S, counts, t, cap, p, chunk)
            assert torch.equal(got, awc_update(C, S, counts, t, cap, p, chunk)), (seed, t, p, chunk)


@pytest.mark.parametrize("greedy,nearest", [(False, True), (True, False), (False, False), (True, True)])
def test_block_bit_identical_to_torch_block(greedy, nearest):
    for i, (n, F, k) in enumerate([(200, 70, 8), (97, 129, 9), (300, 64, 1), (256, 200, 16), (130, 1, 3)]):
        X, C = rand01(n, F, 0.4, i), rand01(k, F, 0.5, 50 + i)
        if k > 2:
            C[2] = C[0]  # exact ties: the lower index must win
            C[k - 1] = 1.0  # a centroid nearer than all: others may end up empty
        for tol, t, p in itertools.product((1.0, 0.7), (1, 4), (0.0, 0.4)):
            cap = int(tol * n // k)
            a = kc.awc_block(X, C, cap, greedy, nearest, t, p)
            b = torch_block(X, C, cap, greedy, nearest, t, p, "fp32")
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:], (n, F, k, tol, t, p)
    assert kc.awc_block(X.to(torch.uint8), C, 10, greedy, nearest, 1, 0.4)[1].tolist() == \
        kc.awc_block(X, C, 10, greedy, nearest, 1, 0.4)[1].tolist()


@pytest.mark.parametrize("assign", ["global", "greedy"])
def test_fit_identical_on_every_kernel(assign, fresh_cache):
    X = rand01(480, 100, 0.4, 9)
    kw = dict(max_iter=3, sparsity=0.3, block_rows=160, random_state=1, assign=assign)
    runs = [ActivationAwareClustering(8, kernel=kern, **kw).fit(X) for kern in ("popcount", "fp32", "int8")]
    for r in runs[1:]:
        assert torch.equal(r.cluster_centers_, runs[0].cluster_centers_)
        assert torch.equal(r.labels_, runs[0].labels_)
        assert r.objective_history_ == runs[0].objective_history_


def test_choice_measured_once_cached_and_overridable(fresh_cache, monkeypatch):
    calls = []

    def probes():
        calls.append(1)
        return {"popcount": lambda: None, "gemm": lambda: sum(range(20000))}

    monkeypatch.setattr(ck, "_awc_probes", probes)
    assert ck.awc_kernel(None) == "popcount" and len(calls) == 1
    hw._memo.clear()
    assert ck.awc_kernel("auto") == "popcount" and len(calls) == 1  # from the cache file
    assert ck.awc_kernel("fp32") == "gemm" and ck.awc_kernel("int8") == "gemm"
    monkeypatch.setenv("AWQ_KERNEL_AWC", "gemm")
    assert ck.awc_kernel(None) == "gemm"
    assert ck.awc_kernel("popcount") == "popcount"  # the argument beats the environment
    monkeypatch.setenv("AWQ_KERNEL_AWC", "bogus")
    with pytest.raises(ValueError, match="unknown kernel"):
        ck.awc_kernel(None)


def test_no_compiler_falls_back_to_torch(fresh_cache, monkeypatch):
    monkeypatch.setattr(ck, "kernel", lambda: None)
    assert ck.awc_kernel(None) == "gemm"
    with pytest.raises(ValueError, match="could not be built"):
        ck.awc_kernel("popcount")


def test_avx2_only_build_is_real_and_identical(fresh_cache, monkeypatch):
    monkeypatch.setenv("AWQ_HW_FLAGS", "avx2 fma")
    flags = kc.build_flags()
    if "-march=haswell" not in flags:
        pytest.skip("not an x86-64 CPU")
    assert "-march=native" not in flags
    avx2 = kc.kernel()
    assert avx2 is not None and avx2 is not mod and avx2.simd() == "avx2"
    X, C = rand01(203, 1000, 0.5, 1), rand01(13, 1000, 0.6, 2)
    ref = mod.distance(mod.pack_rows(X), mod.pack_rows(C))
    assert torch.equal(avx2.distance(avx2.pack_rows(X), avx2.pack_rows(C)), ref)
    a = avx2.awc_block(X, C, 15, False, True, 2, 0.4, 2048)
    b = torch_block(X, C, 15, False, True, 2, 0.4, "fp32")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def test_block_split_across_threads_identical():
    """A block large enough that every parallel loop (pack, distance, proposals, counts, update) is split."""
    n0 = torch.get_num_threads()
    torch.set_num_threads(max(2, n0))
    try:
        X, C = rand01(12000, 300, 0.4, 21), rand01(64, 300, 0.55, 22)
        for greedy in (False, True):
            a = kc.awc_block(X, C, 180, greedy, True, 2, 0.4)
            b = torch_block(X, C, 180, greedy, True, 2, 0.4, "fp32")
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:], greedy
    finally:
        torch.set_num_threads(n0)
