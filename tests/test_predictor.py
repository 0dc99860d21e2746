"""awq.methods.label_predictor: training beats the majority baseline, metrics match a plain reference, file checks,
save/load round trip, resume, and the predicted-centroid path through awq.methods.codebook end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from awq.load.arch import PROJS
from awq.methods import label_predictor as P
from awq.methods.base import sparsify_
from awq.methods.paper_mlp import SparsityConfig
from awq.methods.recording import record_masks
from awq.predictor import __main__ as PM
from awq.predictor import evaluate as PE
from awq.predictor import train as PT
from awq.store.bitpack import pack, unpack
from awq.store.centroids import save_centroids
from awq.store.pattern_store import StoreWriter

H, WIDTHS, LAYERS, SEQ = 24, {"gate_proj": 40, "up_proj": 40, "down_proj": 24}, 2, 32
KS = {"gate_proj": 6, "up_proj": 5, "down_proj": 4}
META = {"model": "planted", "thresholds_sha256": "x", "dataset": "planted", "dataset_source": "test", "split": "train"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny GEMMs: intra-op threads only add overhead (and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# planted store: the cluster of a token is a linear function of its MLP input
# --------------------------------------------------------------------------------------------
def planted_centroids(tmp: Path, seed: int = 0) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(seed)
    files, cents = [], {}
    for p in PROJS:
        c = (torch.rand(KS[p], WIDTHS[p], generator=g) < 0.5).to(torch.uint8)
        c[:, 0] = 1  # no empty centroid
        save_centroids(tmp / f"{p}.pt", c, {"proj": p})
        files.append(f"{p.split('_')[0]}={tmp / f'{p}.pt'}")
        cents[p] = c
    return ",".join(files), cents


def planted_store(root: Path, cents: dict, windows: int, seed: int) -> None:
    """x = mu[z] + noise; the mask of projection p is its centroid z mod K_p with 10% of its bits dropped."""
    rng = np.random.default_rng(seed)
    mus = np.random.default_rng(123).normal(size=(LAYERS, 8, H)) * 1.5  # fixed across train/test
    prior = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])
    w = StoreWriter(root, meta=META | {"split": f"s{seed}"}, total_windows=windows, seqlen=SEQ, num_layers=LAYERS,
                    record_inputs=True)
    for i in range(windows):
        for l in range(LAYERS):
            z = rng.choice(8, size=SEQ, p=prior)
            x = mus[l, z] + rng.normal(size=(SEQ, H))
            w.write("input", l, i, x.astype(np.float16))
            for p in PROJS:
                a = cents[p].numpy()[(z + l) % KS[p]] * (rng.random((SEQ, WIDTHS[p])) > 0.1)
                w.write(p, l, i, pack(a), width=WIDTHS[p])
        w.end_window(i, {})
    w.close()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    spec, cents = planted_centroids(d)
    planted_store(d / "train", cents, windows=24, seed=1)
    planted_store(d / "test", cents, windows=8, seed=2)
    cfg = PT.TrainConfig(rank=4, epochs=6, batch_size=64, lr=1e-2, max_rows=None, val_fraction=0.1, seed=3)
    PT.train(d / "train", spec, d / "pred.safetensors", cfg)
    return d, spec, cents, cfg


# --------------------------------------------------------------------------------------------
# plain references
# --------------------------------------------------------------------------------------------
def ref_logits(t: dict, meta: dict, x: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
    """One row at a time, one output at a time."""
    r = meta["rank"]
    i = [p for p in PROJS if p in meta["k"]].index(proj)
    off = 0 if meta["trunk"] == "shared" else i * r
    w1, b1 = t[f"layers.{layer}.w1"].double(), t[f"layers.{layer}.b1"].double()
    w2, b2 = t[f"layers.{layer}.{proj}.w2"].double(), t[f"layers.{layer}.{proj}.b2"].double()
    out = torch.zeros(x.shape[0], w2.shape[0], dtype=torch.float64)
    for n in range(x.shape[0]):
        z = [float(w1[off + j] @ x[n].double() + b1[off + j]) for j in range(r)]
        if meta["act"] == "relu":
            z = [max(v, 0.0) for v in z]
        for k in range(w2.shape[0]):
            out[n, k] = sum(w2[k, j] * z[j] for j in range(r)) + b2[k]
    return out


def ref_eval(store_dir: Path, pred: P.ClusterPredictor, cents: dict, topk: int) -> dict:
    """Plain per-row evaluation of one store (all rows)."""
    from awq.store.pattern_store import PatternStore

    st = PatternStore(store_dir)
    out = {}
    for p in pred.projs:
        C = cents[p].numpy().astype(int)
        s = dict(rows=0, active=0, top1=0, topk=0, pred=0, best=0, oracle=0, maj=0)
        for l in range(st.num_layers):
            x = torch.from_numpy(np.array(st.inputs(l), dtype=np.float32))
            lg = ref_logits(pred.tensors, pred.meta, x, l, p)
            A = np.unpackbits(st.layer(p, l), axis=-1, count=WIDTHS[p]).astype(int)
            counts = pred.tensors[f"layers.{l}.{p}.counts"].tolist()
            maj = max(range(len(counts)), key=lambda k: (counts[k], -k))
            for n in range(A.shape[0]):
                ov = [int((A[n] & C[k]).sum()) for k in range(C.shape[0])]
                label = ov.index(max(ov))
                order = sorted(range(len(ov)), key=lambda k: -float(lg[n, k]))[:topk]
                s["rows"] += 1
                s["active"] += int(A[n].sum())
                s["top1"] += order[0] == label
                s["topk"] += label in order
                s["pred"] += ov[order[0]]
                s["best"] += max(ov[k] for k in order)
                s["oracle"] += max(ov)
                s["maj"] += ov[maj]
        out[p] = {"top1_acc": s["top1"] / s["rows"], f"top{topk}_acc": s["topk"] / s["rows"],
                  "recall_pred": s["pred"] / s["active"], f"recall_best_of_top{topk}": s["best"] / s["active"],
                  "recall_oracle": s["oracle"] / s["active"], "recall_majority": s["maj"] / s["active"]}
    return out


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_training_beats_majority_baseline(planted):
    d, spec, cents, cfg = planted
    res = PE.evaluate(d / "test", d / "pred.safetensors")
    for p in PROJS:
        m = res["overall"][p]
        assert m["rows"] == LAYERS * 8 * SEQ
        assert m["top1_acc"] > m["top1_acc_majority"] + 0.3, (p, m)
        assert m["recall_pred"] > m["recall_majority"] + 0.1, (p, m)
        assert m["recall_pred"] <= m["recall_best_of_top5"] <= m["recall_oracle"] + 1e-12
        assert m["top1_acc"] <= m["top5_acc"] and 0.4 < m["data_density"] < 0.6
    assert res["cost"]["flop_fraction"] == pytest.approx(
        (3 * 4 * H + 4 * sum(KS.values())) / (3 * H * 40))


def test_shared_trunk_coverage_loss_learns(planted, tmp_path):
    d, spec, cents, cfg = planted
    cfg2 = PT.TrainConfig(rank=4, trunk="shared", act="gelu", loss="coverage", top_m=3, epochs=6, batch_size=64,
                         lr=1e-2, max_rows=None, val_fraction=0.0, seed=3)
    PT.train(d / "train", spec, tmp_path / "cov.safetensors", cfg2)
    res = PE.evaluate(d / "test", tmp_path / "cov.safetensors", max_rows=200)
    assert res["store"]["rows_evaluated"] == 200 and res["predictor"]["trunk"] == "shared"
    for p in PROJS:
        m = res["overall"][p]
        assert m["recall_pred"] > m["recall_majority"] + 0.1, (p, m)


def test_evaluate_matches_plain_reference(planted):
    d, spec, cents, cfg = planted
    pred = P.ClusterPredictor.load(d / "pred.safetensors")
    for topk in (1, 3):
        res = PE.evaluate(d / "test", d / "pred.safetensors", topk=topk, block_rows=50)
        ref = ref_eval(d / "test", pred, cents, topk)
        for p in PROJS:
            for key, val in ref[p].items():
                assert res["overall"][p][key] == pytest.approx(val, abs=1e-9), (p, key)


def test_inference_matches_reference_and_fold(planted, tmp_path):
    d, spec, cents, cfg = planted
    pred = P.ClusterPredictor.load(d / "pred.safetensors")
    x = torch.randn(7, H)
    for l in range(LAYERS):
        for p in PROJS:
            torch.testing.assert_close(pred.logits(x, l, p).double(), ref_logits(pred.tensors, pred.meta, x, l, p),
                                       rtol=1e-5, atol=1e-5)
    # a shared relu trunk, and folding the standardisation into W1 keeps the net's logits
    ks = {"gate_proj": 5, "down_proj": 3}
    net = PT._LayerNet(H, 3, ks, "shared", "relu")
    xs = torch.randn(50, H) * 3 + 1
    mean, std = xs.mean(0), xs.std(0)
    t = PT._fold(net, mean, std, 0, {p: torch.zeros(k, dtype=torch.int64) for p, k in ks.items()})
    meta = {"hidden": H, "intermediate": 40, "num_layers": 1, "rank": 3, "trunk": "shared", "act": "relu", "k": ks,
            "widths": {"gate_proj": 40, "down_proj": 24}}
    cp = P.ClusterPredictor(t, meta)
    with torch.no_grad():
        want = net((xs - mean) / std)
    for p in ks:
        torch.testing.assert_close(cp.logits(xs, 0, p), want[p], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cp.logits(xs, 0, p).double(), ref_logits(t, meta, xs, 0, p), rtol=1e-5, atol=1e-5)


def same_file(a: Path, b: Path) -> None:
    """Same metadata and bit-identical tensors (the safetensors header's key order may vary)."""
    x, y = P.ClusterPredictor.load(a), P.ClusterPredictor.load(b)
    assert x.meta == y.meta and set(x.tensors) == set(y.tensors)
    assert all(torch.equal(x.tensors[k], y.tensors[k]) and x.tensors[k].dtype == y.tensors[k].dtype for k in x.tensors)


def test_round_trip_determinism_and_resume(planted, tmp_path, monkeypatch):
    d, spec, cents, cfg = planted
    a = P.ClusterPredictor.load(d / "pred.safetensors")
    a.save(tmp_path / "copy.safetensors")
    same_file(d / "pred.safetensors", tmp_path / "copy.safetensors")
    assert a.meta["centroids"]["up_proj"]["k"] == KS["up_proj"] and len(a.meta["val_metrics"]) == LAYERS
    # same seed -> identical file; a run killed after layer 0 resumes to the same file
    small = PT.TrainConfig(rank=2, epochs=1, batch_size=128, max_rows=300, seed=5)
    PT.train(d / "train", spec, tmp_path / "r1.safetensors", small)
    PT.train(d / "train", spec, tmp_path / "r2.safetensors", small)
    same_file(tmp_path / "r1.safetensors", tmp_path / "r2.safetensors")
    real = PT._train_layer

    def boom(x, targets, cfg, rank, ks, layer):
        if layer == 1:
            raise KeyboardInterrupt
        return real(x, targets, cfg, rank, ks, layer)

    monkeypatch.setattr(PT, "_train_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        PT.train(d / "train", spec, tmp_path / "r3.safetensors", small)
    assert (tmp_path / "r3.safetensors.partial").is_file() and not (tmp_path / "r3.safetensors").exists()
    calls = []
    monkeypatch.setattr(PT, "_train_layer", lambda *a: calls.append(a[-1]) or real(*a))
    PT.train(d / "train", spec, tmp_path / "r3.safetensors", small)
    assert calls == [1]
    same_file(tmp_path / "r1.safetensors", tmp_path / "r3.safetensors")
    assert not (tmp_path / "r3.safetensors.partial").exists()


def test_auto_rank_respects_budget():
    ks = {p: 2048 for p in PROJS}
    for trunk in P.TRUNKS:
        r = P.auto_rank(576, 1536, ks, trunk, 0.05)
        c, c1 = (P.predictor_cost(576, 1536, ks, q, trunk) for q in (r, r + 1))
        assert max(c["flop_fraction"], c["param_fraction"]) <= 0.05 < max(c1["flop_fraction"], c1["param_fraction"])
    assert P.predictor_cost(576, 1536, ks, 16, "separate")["macs"] == 3 * 16 * (576 + 2048)
    with pytest.raises(P.PredictorError, match="budget"):
        P.auto_rank(576, 1536, ks, "separate", 1e-4)


def test_bad_files_and_cli_errors(planted, tmp_path, capsys):
    d, spec, cents, cfg = planted
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(P.PredictorError, match="not a readable safetensors"):
        P.ClusterPredictor.load(tmp_path / "junk.safetensors")
    with pytest.raises(P.PredictorError, match="not found"):
        P.ClusterPredictor.load(tmp_path / "missing.safetensors")
    a = P.ClusterPredictor.load(d / "pred.safetensors")
    t = dict(a.tensors)
    t["layers.1.up_proj.w2"] = t["layers.1.up_proj.w2"][:, :1]
    P.save_tensors(tmp_path / "bad.safetensors", t, a.meta)
    with pytest.raises(P.PredictorError, match="layers.1.up_proj.w2"):
        P.ClusterPredictor.load(tmp_path / "bad.safetensors")
    # other centroids (same K, other content) are refused by sha256; other K by K
    spec2, _ = planted_centroids(tmp_path, seed=9)
    with pytest.raises(P.PredictorError, match="sha256"):
        PE.evaluate(d / "test", d / "pred.safetensors", centroids=spec2)
    c = torch.ones(KS["gate_proj"] + 1, WIDTHS["gate_proj"], dtype=torch.uint8)
    save_centroids(tmp_path / "k7.pt", c)
    with pytest.raises(P.PredictorError, match="K=6 but centroid file .* has K=7"):
        PE.evaluate(d / "test", d / "pred.safetensors", centroids=f"gate={tmp_path / 'k7.pt'}")
    assert PM.main(["evaluate", "--masks", str(d / "test"), "--predictor", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    # a store without inputs
    w = StoreWriter(tmp_path / "noin", meta=META, total_windows=1, seqlen=SEQ, num_layers=LAYERS)
    for l in range(LAYERS):
        for p in PROJS:
            w.write(p, l, 0, pack(np.ones((SEQ, WIDTHS[p]))), width=WIDTHS[p])
    w.end_window(0)
    w.close()
    assert PM.main(["train", "--masks", str(tmp_path / "noin"), "--centroids", spec, "--output",
                   str(tmp_path / "o.safetensors")]) == 2
    assert "--dump_inputs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# end to end on a tiny model: record -> centroids -> train -> predicted-centroid inference
# --------------------------------------------------------------------------------------------
def tiny(layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return MistralForCausalLM(cfg).eval()


THR = {p: [0.02, 0.03] for p in PROJS}


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_e2e")
    model = sparsify_(tiny(), SparsityConfig(thresholds=THR))
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with record_masks(model, d / "store", meta=META, total_windows=4, seqlen=32, record_inputs=True) as rec:
        for i in range(4):
            rec.start_window(i)
            with torch.no_grad():
                model(windows[i: i + 1])
            rec.end_window(i, {})
    from awq.store.pattern_store import PatternStore

    st = PatternStore(d / "store")
    files = []
    for p in PROJS:  # centroids: an all-ones row, then some recorded masks
        rows = unpack(st.layer(p, 0)[:7], st.widths[p], dtype=torch.uint8)
        c = torch.cat([torch.ones(1, st.widths[p], dtype=torch.uint8), rows])
        save_centroids(d / f"{p}.pt", c)
        files.append(f"{p.split('_')[0]}={d / f'{p}.pt'}")
    spec = ",".join(files)
    PT.train(d / "store", spec, d / "pred.safetensors", PT.TrainConfig(epochs=2, batch_size=32, seed=0))
    return d, spec, windows


def test_predicted_centroids_end_to_end(tiny_predictor):
    from awq.methods.codebook import load_codebooks

    d, spec, windows = tiny_predictor
    model = tiny()
    fns, info = P.load_predictor(d / "pred.safetensors", model, centroids=spec)
    assert set(fns) == set(PROJS) and info["rank"] >= 1 and info["cost"]["flop_fraction"] <= 0.05
    assert info["centroids_spec"].count("=") == 3 and set(info["centroids_checked"]) == set(PROJS)
    books, cinfo = load_codebooks(info["centroids_spec"], model, mode="predicted", label_fns=fns)
    sparsify_(model, SparsityConfig(thresholds=THR, codebooks=books))
    with torch.no_grad():
        got = model(windows[:2]).logits

    # plain reference: per token, label from the stored weights, mask = C[label] over the raw output
    pred = P.ClusterPredictor.load(d / "pred.safetensors")
    cents = {p: torch.load(d / f"{p}.pt", weights_only=True)["centroids"] for p in PROJS}

    class RefBook(torch.nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, y, *, raw, layer_idx, x):
            out = torch.empty_like(raw)
            xs, rs = x.reshape(-1, x.shape[-1]), raw.reshape(-1, raw.shape[-1])
            lg = ref_logits(pred.tensors, pred.meta, xs, layer_idx, self.proj)
            for n in range(xs.shape[0]):
                out.view(-1, raw.shape[-1])[n] = rs[n] * cents[self.proj][int(lg[n].argmax())]
            return out

    ref_model = sparsify_(tiny(), SparsityConfig(thresholds=THR, codebooks={p: RefBook(p) for p in PROJS}))
    with torch.no_grad():
        want = ref_model(windows[:2]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    st = books["up_proj"].stats()
    assert 0 < st["precision"] <= 1 and st["per_layer"][1] is not None


def test_predictor_for_another_model_is_rejected(tiny_predictor, tmp_path):
    d, spec, windows = tiny_predictor
    with pytest.raises(P.PredictorError, match="hidden size 64 .* model has hidden size 32"):
        P.load_predictor(d / "pred.safetensors", tiny(hidden=32))
    with pytest.raises(P.PredictorError, match="2 layers .* model has 3 decoder layers"):
        P.load_predictor(d / "pred.safetensors", tiny(layers=3))
    other = torch.ones(3, 96, dtype=torch.uint8)
    save_centroids(tmp_path / "g.pt", other)
    with pytest.raises(P.PredictorError, match="K=8 but centroid file"):
        P.load_predictor(d / "pred.safetensors", tiny(), centroids=f"gate={tmp_path / 'g.pt'}")
    meta = json.loads(json.dumps(P.ClusterPredictor.load(d / "pred.safetensors").meta))
    assert meta["model"] == "planted" and meta["store"]["split"] == "train" and meta["train"]["seed"] == 0


def test_entry_cli_with_predictor(tiny_predictor, tiny_corpus, tmp_path, capsys):
    """`python -m awq.entry --predictor FILE` runs end to end and reports the predictor beside the results."""
    import json

    from awq.experiments.entry import cli
    from awq.store.thresholds import save_thresholds
    from tests.conftest import tiny_tokenizer

    d, spec, _ = tiny_predictor
    mdir = tmp_path / "model"
    tiny().save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    thr = tmp_path / "thr.json"
    save_thresholds(THR, thr)
    out = tmp_path / "res.json"
    rc = cli(["--model_path", str(mdir), "--data_path", str(tiny_corpus), "--seqlen", "32", "--nsamples", "2",
              "--thresholds", str(thr), "--predictor", str(d / "pred.safetensors"), "--output_path", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["centroids"]["mode"] == "predicted" and res["predictor"]["rank"] >= 1
    assert set(res["centroids"]["run_stats"]) == set(PROJS) and res["ppl"] > 1
    # the gathered sparse kernel computes the same predicted-cluster model (only the active neurons)
    out2 = tmp_path / "res_sparse.json"
    rc = cli(["--model_path", str(mdir), "--data_path", str(tiny_corpus), "--seqlen", "32", "--nsamples", "2",
              "--thresholds", str(thr), "--predictor", str(d / "pred.safetensors"), "--sparse_compute",
              "--output_path", str(out2)])
    err = capsys.readouterr().err
    assert rc == 0, err
    sparse = json.loads(out2.read_text())
    assert sparse["ppl"] == pytest.approx(res["ppl"], rel=1e-4)
    # --sparse_compute without a predictor is refused clearly
    rc = cli(["--model_path", str(mdir), "--data_path", str(tiny_corpus), "--seqlen", "32", "--nsamples", "1",
              "--thresholds", str(thr), "--sparse_compute"])
    assert rc == 2 and "--sparse_compute needs --predictor" in capsys.readouterr().err


def test_cli_contract_and_module_entry_point(planted, tmp_path):
    """`python -m awq.predictor train|evaluate` keep their arguments; the split modules stay reachable here."""
    import subprocess
    import sys

    ap = PM.build_parser()
    sub = next(a for a in ap._actions if a.dest == "cmd").choices
    opts = {c: {o for a in p._actions for o in a.option_strings} - {"-h", "--help"} for c, p in sub.items()}
    assert opts == {
        "train": {"--masks", "--centroids", "--output", "--rank", "--trunk", "--act", "--loss", "--epochs",
                  "--batch_size", "--lr", "--weight_decay", "--max_rows", "--val_fraction", "--top_m", "--budget",
                  "--seed", "--log_level"},
        "evaluate": {"--masks", "--predictor", "--centroids", "--topk", "--max_rows", "--output", "--log_level"}}
    assert PT.LOSSES == ("ce", "coverage")
    d, spec, cents, cfg = planted
    out = tmp_path / "ev.json"
    r = subprocess.run([sys.executable, "-m", "awq.predictor", "evaluate", "--masks", str(d / "test"), "--predictor",
                        str(d / "pred.safetensors"), "--topk", "3", "--max_rows", "100", "--output", str(out),
                        "--log_level", "WARNING"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    want = PE.evaluate(d / "test", d / "pred.safetensors", topk=3, max_rows=100)
    assert res["overall"] == json.loads(json.dumps(want["overall"]))
    assert r.stdout.splitlines()[0].startswith("predictor rank=4")
    r = subprocess.run([sys.executable, "-m", "awq.predictor", "evaluate", "--masks", str(d / "test"), "--predictor",
                        str(d / "pred.safetensors"), "--output", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "is a directory" in r.stderr


def test_load_predicted_selector(tiny_predictor):
    """The gathered-compute selector: labels of the named projections pick centroid rows (gate AND up, down ->
    output mask); a subset spec restricts the projections."""
    d, spec, windows = tiny_predictor
    model = tiny()
    pred = P.ClusterPredictor.load(d / "pred.safetensors")
    cents = {p: torch.load(d / f"{p}.pt", weights_only=True)["centroids"].bool() for p in PROJS}
    sel, info = P.load_predicted_selector(d / "pred.safetensors", model)
    assert info["projs"] == list(PROJS) and info["rank"] == pred.rank
    x = torch.randn(5, 64)
    out = sel(1, x)
    lab = {p: pred.labels(x, 1, p) for p in PROJS}
    assert torch.equal(out["active"], cents["gate_proj"][lab["gate_proj"]] & cents["up_proj"][lab["up_proj"]])
    assert torch.equal(out["out_mask"], cents["down_proj"][lab["down_proj"]])
    gate_only = spec.split(",")[0]
    sel, info = P.load_predicted_selector(d / "pred.safetensors", model, centroids=gate_only)
    assert info["projs"] == ["gate_proj"]
    out = sel(0, x)
    labs, table = out["active"]
    assert torch.equal(labs, pred.labels(x, 0, "gate_proj")) and torch.equal(table, cents["gate_proj"])
    assert out["out_mask"] is None
