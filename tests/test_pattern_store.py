"""Pattern-store reader (awq.store.pattern_store): pooled and canonical iteration against plain numpy references,
and stores written without this code (numpy alone, per the documented layout) opening and resuming."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from awq.load.arch import PROJS
from awq.store.pattern_store import PatternStore, StoreError, StoreWriter, pack, unpack


# --------------------------------------------------------------------------------------------
# reader: pooled iteration over a synthetic store
# --------------------------------------------------------------------------------------------
def synthetic_store(path: Path, layers=3, windows=4, seqlen=10, widths=(21, 21, 9), seed=0):
    rng = np.random.default_rng(seed)
    w = StoreWriter(path, meta={"model": "synthetic"}, total_windows=windows, seqlen=seqlen, num_layers=layers)
    ref = {p: np.zeros((layers, windows * seqlen, widths[k]), dtype=bool) for k, p in enumerate(PROJS)}
    for i in range(windows):
        for l in range(layers):
            for k, p in enumerate(PROJS):
                m = rng.random((seqlen, widths[k])) < 0.5
                ref[p][l, i * seqlen : (i + 1) * seqlen] = m
                w.write(p, l, i, pack(m), width=widths[k])
        w.end_window(i)
    w.close()
    return ref


@pytest.mark.parametrize("block_rows", [1, 7, 40, 1000])
def test_pooled_iterator_covers_every_row_once(tmp_path, block_rows):
    ref = synthetic_store(tmp_path / "s")
    st = PatternStore(tmp_path / "s")
    pooled = ref["gate_proj"].reshape(-1, 21)  # layer-major, like the row ids
    n = st.n_rows("gate_proj")
    assert n == pooled.shape[0] == 120

    def collect(**kw):
        ids, rows = [], []
        for rid, packed in st.iter_blocks("gate_proj", block_rows=block_rows, **kw):
            assert rid.dtype == np.int64 and len(rid) <= block_rows and packed.shape == (len(rid), 3)
            ids.append(rid)
            rows.append(packed)
        return np.concatenate(ids), np.concatenate(rows)

    ids, rows = collect()
    assert np.array_equal(ids, np.arange(n))
    assert np.array_equal(unpack(rows, 21, dtype=torch.bool).numpy(), pooled)
    # subsample: sorted, unique, deterministic in the seed, same rows as a direct read
    sub, sub_rows = collect(max_rows=37, seed=3)
    assert len(sub) == 37 and np.all(np.diff(sub) > 0) and sub.max() < n
    assert np.array_equal(sub, collect(max_rows=37, seed=3)[0])
    assert not np.array_equal(sub, collect(max_rows=37, seed=4)[0])
    assert np.array_equal(unpack(sub_rows, 21, dtype=torch.bool).numpy(), pooled[sub])
    # shards: every (sub)sampled row exactly once over the ranks
    for kw in ({}, {"max_rows": 37, "seed": 3}):
        parts = [collect(rank=r, world_size=3, **kw)[0] for r in range(3)]
        assert np.array_equal(np.sort(np.concatenate(parts)), collect(**kw)[0])
    # one layer
    lid, lrows = zip(*st.iter_blocks("down_proj", 2, block_rows=block_rows))
    assert np.array_equal(np.concatenate(lid), np.arange(40))
    assert np.array_equal(unpack(np.concatenate(lrows), 9, dtype=torch.bool).numpy(), ref["down_proj"][2])
    # read_rows in arbitrary order
    perm = np.random.default_rng(0).permutation(n)[:50]
    assert np.array_equal(unpack(st.read_rows("gate_proj", perm), 21, dtype=torch.bool).numpy(), pooled[perm])


def test_partial_store_shows_only_complete_windows(tmp_path):
    w = StoreWriter(tmp_path / "s", meta={"model": "m"}, total_windows=3, seqlen=4, num_layers=1)
    for p in PROJS:
        w.write(p, 0, 0, pack(np.ones((4, 10), bool)), width=10)
    w.end_window(0)
    w.write("gate_proj", 0, 1, pack(np.ones((4, 10), bool)), width=10)
    with pytest.raises(StoreError, match="no rows were recorded"):
        w.end_window(1)  # up/down of window 1 never written
    with pytest.raises(ValueError, match="not the next window"):
        w.write("gate_proj", 0, 2, pack(np.ones((4, 10), bool)), width=10)
    w.close()
    st = PatternStore(tmp_path / "s", allow_partial=True)
    assert st.n_tokens == 4 and st.layer("up_proj", 0).shape == (4, 2)
    assert sum(len(r) for r, _ in st.iter_blocks("up_proj")) == 4


# --------------------------------------------------------------------------------------------
# canonical order (window-major, then layer, then token), the clustering view
# --------------------------------------------------------------------------------------------
def ref_canonical(ref: np.ndarray, layers: list[int], seqlen: int):
    """Plain loops: (rows, pooled ids, layers, tokens) in canonical order; ref is bool [all layers, T, w]."""
    T = ref.shape[1]
    rows, ids, lay, tok = [], [], [], []
    for w in range(T // seqlen):
        for l in layers:
            for t in range(w * seqlen, (w + 1) * seqlen):
                rows.append(ref[l, t])
                ids.append(l * T + t)
                lay.append(l)
                tok.append(t)
    return np.array(rows), np.array(ids), np.array(lay), np.array(tok)


@pytest.mark.parametrize("layer", [None, 1])
@pytest.mark.parametrize("max_rows", [None, 37, 10_000])
def test_canonical_rows_match_reference(tmp_path, layer, max_rows):
    ref = synthetic_store(tmp_path / "s", layers=3, windows=4, seqlen=10)
    st = PatternStore(tmp_path / "s")
    layers = [0, 1, 2] if layer is None else [layer]
    rows, ids, lay, tok = ref_canonical(ref["gate_proj"], layers, 10)
    if max_rows is not None and max_rows < len(ids):  # the documented subsample rule
        keep = np.sort(np.random.default_rng(5).choice(len(ids), size=max_rows, replace=False))
        rows, ids, lay, tok = rows[keep], ids[keep], lay[keep], tok[keep]
    view = st.rows("gate_proj", layer, max_rows=max_rows, seed=5)
    assert len(view) == view.n_rows == len(ids) and view.width == 21 and view.chunk_rows == 10 * len(layers)
    assert np.array_equal(view.row_ids(), ids)
    pos = np.arange(view.n_rows)
    assert np.array_equal(view.layers_of(pos), lay) and np.array_equal(view.tokens_of(pos), tok)
    for block_rows in (None, 1, 7, 1000):
        got = list(view.iter_blocks(block_rows, dtype=torch.uint8))
        starts = [s for s, _, _ in got]
        assert starts == [s for s, _ in view.blocks(block_rows)] and got[-1][1] == view.n_rows
        assert np.array_equal(torch.cat([x for _, _, x in got]).numpy().astype(bool), rows)
    packed = np.concatenate([x for _, _, x in view.iter_blocks(packed=True)])
    assert np.array_equal(packed, np.packbits(rows, axis=-1))
    # any order, repeats allowed
    perm = np.random.default_rng(1).integers(0, view.n_rows, size=60)
    assert np.array_equal(view.read(perm, dtype=torch.bool).numpy(), rows[perm])
    assert np.array_equal(view.read_range(3, 17).numpy(), rows[3:17].astype(np.float32))
    # same seed, same rows; another seed, other rows
    if max_rows == 37:
        assert np.array_equal(st.rows("gate_proj", layer, max_rows=37, seed=5).row_ids(), ids)
        assert not np.array_equal(st.rows("gate_proj", layer, max_rows=37, seed=6).row_ids(), ids)
    with pytest.raises(StoreError, match="out of range"):
        view.read([view.n_rows])
    with pytest.raises(ValueError, match="max_rows"):
        st.rows("gate_proj", max_rows=0)
    with pytest.raises(StoreError, match="unknown projection"):
        st.rows("o_proj")


def test_read_rows_with_repeated_ids(tmp_path):
    ref = synthetic_store(tmp_path / "s", layers=2, windows=2, seqlen=8)
    st = PatternStore(tmp_path / "s")
    pooled = ref["up_proj"].reshape(-1, 21)
    rng = np.random.default_rng(2)
    for ids in ([3, 3, 5], [5, 3, 3], [0, 0, 1, 2], rng.integers(0, 32, size=40)):
        ids = np.asarray(ids)
        assert np.array_equal(unpack(st.read_rows("up_proj", ids), 21, dtype=torch.bool).numpy(), pooled[ids])
        one = unpack(st.read_rows("up_proj", ids % 16, layer=1), 21, dtype=torch.bool).numpy()
        assert np.array_equal(one, ref["up_proj"][1][ids % 16])


# --------------------------------------------------------------------------------------------
# compatibility: the documented layout, written by numpy alone
# --------------------------------------------------------------------------------------------
def numpy_store(root: Path, layers=2, windows=3, done=2, seqlen=4, widths=(12, 12, 7), seed=0) -> dict:
    """A partial store written with numpy and json only, as docs/formats.md describes the format."""
    rng = np.random.default_rng(seed)
    ref = {}
    for k, p in enumerate(PROJS):
        ref[p] = rng.random((layers, windows * seqlen, widths[k])) < 0.4
        for l in range(layers):
            (root / p).mkdir(parents=True, exist_ok=True)
            data = np.packbits(ref[p][l], axis=-1)
            data[done * seqlen:] = 0  # not written yet
            np.save(root / p / f"layer_{l:02d}.npy", data)
    meta = {
        "model": "numpy", "format": "awq-pattern-store", "format_version": 1, "seqlen": seqlen,
        "tokens_per_window": seqlen, "windows_total": windows, "windows_done": done, "record_inputs": False,
        "num_layers": layers, "widths": dict(zip(PROJS, widths)), "hidden": None, "bit_order": "big",
        "window_stats": [{} for _ in range(done)],
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    (root / "meta.json.tmp").write_text("left by an old writer")
    return ref


def test_numpy_written_store_opens_and_resumes(tmp_path):
    root = tmp_path / "s"
    ref = numpy_store(root)
    with pytest.raises(StoreError, match="incomplete"):
        PatternStore(root)
    st = PatternStore(root, allow_partial=True)
    assert st.n_tokens == 8 and st.widths == {"gate_proj": 12, "up_proj": 12, "down_proj": 7}
    for p in PROJS:
        for l in range(2):
            assert np.array_equal(unpack(st.layer(p, l), st.widths[p], dtype=torch.bool).numpy(), ref[p][l, :8])
    w = StoreWriter(root, meta={"model": "numpy"}, total_windows=3, seqlen=4, num_layers=2)
    assert w.windows_done == 2
    for l in range(2):
        for p in PROJS:
            w.write(p, l, 2, pack(ref[p][l, 8:12]), width=st.widths[p])
    w.end_window(2, {"resumed": True})
    w.close()
    st = PatternStore(root)
    assert st.meta["window_stats"][-1] == {"resumed": True}
    for p in PROJS:
        view = st.rows(p)
        want = np.concatenate([ref[p][l, wi * 4:(wi + 1) * 4] for wi in range(3) for l in range(2)])
        assert np.array_equal(view.read_range(0, view.n_rows, dtype=torch.bool).numpy(), want)
    assert not [f for f in root.rglob("*.tmp") if f.name != "meta.json.tmp"]  # the writer leaves no temp files


@pytest.mark.parametrize("leftover, ok", [("meta.json.tmp", True), (".meta.json.x1y2.tmp", True), ("notes.txt", False)])
def test_new_store_beside_leftover_files(tmp_path, leftover, ok):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / leftover).write_text("x")
    if ok:  # a writer killed while creating the store left only its meta.json temp file
        StoreWriter(tmp_path / "s", meta={}, total_windows=1, seqlen=2, num_layers=1).close()
        assert (tmp_path / "s" / "meta.json").is_file()
    else:
        with pytest.raises(StoreError, match="not empty"):
            StoreWriter(tmp_path / "s", meta={}, total_windows=1, seqlen=2, num_layers=1)
