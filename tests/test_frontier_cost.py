"""The frontier's cost axis equals the cost recomputed from the masks actually applied (issue 9, "Done when").

* Paper thresholds and their per-projection variants: ``python -m awq.entry --dump_masks`` records the masks
  the thresholded MLP applies (gate and up outputs after thresholding) into a pattern store. Per token,
  ``h = act(g) * u`` is nonzero exactly where both the gate and the up bit are set, gate and up are read in
  full and down reads the columns of nonzero ``h``, so the read fraction is ``(1 + 1 + density(gate AND up)) / 3``,
  recomputed here from the store's bits with ``numpy.unpackbits``.
* CATS: its applied mask (the kept ``act(gate(x))``) reaches the recorder's observers, but the store format
  needs all three projections and CATS has no thresholded up output; the observer's bits
  (:func:`awq.store.bitpack.pack`, as the recorder packs them) give ``1/3 + 2/3 * density(keep)``.
* Masks the recorder never sees: TEAL/WINA/LaRoSA (the masks of ``x`` and ``h``), the neuron predictor and the
  cluster methods (the centroid mask is applied after the observers). Their metered cost is tested against a
  recomputation from the module's own masks instead: TEAL at frontier level in ``test_frontier.py``, every
  method at module level in ``test_methods.py``, and ``cluster_predicted`` at frontier level here (the masks the
  codebooks return, and the predictor's share from the tensors in its file).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from awq.experiments.frontier import FrontierConfig, main

PAPER = ["paper", "paper_gate", "paper_up", "paper_gate_up", "paper_down"]
SEQ, NS = 32, 2


def _cfg(model_dir, corpus, out, plots, **kw):
    base = dict(model_path=str(model_dir), data_path=str(corpus), out=out, plots_dir=plots,
                methods=PAPER + ["cats"], densities=[0.5], nsamples=NS, calib_nsamples=2, seqlen=SEQ, device="cpu")
    base.update(kw)
    return FrontierConfig(**base)


@pytest.fixture(scope="module")
def frontier(tiny_model_dir, tiny_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("frontier_cost")
    cfg = _cfg(tiny_model_dir, tiny_corpus, d / "fr", d / "plots")
    res = main(cfg)
    rows = {r["method"]: r for r in csv.DictReader(open(res["csv"]))}
    points = {m: json.loads((cfg.out / "points" / f"{m}_0.5000.json").read_text()) for m in rows}
    return cfg, rows, points, d


def _bits(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(np.asarray(packed), axis=-1)[..., :width].astype(bool)


def _test_windows(tiny_model_dir, tiny_corpus):
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model

    model, tok, _ = load_model(str(tiny_model_dir), device="cpu")
    return model, tokenize_windows(tok, load_corpus("test", str(tiny_corpus)).text, SEQ)[:NS]


@pytest.mark.parametrize("method", PAPER)
def test_paper_cost_equals_dumped_store(method, frontier, tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from awq.experiments.entry import cli as entry_cli
    from awq.store.pattern_store import PatternStore
    from awq.store.thresholds import save_thresholds

    cfg, rows, points, _ = frontier
    point = points[method]
    thr = tmp_path / "thr.json"
    save_thresholds(point["config"]["thresholds"], thr)  # the thresholds that point applied (variant zeros included)
    store, res_path = tmp_path / "store", tmp_path / "res.json"
    assert entry_cli(["--model_path", str(tiny_model_dir), "--data_path", str(tiny_corpus), "--seqlen", str(SEQ),
                      "--nsamples", str(NS), "--thresholds", str(thr), "--device", "cpu", "--dump_masks", str(store),
                      "--output_path", str(res_path)]) == 0
    printed = capsys.readouterr().out

    st = PatternStore(store)
    assert st.n_tokens == NS * SEQ and st.num_layers == 2
    dens_h = []  # per (layer, token): fraction of h's entries that are nonzero = gate bit AND up bit
    for layer in range(st.num_layers):
        g = _bits(st.layer("gate_proj", layer), st.widths["gate_proj"])
        u = _bits(st.layer("up_proj", layer), st.widths["up_proj"])
        dens_h.append((g & u).mean(axis=1))
    dh = float(np.mean(np.concatenate(dens_h)))  # same token count per layer: mean over layers and tokens
    want = 2 / 3 + dh / 3
    if method == "paper_down":
        assert dh == 1.0  # gate and up unthresholded: everything read
    else:
        assert dh < 1.0

    res = json.loads(res_path.read_text())
    assert res["weight_read"]["weight_read_fraction"] == pytest.approx(want, abs=1e-12)  # awq.entry's meter
    assert f"mlp_weight_read={want:.3f}" in printed  # the number awq.entry prints
    assert float(rows[method]["weight_read_fraction"]) == pytest.approx(want, abs=1e-12)  # frontier.csv
    assert point["per_projection"]["down_proj"] == pytest.approx(dh, abs=1e-12)
    assert point["per_projection"]["gate_proj"] == point["per_projection"]["up_proj"] == 1.0
    assert res["ppl"] == pytest.approx(point["ppl"], rel=1e-6)  # same windows, same model


def test_cats_cost_equals_recorded_masks(frontier, tiny_model_dir, tiny_corpus):
    from awq.methods.base import sparsify_
    from awq.methods.cats import CatsConfig
    from awq.methods.recording import observing
    from awq.store.bitpack import pack

    cfg, rows, points, _ = frontier
    model, windows = _test_windows(tiny_model_dir, tiny_corpus)
    sparsify_(model, CatsConfig(thresholds=points["cats"]["config"]["thresholds"]))
    packed: dict[int, list] = {}

    def observe(layer, name, y):
        if name == "gate_proj":  # CATS notifies act(gate(x)) * keep: the neurons it keeps
            packed.setdefault(layer, []).append((pack(y.reshape(-1, y.shape[-1])), y.shape[-1]))

    with observing(model, observe), torch.no_grad():
        for w in windows:
            model(w[None])
    keep = np.concatenate([_bits(np.concatenate([p for p, _ in v]), v[0][1]).mean(axis=1) for v in packed.values()])
    assert keep.size == 2 * NS * SEQ
    want = 1 / 3 + 2 / 3 * float(keep.mean())
    assert float(rows["cats"]["weight_read_fraction"]) == pytest.approx(want, abs=1e-12)
    assert 1 / 3 < want < 1


@pytest.fixture(scope="module")
def tiny_cluster_predictor(frontier, tiny_model_dir, tiny_corpus):
    """Centroids (an all-ones row + recorded masks) and a predictor trained on a store with MLP inputs."""
    from awq.load.arch import PROJS
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model
    from awq.methods.base import sparsify_
    from awq.methods.paper_mlp import SparsityConfig
    from awq.methods.recording import record_masks
    from awq.predictor import train as PT
    from awq.store.centroids import save_centroids
    from awq.store.pattern_store import PatternStore

    cfg, _, points, d = frontier
    model, tok, _ = load_model(str(tiny_model_dir), device="cpu")
    train = tokenize_windows(tok, load_corpus("train", str(tiny_corpus)).text, SEQ)[:4]
    sparsify_(model, SparsityConfig(thresholds=points["paper"]["config"]["thresholds"]))
    meta = {"model": "tiny", "thresholds_sha256": "x", "dataset": "tiny", "dataset_source": "test", "split": "train"}
    with record_masks(model, d / "train_store", meta=meta, total_windows=4, seqlen=SEQ, record_inputs=True) as rec:
        for i in range(4):
            rec.start_window(i)
            with torch.no_grad():
                model(train[i: i + 1])
            rec.end_window(i, {})
    st = PatternStore(d / "train_store")
    files = []
    for p in PROJS:
        rows = torch.from_numpy(_bits(st.layer(p, 0)[:7], st.widths[p]).astype(np.uint8))
        save_centroids(d / f"{p}.pt", torch.cat([torch.ones(1, st.widths[p], dtype=torch.uint8), rows]))
        files.append(f"{p.split('_')[0]}={d / f'{p}.pt'}")
    spec = ",".join(files)
    PT.train(d / "train_store", spec, d / "pred.safetensors", PT.TrainConfig(epochs=2, batch_size=32, seed=0))
    return spec, d / "pred.safetensors"


def test_cluster_predicted_cost_equals_applied_masks(frontier, tiny_cluster_predictor, tiny_model_dir, tiny_corpus):
    from safetensors.torch import load_file

    from awq.load.arch import decoder_layers
    from awq.methods.base import sparsify_
    from awq.methods.cluster import calibrate_cluster

    cfg, _, _, d = frontier
    spec, pred = tiny_cluster_predictor
    res = main(_cfg(tiny_model_dir, tiny_corpus, cfg.out, cfg.plots_dir, methods=["cluster_predicted"],
                    centroids=spec, predictor=str(pred)))
    assert res["computed"] == 1  # same directory, same fingerprint: only the new point
    row = {r["method"]: r for r in csv.DictReader(open(res["csv"]))}["cluster_predicted"]
    assert row["realizable"] == "true"

    # reference: the masks the codebooks actually return, per token; h = act(g) * u
    model, windows = _test_windows(tiny_model_dir, tiny_corpus)
    from awq.load.data import load_corpus, tokenize_windows
    from awq.load.models import load_model

    _, tok, _ = load_model(str(tiny_model_dir), device="cpu")  # recalibrate as the frontier does (deterministic)
    calib_windows = tokenize_windows(tok, load_corpus("train", str(tiny_corpus)).text, SEQ)[:2]
    ccfg = calibrate_cluster(model, calib_windows, 0.5, centroids=spec, predictor=str(pred), model_name="tiny")
    outs: dict[tuple[int, str], list] = {}

    class Capture:
        def __init__(self, proj, book):
            self.proj, self.book = proj, book

        def __call__(self, y, *, raw, layer_idx, x):
            out = self.book(y, raw=raw, layer_idx=layer_idx, x=x)
            outs.setdefault((layer_idx, self.proj), []).append(out.detach().reshape(-1, out.shape[-1]).clone())
            return out

    ccfg.codebooks = {p: Capture(p, b) for p, b in ccfg.codebooks.items()}
    sparsify_(model, ccfg)
    with torch.no_grad():
        for w in windows:
            model(w[None])
    act = decoder_layers(model)[0].mlp.act_fn
    fr = np.zeros(3)
    n = 0
    for layer in range(2):
        g, u = torch.cat(outs[(layer, "gate_proj")]), torch.cat(outs[(layer, "up_proj")])
        h = act(g) * u
        fr += [float((g != 0).double().mean(1).sum()), float((u != 0).double().mean(1).sum()),
               float((h != 0).double().mean(1).sum())]
        n += g.shape[0]
    fr /= n
    # the predictor's share: its multiply-adds (the weights of one layer's heads) over the MLP's 3*H*F
    t = load_file(str(pred))
    macs = sum(v.numel() for k, v in t.items() if k.startswith("layers.0.") and k.split(".")[-1] in ("w1", "w2"))
    hidden, inter = 64, 128
    extra = macs / (3 * hidden * inter)
    assert 0 < extra <= 0.05
    want = float(fr.mean()) + extra
    assert float(row["weight_read_fraction"]) == pytest.approx(want, abs=1e-12)
    point = json.loads((cfg.out / "points" / "cluster_predicted_0.5000.json").read_text())
    assert point["extra"] == pytest.approx(extra, abs=1e-15)
    for j, p in enumerate(("gate_proj", "up_proj", "down_proj")):
        assert point["per_projection"][p] == pytest.approx(fr[j], abs=1e-12), p
