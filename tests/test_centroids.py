"""awq.store.centroids: centroid files, the active-only distance/assignment and coverage counts."""
import pytest
import torch

from awq.store.centroids import (
    CentroidError,
    active_only_distance,
    assign_active_only,
    coverage_stats,
    load_centroids,
    metrics_from_counts,
    save_centroids,
)


def ref_distance(A, C):
    """Plain artifact formula: d(x, c) = sum_j x_j * |x_j - c_j|, one centroid at a time."""
    out = torch.zeros(A.shape[0], C.shape[0])
    for i in range(C.shape[0]):
        out[:, i] = (A * (A - C[i]).abs()).sum(1)
    return out


def ref_assign(A, C):
    D = ref_distance(A, C)
    labels = []
    for r in range(A.shape[0]):
        best = 0
        for i in range(1, C.shape[0]):
            if D[r, i] < D[r, best]:
                best = i
        labels.append(best)
    return torch.tensor(labels)


def rand01(n, f, p, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, f, generator=g) < p).float()


def test_distance_and_assignment_match_reference():
    A, C = rand01(300, 40, 0.5, 0), rand01(17, 40, 0.6, 1)
    C[3] = C[5]  # exact duplicate centroids -> ties must go to the lower index
    assert torch.equal(active_only_distance(A, C), ref_distance(A, C))
    assert torch.equal(assign_active_only(A, C), ref_assign(A, C))
    assert torch.all(assign_active_only(A, C) != 5)
    # all-ones centroid has distance 0 to everything
    assert torch.all(active_only_distance(A, torch.ones(1, 40)) == 0)


def test_assignment_exact_for_wide_rows():
    # counts above 2048 must stay exact (fp32 accumulation)
    A, C = rand01(64, 9000, 0.5, 2), rand01(5, 9000, 0.5, 3)
    D = active_only_distance(A, C).double()
    ref = A.double().sum(1, keepdim=True) - A.double() @ C.double().T
    assert torch.equal(D, ref)


def test_coverage_and_precision_reference():
    A, C = rand01(200, 30, 0.4, 4), rand01(6, 30, 0.6, 5)
    st = coverage_stats(A, C)
    lab = ref_assign(A, C)
    tp = sum(float((A[r] * C[lab[r]]).sum()) for r in range(200))
    pred = sum(float(C[lab[r]].sum()) for r in range(200))
    assert st["covered"] == tp and st["active"] == float(A.sum()) and st["predicted"] == pred
    m = metrics_from_counts(st["active"], st["covered"], st["predicted"], st["cells"])
    assert m["precision"] == pytest.approx(tp / float(A.sum()))
    assert m["f1"] == pytest.approx(2 * tp / (float(A.sum()) + pred))
    assert m["jaccard"] == pytest.approx(tp / (float(A.sum()) + pred - tp))


def test_save_load_roundtrip(tmp_path):
    C = rand01(5, 12, 0.5, 6)
    p = tmp_path / "c.pt"
    save_centroids(p, C, {"method": "awc", "proj": "gate_proj", "sparsity": 0.4})
    got, meta = load_centroids(p, 12)
    assert got.dtype == torch.uint8 and torch.equal(got.float(), C)
    assert meta["method"] == "awc" and meta["k"] == 5
    assert p.with_suffix(".json").is_file()
    # artifact-style bare float32 and bool tensors are accepted
    torch.save(C, tmp_path / "bare.pt")
    torch.save(C.bool(), tmp_path / "bool.pt")
    assert torch.equal(load_centroids(tmp_path / "bare.pt")[0], got)
    assert torch.equal(load_centroids(tmp_path / "bool.pt")[0], got)


@pytest.mark.parametrize(
    "obj, width, msg",
    [
        (torch.zeros(4), None, "2-D"),
        (torch.tensor([[0.0, 0.5], [1.0, 0.0]]), None, "non-binary"),
        (torch.zeros(0, 8), None, "K == 0"),
        (torch.ones(3, 8), 10, "width 8.*width 10"),
    ],
)
def test_bad_centroid_files(tmp_path, obj, width, msg):
    p = tmp_path / "bad.pt"
    torch.save(obj, p)
    with pytest.raises(CentroidError, match=msg):
        load_centroids(p, width)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CentroidError, match="not found"):
        load_centroids(tmp_path / "nope.pt")
    p = tmp_path / "corrupt.pt"
    p.write_bytes(b"this is not a torch file")
    with pytest.raises(CentroidError, match="corrupt or unreadable"):
        load_centroids(p)
