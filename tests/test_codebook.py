"""Centroid swap (oracle / replace) inside the thresholded MLP."""
from __future__ import annotations

import pytest
import torch

from awq.load.arch import PROJS
from awq.methods.base import sparsify_
from awq.methods.codebook import CentroidCodebook, load_codebooks, parse_centroid_spec
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.recording import add_observer, remove_observer
from awq.store.centroids import CentroidError, save_centroids
from tests.conftest import tiny_model

THR = {"gate_proj": [0.02, 0.03], "up_proj": [0.02, 0.03], "down_proj": [0.0005, 0.0005]}
WIDTH = {"gate_proj": 128, "up_proj": 128, "down_proj": 64}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _books(cents, mode="oracle", layers=2):
    return {p: CentroidCodebook(c, p, layers, mode=mode) for p, c in cents.items()}


def test_single_all_ones_centroid_equals_threshold_only():
    model = tiny_model("mistral", layers=2)
    ids = torch.randint(0, 128, (1, 24))
    sparsify_(model, SparsityConfig(thresholds=THR))
    ref = _logits(model, ids)
    books = _books({p: torch.ones(1, WIDTH[p], dtype=torch.uint8) for p in PROJS})
    sparsify_(model, SparsityConfig(thresholds=THR, codebooks=books))
    assert torch.equal(_logits(model, ids), ref)
    st = books["gate_proj"].stats()
    assert st["precision"] == 1.0 and st["predicted_density"] == 1.0


def test_centroids_equal_to_true_masks_equal_threshold_only():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 128, (1, 20))
    sparsify_(model, SparsityConfig(thresholds=THR))
    masks = {p: [] for p in PROJS}

    def obs(layer, name, y):
        if name in masks:
            masks[name].append((y.reshape(-1, y.shape[-1]) != 0).to(torch.uint8))

    add_observer(model, obs)
    ref = _logits(model, ids)
    remove_observer(model, obs)
    cents = {p: torch.unique(torch.cat(m), dim=0) for p, m in masks.items()}
    books = _books(cents)
    sparsify_(model, SparsityConfig(thresholds=THR, codebooks=books))
    assert torch.equal(_logits(model, ids), ref)
    for p in PROJS:
        assert books[p].stats()["precision"] == 1.0


def test_label_choice_matches_plain_reference():
    torch.manual_seed(0)
    C = (torch.rand(7, 16) < 0.5).to(torch.uint8)
    C[3] = C[1]  # a duplicate: ties must go to the lower index
    cb = CentroidCodebook(C, "gate_proj", 1)
    y = torch.randn(1, 40, 16) * (torch.rand(1, 40, 16) < 0.6)
    got = cb.labels(y, y, 0)
    for t in range(40):
        a = (y[0, t] != 0).to(torch.int64).tolist()
        dists = [sum(ai * abs(ai - int(c)) for ai, c in zip(a, C[i].tolist())) for i in range(7)]
        assert got[t].item() == dists.index(min(dists))
    out = cb(y, raw=y, layer_idx=0, x=y)
    ref = y.clone()
    for t in range(40):
        ref[0, t] *= C[got[t]].float()
    assert torch.equal(out, ref)


def test_replace_mode_uses_unthresholded_output():
    C = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.uint8)
    raw = torch.tensor([[[0.5, 0.01, 0.02, 0.9]]])
    thr = raw.masked_fill(raw.abs() < 0.1, 0)  # [0.5, 0, 0, 0.9]: overlap 1 with both -> label 0
    cb = CentroidCodebook(C, "up_proj", 1, mode="replace")
    out = cb(thr, raw=raw, layer_idx=0, x=raw)
    assert torch.equal(out, torch.tensor([[[0.5, 0.01, 0.0, 0.0]]]))


def test_load_codebooks_files_and_errors(tmp_path):
    model = tiny_model("mistral", layers=2)
    for p in PROJS:
        save_centroids(tmp_path / f"centroids_{p.split('_')[0]}_4.pt", (torch.rand(4, WIDTH[p]) < 0.5).to(torch.uint8),
                       {"method": "test", "proj": p})
    books, info = load_codebooks(str(tmp_path), model)
    assert set(books) == set(PROJS) and info["files"]["gate_proj"]["k"] == 4
    assert len(info["files"]["up_proj"]["sha256"]) == 64
    spec = f"gate={tmp_path / 'centroids_gate_4.pt'}"
    assert set(parse_centroid_spec(spec)) == {"gate_proj"}
    # wrong width
    save_centroids(tmp_path / "w.pt", torch.ones(2, 99, dtype=torch.uint8), {})
    with pytest.raises(CentroidError, match="width"):
        load_codebooks(f"gate={tmp_path / 'w.pt'}", model)
    # non-binary
    torch.save(torch.full((2, 128), 0.5), tmp_path / "nb.pt")
    with pytest.raises(CentroidError, match="non-binary"):
        load_codebooks(f"up={tmp_path / 'nb.pt'}", model)
    with pytest.raises(CentroidError, match="bad --centroids key"):
        parse_centroid_spec("left=x.pt")
