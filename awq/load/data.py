"""Evaluation / calibration text: WikiText-2 or an offline Wikipedia substitute, and token windows.

Sources, in order (:func:`load_corpus`):

1. ``data_path``: a local ``wiki.test.raw``-style text file, a parquet file with a ``text`` column,
   or a directory holding either (e.g. the HF layout ``wikitext-2-raw-v1/test-00000-of-00001.parquet``).
2. The Hugging Face hub, ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=...)``,
   when ``use_hub`` and the hub is reachable (:func:`awq.load.hub.hub_available`).
3. An offline substitute: the (shortened) 2016 English Wikipedia dump shipped inside the
   ``gensim==4.4.0`` wheel, converted once to WikiText-style plain text and cached under
   :func:`awq.util.cache.cache_dir` ``("corpus")``.  It is never called WikiText-2
   (``name="enwiki-2016-substitute"``, ``substitute=True``).

Rows are joined with ``"\\n\\n"`` exactly as the paper's protocol does with the HF dataset rows:
a raw text file gives one row per line, newline included, and whitespace-only lines become ``""``
(this is what the HF ``wikitext`` builder produces from ``wiki.*.raw``).

Substitute split: the kept articles (namespace 0, not redirects, non-empty after cleaning) are
numbered 0, 1, 2, ... in dump order; article ``i`` goes to ``test`` when ``i % 3 == 0`` and to
``train`` otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from awq.load.hub import hub_available
from awq.load.wiki_substitute import SUBSTITUTE_NAME, TEST_EVERY, DataError, substitute_articles
from awq.util.cli import ConfigError, build_parser, fail, opt, parse_config, setup_logging

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("test", "train")
WIKITEXT_NAME = "wikitext-2-raw-v1"


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


_MARGIN_CHARS = 4096  # tokens ending this close to a prefix cut may differ from the full tokenization


def _prefix_ids(tokenizer, text: str, need: int) -> Optional[list[int]]:
    """At least ``need`` leading ids of ``tokenizer(text)`` from a growing prefix of ``text`` (None: not possible).

    Only tokens ending at least ``_MARGIN_CHARS`` characters before the cut are kept: a tokenizer's
    merges are local (words, pre-tokenizer splits), so these equal the full tokenization's tokens.
    Needs a fast tokenizer (character offsets); memory is bounded by the prefix, not the file.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    length = need * 8 + 2 * _MARGIN_CHARS
    while length < len(text):
        enc = tokenizer(text[:length], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        cut = length - _MARGIN_CHARS
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        keep = next((i for i, (_s, e) in enumerate(offsets) if e > cut), len(ids))
        if keep >= need:
            return ids[:keep]
        length *= 2
    return None  # the whole text is needed anyway


def tokenize_windows(tokenizer, text: str, seqlen: int, max_windows: Optional[int] = None) -> torch.LongTensor:
    """Tokenize ``text`` (no special tokens) and cut it into ``[n_windows, seqlen]``; tail dropped.

    ``max_windows``: only the first ``max_windows`` windows are wanted, so only a prefix of the
    text is tokenized (same ids as a full tokenization; see :func:`_prefix_ids`) and at most
    ``max_windows`` windows are returned -- fewer when the text is shorter.
    """
    if seqlen < 1:
        raise DataError(f"seqlen must be positive, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be positive, got {max_windows}")
    ids = _prefix_ids(tokenizer, text, max_windows * seqlen) if max_windows is not None else None
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
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


@dataclass
class DataConfig:
    """Options of ``python -m awq.load.data``."""

    split: str = opt("test", help="which part to load (default: test)", choices=SPLITS)
    data_path: Optional[str] = opt(None, help="local wiki.<split>.raw, parquet file or HF-layout folder (default: "
                                   "hub, else offline substitute)", kind="in_path")
    no_hub: bool = opt(False, help="do not try the Hugging Face hub")
    log_level: str = opt("INFO", help="logging level (default: INFO)", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def cli(argv: Optional[list[str]] = None) -> int:
    p = build_parser(DataConfig, prog="python -m awq.load.data",
                     description="Load the evaluation corpus and print where it came from and its size.")
    try:
        a, _ = parse_config(DataConfig, argv, p)
    except ConfigError as e:
        fail(str(e))
        return 2
    setup_logging(a.log_level, fmt="%(levelname)s %(name)s: %(message)s")
    try:
        main(a.split, a.data_path, not a.no_hub)
    except (DataError, OSError) as e:
        fail(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
