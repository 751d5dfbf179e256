"""MediaWiki XML dumps (``enwiki-<date>-pages-articles*.xml[.bz2]``) as corpus input.

Pages are read as a stream with ``mwxml`` (the dump's XML, bounded memory: each page element is dropped
once read) and their wikitext is turned into plain text with WikiExtractor's ``clean`` (the extractor
Google's and NVIDIA's BERT recipes document): templates, ``<ref>``s, tables, files/images, categories,
interwiki links, comments and magic words removed; links replaced by their anchor text. Its result is
then shaped like the hub's ``wikimedia/wikipedia`` text (section headings and list items as plain lines),
so the one Wikipedia-style cleaning of ``data.corpus.prepare_document`` (drop headings, split sentences)
applies to both.

Only main-namespace articles are kept; the rest is skipped with a reason (``SKIPS``): redirects,
disambiguation pages (a disambiguation template or a "(disambiguation)" title), other namespaces.

**Multistream.** ``X-multistream.xml.bz2`` is a concatenation of independent bz2 streams: the first holds
``<mediawiki>`` + ``<siteinfo>``, then 100 pages per stream, the last ``</mediawiki>``. Its
``X-multistream-index.txt.bz2`` has one line per page, ``byte_offset:page_id:title``. ``iter_ranges``
groups consecutive streams into ``StreamRange``s from the index alone (no decompression); ``read_range``
decompresses exactly the bytes of one range, so every builder worker and Slurm slice decompresses only
its own streams.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from common import files
from common.errors import DataError

MAIN_NAMESPACE = 0
PAGES_PER_STREAM = 100  # Wikimedia's multistream layout
SKIPS = ("wiki_redirects", "wiki_disambiguation", "wiki_other_namespaces")
_BZ2_MAGIC = b"BZh"
_READ = 1 << 20
# Disambiguation pages carry one of these templates (en.wikipedia's Template:Disambiguation and its
# redirects/variants: hndis = human names, geodis = places, ...) or "(disambiguation)" in the title.
_DISAMBIG_RE = re.compile(r"\{\{\s*(?:disambiguation|disambig|disamb|dab|hndis|geodis|numberdis|"
                          r"letter-numbercombdisambig|mil-unit-dis|shipindex|set index article)\s*(?:\||\}\})",
                          re.IGNORECASE)
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LIST_MARKS = "*#:;"
# Parentheses emptied by the dropped templates of a lead ("Tokyo ({{lang|ja|東京}}) is" -> "Tokyo () is").
_EMPTY_PARENS_RE = re.compile(r" ?\((?:[\s,;]|&nbsp;)*\)")


def is_dump_path(path: str) -> bool:
    return path.lower().endswith((".xml", ".xml.bz2"))


def index_path(dump: str) -> str | None:
    """The offset index beside a ``-multistream.xml.bz2`` dump, if it is there."""
    if not dump.endswith("-multistream.xml.bz2"):
        return None
    idx = dump[: -len(".xml.bz2")] + "-index.txt.bz2"
    return idx if os.path.isfile(idx) else None


# ---------------------------------------------------------------------------------------------------
# Pages -> articles
# ---------------------------------------------------------------------------------------------------
def skip_reason(namespace: int, redirect: bool, title: str, wikitext: str) -> str | None:
    """Why a page is not an article (a key of SKIPS), or None for a main-namespace article."""
    if namespace != MAIN_NAMESPACE:
        return "wiki_other_namespaces"
    if redirect or wikitext.lstrip()[:9].upper() == "#REDIRECT":
        return "wiki_redirects"
    if title.endswith("(disambiguation)") or _DISAMBIG_RE.search(wikitext):
        return "wiki_disambiguation"
    return None


def _pages(f, where: str) -> Iterator[tuple[str | None, str]]:
    """(skip reason or None, wikitext) of every page of an XML file object, through mwxml."""
    import mwxml
    from mwxml.element_iterator import ElementIterator

    try:
        root = ElementIterator.from_file(f)
        for page in mwxml.Dump.from_element(root):
            text = ""
            for rev in page:  # pages-articles dumps hold one (the latest) revision
                text = rev.text or ""
            # mwxml empties each page element but leaves it in <mediawiki>'s child list (~40 bytes a page,
            # ~1 GB over enwiki's 23M pages): drop them, the usual iterparse idiom, so memory stays flat.
            del root.element[:]
            yield skip_reason(page.namespace, bool(page.redirect), page.title or "", text), text
    except DataError:
        raise
    except (EOFError, OSError) as e:  # bz2: truncated / corrupt compressed data
        raise DataError(f"{where}: damaged compressed data ({e})") from None
    except Exception as e:  # noqa: BLE001 - expat and mwxml raise several types for malformed XML
        raise DataError(f"{where}: not a readable MediaWiki XML dump ({type(e).__name__}: {e})") from None


def iter_pages(path: str) -> Iterator[tuple[str | None, str]]:
    """Every page of a whole dump (XML, bz2-compressed or not: told by its first bytes; multistream or not), one
    reader, in file order."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with raw:
        compressed = raw.read(3) == _BZ2_MAGIC
        raw.seek(0)
        with bz2.open(raw, "rb") if compressed else contextlib.nullcontext(raw) as f:
            yield from _pages(f, path)


# ---------------------------------------------------------------------------------------------------
# Multistream: index -> ranges of streams; one range -> its pages
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamRange:
    """Consecutive bz2 streams ``[start, end)`` of a multistream dump (end None: to the end of the file)
    holding ``pages`` pages by the index; ``header_end`` = offset of the first page stream (before it: the
    ``<mediawiki><siteinfo>`` stream)."""

    path: str
    start: int
    end: int | None
    pages: int
    header_end: int


def _stream_offsets(index: str) -> Iterator[tuple[int, int]]:
    """(stream offset, pages in it) from the index, in order; a malformed line is an error naming it."""
    last, count = -1, 0
    try:
        with bz2.open(index, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                head = line.split(":", 1)[0]
                if not head.isdigit():
                    raise DataError(f"{index}: line {n}: expected byte_offset:page_id:title, got {line[:80]!r}")
                off = int(head)
                if off < last:
                    raise DataError(f"{index}: line {n}: offset {off} goes back (previous {last})")
                if off != last and count:
                    yield last, count
                    count = 0
                last = off
                count += 1
    except (EOFError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{index}: unreadable index ({e})") from None
    if count:
        yield last, count


def iter_ranges(path: str, index: str, block_pages: int) -> Iterator[StreamRange]:
    """The dump as ranges of consecutive streams of at least ``block_pages`` pages (by the index; the last
    range may hold fewer): a function of the index only, so every worker and slice count sees the same."""
    size = os.path.getsize(path)
    first = start = None
    pages = 0
    for off, n in _stream_offsets(index):
        if off >= size:
            raise DataError(f"{index}: offset {off} lies beyond the end of {path} ({size} bytes)")
        if first is None:
            first = start = off
        if pages >= block_pages:
            yield StreamRange(path, start, off, pages, first)
            start, pages = off, 0
        pages += n
    if first is None:
        raise DataError(f"{index}: empty index")
    yield StreamRange(path, start, None, pages, first)


def _decompress_streams(path: str, data: bytes, base: int, to_eof: bool) -> Iterator[bytes]:
    """The decompressed content of each bz2 stream of ``data`` (read from ``path`` at offset ``base``; ``to_eof``:
    ``data`` runs to the end of the file, else to where the index puts the next stream)."""
    pos = 0
    while pos < len(data):
        off = base + pos
        if data[pos:pos + 3] != _BZ2_MAGIC:
            raise DataError(f"{path}: no bz2 stream starts at byte offset {off} (index and dump do not match, "
                            f"or the file is damaged)")
        d = bz2.BZ2Decompressor()
        try:
            out = d.decompress(data[pos:])
        except OSError as e:
            raise DataError(f"{path}: bz2 stream at byte offset {off} is corrupt ({e})") from None
        if not d.eof:
            where = ("the file ends inside it" if to_eof else
                     f"it runs past byte offset {base + len(data)}, where the index puts the next stream: index and "
                     f"dump do not match, or the file is damaged")
            raise DataError(f"{path}: bz2 stream at byte offset {off} is truncated ({where})")
        yield out
        pos = len(data) - len(d.unused_data)


def _read_bytes(path: str, start: int, end: int | None) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    if end is not None and len(data) != end - start:
        raise DataError(f"{path}: truncated: the streams at byte offset {start}..{end} end at the end of the file "
                        f"({start + len(data)} bytes)")
    return data


def read_range(r: StreamRange) -> Iterator[tuple[str | None, str]]:
    """(skip reason or None, wikitext) of every page of one range: decompresses only its streams (and the
    small siteinfo stream, which mwxml needs to start a document)."""
    try:
        header = b"".join(_decompress_streams(r.path, _read_bytes(r.path, 0, r.header_end), 0, False))
        body = b"".join(_decompress_streams(r.path, _read_bytes(r.path, r.start, r.end), r.start, r.end is None))
    except OSError as e:
        raise DataError(f"{r.path}: cannot read byte offset {r.start} ({e.strerror})") from None
    end = body.rfind(b"</mediawiki>")  # the last range holds the closing stream
    if end >= 0:
        body = body[:end]
    xml = io.BytesIO(header + body + b"</mediawiki>\n")
    yield from _pages(xml, f"{r.path} (streams at byte offset {r.start})")


# ---------------------------------------------------------------------------------------------------
# Wikitext -> plain text (WikiExtractor), shaped like the hub's Wikipedia text
# ---------------------------------------------------------------------------------------------------
def _extractor():
    from wikiextractor.extract import Extractor

    # No template expansion (that needs the dump's Template namespace; BERT's recipes don't expand either):
    # templates are dropped, as `wikiextractor` does by default without --templates.
    return Extractor(0, 0, "", "", [])


def wikitext_to_text(wikitext: str, extractor=None) -> str:
    """Plain text of an article: WikiExtractor's ``clean`` (no template expansion) without the empty
    parentheses it leaves, then one line per paragraph, section heading (its bare title) and list item (its
    text), as the hub's Wikipedia text."""
    from wikiextractor.extract import clean

    text = clean(extractor or _extractor(), wikitext, expand_templates=False, html_safe=False)
    text = _EMPTY_PARENS_RE.sub("", text)
    lines = []
    for line in text.split("\n"):
        s = line.strip()
        m = _HEADING_RE.match(s)
        if m:
            s = m.group(2)
        else:
            s = s.lstrip(_LIST_MARKS).strip()
            # Leftovers of tables and templates WikiExtractor could not pair ("|}" lines, "{{" fragments):
            # dropped as its `compact` does.
            if s[:1] in "{|" or s[-1:] == "}":
                continue
        lines.append(s)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Writing a multistream dump (tests and the benchmark; also a way to make a plain dump seekable)
# ---------------------------------------------------------------------------------------------------
SITEINFO = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="http://www.mediawiki.org/xml/export-0.11/ http://www.mediawiki.org/xml/export-0.11.xsd" \
version="0.11" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <dbname>enwiki</dbname>
    <base>https://en.wikipedia.org/wiki/Main_Page</base>
    <generator>MediaWiki 1.44.0-wmf.1</generator>
    <case>first-letter</case>
    <namespaces>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Talk</namespace>
      <namespace key="2" case="first-letter">User</namespace>
      <namespace key="4" case="first-letter">Wikipedia</namespace>
      <namespace key="6" case="first-letter">File</namespace>
      <namespace key="10" case="first-letter">Template</namespace>
      <namespace key="14" case="first-letter">Category</namespace>
    </namespaces>
  </siteinfo>
"""


def page_xml(page_id: int, title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    """One ``<page>`` in the export schema 0.11, as Special:Export and the dumps write it."""
    red = f"    <redirect title={quoteattr(redirect)} />\n" if redirect is not None else ""
    return (f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>{page_id}</id>\n{red}"
            f"    <revision>\n      <id>{page_id * 10 + 1}</id>\n      <timestamp>2026-11-01T00:00:00Z</timestamp>\n"
            f"      <contributor>\n        <username>Example</username>\n        <id>1</id>\n      </contributor>\n"
            f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
            f"      <text bytes=\"{len(text.encode('utf-8'))}\" xml:space=\"preserve\">{escape(text)}</text>\n"
            f"      <sha1>0</sha1>\n    </revision>\n  </page>\n")


def write_multistream(dump: str, pages: Iterable[dict], per_stream: int = PAGES_PER_STREAM) -> str:
    """Write ``pages`` (dicts: id, title, text, ns, redirect) as ``dump`` (name ending
    ``-multistream.xml.bz2``) in Wikimedia's layout, plus its index; returns the index path."""
    if not dump.endswith("-multistream.xml.bz2"):
        raise ValueError(f"{dump}: a multistream dump's name ends with -multistream.xml.bz2")
    index = dump[: -len(".xml.bz2")] + "-index.txt.bz2"
    lines: list[str] = []
    with files.atomic_open(dump, "wb") as out:
        out.write(bz2.compress(SITEINFO.encode("utf-8")))
        batch: list[dict] = []

        def flush() -> None:
            off = out.tell()
            lines.extend(f"{off}:{p['id']}:{p['title']}\n" for p in batch)
            out.write(bz2.compress("".join(page_xml(p["id"], p["title"], p["text"], p.get("ns", 0),
                                                    p.get("redirect")) for p in batch).encode("utf-8")))
            batch.clear()

        for p in pages:
            batch.append(p)
            if len(batch) == per_stream:
                flush()
        if batch:
            flush()
        out.write(bz2.compress(b"</mediawiki>\n"))
    files.write_bytes(index, bz2.compress("".join(lines).encode("utf-8")))
    return index
