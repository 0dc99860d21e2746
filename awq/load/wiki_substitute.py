"""The offline WikiText-2 substitute: the 2016 English Wikipedia sample shipped in the ``gensim`` wheel,
converted once to WikiText-style plain text (one row per paragraph or heading, `` = Title = `` headings)
and cached as JSON under :func:`awq.util.cache.cache_dir` ``("corpus")``. :mod:`awq.load.data` splits it into the
test and train parts and never calls it WikiText-2.
"""
from __future__ import annotations

import bz2
import importlib.metadata
import importlib.util
import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Optional

from awq.util.cache import cache_dir
from awq.util.io import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

SUBSTITUTE_NAME = "enwiki-2016-substitute"
GENSIM_VERSION = "4.4.0"
GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the conversion below changes: the cache file name carries it.
CONVERTER_VERSION = 2
TEST_EVERY = 3  # article i -> test iff i % TEST_EVERY == 0


class DataError(ValueError):
    """A corpus cannot be found or read (one-line message)."""


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
    cache_obj = {
        "format": SUBSTITUTE_NAME, "converter_version": CONVERTER_VERSION, "source": source,
        "dump_sha256": dump_sha, "mwparserfromhell": mwparserfromhell.__version__,
        "split_rule": f"article i -> test if i % {TEST_EVERY} == 0 else train", "articles": articles,
    }
    # compact UTF-8 JSON (the articles are large); same bytes as before the move to awq.util.io
    atomic_write_text(cache, json.dumps(cache_obj, ensure_ascii=False), what="corpus cache")
    log.info("converted %d articles in %.1f s; cached at %s", len(articles), time.perf_counter() - t0, cache)
    return articles, source
