"""Corpus readers, every bad-input case, interrupted builds, output-folder handling."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import shards
from data.build import BuildSettings, ShardWriter, build
from data.build import main as build_main
from data.corpus import CorpusOptions, iter_documents, python_docs_corpus
from common.errors import DataError

WIKI = [
    {"id": 1, "text": "Alpha Centauri\n\nAlpha Centauri is a star system. It is close to the Sun.\n\n"
                      "History\nThe system was known to ancient astronomers. Smith wrote about it."},
    {"id": 2, "text": "Beta\nBeta is the second letter of the Greek alphabet. It follows alpha!\n"
                      "Is it used in physics? Yes, it is."},
    {"id": 3, "text": None},
    {"id": 4, "text": "Gamma rays are energetic. They come from nuclei."},
]


def _kw(**over):
    """build()'s arguments after the output folder: small settings, one worker, no progress bar."""
    return {"settings": BuildSettings(**{**dict(dupe_factor=2, valid_fraction=0.0, shard_size=500, block_docs=50,
                                                seed=1), **over}), "workers": 1, "progress": False}


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _cli(args, capsys):
    rc = build_main(args)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------
def test_jsonl_and_parquet_records_are_cleaned_and_split(tmp_path):
    jl = _write_jsonl(tmp_path / "wiki.jsonl", WIKI)
    pq.write_table(pa.Table.from_pylist(WIKI), str(tmp_path / "wiki.parquet"))
    for path in (jl, str(tmp_path / "wiki.parquet")):
        stats = {}
        docs = list(iter_documents(CorpusOptions([path]), stats))
        assert docs[0] == ["Alpha Centauri is a star system.", "It is close to the Sun.",
                           "The system was known to ancient astronomers.", "Smith wrote about it."]
        assert docs[1] == ["Beta is the second letter of the Greek alphabet.", "It follows alpha!",
                           "Is it used in physics?", "Yes, it is."]
        assert len(docs) == 3
        assert stats["headings_dropped"] == 3 and stats["records_without_text"] == 1
    # a folder mixing formats is walked in sorted order; google: forces the text reader
    (tmp_path / "g.txt").write_text("One.\nTwo.\n\nThree.\n", encoding="utf-8")
    assert len(list(iter_documents(CorpusOptions([str(tmp_path)])))) == 3 + 3 + 2
    # text: one document per line through datasets
    (tmp_path / "lines.txt").write_text("The first record is here. It has two sentences.\nA second record.\n", encoding="utf-8")
    docs = list(iter_documents(CorpusOptions(["text:" + str(tmp_path / "lines.txt")])))
    assert docs == [["The first record is here.", "It has two sentences."], ["A second record."]]


def test_sentence_records_grouped_into_documents(tmp_path):
    """The BookCorpus path (records are sentences, no boundaries), exercised on local jsonl."""
    rows = [{"text": f"Sentence number {i}."} for i in range(23)]
    path = _write_jsonl(tmp_path / "bookcorpus_like.jsonl", rows)
    docs = list(iter_documents(CorpusOptions([path], sentences_per_doc=10)))
    assert [len(d) for d in docs] == [10, 10, 3] and docs[2][0] == "Sentence number 20."
    # automatic for names containing "bookcorpus": 50 per document
    docs = list(iter_documents(CorpusOptions([path])))
    assert [len(d) for d in docs] == [23]


def test_python_docs_corpus_is_deterministic(tmp_path, data_corpus):
    a = tmp_path / "a.txt"
    assert python_docs_corpus(str(a), max_docs=1200) == 1200
    assert a.read_bytes() == open(data_corpus, "rb").read()
    docs = list(iter_documents(CorpusOptions([str(a)])))
    assert len(docs) == 1200 and all(len(d) >= 2 for d in docs)


# ------------------------------------------------------------------------------------------------
# Bad input: clear message naming the file, exit 2, nothing that looks complete
# ------------------------------------------------------------------------------------------------
def _base(tmp_path, data_tokenizer, inp):
    out = tmp_path / "out"
    return ["--input", str(inp), "--tokenizer", data_tokenizer, "--out", str(out), "--workers", "1",
            "--no-progress", "--dupe-factor", "1", "--valid-fraction", "0"], out


def _assert_failed(rc, err, out, *needles):
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert not os.path.exists(out / "manifest.json")
    assert not list(out.glob("*.tar")) if out.exists() else True


@pytest.mark.parametrize("case", ["missing", "empty_file", "blank_lines", "empty_folder", "binary",
                                  "bad_parquet", "unknown_column", "bad_jsonl", "no_tokenizer"])
def test_bad_inputs(case, tmp_path, data_tokenizer, capsys):
    p = tmp_path / "in"
    needles = []
    if case == "missing":
        needles = ["input not found", str(p)]
    elif case == "empty_file":
        p.write_bytes(b"")
        needles = ["no documents", str(p)]
    elif case == "blank_lines":
        p.write_text("\n   \n\t\n", encoding="utf-8")
        needles = ["no documents"]
    elif case == "empty_folder":
        p.mkdir()
        needles = ["input folder is empty", str(p)]
    elif case == "binary":
        p.write_bytes(b"GIF89a\x00\x01\x02\xff" * 100)
        needles = ["binary", str(p)]
    elif case == "bad_parquet":
        p = tmp_path / "broken.parquet"
        p.write_bytes(b"this is not parquet at all")
        needles = ["unreadable parquet", "broken.parquet"]
    elif case == "unknown_column":
        p = tmp_path / "recs.jsonl"
        _write_jsonl(p, [{"body": "Some text here."}])
        needles = ["recs.jsonl", "no column 'text'", "body"]
    elif case == "bad_jsonl":
        p = tmp_path / "recs.jsonl"
        p.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
        needles = ["recs.jsonl"]
    args, out = _base(tmp_path, data_tokenizer, p)
    if case == "no_tokenizer":
        p.write_text("A sentence.\n", encoding="utf-8")
        args[3] = str(tmp_path / "no_tok")
        needles = ["tokenizer not found", "no_tok"]
    rc, err = _cli(args, capsys)
    _assert_failed(rc, err, out, *needles)


def test_bad_settings_are_refused(tmp_path, data_tokenizer, capsys):
    inp = tmp_path / "c.txt"
    inp.write_text("A b c.\nD e f.\n", encoding="utf-8")
    args, out = _base(tmp_path, data_tokenizer, inp)
    for extra, needle in ((["--max-seq-len", "4"], "--max-seq-len"),
                          (["--masked-lm-prob", "1.5"], "--masked-lm-prob"),
                          (["--slice-index", "3", "--num-slices", "2"], "--slice-index")):
        rc, err = _cli(args + extra, capsys)
        _assert_failed(rc, err, out, needle)


def test_non_utf8_and_giant_lines_are_repaired_and_counted(tmp_path, data_tokenizer, capsys):
    inp = tmp_path / "latin1.txt"
    giant = ("word " * 10000).encode()
    inp.write_bytes("Caf\xe9 au lait is nice.\nSecond sentence here.\n\n".encode("latin-1") + giant
                    + b"\nAnother normal sentence.\n")
    args, out = _base(tmp_path, data_tokenizer, inp)
    rc, err = _cli(args + ["--max-line-chars", "1000"], capsys)
    assert rc == 0, err
    m = shards.read_manifest(str(out))
    assert m["stats"]["repaired"] == {"non_utf8_lines": 1, "giant_lines_cut": 1}
    assert "non_utf8_lines 1" in err and "giant_lines_cut 1" in err
    assert m["stats"]["documents"] == 2


def test_single_document_and_one_sentence_documents(tmp_path, data_tokenizer):
    one = tmp_path / "one.txt"
    one.write_text("\n".join(f"This is sentence {i} of the only document." for i in range(40)) + "\n")
    m = build([str(one)], data_tokenizer, str(tmp_path / "o1"), **_kw())
    assert m["stats"]["documents"] == 1 and m["splits"]["train"]["samples"] > 5
    exs = list(shards.iter_examples(str(tmp_path / "o1")))
    assert {e["next_sentence_label"] for e in exs} == {0, 1}  # random next drawn from the same doc
    singles = tmp_path / "singles.txt"
    singles.write_text("".join(f"Lonely sentence number {i} stands alone.\n\n" for i in range(30)))
    m = build([str(singles)], data_tokenizer, str(tmp_path / "o2"), **_kw())
    assert m["stats"]["one_sentence_documents"] == 30
    exs = list(shards.iter_examples(str(tmp_path / "o2")))
    assert exs and all(e["next_sentence_label"] == 1 for e in exs)  # 1-segment chunks: forced
    assert m["stats"]["forced_random_next"] == len(exs)


# ------------------------------------------------------------------------------------------------
# Interrupted builds, reruns, existing outputs
# ------------------------------------------------------------------------------------------------
def _complete_tar(path):
    with tarfile.open(path) as tf:
        return len(tf.getmembers())


def test_interrupted_build_leaves_nothing_complete_and_rerun_restarts(tmp_path, data_corpus, data_tokenizer,
                                                                      data_build_settings, data_built, monkeypatch):
    out = tmp_path / "crash"
    real_close, closed = ShardWriter.close_shard, []

    def close_then_crash(self):  # the build dies right after its second shard is complete
        real_close(self)
        closed.append(self.split)
        if len(closed) == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(ShardWriter, "close_shard", close_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build([data_corpus], data_tokenizer, str(out), data_build_settings, workers=1, progress=False)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))
    assert len(list(out.glob("*.tar"))) == 2 and all(_complete_tar(p) == 1500 for p in out.glob("*.tar"))
    with pytest.raises(DataError, match="manifest.json: manifest not found"):
        shards.read_manifest(str(out))
    build([data_corpus], data_tokenizer, str(out), data_build_settings, workers=1, progress=False)
    ref = {f: open(os.path.join(data_built, f), "rb").read() for f in os.listdir(data_built)
           if f.endswith((".tar", ".json"))}
    got = {f: open(out / f, "rb").read() for f in os.listdir(out) if f.endswith((".tar", ".json"))}
    assert got == ref


def test_killed_build_process(tmp_path, data_corpus, data_tokenizer):
    """SIGKILL mid-build: no manifest; a .tmp shard may remain but never a complete-looking one."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data.build", "--input", data_corpus, "--tokenizer", data_tokenizer,
           "--out", str(out), "--workers", "1", "--dupe-factor", "40", "--shard-size", "100000",
           "--no-progress", "--block-docs", "50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and list(out.glob("*.tmp"))):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert list(out.glob("train-*.tar.tmp")) and not list(out.glob("train-*.tar"))
    # rerun restarts cleanly (small settings to keep the test fast)
    rc = build_main(["--input", data_corpus, "--tokenizer", data_tokenizer, "--out", str(out),
                     "--workers", "1", "--dupe-factor", "1", "--no-progress"])
    assert rc == 0 and not list(out.glob("*.tmp")) and shards.read_manifest(str(out))


def test_existing_output_folder(tmp_path, data_tokenizer, capsys):
    inp = tmp_path / "c.txt"
    inp.write_text("".join(f"Doc {i} first sentence.\nDoc {i} second sentence.\n\n" for i in range(20)))
    out = str(tmp_path / "o")
    m1 = build([str(inp)], data_tokenizer, out, **_kw())
    assert build([str(inp)], data_tokenizer, out, **_kw()) == m1  # same settings: nothing to do
    assert "already built" in capsys.readouterr().err
    with pytest.raises(DataError, match="different build"):
        build([str(inp)], data_tokenizer, out, **_kw(seed=2))
    m2 = build([str(inp)], data_tokenizer, out, overwrite=True, **_kw(seed=2))
    assert m2["settings"]["seed"] == 2 and shards.read_manifest(out)["settings"]["seed"] == 2


def test_special_token_spellings_in_text_stay_text(tmp_path, data_tokenizer):
    inp = tmp_path / "c.txt"
    inp.write_text("".join(f"Doc {i} says [SEP] and [MASK] and [CLS] literally.\nSecond line [PAD] {i}.\n\n"
                           for i in range(20)))
    out = str(tmp_path / "o")
    build([str(inp)], data_tokenizer, out, **_kw())
    for ex in shards.iter_examples(out):
        r = ex["input_ids"].copy()
        r[ex["masked_lm_positions"]] = ex["masked_lm_ids"]
        assert (r == 3).sum() == 2 and (r == 2).sum() == 1 and not np.isin(r, [0, 4]).any()


def test_build_with_google_layout_vocab_txt(tmp_path, data_tokenizer):
    """An existing vocab.txt works as --tokenizer; special ids come from it ([CLS]=101 ...)."""
    from data.tokenizer import load_tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    rest = [t for t in load_tokenizer(data_tokenizer).vocab if t not in specials]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + specials[1:] + rest
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    inp = tmp_path / "c.txt"
    inp.write_text("".join(f"Document {i} opens here.\nIt continues with more words.\n\n" for i in range(30)))
    out = str(tmp_path / "o")
    m = build([str(inp)], str(tmp_path / "vocab.txt"), out, **_kw())
    assert {k: m["tokenizer"][k] for k in ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id")} == {
        "pad_id": 0, "unk_id": 100, "cls_id": 101, "sep_id": 102, "mask_id": 103}
    exs = list(shards.iter_examples(out))
    assert exs and all(e["input_ids"][0] == 101 and e["input_ids"][-1] == 102 for e in exs)
    assert any((e["input_ids"] == 103).any() for e in exs)
    assert load_tokenizer(out + "/tokenizer").fingerprint == m["tokenizer"]["fingerprint"]


def test_unreadable_manifest_restarts_and_missing_input_touches_nothing(tmp_path, data_tokenizer, capsys):
    inp = tmp_path / "c.txt"
    inp.write_text("".join(f"Doc {i} first sentence.\nDoc {i} second sentence.\n\n" for i in range(20)))
    out = tmp_path / "o"
    m1 = build([str(inp)], data_tokenizer, str(out), **_kw())
    (out / "manifest.json").write_text('{"format_version": 1, "tokeni')  # torn write
    with pytest.raises(DataError, match="not valid JSON"):
        shards.read_manifest(str(out))
    assert build([str(inp)], data_tokenizer, str(out), **_kw()) == m1
    before = sorted(os.listdir(out))
    args = ["--input", str(tmp_path / "typo.txt"), "--tokenizer", data_tokenizer, "--out", str(out)]
    assert build_main(args) == 2 and "typo.txt" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before and shards.read_manifest(str(out)) == m1


def test_cr_only_line_endings_are_lines(tmp_path):
    inp = tmp_path / "mac.txt"
    inp.write_bytes(b"First sentence here.\rSecond sentence here.\r\rThird one.\r\nFourth one.\n")
    stats: dict = {}
    assert list(iter_documents(CorpusOptions([str(inp)]), stats)) == [
        ["First sentence here.", "Second sentence here."], ["Third one.", "Fourth one."]]
    assert not stats.get("giant_lines_cut")


def test_a_giant_line_is_never_held_whole(tmp_path):
    """A 20 MB line with a 1000-character cap: cut and counted, and reading it allocates far less than the line."""
    import tracemalloc

    inp = tmp_path / "giant.txt"
    with open(inp, "wb") as f:
        f.write(b"Before it.\n")
        f.write(b"word " * 4_000_000)
        f.write(b"\nAfter it.\n\nNext document.\n")
    stats: dict = {}
    tracemalloc.start()
    try:
        docs = list(iter_documents(CorpusOptions([str(inp)], max_line_chars=1000), stats))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert docs == [["Before it.", ("word " * 200)[:1000].strip(), "After it."], ["Next document."]]
    assert stats["giant_lines_cut"] == 1
    assert peak < 2_000_000, f"peak {peak} bytes while reading a 20 MB line"


def test_output_folder_holding_an_input_is_refused_before_anything_is_written(tmp_path, data_tokenizer, capsys):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(data_tokenizer, d / "tokenizer")
    (d / "c.txt").write_text("".join(f"Doc {i} first sentence.\nDoc {i} second one.\n\n" for i in range(20)))
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    for args in (["--input", str(d / "c.txt"), "--tokenizer", str(d / "tokenizer")],  # the tokenizer inside
                 ["--input", str(d / "c.txt"), "--tokenizer", data_tokenizer],  # the corpus inside
                 ["--input", str(d), "--tokenizer", data_tokenizer]):  # the input folder is the output folder
        rc, err = _cli(args + ["--out", str(d), "--workers", "1", "--no-progress"], capsys)
        assert rc == 2 and err.startswith("error: ") and f"--out {d} holds the input" in err, err
        assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match="holds the input"):  # also through a symlinked path
        os.symlink(d, tmp_path / "link")
        build([str(tmp_path / "link" / "c.txt")], data_tokenizer, str(d), **_kw())
