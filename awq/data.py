"""Evaluation / calibration text: WikiText-2 or an offline Wikipedia substitute, and token windows.

Sources, in order (:func:`load_corpus`):

1. ``data_path``: a local ``wiki.test.raw``-style text file, a parquet file with a ``text`` column,
   or a directory holding either (e.g. the HF layout ``wikitext-2-raw-v1/test-00000-of-00001.parquet``).
2. The Hugging Face hub, ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=...)``,
   when ``use_hub`` and the hub is reachable (:func:`awq.hub.hub_available`).
3. An offline substitute: the (shortened) 2016 English Wikipedia dump shipped inside the
   ``gensim==4.4.0`` wheel, converted once to WikiText-style plain text and cached under
   :func:`awq.hub.cache_dir` ``("corpus")``.  It is never called WikiText-2
   (``name="enwiki-2016-substitute"``, ``substitute=True``).

Rows are joined with ``"\\n\\n"`` exactly as the paper's protocol does with the HF dataset rows:
a raw text file gives one row per line, newline included, and whitespace-only lines become ``""``
(this is what the HF ``wikitext`` builder produces from ``wiki.*.raw``).

Substitute split: the kept articles (namespace 0, not redirects, non-empty after cleaning) are
numbered 0, 1, 2, ... in dump order; article ``i`` goes to ``test`` when ``i % 3 == 0`` and to
``train`` otherwise.
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from awq.hub import cache_dir, hub_available
from awq.thresholds import file_sha256

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("test", "train")
WIKITEXT_NAME = "wikitext-2-raw-v1"
SUBSTITUTE_NAME = "enwiki-2016-substitute"
GENSIM_VERSION = "4.4.0"
GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the conversion below changes: the cache file name carries it.
CONVERTER_VERSION = 2
TEST_EVERY = 3  # article i -> test iff i % TEST_EVERY == 0


class DataError(ValueError):
    """A corpus cannot be found or read (one-line message)."""


@dataclass
class Corpus:
    text: str
    name: str
    source: str
    split: str
    substitute: bool
    sha256: str

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["text"]
        d["n_chars"] = len(self.text)
        return d


def _corpus(rows: list[str], name: str, source: str, split: str, substitute: bool) -> Corpus:
    text = "\n\n".join(rows)
    return Corpus(text=text, name=name, source=source, split=split, substitute=substitute,
                  sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


# --------------------------------------------------------------------------------------------
# local files
# --------------------------------------------------------------------------------------------
def read_raw_rows(path: Path) -> list[str]:
    """Rows of a ``wiki.*.raw`` file as the HF ``wikitext`` builder yields them.

    One row per line (universal newlines), trailing ``"\\n"`` kept; whitespace-only lines -> ``""``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return [row if row.strip() else "" for row in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_parquet_rows(path: Path) -> list[str]:
    """The ``text`` column of a parquet file (nulls -> ``""``)."""
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read parquet file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "text" not in table.column_names:
        raise DataError(f"{path}: parquet file has no 'text' column (columns: {', '.join(table.column_names)})")
    return [t if t is not None else "" for t in table.column("text").to_pylist()]


def _read_rows(path: Path) -> list[str]:
    return read_parquet_rows(path) if path.suffix == ".parquet" else read_raw_rows(path)


def _split_files(root: Path, split: str) -> list[Path]:
    """Files of ``split`` below ``root``: HF parquet shards, else a ``wiki.<split>.raw``-style file.

    When several folders hold candidates (e.g. all WikiText configs), the ``wikitext-2-raw-v1``
    (or ``wikitext-2-raw``) folder is taken; any other ambiguity is an error.
    """
    found = [*root.rglob(f"{split}-*.parquet"), *root.rglob(f"{split}.parquet")]
    if not found:
        for pat in (f"wiki.{split}.raw", f"{split}.txt", f"{split}.raw"):
            found += root.rglob(pat)
    found = sorted({p for p in found if p.is_file()})
    groups = sorted({p.parent for p in found})
    if len(groups) > 1:
        preferred = [g for g in groups if g.name.lower() in (WIKITEXT_NAME, "wikitext-2-raw")]
        if len(preferred) != 1:
            raise DataError(f"{root}: {split} files in several folders "
                            f"({', '.join(str(g) for g in groups)}); pass one file or folder")
        found = [p for p in found if p.parent == preferred[0]]
    return found


_WIKITEXT_DIR = re.compile(r"wikitext-(2|103)(-raw)?(-v1)?")


def _local_name(path: Path) -> str:
    """WikiText config name from the folder (``wikitext-2-raw-v1``, ``wikitext-103-v1``, ...) or the
    ``wiki.<split>.raw`` file name; otherwise ``local:<file name>`` (never claimed to be WikiText)."""
    for part in reversed(path.parts[:-1]):
        m = _WIKITEXT_DIR.fullmatch(part.lower())
        if m:
            return f"wikitext-{m[1]}{m[2] or ''}-v1"
    if re.fullmatch(r"wiki\.(test|train|valid)\.raw", path.name):
        return WIKITEXT_NAME
    return f"local:{path.name}"


def load_local(data_path: str | Path, split: str = "test") -> Corpus:
    """Load ``split`` from a local file or directory (see module docstring)."""
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        files = _split_files(path, split)
        if not files:
            raise DataError(f"{path}: no {split} file found (looked for {split}-*.parquet, "
                            f"{split}.parquet, wiki.{split}.raw, {split}.txt)")
    else:
        files = [path]
    rows: list[str] = []
    for f in files:
        rows += _read_rows(f)
    if not any(r.strip() for r in rows):
        raise DataError(f"{path}: no text in {split} data")
    source = str(files[0].resolve()) if len(files) == 1 else str(path.resolve())
    name = _local_name(files[0].resolve())
    log.info("corpus: %s %s split from local %s (%d rows)", name, split, source, len(rows))
    return _corpus(rows, name=name, source=source, split=split, substitute=False)


# --------------------------------------------------------------------------------------------
# the hub
# --------------------------------------------------------------------------------------------
def load_hub(split: str = "test") -> Corpus:
    """WikiText-2 raw ``split`` from the Hugging Face hub (raises whatever ``datasets`` raises)."""
    from datasets import load_dataset

    ds = load_dataset("wikitext", WIKITEXT_NAME, split=split)
    rows = list(ds["text"])
    log.info("corpus: %s %s split from the Hugging Face hub (%d rows)", WIKITEXT_NAME, split, len(rows))
    return _corpus(rows, name=WIKITEXT_NAME, source="hf-hub", split=split, substitute=False)


# --------------------------------------------------------------------------------------------
# the offline substitute: gensim's enwiki test dump -> WikiText-style text
# --------------------------------------------------------------------------------------------
def gensim_dump_path() -> Path:
    """The enwiki dump inside the installed gensim wheel, found without importing gensim."""
    hint = (f"install it with `pip install --no-deps gensim=={GENSIM_VERSION}` "
            "or pass --data_path (a local WikiText-2 file or folder)")
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    member = Path(*GENSIM_MEMBER.split("/")[1:])
    for loc in locations:
        p = Path(loc) / member
        if p.is_file():
            return p
    if not locations:
        raise DataError(f"no WikiText-2 source: hub unreachable and gensim (offline Wikipedia substitute) not installed; {hint}")
    raise DataError(f"gensim is installed but lacks {GENSIM_MEMBER}; {hint}")


def _gensim_version() -> str:
    try:
        return importlib.metadata.version("gensim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Tags removed with their contents; any other tag keeps its contents (<b>, '' '', <sup>, <span>, ...).
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score",
    "graph", "mapframe", "maplink", "templatedata", "noinclude", "syntaxhighlight", "source", "pre",
    "hiero", "inputbox", "categorytree", "indicator", "section", "templatestyles", "charinsert",
})
_DROP_LINK_NS = frozenset({
    "file", "image", "media", "category", "wikipedia", "wp", "wikt", "wiktionary", "template",
    "help", "portal", "user", "talk", "special", "draft", "module", "s", "q", "n", "b", "v", "voy",
    "commons", "meta", "mw", "species", "wikisource", "wikiquote", "wikinews", "wikibooks",
    "wikiversity", "d", "wikidata", "c",
})
_SKIP_SECTIONS = frozenset({
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "literature", "external link", "reference", "note",
})
_WS = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)?$")


def _render(code) -> str:
    """Plain text of a mwparserfromhell Wikicode (templates, refs, tables, files, ... removed)."""
    from mwparserfromhell import nodes as N

    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, N.Text):
            out.append(node.value)
        elif isinstance(node, N.Wikilink):
            title = str(node.title).strip()
            prefix, sep, _ = title.lstrip(":").partition(":")
            if sep:
                p = prefix.strip().lower()
                if p in _DROP_LINK_NS or (not title.startswith(":") and _LANG_PREFIX.match(p)):
                    continue
            if node.text is not None:
                out.append(_render(node.text))
            else:
                shown = _render(node.title).lstrip(":")
                page, _, anchor = shown.partition("#")
                out.append(page or anchor)
        elif isinstance(node, N.ExternalLink):
            if node.title is not None and node.brackets:
                out.append(_render(node.title))
        elif isinstance(node, N.Tag):
            tag = str(node.tag).strip().lower()
            if tag == "br":
                out.append("\n")
            elif tag not in _DROP_TAGS and node.contents is not None:
                out.append(_render(node.contents))
            # else: refs, tables, galleries, ...; list markers (*, #, ;, :) and <hr> have no contents
        elif isinstance(node, N.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, N.Heading):
            out.append(f"\n\x00{node.level}\x00{_render(node.title)}\n")
        # Template, Comment, Argument: dropped
    return "".join(out)


# Fallback clean-up for markup the parser left as text (unclosed constructs, mostly where the
# "shortened" dump cuts an article off).
_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\|\+|\||!)")
_FILE_LINE = re.compile(r"^\s*\[\[\s*(file|image|media|category)\s*:", re.I)
_SCRUB = [
    (re.compile(r"<ref[^>]*/>", re.I), ""),
    (re.compile(r"<ref[^>]*>.*?</ref\s*>", re.I), ""),
    (re.compile(r"<ref[^>]*>.*$", re.I), ""),  # unclosed ref: drop the rest of the line
    (re.compile(r"<!--.*?(-->|$)"), ""),
    (re.compile(r"\{\{.*$"), ""),  # unclosed template (closed ones removed in a loop first)
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]"), r"\1"),  # leftover [[page|text]]
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?"), ""),  # unclosed [[page|
    (re.compile(r"\[(?:https?:)?//\S+\s*([^\]]*)\]"), r"\1"),  # leftover [url text]
    (re.compile(r"</?[A-Za-z][^<>]*>"), ""),  # stray html tags
    (re.compile(r"'{2,}"), ""),  # bold/italic quotes
    (re.compile(r"\}\}|\]\]"), ""),
]
_CLOSED_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def _clean_line(line: str) -> str:
    """Collapse whitespace, scrub leftover markup and the gaps removed templates leave."""
    line = _WS.sub(" ", line).strip()
    if "{{" in line:
        prev = None
        while prev != line:
            prev, line = line, _CLOSED_TEMPLATE.sub("", line)
    for pat, rep in _SCRUB:
        line = pat.sub(rep, line)
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by removed templates
    line = re.sub(r"\s+([,.;:])", r"\1", line)
    return _WS.sub(" ", line).strip()


def wikitext_article_rows(title: str, wikitext: str) -> list[str]:
    """WikiText-style rows of one article: heading/paragraph rows, each followed by an empty row.

    ``" = Title = \\n"``, section headings ``" = = Heading = = \\n"`` (level n -> n ``=``), one
    row per paragraph line ``" text \\n"``.  Reference/link sections (See also, References,
    External links, ...) are dropped with their sub-sections.  Returns ``[]`` when no prose is left.
    """
    import mwparserfromhell

    text = _render(mwparserfromhell.parse(wikitext))
    body: list[str] = []
    skip_level: Optional[int] = None
    pending: list[str] = []  # headings waiting for content
    for raw in text.split("\n"):
        if raw.startswith("\x00"):
            _, level_s, head = raw.split("\x00", 2)
            level = int(level_s)
            head = _clean_line(head)
            if skip_level is not None and level > skip_level:
                continue
            skip_level = level if head.lower() in _SKIP_SECTIONS or not head else None
            pending = [p for p in pending if int(p.split("\x00")[0]) < level]
            if skip_level is None:
                pending.append(f"{level}\x00{head}")
            continue
        if skip_level is not None:
            continue
        if _TABLE_LINE.match(raw) or _FILE_LINE.match(raw):
            continue  # table rows / file captions the parser did not recognise
        line = _clean_line(raw)
        if len(_LETTER.findall(line)) < 2 or line.startswith("="):
            continue  # markup leftovers, lone punctuation, numbers, formula fragments ("= x + y")
        for p in pending:
            level_s, head = p.split("\x00", 1)
            marks = " ".join(["="] * int(level_s))
            body.append(f" {marks} {head} {marks} \n")
        pending = []
        body.append(f" {line} \n")
    if not body:
        return []
    rows = ["", f" = {_clean_line(title)} = \n", ""]
    for r in body:
        rows += [r, ""]
    return rows


def _iter_pages(path: Path) -> Iterator[tuple[str, int, bool, str]]:
    """(title, namespace, is_redirect, wikitext) for each page of a MediaWiki XML dump (.bz2)."""
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title, ns, redirect, text = "", 0, False, ""
            for child in elem.iter():
                t = child.tag.rsplit("}", 1)[-1]
                if t == "title":
                    title = child.text or ""
                elif t == "ns":
                    ns = int(child.text or 0)
                elif t == "redirect":
                    redirect = True
                elif t == "text":
                    text = child.text or ""
            elem.clear()
            yield title, ns, redirect, text


def convert_dump(path: Path) -> list[dict]:
    """Convert a MediaWiki dump into ``[{"title": ..., "rows": [...]}, ...]`` (articles only)."""
    articles = []
    for title, ns, redirect, text in _iter_pages(path):
        if ns != 0 or redirect or text.lstrip()[:9].upper() == "#REDIRECT":
            continue
        rows = wikitext_article_rows(title, text)
        if rows:
            articles.append({"title": title, "rows": rows})
    return articles



def _atomic_write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def substitute_articles() -> tuple[list[dict], str]:
    """The converted substitute articles (from the cache, converting once) and their source label."""
    dump = gensim_dump_path()
    version = _gensim_version()
    if version != GENSIM_VERSION:
        log.warning("gensim %s installed, expected %s: the substitute corpus may differ from the documented one",
                    version, GENSIM_VERSION)
    source = f"gensim-{version}-wheel:{GENSIM_MEMBER}"
    dump_sha = file_sha256(dump)
    cache = cache_dir("corpus") / f"{SUBSTITUTE_NAME}-v{CONVERTER_VERSION}-{dump_sha[:12]}.json"
    if cache.is_file():
        try:
            with open(cache, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("converter_version") == CONVERTER_VERSION and obj.get("dump_sha256") == dump_sha:
                return obj["articles"], source
            log.warning("ignoring stale corpus cache %s", cache)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable corpus cache %s (%s)", cache, exc)
    import mwparserfromhell

    log.info("converting the offline Wikipedia substitute once (%s) ...", dump)
    t0 = time.perf_counter()
    articles = convert_dump(dump)
    if not articles:
        raise DataError(f"{dump}: no articles found in the Wikipedia dump")
    _atomic_write_json(cache, {
        "format": SUBSTITUTE_NAME, "converter_version": CONVERTER_VERSION, "source": source,
        "dump_sha256": dump_sha, "mwparserfromhell": mwparserfromhell.__version__,
        "split_rule": f"article i -> test if i % {TEST_EVERY} == 0 else train", "articles": articles,
    })
    log.info("converted %d articles in %.1f s; cached at %s", len(articles), time.perf_counter() - t0, cache)
    return articles, source


def load_substitute(split: str = "test") -> Corpus:
    """The offline Wikipedia substitute, ``split`` part (article i -> test iff i % 3 == 0)."""
    articles, source = substitute_articles()
    rows: list[str] = []
    for i, art in enumerate(articles):
        if (i % TEST_EVERY == 0) == (split == "test"):
            rows += art["rows"]
    log.info("corpus: %s %s part from %s (offline substitute, NOT WikiText-2)", SUBSTITUTE_NAME, split, source)
    return _corpus(rows, name=SUBSTITUTE_NAME, source=source, split=split, substitute=True)


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def load_corpus(split: str = "test", data_path: str | Path | None = None, use_hub: bool = True) -> Corpus:
    """Text of ``split`` from ``data_path``, else the hub (if reachable), else the offline substitute."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if data_path is not None:
        return load_local(data_path, split)
    if use_hub and hub_available():
        try:
            return load_hub(split)
        except Exception as exc:  # any hub/datasets failure: fall back to the substitute
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("WikiText-2 from the hub failed (%s: %s); using the offline substitute", type(exc).__name__, msg)
    return load_substitute(split)


def tokenize_windows(tokenizer, text: str, seqlen: int) -> torch.LongTensor:
    """Tokenize ``text`` once (no special tokens) and cut it into ``[n_windows, seqlen]``; tail dropped."""
    if seqlen < 1:
        raise DataError(f"seqlen must be positive, got {seqlen}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    if n < 1:
        raise DataError(f"text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def main(split: str = "test", data_path: Optional[str] = None, use_hub: bool = True) -> dict:
    """Load a corpus and print its description plus simple size figures as JSON."""
    t0 = time.perf_counter()
    corpus = load_corpus(split, data_path=data_path, use_hub=use_hub)
    info = corpus.as_dict()
    info["n_words"] = len(corpus.text.split())
    info["n_rows"] = corpus.text.count("\n\n") + 1
    info["load_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Load the evaluation corpus and print where it came from and its size.")
    ap.add_argument("--split", choices=SPLITS, default="test", help="which part to load (default: test)")
    ap.add_argument("--data_path", default=None,
                    help="local wiki.<split>.raw, parquet file or HF-layout folder (default: hub, else offline substitute)")
    ap.add_argument("--no_hub", action="store_true", help="do not try the Hugging Face hub")
    ap.add_argument("--log_level", default="INFO", help="logging level (default: INFO)")
    a = ap.parse_args()
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        main(a.split, a.data_path, not a.no_hub)
    except DataError as e:
        raise SystemExit(f"error: {e}")
