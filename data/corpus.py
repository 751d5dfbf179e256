"""Corpus input: ``--input SPEC`` (repeatable, mixable) -> a stream of documents.

A document is a list of sentence strings. SPEC forms:

* ``PATH`` — a file or a folder (walked recursively in sorted order, hidden files skipped). Files are
  dispatched by extension: ``.jsonl``/``.json`` and ``.parquet`` are read through ``datasets`` (one
  document per record, column ``--text-column``); anything else is Google's format: one sentence per
  line, a blank line between documents.
* ``google:PATH``, ``jsonl:PATH``, ``parquet:PATH`` force a reader; ``text:PATH`` reads a plain text
  file through ``datasets`` with one document per line.
* ``hf:NAME[:CONFIG[:SPLIT]]`` — a Hugging Face hub dataset, streamed (``hf:wikimedia/wikipedia:20231101.en``).
* a MediaWiki XML dump, ``.xml`` or ``.xml.bz2`` (``wikidump:PATH`` forces it): main-namespace articles,
  wikitext cleaned by ``data.wikidump``. A ``-multistream.xml.bz2`` with its ``-multistream-index.txt.bz2``
  beside it can be split by stream offsets (see ``iter_raw_documents``).

Record text (jsonl/parquet/text/hf, and dump articles after ``data.wikidump.wikitext_to_text``) is cleaned
Wikipedia-style (empty lines and section headings dropped) and split into sentences with
``blingfire.text_to_sentences``. Datasets whose records are single
sentences without document boundaries (BookCorpus on the hub) are grouped into synthetic documents of
``--sentences-per-doc`` consecutive records (automatic 50 for names containing ``bookcorpus``).

Reading happens in two stages so the expensive part can run in worker processes: ``iter_raw_documents``
(cheap, in the main process) yields ``RawDoc`` tuples; ``prepare_document`` (wikitext cleaning, sentence
splitting, caps) turns one into a list of sentences. A multistream dump can be deferred further: with
``stream_block_pages`` the reader yields only ranges of bz2 streams (from the index) and ``expand_raw``, in
the worker, decompresses and parses them. Every skip is counted in a ``stats`` dict under a reason.

Google-format lines are read with a bound: at most ``max_line_chars`` characters of a line are ever held
(the rest is skipped and counted as ``giant_lines_cut``); ``\n``, ``\r\n`` and a lone ``\r`` all end a line.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.errors import DataError
from data import wikidump

# RawDoc = (kind, payload): kind PRESPLIT -> payload is a list of sentence lines;
# kind RAW -> payload is a str of paragraphs (newline separated) still to be split into sentences;
# kind WIKITEXT -> payload is an article's wikitext (cleaned to RAW text, then the same);
# kind STREAMS -> payload is a data.wikidump.StreamRange whose pages expand_raw reads (worker side).
PRESPLIT, RAW, WIKITEXT, STREAMS = 0, 1, 2, 3
RawDoc = tuple[int, object]

BOOKCORPUS_SENTENCES_PER_DOC = 50
_BINARY_SNIFF = 8192
_HEADING_MAX_WORDS = 10
_TERMINAL = tuple('.!?;:"\'”’)]…')


@dataclass
class CorpusOptions:
    inputs: list[str]
    text_column: str = "text"
    sentences_per_doc: int = 0  # 0 = auto (bookcorpus -> 50, otherwise one record = one document)
    max_line_chars: int = 20000  # longer sentences/lines are cut to this and counted
    drop_headings: bool = True  # record inputs only: drop short lines without terminal punctuation
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> CorpusOptions:
        return cls(inputs=list(a.input), text_column=a.text_column,
                   sentences_per_doc=a.sentences_per_doc, max_line_chars=a.max_line_chars,
                   drop_headings=not a.keep_headings)

    def settings(self) -> dict:
        return {"inputs": list(self.inputs), "text_column": self.text_column,
                "sentences_per_doc": self.sentences_per_doc, "max_line_chars": self.max_line_chars,
                "drop_headings": self.drop_headings}


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--input", action="append", required=True, metavar="SPEC",
                   help="file, folder, google:/jsonl:/parquet:/text:/wikidump:PATH (a .xml/.xml.bz2 is a "
                        "MediaWiki dump) or hf:NAME[:CONFIG[:SPLIT]] (repeatable)")
    g.add_argument("--text-column", default="text", help="record field holding the text (default text)")
    g.add_argument("--sentences-per-doc", type=int, default=0,
                   help="treat records as sentences and group N consecutive ones into a document "
                        "(0 = auto: 50 for bookcorpus, else one record = one document)")
    g.add_argument("--max-line-chars", type=int, default=20000,
                   help="cut longer lines/sentences to this many characters (counted)")
    g.add_argument("--keep-headings", action="store_true",
                   help="keep heading-like lines of record inputs (default: drop them)")


def _bump(stats: dict | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


# ---------------------------------------------------------------------------------------------------
# Spec resolution
# ---------------------------------------------------------------------------------------------------
_PREFIXES = ("google", "jsonl", "json", "parquet", "text", "wikidump")


def resolve_spec(spec: str) -> list[tuple[str, str]]:
    """SPEC -> list of (reader, target). Raises DataError for missing paths or empty folders."""
    if spec.startswith("hf:"):
        if len(spec) <= 3:
            raise DataError(f"--input {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
        return [("hf", spec[3:])]
    reader = None
    m = re.match(r"^([a-z]+):(.*)$", spec)
    if m and m.group(1) in _PREFIXES:
        reader, spec = m.group(1), m.group(2)
        if reader == "json":
            reader = "jsonl"
    if not os.path.exists(spec):
        raise DataError(f"input not found: {spec}")
    if os.path.isdir(spec):
        files = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        if not files:
            raise DataError(f"input folder is empty: {spec}")
        files.sort()
        indexes = {wikidump.index_path(f) for f in files} - {None}
        files = [f for f in files if f not in indexes]  # a dump's offset index is not text of its own
    else:
        files = [spec]
    return [(reader or _reader_for(f), f) for f in files]


def _reader_for(path: str) -> str:
    low = path.lower()
    if wikidump.is_dump_path(low):
        return "wikidump"
    if low.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if low.endswith(".parquet"):
        return "parquet"
    return "google"


# ---------------------------------------------------------------------------------------------------
# Readers (main process): cheap, streaming
# ---------------------------------------------------------------------------------------------------
def iter_raw_documents(opts: CorpusOptions, stats: dict | None = None,
                       stream_block_pages: int | None = None) -> Iterator[RawDoc]:
    """All documents of all specs, in input order (specs in order, files sorted).

    ``stream_block_pages``: a multistream dump with its index yields STREAMS items of at least this many pages
    (a function of the index alone) instead of its articles, for ``expand_raw`` to read where they are used."""
    targets = [t for spec in opts.inputs for t in resolve_spec(spec)]  # validate all paths up front
    for reader, target in targets:
        _bump(stats, "files")
        if reader == "google":
            yield from _read_google(target, opts, stats)
        elif reader == "wikidump":
            yield from _read_wikidump(target, stats, stream_block_pages)
        elif reader == "hf":
            yield from _read_hf(target, opts, stats)
        else:
            yield from _read_local_records(reader, target, opts, stats)


def _read_google(path: str, opts: CorpusOptions, stats: dict | None) -> Iterator[RawDoc]:
    try:
        with open(path, "rb") as f:
            head = f.read(_BINARY_SNIFF)
        # newline=None: "\n", "\r\n" and a lone "\r" all end a line; surrogateescape keeps undecodable bytes
        # as lone surrogates, so a line with them can be repaired (U+FFFD, as errors="replace") and counted.
        f = open(path, encoding="utf-8", errors="surrogateescape", newline=None)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    if b"\x00" in head:
        f.close()
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not sentence-per-line text; refusing it")
    with f:
        doc: list[str] = []
        for line in _bounded_lines(f, opts.max_line_chars, stats):
            if _UNDECODED.search(line):
                line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                _bump(stats, "non_utf8_lines")
            line = line.strip()
            if not line:
                if doc:
                    yield (PRESPLIT, doc)
                    doc = []
                continue
            doc.append(line)
        if doc:
            yield (PRESPLIT, doc)


_UNDECODED = re.compile("[\udc80-\udcff]")


def _bounded_lines(f, cap: int, stats: dict | None) -> Iterator[str]:
    """Lines of a text file (without their end), each cut to ``cap`` characters: ``readline(cap)`` never holds
    more, and the rest of a longer line is read and dropped ``cap`` characters at a time (counted)."""
    while True:
        line = f.readline(cap)
        if not line:
            return
        if line.endswith("\n"):
            yield line[:-1]
            continue
        rest = f.readline(cap)  # the line filled the cap: is there more of it?
        if rest not in ("", "\n"):
            _bump(stats, "giant_lines_cut")
            while rest and not rest.endswith("\n"):
                rest = f.readline(cap)
        yield line


def _read_wikidump(path: str, stats: dict | None, stream_block_pages: int | None) -> Iterator[RawDoc]:
    index = wikidump.index_path(path)
    if stream_block_pages and index:
        for r in wikidump.iter_ranges(path, index, stream_block_pages):
            yield (STREAMS, r)
        return
    if stream_block_pages and path.endswith("-multistream.xml.bz2"):
        print(f"{path}: no {os.path.basename(path)[:-len('.xml.bz2')]}-index.txt.bz2 beside it: read by one reader",
              file=sys.stderr)
    yield from _articles(wikidump.iter_pages(path), stats)


def _articles(pages: Iterator[tuple[str | None, str]], stats: dict | None) -> Iterator[RawDoc]:
    for reason, text in pages:
        _bump(stats, "wiki_pages")
        if reason is not None:
            _bump(stats, reason)
        else:
            yield (WIKITEXT, text)


def expand_raw(raws: list[RawDoc], stats: dict | None = None) -> list[RawDoc]:
    """``raws`` with every STREAMS item replaced by the articles of its streams (decompressed here)."""
    out: list[RawDoc] = []
    for raw in raws:
        if raw[0] == STREAMS:
            out.extend(_articles(wikidump.read_range(raw[1]), stats))  # type: ignore[arg-type]
        else:
            out.append(raw)
    return out


def _quiet_datasets():
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _records_per_doc(name: str, opts: CorpusOptions) -> int:
    if opts.sentences_per_doc:
        return opts.sentences_per_doc
    return BOOKCORPUS_SENTENCES_PER_DOC if "bookcorpus" in name.lower() else 0


def _read_local_records(reader: str, path: str, opts: CorpusOptions, stats) -> Iterator[RawDoc]:
    datasets = _quiet_datasets()
    builder = {"jsonl": "json", "parquet": "parquet", "text": "text"}[reader]
    if reader == "parquet":
        _check_parquet(path)
    if reader != "parquet":
        with open(path, "rb") as f:
            if b"\x00" in f.read(_BINARY_SNIFF) and not path.endswith(".gz"):
                raise DataError(f"{path}: looks like a binary file (NUL bytes), not {reader} text")
    kwargs = {"sample_by": "line"} if builder == "text" else {}
    column = "text" if builder == "text" else opts.text_column
    try:
        ds = datasets.load_dataset(builder, data_files=[os.path.abspath(path)], split="train",
                                   streaming=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report them by file
        raise DataError(f"{path}: cannot open as {reader}: {type(e).__name__}: {e}") from None
    yield from _records_to_docs(ds, path, column, _records_per_doc(path, opts), stats)


def _check_parquet(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).schema_arrow  # noqa: B018 - reads the footer
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None


def _read_hf(target: str, opts: CorpusOptions, stats) -> Iterator[RawDoc]:
    datasets = _quiet_datasets()
    parts = target.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"hf:{target}: cannot open hub dataset: {type(e).__name__}: {e}") from None
    yield from _records_to_docs(ds, f"hf:{target}", opts.text_column, _records_per_doc(name, opts), stats)


def _records_to_docs(ds, source: str, column: str, per_doc: int, stats) -> Iterator[RawDoc]:
    """Records -> RawDocs. per_doc > 0: records are sentences, grouped per_doc at a time.

    Batched iteration (``IterableDataset.iter``) reads only the text column and is ~2x faster than
    per-record dicts; the main process does this, so it bounds the builder's scaling.
    """
    it = iter(ds.iter(batch_size=1000))
    group: list[str] = []
    n = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow/json errors surface while iterating
            raise DataError(f"{source}: cannot read records after record {n}: "
                            f"{type(e).__name__}: {e}") from None
        if n == 0 and column not in batch:
            raise DataError(f"{source}: no column {column!r} (columns: {', '.join(map(str, batch))}); "
                            f"pass --text-column")
        texts = batch[column]
        n += len(texts)
        for text in texts:
            if not isinstance(text, str):
                _bump(stats, "records_without_text")
                continue
            if per_doc:
                text = text.strip()
                if text:
                    group.append(text)
                if len(group) >= per_doc:
                    yield (PRESPLIT, group)
                    group = []
            else:
                yield (RAW, text)
    if per_doc and group:
        yield (PRESPLIT, group)
    if n == 0:
        _bump(stats, "empty_inputs")


# ---------------------------------------------------------------------------------------------------
# Preparation (worker side): RawDoc -> list of sentences
# ---------------------------------------------------------------------------------------------------
def is_heading(line: str) -> bool:
    """Wikipedia-style section heading: short and without sentence-final punctuation."""
    s = line.rstrip()
    return not s.endswith(_TERMINAL) and len(s.split()) <= _HEADING_MAX_WORDS


def split_sentences(paragraph: str) -> list[str]:
    import blingfire

    out = blingfire.text_to_sentences(paragraph)
    return [s.strip() for s in out.split("\n") if s.strip()] if out else []


def prepare_document(doc: RawDoc, max_line_chars: int = 20000, drop_headings: bool = True,
                     stats: dict | None = None) -> list[str]:
    kind, payload = doc
    if kind == WIKITEXT:
        kind, payload = RAW, wikidump.wikitext_to_text(str(payload))
    if kind == PRESPLIT:
        sents = payload  # already stripped/capped by the reader
    else:
        sents = []
        for para in str(payload).split("\n"):
            para = para.strip()
            if not para:
                continue
            if drop_headings and is_heading(para):
                _bump(stats, "headings_dropped")
                continue
            for s in split_sentences(para):
                if len(s) > max_line_chars:
                    s = s[:max_line_chars]
                    _bump(stats, "giant_lines_cut")
                sents.append(s)
    return sents  # type: ignore[return-value]


def iter_documents(opts: CorpusOptions, stats: dict | None = None) -> Iterator[list[str]]:
    """Prepared non-empty documents (lists of sentences), in input order, single process."""
    for raw in iter_raw_documents(opts, stats):
        sents = prepare_document(raw, opts.max_line_chars, opts.drop_headings, stats)
        if not sents:
            _bump(stats, "empty_documents")
            continue
        _bump(stats, "documents")
        yield sents


def iter_corpus_sentences(opts: CorpusOptions, stats: dict | None = None,
                          limit: int | None = None) -> Iterator[str]:
    n = 0
    for doc in iter_documents(opts, stats):
        for s in doc:
            if limit is not None and n >= limit:
                return
            n += 1
            _bump(stats, "sentences")
            yield s
    if n == 0:
        raise DataError(f"no text found in input(s): {', '.join(opts.inputs)}")


# ---------------------------------------------------------------------------------------------------
# Offline real-text corpus: docstrings of the running interpreter's standard library
# ---------------------------------------------------------------------------------------------------
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "ensurepip", "turtledemo"}


def _docstring_paragraphs(doc: str) -> list[str]:
    paras, cur = [], []
    for line in doc.splitlines():
        s = line.strip()
        code_like = s.startswith((">>>", "...", "$ ", "|", "+--", "--", "==", "::"))
        if not s or code_like:
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    return paras


def python_docs_corpus(out_path: str, max_docs: int | None = None, min_sentences: int = 2) -> int:
    """Write the stdlib's module/class/function docstrings as a Google-format corpus; return #docs.

    Deterministic for a given interpreter: files are walked in sorted order, docstrings taken in
    source order, sentences split with blingfire, documents with fewer than ``min_sentences``
    sentences skipped. Used by the tests and the offline demo.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        files.extend(os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))
    files.sort()
    n_docs = 0
    tmp = out_path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as out:
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), filename=path)
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            nodes = [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            for node in nodes:
                doc = ast.get_docstring(node, clean=True)
                if not doc:
                    continue
                sents = [s for p in _docstring_paragraphs(doc) for s in split_sentences(p)]
                if len(sents) < min_sentences:
                    continue
                out.write("\n".join(sents) + "\n\n")
                n_docs += 1
                if max_docs is not None and n_docs >= max_docs:
                    break
            if max_docs is not None and n_docs >= max_docs:
                break
    os.replace(tmp, out_path)
    return n_docs


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m data.corpus",
                                description="Write a Google-format corpus (one sentence per line, blank line "
                                            "between documents) from this interpreter's stdlib docstrings.")
    p.add_argument("out", help="output text file")
    p.add_argument("max_docs", nargs="?", type=int, default=None, help="stop after this many documents")
    a = p.parse_args(argv)
    n = python_docs_corpus(a.out, a.max_docs)
    print(f"wrote {n} documents to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
