"""Recording masks into a pattern store: round trip, resume after exception / kill -9, refusal, artifact-chunk import.

Bit packing is tested in test_bitpack.py, the reader (pooled and canonical iteration) in test_pattern_store.py.
"""
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

from awq.load.arch import PROJS
from awq.methods.base import sparsify_
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.recording import add_observer, record_masks, remove_observer
from awq.store.bitpack import unpack
from awq.store.pattern_store import PatternStore, StoreError, StoreMismatchError

SEQ = 16
WINDOWS = 3
ROOT = Path(__file__).resolve().parents[1]


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
    from awq.methods.recording import add_observer
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
    import clustering.import_chunks as ic

    chunks = write_chunks(tmp_path / "c", n=11)  # chunk_10 must come after chunk_9
    assert ic.cli(["--chunks", str(tmp_path / "c"), "--output", str(tmp_path / "s"), "--model", "toy"]) == 0
    st = PatternStore(tmp_path / "s")
    assert st.meta["model"] == "toy" and st.n_tokens == 11 * 8 and st.num_layers == 2
    for p in PROJS:
        for l in range(2):
            want = torch.cat([c[l][p][0] for c in chunks]).numpy()
            assert np.array_equal(np.unpackbits(st.layer(p, l), axis=-1, count=st.widths[p]), want)
    # rerun = no-op resume; same output byte for byte
    before = data_files(tmp_path / "s")
    assert ic.cli(["--chunks", str(tmp_path / "c"), "--output", str(tmp_path / "s")]) == 2  # model differs
    assert ic.cli(["--chunks", str(tmp_path / "c"), "--output", str(tmp_path / "s"), "--model", "toy"]) == 0
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
