"""Example builder: Google-exact algorithm, statistics of real shards, determinism, slices + merge."""

import dataclasses
import glob
import math
import os
import random
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data import shards
from data.build import build, is_valid_document
from data.corpus import CorpusOptions, iter_documents
from common.errors import DataError
from data.merge import merge
from data.pretraining import Instances, Params, create_instances_from_document, num_to_predict
from data.tokenizer import load_tokenizer


# ------------------------------------------------------------------------------------------------
# The algorithm against a verbatim transcription of google-research/bert
# ------------------------------------------------------------------------------------------------
def _google_truncate(tokens_a, tokens_b, max_num_tokens, rng):
    while True:
        total_length = len(tokens_a) + len(tokens_b)
        if total_length <= max_num_tokens:
            break
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()


def _google_instances(all_documents, document_index, max_seq_length, short_seq_prob, rng):
    document = all_documents[document_index]
    max_num_tokens = max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    instances = []
    current_chunk = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a = []
                for j in range(a_end):
                    tokens_a.extend(current_chunk[j])
                tokens_b = []
                is_random_next = False
                if len(current_chunk) == 1 or rng.random() < 0.5:
                    is_random_next = True
                    target_b_length = target_seq_length - len(tokens_a)
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    num_unused_segments = len(current_chunk) - a_end
                    i -= num_unused_segments
                else:
                    is_random_next = False
                    for j in range(a_end, len(current_chunk)):
                        tokens_b.extend(current_chunk[j])
                _google_truncate(tokens_a, tokens_b, max_num_tokens, rng)
                tokens = ["C"] + tokens_a + ["S"] + tokens_b + ["S"]
                instances.append((tokens, len(tokens_a) + 1, int(is_random_next)))
            current_chunk = []
            current_length = 0
        i += 1
    return instances


@pytest.mark.parametrize("max_seq_len,short", [(16, 0.1), (32, 0.5), (128, 0.1)])
def test_instances_identical_to_google_reference(max_seq_len, short):
    gen = random.Random(0)
    docs = [[[gen.randint(10, 99) for _ in range(gen.randint(1, 40))] for _ in range(gen.randint(1, 12))]
            for _ in range(30)]
    p = Params(max_seq_len=max_seq_len, short_seq_prob=short)
    for seed in range(5):
        ours, stats = Instances([], [], []), {"target_draws": 0, "short_target_draws": 0,
                                              "forced_random_next": 0}
        r1, r2 = random.Random(seed), random.Random(seed)
        ref = []
        for di in range(len(docs)):
            create_instances_from_document(docs, di, p, r1, "C", "S", ours, stats)
            ref += _google_instances(docs, di, max_seq_len, short, r2)
        assert [(t, s, r) for t, s, r in zip(ours.tokens, ours.sep_index, ours.is_random_next)] == ref
        assert r1.random() == r2.random()  # same number of RNG draws


def test_num_to_predict_formula():
    p = Params(max_seq_len=512, max_predictions=80)
    assert num_to_predict(128, 20, 0.15) == 19 and num_to_predict(512, p.max_predictions, p.masked_lm_prob) == 77
    assert num_to_predict(5, 20, 0.15) == 1 and num_to_predict(200, 20, 0.15) == 20
    for n in range(1, 300):
        assert num_to_predict(n, 20, 0.15) == min(20, max(1, int(round(n * 0.15))))


# ------------------------------------------------------------------------------------------------
# Statistics of shards built from real text
# ------------------------------------------------------------------------------------------------
def _all(path, split):
    return list(shards.iter_examples(path, split))


def _restored(ex):
    ids = ex["input_ids"].copy()
    ids[ex["masked_lm_positions"]] = ex["masked_lm_ids"]
    return ids


def _doc_streams(corpus, tok):
    """Per document: (is_valid, token stream as a str of chr(id)) exactly as the builder sees it."""
    out = []
    for sents in iter_documents(CorpusOptions([corpus])):
        ids = [x for x in tok.encode_ids(sents) if x]
        if ids:
            out.append((is_valid_document(sents, 0.05), "".join(chr(i) for s in ids for i in s)))
    return out


def _s(ids):
    return "".join(map(chr, ids))


def test_manifest_schema_and_counts(data_built, data_build_settings, data_tokenizer):
    m = shards.read_manifest(data_built)
    tok = load_tokenizer(data_tokenizer)
    assert m["format_version"] == shards.FORMAT_VERSION
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert {k: m["tokenizer"][k] for k in ("vocab_size", "pad_id", "cls_id", "sep_id", "mask_id")} == {
        "vocab_size": 2000, "pad_id": 0, "cls_id": 2, "sep_id": 3, "mask_id": 4}
    for k in ("max_seq_len", "max_predictions", "masked_lm_prob", "short_seq_prob", "dupe_factor",
              "whole_word_mask", "seed", "valid_fraction", "shard_size", "inputs"):
        assert k in m["settings"]
    assert m["settings"]["dupe_factor"] == data_build_settings.dupe_factor
    assert load_tokenizer(os.path.join(data_built, "tokenizer")).fingerprint == tok.fingerprint
    for split in shards.SPLITS:
        paths = shards.shard_paths(data_built, split)
        assert [os.path.basename(p) for p in paths] == [f"{split}-{i:06d}.tar" for i in range(len(paths))]
        for p, sh in zip(paths, m["splits"][split]["shards"]):
            exs = list(shards.iter_shard(p))
            assert len(exs) == sh["samples"] and sum(len(e["input_ids"]) for e in exs) == sh["tokens"]
            assert sh["samples"] <= m["settings"]["shard_size"]
    assert m["splits"]["valid"]["samples"] > 0 and m["splits"]["train"]["samples"] > 5000
    assert m["stats"]["documents"] == 1200
    assert not glob.glob(os.path.join(data_built, "*.tmp"))


def test_layout_lengths_and_masking_statistics(data_built, data_build_settings):
    m = shards.read_manifest(data_built)
    exs = _all(data_built, "train") + _all(data_built, "valid")
    p = Params(max_seq_len=data_build_settings.max_seq_len, max_predictions=data_build_settings.max_predictions)
    n_mask = n_keep = n_other = 0
    for ex in exs:
        ids, seg, pos, lab = ex["input_ids"], ex["segment_ids"], ex["masked_lm_positions"], ex["masked_lm_ids"]
        n = len(ids)
        assert 5 <= n <= 128
        r = _restored(ex)
        seps = np.flatnonzero(r == 3)
        assert r[0] == 2 and len(seps) == 2 and seps[1] == n - 1 and 1 < seps[0] < n - 2
        assert (seg[: seps[0] + 1] == 0).all() and (seg[seps[0] + 1:] == 1).all()
        assert len(pos) == num_to_predict(n, p.max_predictions, p.masked_lm_prob)  # exact without whole-word
        assert (np.diff(pos) > 0).all() and 0 not in pos and not np.isin(pos, seps).any()
        assert ex["next_sentence_label"] in (0, 1)
        at = ids[pos]
        n_mask += int((at == 4).sum())
        n_keep += int(((at == lab) & (at != 4)).sum())
        n_other += int(((at != lab) & (at != 4)).sum())
    total = n_mask + n_keep + n_other
    assert total > 20000
    tol = 4 * math.sqrt(0.1 * 0.9 / total) + 0.002  # ~4 sigma (+ random draws that hit the original)
    assert abs(n_mask / total - 0.8) < 4 * math.sqrt(0.16 / total)
    assert abs(n_keep / total - 0.1) < tol and abs(n_other / total - 0.1) < tol
    # NSP: forced random-next (1-segment chunks) + 50% of the rest
    labels = sum(ex["next_sentence_label"] for ex in exs)
    st = m["stats"]
    assert st["random_next"] == labels and st["examples"] == len(exs)
    free = len(exs) - st["forced_random_next"]
    assert abs(labels - st["forced_random_next"] - free / 2) < 4 * math.sqrt(free / 4)
    # short targets drawn with short_seq_prob (once per document per pass, as Google)
    d = st["target_draws"]
    assert d == st["documents"] * data_build_settings.dupe_factor
    assert abs(st["short_target_draws"] / d - 0.1) < 4 * math.sqrt(0.09 / d)
    # the realised lengths: full-length examples dominate the long end, short ones exist
    lens = np.array([len(e["input_ids"]) for e in exs])
    assert (lens == 128).mean() > 0.1 and (lens < 64).mean() > 0.1


def test_isnext_pairs_are_consecutive_text_and_valid_is_held_out(data_built, data_corpus, data_tokenizer):
    tok = load_tokenizer(data_tokenizer)
    docs = _doc_streams(data_corpus, tok)
    valid_docs = [s for v, s in docs if v]
    train_docs = [s for v, s in docs if not v]
    m = shards.read_manifest(data_built)
    assert m["stats"]["valid_documents"] == len(valid_docs) > 0

    def consecutive(a, b, pool):
        for d in pool:
            i = d.find(a)
            while i >= 0:
                if d.find(b, i + len(a)) >= 0:
                    return True
                i = d.find(a, i + 1)
        return False

    for split, pool in (("train", train_docs), ("valid", valid_docs)):
        exs = _all(data_built, split)
        checked = 0
        for ex in exs:
            r = _restored(ex)
            sep = int(np.flatnonzero(r == 3)[0])
            a, b = _s(r[1:sep]), _s(r[sep + 1:-1])
            if ex["next_sentence_label"] == 0:
                assert consecutive(a, b, pool), ex["__key__"]
                checked += 1
            # no text of the other split: every long enough piece comes from this split's documents
            for piece in (a, b):
                if len(piece) >= 12:
                    assert any(piece in d for d in pool), ex["__key__"]
        assert checked > (100 if split == "train" else 5)


def test_reading_paths_agree_and_records_are_compact(data_built):
    """Our reader and webdataset's see the same samples; records store no padding. (Decode speed is measured
    by `launcher/bench.py loader`, never asserted here.)"""
    paths = shards.shard_paths(data_built, "train")
    ours = list(shards.iter_examples(data_built, "train"))
    raw = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert len(raw) == len(ours)
    for r, o in zip(raw[:500], ours[:500]):
        d = shards.decode_sample(r)
        assert d["__key__"] == o["__key__"] and d["next_sentence_label"] == o["next_sentence_label"]
        for k in ("input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids"):
            assert np.array_equal(d[k], o[k])
    # compact: no padding stored, 2-byte ids (vocab 2000), 1-byte positions (max_seq_len 128)
    with tarfile.open(paths[0]) as tf:
        m = tf.getmembers()[0]
        assert m.mtime == 0 and m.uid == 0 and m.name.endswith(".bin")
        data = tf.extractfile(m).read()
    ex = shards.decode_record("k", data)
    assert len(data) == 8 + 2 * len(ex["input_ids"]) + 3 * len(ex["masked_lm_positions"])


def test_decode_sample_rejects_corrupt_records(data_built):
    raw = next(iter(wds.WebDataset(shards.shard_paths(data_built, "train"), shardshuffle=False,
                                   empty_check=False)))
    key = raw["__key__"]
    good = raw["bin"]
    for bad in (good[:5], good[:-1], good + b"\0", bytes([9]) + good[1:], good[:1] + bytes([0xF0]) + good[2:]):
        with pytest.raises(ValueError, match=key):
            shards.decode_sample({"__key__": key, "bin": bad})
    with pytest.raises(ValueError, match="no 'bin' field"):
        shards.decode_sample({"__key__": key, "txt": b"x"})


# ------------------------------------------------------------------------------------------------
# Determinism, workers, whole-word masking, slices
# ------------------------------------------------------------------------------------------------
def _files(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith((".tar", ".json")):
            with open(os.path.join(d, f), "rb") as fh:
                out[f] = fh.read()
    return out


def test_byte_identical_whatever_workers(tmp_path, data_corpus, data_tokenizer, data_build_settings, data_built,
                                         capsys):
    kw = data_build_settings
    build([data_corpus], data_tokenizer, str(tmp_path / "w2"), kw, workers=2, progress=False)
    assert "tokens/s per worker core" in capsys.readouterr().err
    assert _files(str(tmp_path / "w2")) == _files(data_built)
    kw = dataclasses.replace(kw, seed=8)
    build([data_corpus], data_tokenizer, str(tmp_path / "s8"), kw, workers=1, progress=False)
    assert _files(str(tmp_path / "s8"))["train-000000.tar"] != _files(data_built)["train-000000.tar"]


def test_whole_word_masking(tmp_path, data_corpus, data_tokenizer, data_build_settings):
    kw = dataclasses.replace(data_build_settings, whole_word_mask=True, dupe_factor=1)
    out = str(tmp_path / "wwm")
    build([data_corpus], data_tokenizer, out, kw, workers=1, progress=False)
    tok = load_tokenizer(data_tokenizer)
    cont = np.array([t.startswith("##") for t in tok.vocab])
    p = Params(max_seq_len=128, max_predictions=20)
    short = 0
    exs = _all(out, "train")
    for ex in exs:
        r, pos = _restored(ex), ex["masked_lm_positions"]
        k = num_to_predict(len(r), p.max_predictions, p.masked_lm_prob)
        assert len(pos) <= k
        short += len(pos) < k
        masked = set(pos.tolist())
        for i in pos:
            # a masked piece's whole word is masked: neighbours within the word are masked too
            if cont[r[i]] and r[i - 1] not in (2, 3):
                assert i - 1 in masked
            if i + 1 < len(r) and cont[r[i + 1]]:
                assert i + 1 in masked
    assert short < 0.5 * len(exs)  # groups are skipped only when they would overflow


def test_slices_merge_to_exactly_the_slice_examples(tmp_path, data_corpus, data_tokenizer, data_build_settings):
    kw = dataclasses.replace(data_build_settings, block_docs=100, dupe_factor=1)
    full = str(tmp_path / "full")
    build([data_corpus], data_tokenizer, full, kw, workers=1, progress=False)
    parts, records = [], {}
    for i in range(3):
        d = str(tmp_path / f"part{i}")
        m = build([data_corpus], data_tokenizer, d, dataclasses.replace(kw, num_slices=3, slice_index=i), workers=1,
                  progress=False)
        assert m["settings"]["slice_index"] == i
        for s in shards.SPLITS:
            for p in shards.shard_paths(d, s):
                records.update({(s, r["__key__"]): r["bin"] for r in shards.iter_samples(p)})
        parts.append(d)
    with pytest.raises(DataError, match="slices"):
        merge(str(tmp_path / "bad"), parts[:2])
    merged = str(tmp_path / "merged")
    m = merge(merged, parts[::-1])
    got = {}
    for s in shards.SPLITS:
        for p in shards.shard_paths(merged, s):
            got.update({(s, r["__key__"]): r["bin"] for r in shards.iter_samples(p)})
    assert got == records
    # and, seeds being per global block, exactly the examples of the unsliced build
    ref = {}
    for s in shards.SPLITS:
        for p in shards.shard_paths(full, s):
            ref.update({(s, r["__key__"]): r["bin"] for r in shards.iter_samples(p)})
    assert got == ref
    fm = shards.read_manifest(full)
    assert m["splits"]["train"]["samples"] == fm["splits"]["train"]["samples"]
    assert m["stats"]["documents"] == fm["stats"]["documents"]
    assert m["stats"]["input"] == fm["stats"]["input"]
    assert not os.path.exists(os.path.join(parts[0], "manifest.json"))  # moved parts are not complete


def test_merge_cli(tmp_path, data_corpus, data_tokenizer, data_build_settings, capsys):
    from data.merge import main as merge_main

    kw = dataclasses.replace(data_build_settings, dupe_factor=1)
    for i in range(2):
        build([data_corpus], data_tokenizer, str(tmp_path / f"p{i}"),
              dataclasses.replace(kw, num_slices=2, slice_index=i), workers=1, progress=False)
    assert merge_main([str(tmp_path / "m"), str(tmp_path / "p0"), str(tmp_path / "p1")]) == 0
    assert shards.read_manifest(str(tmp_path / "m"))["settings"]["merged_slices"] == 2
    assert merge_main([str(tmp_path / "m2"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("vocab_size,max_len", [(200, 128), (30522, 512), (100000, 128), (250000, 1024)])
def test_record_roundtrip_all_dtypes(vocab_size, max_len):
    rng = np.random.default_rng(0)
    n = min(max_len, 300)
    ids = rng.integers(0, vocab_size, n)
    pos = np.sort(rng.choice(np.arange(1, n - 1), 7, replace=False))
    idc, pc = shards.id_dtype_code(vocab_size), shards.pos_dtype_code(max_len)
    rec = shards.encode_record(ids, 5, pos, ids[pos], 1, idc, pc)
    assert len(rec) == 8 + n * [1, 2, 4][idc] + 7 * ([1, 2][pc] + [1, 2, 4][idc])
    d = shards.decode_sample({"__key__": "k", "bin": shards.tar_member("k.bin", rec)[512:512 + len(rec)]})
    assert np.array_equal(d["input_ids"], ids) and np.array_equal(d["masked_lm_positions"], pos)
    assert np.array_equal(d["masked_lm_ids"], ids[pos]) and d["next_sentence_label"] == 1
    assert d["segment_ids"].tolist() == [0] * 6 + [1] * (n - 6)


def test_parallel_map_is_ordered_and_bounded(data_tokenizer):
    """Memory bound: never more than workers + prefetch blocks pulled ahead of what was written."""
    from data.build import _ordered_bounded_map

    tok = load_tokenizer(data_tokenizer)
    pulled = [0]
    ahead = []

    def tasks():
        for i in range(40):
            pulled[0] += 1
            yield -i

    initargs = (tok.tokenizer.to_str(), Params(), 0.0, {"max_line_chars": 100, "drop_headings": True})
    got = []
    for r in _ordered_bounded_map(abs, tasks(), 2, initargs, prefetch=2):
        ahead.append(pulled[0] - len(got))
        got.append(r)
    assert got == list(range(40))
    assert max(ahead) <= 2 + 2
