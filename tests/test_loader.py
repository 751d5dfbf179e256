"""PretrainLoader: order, partition, exact resume, collate, corruption handling, eval mode, dynamic masking.

Shards are written here with ``data.shards``' own record/tar encoders (small, uneven shard sizes so blocks,
remainders and epoch boundaries all show up); the oracle for contents is ``data.shards.iter_examples``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from data import masking
from data import shards as ds
from data.loader import MODEL_INPUT_KEYS, PretrainLoader, model_inputs
from helpers import damage

VOCAB, PAD, UNK, CLS, SEP, MASK = 120, 0, 1, 2, 3, 4
MAX_LEN, MAX_PRED = 40, 6
TRAIN_COUNTS = [37, 50, 23, 41, 30, 19]  # 200 samples in 6 uneven shards
VALID_COUNTS = [13, 9]


def _example(rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, int]:
    n = int(rng.integers(8, MAX_LEN + 1))
    ids = rng.integers(5, VOCAB, n)
    sep = int(rng.integers(1, n - 2))
    ids[0], ids[sep], ids[n - 1] = CLS, SEP, SEP
    cand = np.array([i for i in range(n) if i not in (0, sep, n - 1)])
    pos = np.sort(rng.choice(cand, masking.num_to_predict(n, MAX_PRED, 0.15), replace=False))
    orig = ids[pos].copy()
    ids[pos] = MASK
    return ids, sep, pos, orig, int(rng.integers(0, 2))


def build_shards(root, *, corrupt: dict[str, set[int]] | None = None, seed: int = 7) -> str:
    """Write a shard folder in the contract layout; ``corrupt[shard] = {i, ...}`` garbles those records."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    corrupt = corrupt or {}
    splits = {}
    for split, counts in (("train", TRAIN_COUNTS), ("valid", VALID_COUNTS)):
        entries = []
        for si, count in enumerate(counts):
            name = ds.shard_name(split, si)
            parts, tokens = [], 0
            for i in range(count):
                ids, sep, pos, orig, nsp = _example(rng)
                rec = ds.encode_record(ids, sep, pos, orig, nsp, ds.id_dtype_code(VOCAB), ds.pos_dtype_code(MAX_LEN))
                if i in corrupt.get(name, ()):
                    rec = bytes([99]) + rec[1:]  # record version 99: decode_sample raises ValueError
                tokens += len(ids)
                parts.append(ds.tar_member(f"{split}-{si:06d}-{i:06d}.{ds.SAMPLE_EXT}", rec))
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"".join(parts) + ds.TAR_EOF)
            entries.append({"name": name, "samples": count, "tokens": tokens})
        splits[split] = {"shards": entries, "samples": sum(counts),
                         "tokens": sum(e["tokens"] for e in entries)}
    manifest = {
        "format_version": ds.FORMAT_VERSION,
        "tokenizer": {"fingerprint": "test", "vocab_size": VOCAB, "pad_id": PAD, "cls_id": CLS, "sep_id": SEP,
                      "mask_id": MASK, "unk_id": UNK},
        "settings": {"max_seq_len": MAX_LEN, "max_predictions": MAX_PRED, "masked_lm_prob": 0.15,
                     "short_seq_prob": 0.1, "dupe_factor": 1, "whole_word_mask": False, "seed": seed,
                     "valid_fraction": 0.1, "shard_size": 50, "inputs": ["synthetic"]},
        "splits": splits, "stats": {},
    }
    with open(os.path.join(root, ds.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return str(root)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def oracle(shard_dir):
    return {d["__key__"]: d for split in ("train", "valid") for d in ds.iter_examples(shard_dir, split)}


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["keys"] == y["keys"]
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k


# ---------------------------------------------------------------------------------------------------
def test_collate_matches_stored_samples(shard_dir, oracle):
    loader = PretrainLoader(shard_dir, "train", 8, num_workers=0, seed=3)
    assert loader.batches_per_epoch == 200 // 8
    for batch in take(loader, loader.batches_per_epoch):
        assert set(batch) == {"keys", "ids", "is_padding", "no_padding", "tokens", "predictions", *MODEL_INPUT_KEYS}
        assert not batch["is_padding"]
        am = batch["attention_mask"]
        assert batch["no_padding"] == bool(am.all()) and batch["tokens"] == int(am.sum())
        assert batch["predictions"] == int(batch["masked_lm_weights"].sum())
        assert ("attention_mask" in model_inputs(batch)) != batch["no_padding"]
        B, S = batch["input_ids"].shape
        lens = [len(oracle[k]["input_ids"]) for k in batch["keys"]]
        assert B == 8 and S % 8 == 0 and max(lens) <= S < max(lens) + 8
        assert batch["masked_lm_positions"].shape == (B, MAX_PRED)
        assert batch["masked_lm_weights"].dtype == torch.float32
        for i, k in enumerate(batch["keys"]):
            d, n, p = oracle[k], lens[i], len(oracle[k]["masked_lm_positions"])
            assert batch["input_ids"][i, :n].tolist() == d["input_ids"].tolist()
            assert (batch["input_ids"][i, n:] == PAD).all()
            assert batch["token_type_ids"][i, :n].tolist() == d["segment_ids"].tolist()
            assert (batch["token_type_ids"][i, n:] == 0).all()
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (S - n)
            assert batch["masked_lm_positions"][i, :p].tolist() == d["masked_lm_positions"].tolist()
            assert batch["masked_lm_ids"][i, :p].tolist() == d["masked_lm_ids"].tolist()
            assert batch["masked_lm_weights"][i].tolist() == [1.0] * p + [0.0] * (MAX_PRED - p)
            assert (batch["masked_lm_positions"][i, p:] == 0).all()
            assert int(batch["next_sentence_label"][i]) == d["next_sentence_label"]


def test_rank_partition_and_epoch_shuffle(shard_dir, oracle):
    B, W = 6, 2
    T = 200 // (B * W)  # 16 batches/rank; 192 of 200 samples used, 8 dropped
    epochs = {}
    for r in range(W):
        loader = PretrainLoader(shard_dir, "train", B, rank=r, world_size=W, seed=11, num_workers=0)
        assert loader.batches_per_epoch == T
        batches = take(loader, 2 * T)
        epochs[r] = [[k for b in batches[e * T:(e + 1) * T] for k in b["keys"]] for e in range(2)]
    for e in range(2):
        k0, k1 = epochs[0][e], epochs[1][e]
        assert len(k0) == len(set(k0)) == len(k1) == len(set(k1)) == T * B  # no duplicates within a rank
        assert not set(k0) & set(k1)  # ranks disjoint
        train_keys = {k for k in oracle if k.startswith("train-")}
        assert set(k0) | set(k1) <= train_keys and len(set(k0) | set(k1)) == 192
    assert epochs[0][0] != epochs[0][1]  # reshuffled per epoch
    # the shuffle actually mixes samples across shards inside a block, and is seed-determined
    first = [k.split("-")[1] for k in epochs[0][0][:24]]
    assert len(set(first)) > 1 and first != sorted(first)
    again = take(PretrainLoader(shard_dir, "train", B, rank=0, world_size=W, seed=11, num_workers=0), T)
    assert [k for b in again for k in b["keys"]] == epochs[0][0]
    other = take(PretrainLoader(shard_dir, "train", B, rank=0, world_size=W, seed=12, num_workers=0), T)
    assert [k for b in other for k in b["keys"]] != epochs[0][0]


def test_shuffle_window_is_bounded_by_blocks(shard_dir):
    """With block_shards=2 the first positions of an epoch come only from the first two shards in epoch order."""
    loader = PretrainLoader(shard_dir, "train", 1, seed=5, num_workers=0, block_shards=2)
    order, block_starts, _ = loader._plan.layout(0)
    first_block = {ds.shard_name("train", int(s))[len("train-"):-4] for s in order[:2]}
    n0 = int(block_starts[1])
    assert n0 == TRAIN_COUNTS[order[0]] + TRAIN_COUNTS[order[1]]
    keys = [b["keys"][0] for b in take(loader, n0)]
    assert {k.split("-")[1] for k in keys} == first_block


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_exact_resume_any_workers(shard_dir, num_workers):
    B, W, seed = 5, 2, 21
    T = 200 // (B * W)  # 20 batches per rank per epoch
    total = T + 6  # crosses the epoch boundary
    for rank in range(W):
        ref = take(PretrainLoader(shard_dir, "train", B, rank=rank, world_size=W, seed=seed, num_workers=0), total)
        mk = lambda: PretrainLoader(shard_dir, "train", B, rank=rank, world_size=W, seed=seed,  # noqa: E731
                                    num_workers=num_workers, block_shards=2)
        ref2 = take(PretrainLoader(shard_dir, "train", B, rank=rank, world_size=W, seed=seed, num_workers=0,
                                   block_shards=2), total)
        assert_same_batches(take(mk(), total), ref2)  # worker count does not change the stream
        for stop in (3, T - 1, T + 2):
            first = mk()
            head = take(first, stop)
            sd = first.state_dict()
            assert sd["sample_in_epoch"] == (stop % T) * B * W and sd["epoch"] == stop // T
            resumed = mk()
            resumed.load_state_dict(json.loads(json.dumps(sd)))  # survives a JSON/torch.save round trip
            assert_same_batches(head + take(resumed, total - stop), ref2)
        assert [b["keys"] for b in ref] != [b["keys"] for b in ref2]  # block size is part of the order


def step_keys(shard_dir, world, micro, G, steps, state=None, seed=3):
    """Keys of each optimizer step (all ranks together, as a set) of `steps` steps of global batch G."""
    accum = G // (micro * world)
    loaders = [PretrainLoader(shard_dir, "train", micro, rank=r, world_size=world, seed=seed, num_workers=0,
                              global_batch=G) for r in range(world)]
    notes = [ld.load_state_dict(state) for ld in loaders] if state else [""]
    its = [iter(ld) for ld in loaders]
    keys = [{k for it in its for _ in range(accum) for k in next(it)["keys"]} for _ in range(steps)]
    return keys, loaders[0].state_dict(), notes[0]


def test_resume_on_another_world_size_continues_with_the_same_samples(shard_dir):
    """The stream is global: a state from 2 ranks continues on 1 or 4 (global batch 16 = micro 4 x accum
    4/2/1 x world 1/2/4) and every step holds the samples of the uninterrupted run, across an epoch's end."""
    ref, _, _ = step_keys(shard_dir, 2, 4, 16, 16)  # 200 samples: 12 steps of 16 per epoch (8 dropped)
    assert all(len(k) == 16 for k in ref) and len(set.union(*ref[:12])) == 192  # whole steps, none repeated
    _, state, _ = step_keys(shard_dir, 2, 4, 16, 5)
    for world in (1, 4):
        got, _, note = step_keys(shard_dir, world, 4, 16, 11, state)
        assert got == ref[5:] and note == ""
    # another global batch: said, and the data continues at the same sample of the epoch
    got, after, note = step_keys(shard_dir, 1, 4, 8, 3, state)
    assert "global batch changed from 16 to 8" in note and after["samples_seen"] == 80 + 24
    plain = take(PretrainLoader(shard_dir, "train", 8, seed=3, num_workers=0), 13)  # positions 8k .. 8k+7
    assert got == [set(b["keys"]) for b in plain[10:13]]  # positions 80..103 of epoch 0


def test_resume_rejects_other_settings(shard_dir):
    loader = PretrainLoader(shard_dir, "train", 4, world_size=2, num_workers=0)
    take(loader, 3)
    sd = loader.state_dict()
    other = PretrainLoader(shard_dir, "train", 4, world_size=1, num_workers=0, seed=5)
    with pytest.raises(ValueError, match="seed is 0 in the checkpoint but 5 now"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("world", [2, 3])
def test_eval_one_pass_equal_batches_with_padding(shard_dir, oracle, world):
    B = 4
    valid = [k for k in oracle if k.startswith("valid-")]  # manifest order
    per_rank = {}
    for r in range(world):
        loader = PretrainLoader(shard_dir, "valid", B, rank=r, world_size=world, shuffle=False, loop=False,
                                num_workers=1 if r == 0 else 0)
        batches = list(loader)
        assert len(batches) == len(loader) == -(-(-(-22 // world)) // B)
        assert batches == [] or all("is_padding" in b for b in batches)
        real = [b for b in batches if not b["is_padding"]]
        pads = [b for b in batches if b["is_padding"]]
        assert all(b["keys"] == [] and b["masked_lm_weights"].sum() == 0 for b in pads)
        per_rank[r] = [k for b in real for k in b["keys"]]
        assert [k for b in list(loader) if not b["is_padding"] for k in b["keys"]] == per_rank[r]  # new pass
    assert sorted(k for ks in per_rank.values() for k in ks) == sorted(valid)  # each sample exactly once
    for r in range(world):
        assert per_rank[r] == valid[r::world]  # shuffle=False: manifest order, rank r takes r::world


def test_eval_padding_batch_when_rank_runs_out(shard_dir):
    # 22 valid samples over W=5 ranks hold 5/5/4/4/4; B=2 -> every rank yields ceil(5/2) = 3 batches:
    # ranks 0-1 end with a 1-sample batch, ranks 2-4 with a padding batch. W=24: ranks 22, 23 hold nothing.
    for world, rank, expect in ((5, 0, [False] * 3), (5, 3, [False, False, True]), (24, 23, [True])):
        loader = PretrainLoader(shard_dir, "valid", 2, rank=rank, world_size=world, shuffle=False, loop=False,
                                num_workers=0)
        batches = list(loader)
        assert [b["is_padding"] for b in batches] == expect
        assert [len(b["keys"]) for b in batches] == [0 if p else len(b["input_ids"]) for p, b in zip(expect, batches)]
        for b in batches:
            if b["is_padding"]:  # a runnable forward: one row, [CLS] [SEP], no predictions
                assert b["input_ids"].shape == (1, 8) and b["input_ids"][0, :2].tolist() == [CLS, SEP]
                assert b["masked_lm_weights"].sum() == 0
    assert [len(b["keys"]) for b in PretrainLoader(shard_dir, "valid", 2, rank=0, world_size=5, shuffle=False,
                                                   loop=False, num_workers=0)] == [2, 2, 1]


# ---------------------------------------------------------------------------------------------------
def test_corrupt_samples_skipped_counted_logged(tmp_path, caplog):
    bad = {"train-000001.tar": {0, 7}, "train-000004.tar": {29}}
    root = build_shards(tmp_path, corrupt=bad)
    bad_keys = {"train-000001-000000", "train-000001-000007", "train-000004-000029"}
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        loader = PretrainLoader(root, "train", 8, num_workers=0, seed=1)  # 200 = 25 x 8: nothing dropped
        keys = [k for b in take(loader, 25) for k in b["keys"]]
    assert len(keys) == 197 and not bad_keys & set(keys)
    assert loader.stats["corrupt_samples"] == 3 and loader.stats["missing_samples"] == 0
    assert loader.stats["bad_shards"] == 0  # sample-level damage: the shards themselves read whole
    logged = caplog.text
    assert all(k in logged for k in bad_keys) and "train-000001.tar" in logged and "version 99" in logged
    # with workers the counts reach the main process, and resume stays exact over the same damage
    ref = take(PretrainLoader(root, "train", 8, num_workers=0, seed=1), 30)
    wl = PretrainLoader(root, "train", 8, num_workers=2, seed=1)
    head = take(wl, 12)
    again = PretrainLoader(root, "train", 8, num_workers=2, seed=1)
    again.load_state_dict(wl.state_dict())
    assert_same_batches(head + take(again, 18), ref)
    full = PretrainLoader(root, "train", 8, num_workers=2, seed=1)
    take(full, 50)  # exactly two epochs
    assert full.health_report()["corrupt"] == {"train-000001.tar": 4, "train-000004.tar": 2}
    assert full.health_report()["read"] == 400


def rows_of(loader, n):
    """key -> the sample as its batch holds it, padding aside (a shorter batch may pad less), for n batches."""
    out = {}
    loader.delivered = 0
    for batch in take(loader, n):
        loader.delivered += len(batch["keys"])
        for i, k in enumerate(batch["keys"]):
            length = int(batch["attention_mask"][i].sum())
            out[k] = tuple(batch[f][i][:length].tolist() if f in ("input_ids", "token_type_ids", "attention_mask")
                           else batch[f][i].tolist() for f in MODEL_INPUT_KEYS)
    return out


@pytest.mark.parametrize("kind", ["cut_0.1%", "cut_half", "zero_byte", "missing", "garbage_member", "garbage_header"])
def test_damage_stays_inside_its_shard(tmp_path, kind):
    """Whatever happens to one shard, every other shard's samples decode exactly as without the damage, in the
    same order (the order is the manifest's): 2 ranks, 2 workers each, 3 shuffle blocks, two epochs."""
    good, bad = build_shards(str(tmp_path / "good")), build_shards(str(tmp_path / "bad"))
    victim = "train-000001.tar"  # 50 samples, in a block with another shard
    damage(bad, victim, kind)
    kw = dict(micro_batch=5, world_size=2, seed=11, num_workers=2, block_shards=2)
    reports = []
    for rank in range(2):
        ref = PretrainLoader(good, "train", rank=rank, **kw)
        ref_rows = rows_of(ref, 40)  # 200 / (5 x 2) = 20 batches per epoch
        got_loader = PretrainLoader(bad, "train", rank=rank, **kw)
        got = rows_of(got_loader, 40)
        healthy = [k for k in ref_rows if not k.startswith("train-000001-")]
        assert [k for k in got if not k.startswith("train-000001-")] == healthy  # order kept
        assert all(got[k] == ref_rows[k] for k in healthy)  # byte for byte
        damaged_keys = set(got) - set(healthy)
        assert damaged_keys <= set(ref_rows)  # what survives of the victim is its own, unaltered
        assert all(got[k] == ref_rows[k] for k in damaged_keys)
        lost = ref.delivered - got_loader.delivered
        report = got_loader.health_report()
        assert sum(report["corrupt"].values()) + report["missing"] == lost and report["read"] == ref.delivered
        reports.append(report)
    if kind == "garbage_member":  # sample 5 is read once per epoch, by one rank or the other
        assert sum(sum(r["corrupt"].values()) for r in reports) == 2 and all(r["damaged"] == {} for r in reports)
        return
    assert all(set(r["damaged"]) == {victim} and r["corrupt"] == {} for r in reports)
    found = reports[0]["damaged"][victim]["found"]
    assert reports[0]["damaged"][victim]["expected"] == 50
    assert sum(r["missing"] for r in reports) == 2 * (50 - found)  # two epochs of the lost samples
    assert found == {"cut_0.1%": 49, "cut_half": 25, "zero_byte": 0, "missing": 0, "garbage_header": 9}[kind]


def test_health_counts_each_loss_once_and_names_the_override():
    from data.health import DataHealth, shard_budget

    h = DataHealth(max_bad_samples=10, max_bad_fraction=0.001, max_bad_shards=1)
    b_cut = {"problem": "ReadError: unexpected end of data", "found": 95, "expected": 100}
    two_ranks = [{"read": 40, "corrupt": {"a": 2}, "missing": 3, "opened": {"a": 100, "b": 100}, "damaged": {"b": b_cut}},
                 {"read": 40, "corrupt": {"a": 1}, "missing": 2, "opened": {"a": 100, "b": 100, "c": 100},
                  "damaged": {"b": b_cut}}]
    h.add_reports(two_ranks)
    h.add_reports(two_ranks)  # the same reports again (merged at a later step): nothing counts twice
    assert (h.missing, len(h.damaged), sum(h.opened.values()), h.corrupt) == (5, 1, 300, 3)  # b counted once
    msg = h.verdict()
    assert "5 of the 300 samples of the shards read so far are missing (1.667%)" in msg
    assert "more than data.max_bad_fraction=0.001" in msg and "b (ReadError: unexpected end of data)" in msg
    assert "data.max_bad_fraction=0.0167 data.max_bad_shards=1" in msg and "--verify" in msg
    h.max_bad_fraction = 0.02
    assert h.verdict() is None
    two_ranks[1]["corrupt"] = {"a": 1, "c": 8}
    h.add_reports(two_ranks)
    assert "11 corrupt samples" in h.verdict() and "data.max_bad_samples=11" in h.verdict()
    # it survives a checkpoint; after a resume the new start's counts add to the old ones
    again = DataHealth(10, 0.02, 1)
    again.load_state_dict(h.state_dict())
    assert again.corrupt == 11 and again.suspects() == ["a", "b", "c"]
    again.add_reports([{"corrupt": {"c": 2}, "opened": {"d": 50}, "damaged": {}}])
    assert again.corrupt == 13 and again.missing == 5 and set(again.opened) == {"a", "b", "c", "d"}
    again.forget(["b", "c"])  # replaced: their losses no longer count, the others' do
    assert (again.corrupt, again.missing, again.suspects(), again.verdict()) == (3, 0, ["a"], None)
    again.add_reports([{"corrupt": {"c": 2}, "opened": {}, "damaged": {}}])  # later reports: c's forgotten past
    assert again.corrupt == 5                                                 # stays forgotten
    assert shard_budget(6, None) == 1 and shard_budget(500, None) == 5 and shard_budget(500, 0) == 0


# ---------------------------------------------------------------------------------------------------
def test_dynamic_masking_rules_and_determinism(shard_dir, oracle):
    B = 10
    stored = take(PretrainLoader(shard_dir, "train", B, seed=9, num_workers=0), 20)
    dyn = take(PretrainLoader(shard_dir, "train", B, seed=9, num_workers=0, dynamic_masking=True), 40)
    assert [b["keys"] for b in dyn[:20]] == [b["keys"] for b in stored]  # same order, only masks differ
    changed, counts = 0, np.zeros(3)
    for batch in dyn:
        for i, k in enumerate(batch["keys"]):
            d = oracle[k]
            orig = masking.restore_original(d["input_ids"], d["masked_lm_positions"], d["masked_lm_ids"])
            n = len(orig)
            p = int(batch["masked_lm_weights"][i].sum())
            pos = batch["masked_lm_positions"][i, :p].numpy()
            assert p == masking.num_to_predict(n, MAX_PRED, 0.15)
            assert (np.diff(pos) > 0).all() and not np.isin(orig[pos], [CLS, SEP]).any()
            assert (batch["masked_lm_ids"][i, :p].numpy() == orig[pos]).all()
            inp = batch["input_ids"][i, :n].numpy()
            keep = np.ones(n, bool)
            keep[pos] = False
            assert (inp[keep] == orig[keep]).all()  # only the chosen positions differ from the original
            counts += [(inp[pos] == MASK).sum(), (inp[pos] == orig[pos]).sum(), 0]
            counts[2] += p
            changed += not np.array_equal(pos, d["masked_lm_positions"])
    assert changed > 300  # fresh positions, not the stored ones
    mask_frac, keep_frac = counts[0] / counts[2], counts[1] / counts[2]
    # ~2,000 predictions: 80% [MASK] (sd ~0.9%), 10% kept + 10% random that hits the same id 1/120 of the time
    assert abs(mask_frac - 0.8) < 0.04 and abs(keep_frac - 0.1) < 0.03
    # epoch 2 re-draws different masks for the same sample; a fresh loader reproduces everything
    again = take(PretrainLoader(shard_dir, "train", B, seed=9, num_workers=2, dynamic_masking=True), 40)
    assert_same_batches(again, dyn)
    e0 = {k: b["masked_lm_positions"][i].tolist() for b in dyn[:20] for i, k in enumerate(b["keys"])}
    e1 = {k: b["masked_lm_positions"][i].tolist() for b in dyn[20:] for i, k in enumerate(b["keys"])}
    assert sum(e0[k] != e1[k] for k in e0) > 150


def test_dynamic_masking_resume(shard_dir):
    mk = lambda: PretrainLoader(shard_dir, "train", 7, world_size=2, rank=1, seed=4,  # noqa: E731
                                num_workers=2, dynamic_masking=True)
    ref = take(mk(), 20)
    a = mk()
    head = take(a, 9)
    b = mk()
    b.load_state_dict(a.state_dict())
    assert_same_batches(head + take(b, 11), ref)


# ---------------------------------------------------------------------------------------------------
def test_shards_of_other_tools_read_as_webdataset_reads_them(tmp_path):
    """The one tar reader is webdataset's: pax/GNU long names, directories, several members per sample."""
    p = tmp_path / "other.tar"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        with tarfile.open(p, mode="w", format=fmt) as tf:
            d = tarfile.TarInfo("dir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            for key, exts in (("a" * 120 + "/s1", ("bin", "json")), ("s2", ("bin",)), ("dir/s3", ("Bin", "txt"))):
                for ext in exts:
                    payload = f"{key}.{ext}".encode() * 3
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
        scan = ds.ShardScan(str(p))
        raws = list(ds.iter_samples(str(p), scan))
        assert scan.error is None and scan.samples == 3 and scan.describe(3) is None
        assert [r["__key__"] for r in raws] == ["a" * 120 + "/s1", "s2", "dir/s3"]
        assert raws[0]["json"] == ("a" * 120 + "/s1.json").encode() * 3
        assert set(raws[2]) - {"__url__"} == {"__key__", "bin", "txt"}  # extensions lower-cased


# ---------------------------------------------------------------------------------------------------
# Skips: ranges of the stream passed over (trainer.rollback), part of the order and of the state


def test_a_skipped_range_is_the_unskipped_order_without_it(shard_dir):
    """Skipping stream range [16, 40) of world 2 x micro 4: the batches are the plain order's with those samples
    left out, across an epoch end (200 samples -> 200 used per epoch at global batch 8); ids match the plan's."""
    plain = [take(PretrainLoader(shard_dir, "train", 4, rank=r, world_size=2, num_workers=0, seed=3), 60)
             for r in range(2)]
    stream = [k for j in range(60) for i in range(4) for k in (plain[0][j]["keys"][i], plain[1][j]["keys"][i])]
    want = stream[:16] + stream[40:]
    for workers in (0, 2):
        got = []
        loaders = [PretrainLoader(shard_dir, "train", 4, rank=r, world_size=2, num_workers=workers, seed=3)
                   for r in range(2)]
        for loader in loaders:
            loader.skip([(16, 40), (30, 32)])  # merged into one range
            assert loader.skips == [(16, 40)]
        batches = [take(loader, 54) for loader in loaders]
        got = [k for j in range(54) for i in range(4) for k in (batches[0][j]["keys"][i], batches[1][j]["keys"][i])]
        assert got == want[:len(got)], workers
    ids = loaders[0].ids_at(np.arange(0, 208)).tolist()  # the plan's answer, without reading a shard
    got_ids = [i for j in range(26) for k in range(4) for i in (batches[0][j]["ids"][k], batches[1][j]["ids"][k])]
    assert got_ids == ids[:len(got_ids)] and len(set(ids[:176])) == 176  # epoch 0: 200 - 24 skipped


def test_skips_travel_in_the_state_and_resume_on_another_world_size(shard_dir):
    """The state holds the skips and the stream position; a loader of one rank resumes the two-rank one at the
    same sample, past the skipped range, and a state without skips (an older checkpoint) still loads."""
    a = PretrainLoader(shard_dir, "train", 4, rank=0, world_size=2, num_workers=0, seed=3)
    a.skip([(8, 24)])
    take(a, 2)  # logical 16 -> stream 32
    sd = a.state_dict()
    assert sd["skips"] == [[8, 24]] and sd["sample_in_epoch"] == 32 and sd["samples_seen"] == 16
    one = PretrainLoader(shard_dir, "train", 8, num_workers=0, seed=3, global_batch=8)
    one.load_state_dict(sd)
    ref = PretrainLoader(shard_dir, "train", 8, num_workers=0, seed=3, global_batch=8)
    ref.load_state_dict({**sd, "skips": [], "sample_in_epoch": 32})
    assert_same_batches(take(one, 3), take(ref, 3))
    old = {k: v for k, v in sd.items() if k != "skips"}
    fresh = PretrainLoader(shard_dir, "train", 8, num_workers=0, seed=3, global_batch=8)
    fresh.load_state_dict(old)
    assert fresh.skips == [] and fresh.position == 32
