"""MediaWiki XML dumps as corpus input: the export schema, multistream files with their index, cleaning,
skipped pages, worker/slice invariance, damaged streams."""

import bz2
import dataclasses
import json
import os

import pytest

from common.errors import DataError
from data import shards, wikidump
from data.build import BuildSettings, build
from data.build import main as build_main
from data.corpus import CorpusOptions, iter_documents
from data.merge import merge

ZURICH = """{{Short description|City in Switzerland}}
{{Infobox settlement
| name = Zürich
| population = {{formatnum:421878}}
| image = {{Photomontage|photo1a=Zurich.jpg}}
}}
'''Zürich''' (German: ''Zürich'') is the largest city in [[Switzerland]].<ref>{{cite web |url=https://example.org/a \
|title=Population}}</ref> It lies at the north end of [[Lake Zurich|the lake]].<ref name="lake" /> <!-- a comment -->

[[File:Zürich Skyline.jpg|thumb|upright=1.2|The [[skyline]] at night]]
The city is home to many banks and to [[ETH Zurich]], a university founded in 1855.

== Geschichte ==
The Romans called the settlement ''Turicum''.<ref>Smith, p. 4.</ref> Later it joined the \
[[Old Swiss Confederacy|Confederacy]] in 1351.

{| class="wikitable"
|-
! Year !! Population
|-
| 1850 || 17,200
|}

== Districts ==
* Altstadt is the old town.
* Wiedikon
The districts are numbered from one to twelve.

== See also ==
* [[München]]

[[Category:Cities in Switzerland]]
[[de:Zürich]]
[[ja:チューリッヒ]]
"""

TOKYO = """'''Tokyo''' ({{lang|ja|東京}}) is the capital of [[Japan]]. Its name means "eastern capital" \
(Восточная столица in Russian).

=== Economy ===
Tokyo has one of the largest urban economies in the world.<ref group="note">Measured by GDP.</ref> __NOTOC__
"""

PAGES = [
    {"id": 10, "title": "Zürich", "text": ZURICH},
    {"id": 11, "title": "Zurich", "redirect": "Zürich",
     "text": "#REDIRECT [[Zürich]]\n\n{{Redirect category shell|{{R from ASCII-only}}}}"},
    {"id": 12, "title": "Mercury", "text": "'''Mercury''' may refer to:\n* [[Mercury (planet)]]\n"
                                           "* [[Mercury (element)]]\n\n{{disambiguation}}"},
    {"id": 13, "title": "Talk:Zürich", "ns": 1, "text": "== Spelling ==\nShould it use the umlaut? It should. ~~~~"},
    {"id": 14, "title": "Template:Infobox settlement", "ns": 10, "text": "{{{name}}} is a settlement."},
    {"id": 15, "title": "File:Zürich Skyline.jpg", "ns": 6, "text": "A photograph of the city at night."},
    {"id": 16, "title": "Tokyo", "text": TOKYO},
]
# What a reader of the two articles should see: no template, reference, table, image, category or interwiki
# text; links as their anchors; headings and short list items dropped as the hub reader drops them.
EXPECTED = [
    ['Zürich (German: "Zürich") is the largest city in Switzerland.', "It lies at the north end of the lake.",
     "The city is home to many banks and to ETH Zurich, a university founded in 1855.",
     'The Romans called the settlement "Turicum".', "Later it joined the Confederacy in 1351.",
     "Altstadt is the old town.", "The districts are numbered from one to twelve."],
    ["Tokyo is the capital of Japan.", 'Its name means "eastern capital" (Восточная столица in Russian).',
     "Tokyo has one of the largest urban economies in the world."],
]
SKIPPED = {"wiki_redirects": 1, "wiki_disambiguation": 1, "wiki_other_namespaces": 3}


def write_dump(folder, pages=PAGES, per_stream=2, name="enwiki-20261101-pages-articles-multistream.xml.bz2"):
    path = str(folder / name)
    return path, wikidump.write_multistream(path, pages, per_stream)


def many_pages(copies: int) -> list[dict]:
    """PAGES repeated with distinct ids, titles and one distinct sentence per article."""
    out = []
    for c in range(copies):
        for p in PAGES:
            q = dict(p, id=p["id"] + 100 * c, title=f"{p['title']} {c}")
            if "ns" not in p and "redirect" not in p and p["title"] != "Mercury":
                q["text"] = p["text"] + f"\nThis copy carries the number {c} in its last sentence.\n"
            out.append(q)
    return out


def _kw(**over):
    return {"settings": BuildSettings(**{**dict(dupe_factor=2, valid_fraction=0.1, shard_size=200, block_docs=20,
                                                seed=3, max_seq_len=64, max_predictions=10), **over}),
            "workers": 1, "progress": False}


def _members(folder: str) -> dict:
    return {(s, r["__key__"]): r["bin"] for s in shards.SPLITS for p in shards.shard_paths(folder, s)
            for r in shards.iter_samples(p)}


# ------------------------------------------------------------------------------------------------
# The generator writes Wikimedia's multistream layout
# ------------------------------------------------------------------------------------------------
def test_written_dump_has_the_multistream_layout(tmp_path):
    path, index = write_dump(tmp_path)
    assert index == path.replace("-multistream.xml.bz2", "-multistream-index.txt.bz2")
    lines = bz2.decompress(open(index, "rb").read()).decode().splitlines()
    assert [ln.split(":", 2)[1:] for ln in lines] == [[str(p["id"]), p["title"]] for p in PAGES]
    offsets = sorted({int(ln.split(":", 1)[0]) for ln in lines})
    assert len(offsets) == 4  # 7 pages, 2 per stream
    data = open(path, "rb").read()
    bounds = offsets + [None]
    # every stream decompresses on its own: siteinfo first, then pages, then the closing tag
    head = bz2.decompress(data[:offsets[0]]).decode()
    assert head.startswith("<mediawiki") and "<siteinfo>" in head and "<page>" not in head
    for a, b in zip(bounds, bounds[1:]):
        d = bz2.BZ2Decompressor()
        text = d.decompress(data[a:b] if b else data[a:]).decode()
        assert d.eof and text.count("<page>") == (2 if b else 1)
        if b is None:
            assert d.unused_data and bz2.decompress(d.unused_data) == b"</mediawiki>\n"
    assert bz2.decompress(data).decode().count("<page>") == len(PAGES)  # and it is one valid bz2 file


# ------------------------------------------------------------------------------------------------
# Cleaning and skipping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["multistream", "plain_bz2", "xml", "forced", "forced_xml"])
def test_articles_are_cleaned_and_non_articles_skipped(tmp_path, form):
    path, _ = write_dump(tmp_path)
    if form == "plain_bz2":  # the same file without its index: one reader
        os.rename(path, str(tmp_path / "enwiki-pages-articles.xml.bz2"))
        path = str(tmp_path / "enwiki-pages-articles.xml.bz2")
    elif form in ("xml", "forced_xml"):
        with open(tmp_path / "dump.xml", "wb") as f:
            f.write(bz2.decompress(open(path, "rb").read()))
        path = str(tmp_path / "dump.xml")
    if form.startswith("forced"):  # any name, compressed or not
        os.rename(path, str(tmp_path / "dump.data"))
        path = "wikidump:" + str(tmp_path / "dump.data")
    stats: dict = {}
    assert list(iter_documents(CorpusOptions([path]), stats)) == EXPECTED
    assert {k: stats.get(k) for k in SKIPPED} == SKIPPED and stats["wiki_pages"] == len(PAGES)


def test_headings_and_lists_follow_the_hub_readers_rules():
    """The dump's text goes through the same cleaning as hub/jsonl records: keep_headings keeps them."""
    from data.corpus import RAW, WIKITEXT, prepare_document

    text = wikidump.wikitext_to_text(ZURICH)
    assert "\nGeschichte\n" in f"\n{text}\n" and "\nWiedikon\n" in f"\n{text}\n"
    for drop in (True, False):
        assert prepare_document((WIKITEXT, ZURICH), drop_headings=drop) == prepare_document((RAW, text),
                                                                                           drop_headings=drop)
    assert "Geschichte" in prepare_document((WIKITEXT, ZURICH), drop_headings=False)


def test_ranges_cover_the_dump_in_order(tmp_path):
    path, index = write_dump(tmp_path, many_pages(3), per_stream=3)
    whole = list(wikidump.iter_pages(path))
    for block in (1, 3, 4, 7, 100):
        ranges = list(wikidump.iter_ranges(path, index, block))
        assert all(r.pages >= block for r in ranges[:-1]) and sum(r.pages for r in ranges) == len(whole)
        assert [p for r in ranges for p in wikidump.read_range(r)] == whole


# ------------------------------------------------------------------------------------------------
# Builds: counts, worker and slice invariance, each slice reads only its streams
# ------------------------------------------------------------------------------------------------
def test_build_reports_skipped_pages(tmp_path, data_tokenizer, capsys):
    path, _ = write_dump(tmp_path, many_pages(4), per_stream=5)
    out = tmp_path / "o"
    rc = build_main(["--input", path, "--tokenizer", data_tokenizer, "--out", str(out), "--workers", "1",
                     "--no-progress", "--dupe-factor", "1", "--block-docs", "10"])
    err = capsys.readouterr().err
    assert rc == 0, err
    st = shards.read_manifest(str(out))["stats"]
    want = {k: 4 * v for k, v in SKIPPED.items()}
    assert {k: st["skipped"][k] for k in want} == want and st["wiki_pages"] == 4 * len(PAGES)
    assert st["documents"] == 8 and st["input"]["raw_documents"] == 4 * len(PAGES)
    assert "wiki_redirects 4" in err and "wiki_disambiguation 4" in err and "wiki_other_namespaces 12" in err


def test_shards_identical_whatever_workers_and_slices(tmp_path, data_tokenizer, monkeypatch):
    path, index = write_dump(tmp_path, many_pages(12), per_stream=5)
    full = str(tmp_path / "full")
    m = build([path], data_tokenizer, full, **_kw())
    assert m["stats"]["blocks"] == len(list(wikidump.iter_ranges(path, index, 20))) > 3
    w2 = str(tmp_path / "w2")
    build([path], data_tokenizer, w2, **dict(_kw(), workers=2))
    files = sorted(f for f in os.listdir(full) if f.endswith(".tar"))
    assert files and files == sorted(f for f in os.listdir(w2) if f.endswith(".tar"))
    for f in files:
        assert open(os.path.join(full, f), "rb").read() == open(os.path.join(w2, f), "rb").read()
    # 3 slices: each decompresses exactly its own ranges (plus the siteinfo stream), and merged they are the build
    ranges = [(r.start, r.end) for r in wikidump.iter_ranges(path, index, 20)]
    reads: list = []
    real = wikidump._read_bytes
    monkeypatch.setattr(wikidump, "_read_bytes", lambda p, a, b: reads.append((a, b)) or real(p, a, b))
    parts = []
    for i in range(3):
        reads.clear()
        d = str(tmp_path / f"part{i}")
        kw = _kw()
        build([path], data_tokenizer, d, **dict(kw, settings=dataclasses.replace(kw["settings"], num_slices=3,
                                                                                 slice_index=i)))
        assert sorted({x for x in reads if x[0] != 0}) == sorted(ranges[i::3])
        parts.append(d)
    merged = str(tmp_path / "merged")
    mm = merge(merged, parts)
    assert _members(merged) == _members(full)
    assert mm["stats"]["skipped"] == m["stats"]["skipped"] and mm["stats"]["wiki_pages"] == m["stats"]["wiki_pages"]


def test_tokenizer_trains_on_a_dump(tmp_path, capsys):
    from data.tokenizer import load_tokenizer
    from data.tokenizer import main as tok_main

    path, _ = write_dump(tmp_path, many_pages(3))
    assert tok_main(["--input", path, "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "from 6 documents" in out and "wiki_redirects 3" in out and "wiki_other_namespaces 9" in out
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert "zurich" in tok.vocab and "tokyo" in tok.vocab  # uncased: accents stripped
    assert "infobox" not in tok.vocab and "wikitable" not in tok.vocab  # markup never reached it


# ------------------------------------------------------------------------------------------------
# Damage: a clear error naming the offset, never a hang
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "index_mismatch"])
@pytest.mark.parametrize("workers", [1, 2])
def test_damaged_stream_is_an_error_naming_its_offset(tmp_path, data_tokenizer, capsys, damage, workers):
    path, index = write_dump(tmp_path, many_pages(2), per_stream=2)
    offsets = sorted({int(ln.split(b":", 1)[0]) for ln in bz2.decompress(open(index, "rb").read()).splitlines()})
    data = bytearray(open(path, "rb").read())
    bad = offsets[3]
    if damage == "truncated":  # the file ends inside its last page stream (earlier ones are intact)
        bad = offsets[-1]
        data = data[: bad + 40]
        needle = f"bz2 stream at byte offset {bad} is truncated"
    elif damage == "corrupt":  # flipped bytes inside the stream at `bad`
        mid = bad + (offsets[4] - bad) // 2
        data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
        needle = f"bz2 stream at byte offset {bad} is corrupt"
    else:  # an index from another file: an offset that is not the start of a stream
        lines = bz2.decompress(open(index, "rb").read()).decode().splitlines()
        lines = [ln.replace(f"{bad}:", f"{bad + 7}:", 1) if ln.startswith(f"{bad}:") else ln for ln in lines]
        open(index, "wb").write(bz2.compress(("\n".join(lines) + "\n").encode()))
        needle = "index and dump do not match"
    open(path, "wb").write(bytes(data))
    out = tmp_path / "o"
    rc = build_main(["--input", path, "--tokenizer", data_tokenizer, "--out", str(out), "--workers", str(workers),
                     "--no-progress", "--dupe-factor", "1", "--block-docs", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err and os.path.basename(path) in err, err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))


def test_damaged_plain_dump_and_bad_index_are_errors(tmp_path):
    path, index = write_dump(tmp_path)
    plain = str(tmp_path / "enwiki-pages-articles.xml.bz2")
    open(plain, "wb").write(open(path, "rb").read()[:-40])
    with pytest.raises(DataError, match="damaged compressed data"):
        list(iter_documents(CorpusOptions([plain])))
    open(index, "wb").write(bz2.compress(b"12:10:Z\nnot-an-offset\n"))
    with pytest.raises(DataError, match="line 2: expected byte_offset:page_id:title"):
        list(wikidump.iter_ranges(path, index, 10))


def test_wikidump_benchmark_prints_a_table_and_writes_json(tmp_path, capsys):
    from benchmarks.cli import main as bench_main

    assert bench_main(["wikidump", "--pages", "60", "--workers", "1", "--json", str(tmp_path / "w.json")]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "w.json").read_text())
    assert [r["what"] for r in res["results"]] == ["read (mwxml, bz2)", "read + clean", "build, multistream",
                                                   "build, one reader"]
    assert all(r["pages"] == 60 and r["pages_per_cpu_s"] > 0 for r in res["results"])
    assert res["results"][2]["tokens"] == res["results"][3]["tokens"] > 0  # same articles, either way
    assert "pages_per_cpu_s" in out and "the reader alone reads" in out


def test_reading_a_dump_does_not_grow_with_its_length(tmp_path):
    """The one-reader path holds no trace of pages already read: peak memory over 12,000 pages is that of
    2,000 (mwxml alone keeps ~40 bytes per page read: ~400 kB more here, ~1 GB over enwiki)."""
    import tracemalloc

    path, _ = write_dump(tmp_path, ({"id": i + 1, "title": f"P{i}", "text": "Short text."} for i in range(12000)),
                         per_stream=100)

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            for k, _ in enumerate(wikidump.iter_pages(path), 1):
                if k == n:
                    break
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(100)  # imports and caches
    assert peak(12000) < peak(2000) + 150_000
