"""Pattern store: pack/unpack, recorder round trip, resume, refusal, reader, artifact-chunk import."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from awq.masks import (
    PatternStore,
    StoreError,
    StoreMismatchError,
    StoreWriter,
    _pack_torch,
    _unpack_torch,
    pack,
    record_masks,
    unpack,
)
from awq.sparse_mlp import PROJS, SparsityConfig, add_observer, remove_observer, sparsify_

SEQ = 16
WINDOWS = 3
ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------
# tiny sparsified model
# --------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        hidden_size=64, intermediate_size=132, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )
    model = MistralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    thr = {p: (torch.rand(2, generator=g) * 0.05).tolist() for p in PROJS}
    sparsify_(model, SparsityConfig(thresholds=thr))
    return model


def token_windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (WINDOWS, SEQ), generator=torch.Generator().manual_seed(seed))


META = {
    "model": "tiny-mistral", "thresholds_sha256": "abc", "dataset": "random", "dataset_source": "test", "split": "test",
}


def run_record(model, out, windows, meta=META, record_inputs=False, fail_at=None):
    """Record every window; fail_at=(window, layer) raises inside that window's forward."""
    boom = None
    if fail_at is not None:
        def boom(layer, name, y, _state={"w": 0}):  # noqa: B006
            if name == "down_proj" and layer == fail_at[1] and _state["w"] == fail_at[0]:
                raise KeyboardInterrupt("simulated interruption")
            if name == "down_proj" and layer == 1:
                _state["w"] += 1
    with record_masks(
        model, out, meta=meta, total_windows=len(windows), seqlen=SEQ, record_inputs=record_inputs
    ) as rec:
        if boom is not None:
            add_observer(model, boom)
        try:
            for i in range(rec.windows_done, len(windows)):
                rec.start_window(i)
                with torch.no_grad():
                    model(windows[i : i + 1])
                rec.end_window(i, {"window": i})
        finally:
            if boom is not None:
                remove_observer(model, boom)
        return rec.window_stats()


def data_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_round_trip_matches_model_masks(tmp_path):
    model, windows = tiny_model(), token_windows()
    captured: dict[tuple[str, int], list[torch.Tensor]] = {}

    def capture(layer, name, y):
        v = y[0].to(torch.float16) if name == "input" else (y[0] != 0)
        captured.setdefault((name, layer), []).append(v.clone())

    add_observer(model, capture)
    stats = run_record(model, tmp_path / "s", windows, record_inputs=True)
    remove_observer(model, capture)
    assert stats == [{"window": i} for i in range(WINDOWS)]

    st = PatternStore(tmp_path / "s")
    assert st.num_layers == 2 and st.n_tokens == WINDOWS * SEQ
    assert st.widths == {"gate_proj": 132, "up_proj": 132, "down_proj": 64} and st.hidden == 64
    assert st.meta["bit_order"] == "big" and st.meta["windows_done"] == WINDOWS
    some_zeros = False
    for proj in PROJS:
        for layer in range(2):
            want = torch.cat(captured[(proj, layer)]).to(torch.uint8)
            got = unpack(st.layer(proj, layer), st.widths[proj], dtype=torch.uint8)
            assert torch.equal(got, want)
            some_zeros |= bool((want == 0).any()) and bool((want == 1).any())
            # plain numpy read of the documented format
            raw = np.load(tmp_path / "s" / proj / f"layer_{layer:02d}.npy")
            assert np.array_equal(np.unpackbits(raw, axis=-1, count=st.widths[proj]), want.numpy())
        want_in = torch.cat(captured[("input", layer)]).numpy()
        assert np.array_equal(st.inputs(layer), want_in)
    assert some_zeros  # thresholds actually produced sparse masks
    # pooled reads see layer-major rows
    ids = np.array([st.n_tokens + 5, 3, 2 * st.n_tokens - 1])
    rows = st.read_rows("up_proj", ids)
    assert np.array_equal(rows[0], st.layer("up_proj", 1)[5])
    assert np.array_equal(rows[1], st.layer("up_proj", 0)[3])
    assert np.array_equal(rows[2], st.layer("up_proj", 1)[-1])


def test_resume_after_exception_is_byte_identical(tmp_path):
    windows = token_windows(1)
    run_record(tiny_model(), tmp_path / "full", windows, record_inputs=True)
    with pytest.raises(KeyboardInterrupt):
        run_record(tiny_model(), tmp_path / "part", windows, record_inputs=True, fail_at=(1, 1))
    part = PatternStore(tmp_path / "part", allow_partial=True)
    assert part.meta["windows_done"] == 1 and part.n_tokens == SEQ
    with pytest.raises(StoreError, match="incomplete"):
        PatternStore(tmp_path / "part")
    stats = run_record(tiny_model(), tmp_path / "part", windows, record_inputs=True)
    assert stats == [{"window": i} for i in range(WINDOWS)]
    assert data_files(tmp_path / "part") == data_files(tmp_path / "full")
    a, b = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("part", "full"))
    for m in (a, b):
        m.pop("created"), m.pop("updated")
    assert a == b


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, signal, torch
    sys.path.insert(0, {tests!r})
    from test_masks import tiny_model, token_windows, run_record
    from awq.sparse_mlp import add_observer
    model = tiny_model()
    kill_window = int(sys.argv[2])
    seen = {{"w": 0}}
    def killer(layer, name, y):
        if name == "up_proj" and layer == 1:
            if seen["w"] == kill_window:
                os.kill(os.getpid(), signal.SIGKILL)
            seen["w"] += 1
    if kill_window >= 0:
        add_observer(model, killer)
    run_record(model, sys.argv[1], token_windows(2))
    """
)


def test_resume_after_kill9_is_byte_identical(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "s"), "2"], env=env, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert PatternStore(tmp_path / "s", allow_partial=True).meta["windows_done"] == 2
    run_record(tiny_model(), tmp_path / "s", token_windows(2))  # resume in this process
    run_record(tiny_model(), tmp_path / "ref", token_windows(2))
    assert data_files(tmp_path / "s") == data_files(tmp_path / "ref")


def test_mismatch_and_bad_directories_are_refused(tmp_path):
    model, windows = tiny_model(), token_windows()
    run_record(model, tmp_path / "s", windows)
    for key, val in (("thresholds_sha256", "other"), ("model", "other-model"), ("split", "train")):
        with pytest.raises(StoreMismatchError, match=key):
            run_record(model, tmp_path / "s", windows, meta={**META, key: val})
    with pytest.raises(StoreMismatchError, match="seqlen"):
        with record_masks(model, tmp_path / "s", meta=META, total_windows=WINDOWS, seqlen=SEQ * 2):
            pass
    with pytest.raises(StoreMismatchError, match="windows_total"):
        with record_masks(model, tmp_path / "s", meta=META, total_windows=WINDOWS + 1, seqlen=SEQ):
            pass
    with pytest.raises(ValueError, match="seqlen"):  # caller meta may repeat derived fields, not contradict them
        run_record(model, tmp_path / "t", windows, meta={**META, "seqlen": SEQ + 1})
    with pytest.raises(StoreError, match="width"):  # widths given in meta are checked against the model
        run_record(model, tmp_path / "u", windows, meta={**META, "seqlen": SEQ, "widths": {"gate_proj": 100}})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="meta.json"):
        run_record(model, tmp_path / "junk", windows)
    # a complete store reruns as a no-op with the same identity (tuples and lists are the same JSON)
    assert len(run_record(model, tmp_path / "s", windows)) == WINDOWS
    run_record(model, tmp_path / "v", windows, meta={**META, "dataset_source": ("a", "b")})
    assert len(run_record(model, tmp_path / "v", windows, meta={**META, "dataset_source": ["a", "b"]})) == WINDOWS
    # batch > 1 is refused with a clear error
    with record_masks(model, tmp_path / "b", meta=META, total_windows=1, seqlen=SEQ) as rec:
        rec.start_window(0)
        with pytest.raises(ValueError, match="batch size 1"):
            model(windows[:2])


def test_corrupt_meta_and_files_give_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        PatternStore(tmp_path / "nope")
    run_record(tiny_model(), tmp_path / "s", token_windows())
    meta = tmp_path / "s" / "meta.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(StoreError, match="corrupt"):
        PatternStore(tmp_path / "s")
    meta.unlink()
    with pytest.raises(StoreError, match="no meta.json"):
        PatternStore(tmp_path / "s")
    meta.write_text(good)
    f = tmp_path / "s" / "gate_proj" / "layer_01.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    st = PatternStore(tmp_path / "s")
    with pytest.raises(StoreError, match="bytes"):
        st.layer("gate_proj", 1)
    with pytest.raises(StoreError, match="no MLP inputs"):
        st.inputs(0)


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
# artifact chunk import
# --------------------------------------------------------------------------------------------
def write_chunks(d: Path, n=2, layers=2, seqlen=8, widths=(20, 20, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i in range(n):
        chunk = [
            {p: (torch.rand(1, seqlen, widths[k], generator=g) < 0.5).to(torch.uint8) for k, p in enumerate(PROJS)}
            for _ in range(layers)
        ]
        torch.save(chunk, d / f"chunk_{i}.pt")
        chunks.append(chunk)
    return chunks


def test_import_chunks(tmp_path):
    sys.path.insert(0, str(ROOT / "clustering"))
    try:
        import import_chunks as ic
    finally:
        sys.path.remove(str(ROOT / "clustering"))
    chunks = write_chunks(tmp_path / "c", n=11)  # chunk_10 must come after chunk_9
    assert ic.main(["--chunks", str(tmp_path / "c"), "--output", str(tmp_path / "s"), "--model", "toy"]) == 0
    st = PatternStore(tmp_path / "s")
    assert st.meta["model"] == "toy" and st.n_tokens == 11 * 8 and st.num_layers == 2
    for p in PROJS:
        for l in range(2):
            want = torch.cat([c[l][p][0] for c in chunks]).numpy()
            assert np.array_equal(np.unpackbits(st.layer(p, l), axis=-1, count=st.widths[p]), want)
    # rerun = no-op resume; same output byte for byte
    before = data_files(tmp_path / "s")
    assert ic.main(["--chunks", str(tmp_path / "c"), "--output", str(tmp_path / "s")]) == 1  # model differs
    assert ic.main(["--chunks", str(tmp_path / "c"), "--output", str(tmp_path / "s"), "--model", "toy"]) == 0
    assert data_files(tmp_path / "s") == before
    # corrupt and mismatched chunks: one-line errors, no traceback
    bad = tmp_path / "bad"
    write_chunks(bad, n=2)
    (bad / "chunk_1.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="chunk_1.pt: cannot be loaded"):
        ic.import_chunks([bad], tmp_path / "s2")
    torch.save([{"gate_proj": torch.zeros(1, 8, 20, dtype=torch.uint8)}], bad / "chunk_1.pt")
    with pytest.raises(ValueError, match="chunk_1.pt: layer 0 has no 'up_proj'"):
        ic.import_chunks([bad], tmp_path / "s3")
    write_chunks(bad, n=2, widths=(20, 20, 12))
    torch.save(write_chunks(tmp_path / "other", n=1, widths=(20, 20, 16))[0], bad / "chunk_1.pt")
    with pytest.raises(ValueError, match="down_proj has shape"):
        ic.import_chunks([bad], tmp_path / "s4")
    # the partial import resumes once the chunk is fixed
    write_chunks(bad, n=2, widths=(20, 20, 12))
    ic.import_chunks([bad], tmp_path / "s4")
    assert PatternStore(tmp_path / "s4").n_tokens == 16
