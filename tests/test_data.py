"""Corpus loading (local files, hub fallback, offline Wikipedia substitute), windows, hub probe.

No network: every test runs with the HF offline switches on (the hub probe tests point
``AWQ_HUB_HOST`` at local ports).  The offline substitute is converted for real once per test
session into a temporary ``AWQ_CACHE_DIR``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from awq.load import data, hub, wiki_substitute
from awq.load.data import Corpus, DataError, load_corpus, tokenize_windows
from awq.util import cache

HEADING = re.compile(r"^ (= )+\S.*? (= )+\n$")


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("awq-cache")


@pytest.fixture(autouse=True)
def offline(monkeypatch, session_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("AWQ_CACHE_DIR", str(session_cache))
    monkeypatch.delenv("AWQ_HUB_HOST", raising=False)
    hub.reset_hub_probe()
    yield
    hub.reset_hub_probe()


@pytest.fixture(scope="session")
def substitute(session_cache):
    """Convert the gensim dump for real (once), then load both parts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("AWQ_CACHE_DIR", str(session_cache))
        corpus_dir = session_cache / "corpus"
        assert not list(corpus_dir.glob("*.json")), "conversion must run from an empty cache"
        t0 = time.perf_counter()
        test = load_corpus("test", use_hub=False)
        convert_s = time.perf_counter() - t0
        train = load_corpus("train", use_hub=False)
        caches = list(corpus_dir.glob("*.json"))
        assert len(caches) == 1
        articles = json.loads(caches[0].read_text(encoding="utf-8"))["articles"]
    return {"test": test, "train": train, "articles": articles, "cache": caches[0], "convert_s": convert_s}


def _tiny_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def _titles(corpus: Corpus) -> list[str]:
    return re.findall(r"^ = ([^=\n].*?) = $", corpus.text, flags=re.M)


# --------------------------------------------------------------------------------------------
# local files
# --------------------------------------------------------------------------------------------
RAW = " \n = Title = \n \n Hello world . \n   \n = = Part = = \n\t\nlast line"
RAW_ROWS = ["", " = Title = \n", "", " Hello world . \n", "", " = = Part = = \n", "", "last line"]


def test_local_raw_file_rows_joined(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(RAW, encoding="utf-8")
    c = load_corpus("test", data_path=path)
    assert c.text == "\n\n".join(RAW_ROWS)
    assert c.source == str(path.resolve())
    assert (c.name, c.split, c.substitute) == ("wikitext-2-raw-v1", "test", False)
    assert c.sha256 == hashlib.sha256(c.text.encode()).hexdigest()
    d = c.as_dict()
    assert "text" not in d and d["n_chars"] == len(c.text) and d["source"] == c.source


def test_local_raw_file_crlf_and_generic_name(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(RAW.replace("\n", "\r\n").encode())
    c = load_corpus("test", data_path=str(path))
    assert c.text == "\n\n".join(RAW_ROWS)  # universal newlines, as the HF builder reads it
    assert c.name != "wikitext-2-raw-v1" and not c.substitute


def test_parquet_file(tmp_path):
    rows = [" = A = \n", "", None, " b c \n"]
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": rows}), path)
    c = load_corpus("train", data_path=path)
    assert c.text == "\n\n".join(r or "" for r in rows)
    assert c.source == str(path.resolve()) and c.split == "train"


def test_hf_layout_dir_picks_split(tmp_path):
    root = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    root.mkdir(parents=True)
    parts = {s: [f" = {s} = \n", "", f" {s} text \n"] for s in ("test", "train", "validation")}
    for s, rows in parts.items():
        pq.write_table(pa.table({"text": rows}), root / f"{s}-00000-of-00001.parquet")
    for split in ("test", "train"):
        c = load_corpus(split, data_path=tmp_path / "wikitext")
        assert c.text == "\n\n".join(parts[split])
        assert c.name == "wikitext-2-raw-v1" and c.split == split
        assert c.source == str((root / f"{split}-00000-of-00001.parquet").resolve())


def test_all_configs_dir_prefers_wikitext2_raw(tmp_path):
    for cfg in ("wikitext-103-raw-v1", "wikitext-2-raw-v1", "wikitext-2-v1"):
        (tmp_path / cfg).mkdir()
        pq.write_table(pa.table({"text": [f" {cfg} \n"]}), tmp_path / cfg / "test-00000-of-00001.parquet")
    c = load_corpus("test", data_path=tmp_path)
    assert c.text == " wikitext-2-raw-v1 \n" and c.name == "wikitext-2-raw-v1"
    c = load_corpus("test", data_path=tmp_path / "wikitext-2-v1" / "test-00000-of-00001.parquet")
    assert c.name == "wikitext-2-v1"  # the tokenized (<unk>) variant is named as such


def test_raw_dir_picks_split(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" test \n", encoding="utf-8")
    (tmp_path / "wiki.train.raw").write_text(" train \n", encoding="utf-8")
    assert load_corpus("train", data_path=tmp_path).text == " train \n"
    assert load_corpus("test", data_path=tmp_path).text == " test \n"


def test_missing_and_bad_local_inputs(tmp_path):
    missing = tmp_path / "nope" / "wiki.test.raw"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_corpus("test", data_path=missing)
    with pytest.raises(DataError, match="no train file"):
        (tmp_path / "wiki.test.raw").write_text(" x \n", encoding="utf-8")
        load_corpus("train", data_path=tmp_path)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["x"]}), bad)
    with pytest.raises(DataError, match="no 'text' column"):
        load_corpus("test", data_path=bad)
    binary = tmp_path / "bin.raw"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_corpus("test", data_path=binary)
    with pytest.raises(DataError, match="unknown split"):
        load_corpus("validation", data_path=tmp_path)


# --------------------------------------------------------------------------------------------
# offline substitute
# --------------------------------------------------------------------------------------------
def test_substitute_is_labelled_and_split(substitute):
    test, train, articles = substitute["test"], substitute["train"], substitute["articles"]
    for c, split in ((test, "test"), (train, "train")):
        assert c.substitute is True and c.split == split
        assert c.name == data.SUBSTITUTE_NAME and "wikitext" not in c.name.lower()
        assert c.source.startswith("gensim-") and c.source.endswith(wiki_substitute.GENSIM_MEMBER)
        assert c.sha256 == hashlib.sha256(c.text.encode()).hexdigest()
    t_titles, tr_titles = _titles(test), _titles(train)
    assert t_titles and tr_titles and not set(t_titles) & set(tr_titles)
    # the documented rule: kept article i -> test iff i % 3 == 0, in dump order
    assert t_titles == [a["title"] for i, a in enumerate(articles) if i % 3 == 0]
    assert tr_titles == [a["title"] for i, a in enumerate(articles) if i % 3 != 0]
    assert test.text == "\n\n".join(r for i, a in enumerate(articles) if i % 3 == 0 for r in a["rows"])
    assert len(train.text) > len(test.text) > 100_000


def test_substitute_has_no_markup_and_wikitext_layout(substitute):
    text = substitute["test"].text + substitute["train"].text
    for mark in ("{{", "}}", "[[", "]]", "<ref", "</", "{|", "''", "<!--", "thumb|", "http"):
        assert mark not in text, mark
    rows = [r for a in substitute["articles"] for r in a["rows"]]
    for r in rows:
        assert r == "" or (r.startswith(" ") and r.endswith(" \n") and "\n" not in r[:-1]), repr(r)
    headings = [r for r in rows if r.startswith(" =")]
    assert headings and all(HEADING.match(h) for h in headings)
    assert any(h.startswith(" = = ") for h in headings)  # section headings, not just titles
    for h in headings:  # balanced: level n opens and closes with n '='
        left, right = re.match(r"^ ((?:= )+)", h).group(1), re.search(r" ((?:= )+)\n$", h).group(1)
        assert left == right, h


def test_substitute_conversion_is_deterministic(substitute):
    """Re-converting the first articles from the dump gives exactly the cached rows."""
    cached = {a["title"]: a["rows"] for a in substitute["articles"][:4]}
    redone = {}
    for title, ns, redirect, text in wiki_substitute._iter_pages(wiki_substitute.gensim_dump_path()):
        if title in cached:
            redone[title] = wiki_substitute.wikitext_article_rows(title, text)
        if len(redone) == len(cached):
            break
    assert redone == cached


def test_substitute_reads_cache_fast(substitute, monkeypatch):
    monkeypatch.setattr(wiki_substitute, "convert_dump", lambda path: pytest.fail("cache not used"))
    t0 = time.perf_counter()
    again = load_corpus("test", use_hub=False)
    assert time.perf_counter() - t0 < 1.0
    assert again == substitute["test"]


def test_conversion_rules_on_handwritten_article():
    wikitext = (
        "{{Infobox thing|name=X}}\n'''Thing''' is a [[Example page|small example]] of "
        "[[markup]].<ref>{{cite web|url=http://x.org}}</ref> See [http://x.org the site].\n"
        "[[File:Pic.jpg|thumb|A caption]]\n<!-- hidden -->\n"
        "== History ==\nIt began in 1900 &amp; grew.<ref name=a/>\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "=== Early days ===\n* A listed item here\n"
        "== References ==\n{{reflist}}\nSome reference text\n[[Category:Things]]\n[[de:Ding]]\n"
    )
    rows = wiki_substitute.wikitext_article_rows("Thing", wikitext)
    assert rows == [
        "", " = Thing = \n", "",
        " Thing is a small example of markup. See the site. \n", "",
        " = = History = = \n", "",
        " It began in 1900 & grew. \n", "",
        " = = = Early days = = = \n", "",
        " A listed item here \n", "",
    ]
    assert wiki_substitute.wikitext_article_rows("Empty", "{{stub}}\n[[Category:X]]") == []


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    fake = [{"title": f"T{i}", "rows": ["", f" = T{i} = \n", "", f" body {i} \n", ""]} for i in range(4)]
    calls = []
    monkeypatch.setattr(wiki_substitute, "convert_dump", lambda path: calls.append(path) or fake)
    first = load_corpus("test", use_hub=False)
    assert len(calls) == 1 and _titles(first) == ["T0", "T3"]
    (cache,) = (tmp_path / "corpus").glob("*.json")
    cache.write_text("{not json", encoding="utf-8")
    assert load_corpus("test", use_hub=False) == first
    assert len(calls) == 2 and "unreadable corpus cache" in caplog.text
    assert not list((tmp_path / "corpus").glob("*.tmp"))


def test_missing_gensim_says_how_to_install(monkeypatch):
    monkeypatch.setattr(wiki_substitute.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=re.escape("pip install --no-deps gensim==4.4.0")):
        load_corpus("test", use_hub=False)


def test_gensim_found_without_import(substitute):
    assert wiki_substitute.gensim_dump_path().is_file()
    assert "gensim" not in sys.modules


# --------------------------------------------------------------------------------------------
# hub selection and fallback
# --------------------------------------------------------------------------------------------
def test_offline_env_skips_hub(substitute, monkeypatch):
    monkeypatch.setattr(data, "load_hub", lambda split: pytest.fail("hub used while offline"))
    assert load_corpus("test").substitute


def test_hub_failure_falls_back(substitute, monkeypatch, caplog):
    def boom(split):
        raise ConnectionError("simulated outage\nsecond line")

    monkeypatch.setattr(data, "hub_available", lambda: True)
    monkeypatch.setattr(data, "load_hub", boom)
    c = load_corpus("test")
    assert c == substitute["test"]
    assert "simulated outage" in caplog.text and "second line" not in caplog.text


def test_hub_success_is_labelled_wikitext(monkeypatch):
    monkeypatch.setattr(data, "hub_available", lambda: True)

    def fake_load_dataset(path, name, split):
        assert (path, name) == ("wikitext", "wikitext-2-raw-v1")
        return {"text": [" = A = \n", "", f" {split} \n"]}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = load_corpus("train")
    assert (c.name, c.source, c.substitute, c.text) == ("wikitext-2-raw-v1", "hf-hub", False, " = A = \n\n\n\n\n train \n")


# --------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------
def test_tokenize_windows_matches_reference():
    words = "the a cat sat on mat = Title .".split()
    tok = _tiny_tokenizer(words)
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(len(words), (103,), generator=g).tolist())
    win = tokenize_windows(tok, text, 10)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # the tokenizer would add a BOS ...
    assert win.dtype == torch.long and win.shape == (len(ids) // 10, 10)
    for i in range(win.shape[0]):  # plain reference: consecutive slices, tail dropped
        assert win[i].tolist() == ids[i * 10:(i + 1) * 10]
    assert (win != tok.bos_token_id).all()  # ... but windows carry none


def test_tokenize_windows_too_short():
    tok = _tiny_tokenizer(["cat"])
    with pytest.raises(DataError, match="fewer than one window"):
        tokenize_windows(tok, "cat cat cat", 4)
    assert tokenize_windows(tok, "cat cat cat cat", 4).shape == (1, 4)


# --------------------------------------------------------------------------------------------
# hub probe and cache dir
# --------------------------------------------------------------------------------------------
def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online_env(monkeypatch):
    """Offline switches off (restored afterwards), including flags of already-imported HF modules."""
    for v in hub.OFFLINE_VARS:
        monkeypatch.setenv(v, "0")
    for mod, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                       ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        m = sys.modules.get(mod)
        for a in attrs:
            if m is not None and hasattr(m, a):
                monkeypatch.setattr(m, a, getattr(m, a))
    return monkeypatch


def test_hub_unreachable_fails_fast_and_goes_offline(online_env):
    online_env.setenv("AWQ_HUB_HOST", f"127.0.0.1:{_unused_port()}")
    t0 = time.perf_counter()
    assert hub.hub_available() is False
    assert time.perf_counter() - t0 < 1.0
    assert hub.offline_requested()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        assert constants.HF_HUB_OFFLINE is True


def test_hub_reachable_and_cached(online_env):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        online_env.setenv("AWQ_HUB_HOST", f"127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_available() is True
    # the answer is cached per process: the closed server is not probed again
    assert hub.hub_available() is True
    assert not hub.offline_requested()


def test_hanging_resolver_is_bounded(online_env):
    def hang(*a, **k):
        time.sleep(2)
        raise OSError("resolver gave up")

    online_env.setattr(hub.socket, "create_connection", hang)
    online_env.setenv("AWQ_HUB_HOST", "hub.invalid")
    t0 = time.perf_counter()
    assert hub.hub_available(timeout=0.2) is False
    assert time.perf_counter() - t0 < 1.0


def test_offline_env_answers_without_probe(monkeypatch):
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    for value in ("1", "true", "YES"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_available() is False


def test_cache_dir_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache.cache_dir("a", "b") == tmp_path / "explicit" / "a" / "b"
    assert (tmp_path / "explicit" / "a" / "b").is_dir()
    monkeypatch.delenv("AWQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir("corpus") == tmp_path / "xdg" / "awq-sparsity" / "corpus"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "awq-sparsity"
