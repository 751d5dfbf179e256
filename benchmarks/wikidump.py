"""`wikidump`: pages/s and MB/s per core of the Wikipedia dump reader and of builds from a dump, on a
generated enwiki-like multistream dump."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

from benchmarks.report import children_cpu, print_table
from data import wikidump
from data.build import BuildSettings, build
from data.corpus import CorpusOptions, iter_corpus_sentences
from data.tokenizer import load_tokenizer, train_tokenizer

_WORDS = ("the of and in to was is for on as by with he that at from his it an were are which this also be "
          "has or had first one their its new after who they two her she been other when there all during into "
          "school time may years more most only over city some world would where later up such used many can "
          "state about national out known university united then made team river century government music "
          "album film war church village county série Zürich Ålesund café naïve Müller São Paulo Kraków "
          "Москва 東京 München Ærø Dvořák").split()


def synthetic_wiki_pages(n: int, seed: int = 0):
    """``n`` pages shaped like enwiki's pages-articles: ~10% redirects, ~2% disambiguation pages, ~8% other
    namespaces; articles of ~4 KB wikitext with an infobox, refs with cite templates, links, a table, an
    image with a linked caption, headings, lists, categories and interwiki links."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    def sentence():
        parts = [words(rng.randint(3, 8)), f"[[{words(2).title()}|{words(2)}]]", words(rng.randint(2, 6)),
                 f"'''{words(1)}'''", words(rng.randint(2, 6))]
        ref = rng.random()
        if ref < 0.3:
            parts.append(f"<ref>{{{{cite web |url=https://example.org/{rng.randint(1, 10**6)} |title={words(3)} "
                         f"|access-date=2020-01-01}}}}</ref>")
        elif ref < 0.4:
            parts.append(f'<ref name="r{rng.randint(1, 9)}" />')
        return " ".join(parts).capitalize() + "."

    def paragraph():
        return " ".join(sentence() for _ in range(rng.randint(3, 7)))

    for i in range(n):
        pid = 10 + i
        title = f"{words(2).title()} {i}"
        r = rng.random()
        if r < 0.10:
            yield {"id": pid, "title": title, "redirect": f"{words(2).title()}",
                   "text": f"#REDIRECT [[{words(2).title()}]]\n\n{{{{R from move}}}}"}
            continue
        if r < 0.12:
            yield {"id": pid, "title": f"{title} (disambiguation)",
                   "text": f"'''{title}''' may refer to:\n* [[{words(2)}]]\n* [[{words(2)}]]\n\n{{{{disambiguation}}}}"}
            continue
        if r < 0.20:
            yield {"id": pid, "title": f"Talk:{title}", "ns": 1, "text": f"== Comment ==\n{paragraph()} ~~~~"}
            continue
        infobox = ("{{Infobox settlement\n| name = " + title + "\n| population = {{formatnum:" + str(rng.randint(1, 10**6))
                   + "}}\n| image = Example.jpg\n}}\n")
        body = [infobox, f"'''{title}''' is {paragraph()}", paragraph()]
        for _ in range(rng.randint(2, 4)):
            body.append(f"== {words(2).title()} ==")
            body.append(paragraph())
            if rng.random() < 0.5:
                body.append("\n".join(f"* {words(rng.randint(2, 6))}" for _ in range(rng.randint(2, 5))))
            if rng.random() < 0.3:
                body.append(f"[[File:{words(1)}.jpg|thumb|left|{words(3)} in [[{words(1)}]]]]")
            if rng.random() < 0.3:
                body.append('{| class="wikitable"\n|-\n! Year !! Value\n|-\n| 1999 || ' + words(2) + "\n|}")
            body.append(paragraph())
        body.append("== References ==\n{{reflist}}")
        body.append(f"[[Category:{words(2).title()}]]\n[[Category:{words(1).title()}]]\n[[de:{words(2)}]]")
        yield {"id": pid, "title": title, "text": "\n\n".join(body)}


def _page_rates(pages: int, wall: float, cpu: float, sizes: tuple[int, float]) -> dict:
    """Rates of one pass over a dump of ``sizes`` = (bz2 bytes, wikitext MB): per second of wall time, and per
    CPU-second (= per core)."""
    return {"pages": pages, "wall_s": wall, "pages_per_s": pages / wall, "pages_per_cpu_s": pages / cpu,
            "bz2_mb_per_cpu_s": sizes[0] / 1e6 / cpu, "wikitext_mb_per_cpu_s": sizes[1] / cpu}


def _timed_pages(pages, sizes: tuple[int, float]) -> dict:
    """Drain an iterator with one item per page of the dump, on this core."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in pages)
    return _page_rates(n, time.perf_counter() - t0, time.process_time() - c0, sizes)


def run(a) -> dict:
    """A generated enwiki-like multistream dump: the reader alone (mwxml over bz2, one core), reading plus
    WikiExtractor cleaning, then end-to-end builds from the multistream file (workers decompress their own
    streams) and from the same file without its index (one reader in the main process feeds the workers)."""
    tmp = tempfile.mkdtemp(prefix="bench-wikidump-")
    try:
        dump = os.path.join(tmp, "enwiki-bench-pages-articles-multistream.xml.bz2")
        wikidump.write_multistream(dump, synthetic_wiki_pages(a.pages, seed=1))
        plain = os.path.join(tmp, "enwiki-bench-pages-articles.xml.bz2")
        os.link(dump, plain)
        size = os.path.getsize(dump)
        wikitext_mb = sum(len(t.encode("utf-8")) for _, t in wikidump.iter_pages(dump)) / 1e6
        cleaned = (wikidump.wikitext_to_text(t) if r is None else r for r, t in wikidump.iter_pages(dump))
        sizes = (size, wikitext_mb)
        rows = [{"what": "read (mwxml, bz2)", "workers": 1, **_timed_pages(wikidump.iter_pages(dump), sizes)},
                {"what": "read + clean", "workers": 1, **_timed_pages(cleaned, sizes)}]
        tok = (load_tokenizer(a.tokenizer) if a.tokenizer else
               train_tokenizer(iter_corpus_sentences(CorpusOptions([dump]), limit=20000), vocab_size=8000,
                               show_progress=False))
        for path, what in ((dump, "build, multistream"), (plain, "build, one reader")):
            for w in a.workers:
                t0 = time.perf_counter()
                cpu0 = children_cpu() + time.process_time()
                m = build([path], tok, os.path.join(tmp, f"s-{w}-{len(rows)}"), BuildSettings(dupe_factor=1),
                          workers=w, progress=False)
                wall = time.perf_counter() - t0
                cpu = children_cpu() + time.process_time() - cpu0
                rows.append({"what": what, "workers": w, **_page_rates(a.pages, wall, cpu, sizes),
                             "pages_per_s_per_core": a.pages / wall / w, "tokens": m["stats"]["tokens"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, [("what", "{}"), ("workers", "{}"), ("pages", "{}"), ("wall_s", "{:.1f}"),
                       ("pages_per_s", "{:.0f}"), ("pages_per_s_per_core", "{:.0f}"), ("pages_per_cpu_s", "{:.0f}"),
                       ("bz2_mb_per_cpu_s", "{:.2f}"), ("wikitext_mb_per_cpu_s", "{:.2f}")])
    reader = rows[0]["pages_per_cpu_s"]
    for r in rows[2:]:
        r["reader_headroom"] = reader / r["pages_per_s"]  # > 1: one reader outpaces what the build consumes
    one_reader = [r for r in rows if r["what"] == "build, one reader"]
    print(f"dump {size / 1e6:.1f} MB bz2 ({wikitext_mb:.1f} MB wikitext, {a.pages} pages); the reader alone reads "
          f"{reader:.0f} pages per CPU-second: " + ", ".join(
              f"{r['reader_headroom']:.1f}x what the one-reader build with {r['workers']} worker(s) consumed"
              for r in one_reader))
    return {"pages": a.pages, "dump_bytes": size, "wikitext_mb": wikitext_mb, "results": rows}


def add_parser(sub) -> None:
    wd = sub.add_parser("wikidump", help="pages/s and MB/s per core of the Wikipedia dump reader and builds")
    wd.add_argument("--pages", type=int, default=12000, help="pages of the generated dump (~1 KB of bz2 each)")
    wd.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    wd.add_argument("--tokenizer", default=None, help="default: one trained on the dump (vocab 8000)")
    wd.set_defaults(run=run)
