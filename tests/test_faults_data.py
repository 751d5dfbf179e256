"""Data faults, one row each: a fault written into a copy of the session's real shards (``train_shards``) and
what must follow. "A bad record is one lost sample": a record that breaks a field's range is one corrupt
sample and the rest of its block trains; a shard that is not a plain, bounded, regular tar file is one
damaged shard (its samples from the damage on are missing); a manifest that names files outside its folder or
counts below zero is refused with a message naming the manifest and the field.

Every row is checked through the real loader (``PretrainLoader``, one eval pass over the whole split with 0 and
with 1 worker: every position read once) and through ``python -m data.inspect --verify``, which must name
exactly the shards and counts the loader skipped. The oracle for the keys is the standard library's tar
reader on the pristine shards. Helpers carry a ``dmg_`` prefix (this module is to be merged with other fault
modules)."""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import shutil
import tarfile
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common.errors import DataError
from data import shards as ds
from data.inspect import main as dmg_inspect_main
from data.loader import PretrainLoader

DMG_VICTIM = 1  # the train shard a shard- or sample-level fault is written into (index in the manifest)
DMG_SAMPLE = 7  # the sample of the victim a record-level fault damages
DMG_BIG = 16 << 20  # bytes of the oversized member: 16 MiB, where the largest seq-64 record is ~0.5 KiB


# ---------------------------------------------------------------------------------------------------
# Writing faults into a copy
# ---------------------------------------------------------------------------------------------------
def dmg_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, data) of every member, read by the standard library (the oracle, independent of webdataset)."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def dmg_write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of ``members``; names may hold surrogate escapes, written as the raw (non-UTF-8) bytes they stand for."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, fileobj=io.BytesIO(data))


def dmg_shard(folder: Path, index: int = DMG_VICTIM) -> Path:
    return folder / ds.read_manifest(str(folder))["splits"]["train"]["shards"][index]["name"]


def dmg_edit_record(edit: Callable[[dict], dict]) -> Callable[[Path], None]:
    """A fault: sample DMG_SAMPLE of the victim re-encoded after ``edit`` changed its decoded fields (same
    length, so the member keeps its size and place)."""
    def fault(folder: Path) -> None:
        path = dmg_shard(folder)
        members = dmg_members(path)
        name, data = members[DMG_SAMPLE]
        d = edit(ds.decode_record(name, data))
        flags = data[1]
        rec = ds.encode_record(d["input_ids"], d["sep"], d["masked_lm_positions"], d["masked_lm_ids"],
                               d["next_sentence_label"], (flags >> 1) & 3, (flags >> 3) & 1)
        assert len(rec) == len(data)
        members[DMG_SAMPLE] = (name, rec)
        dmg_write_members(path, members)
    return fault


def dmg_sep(d: dict) -> int:
    return int(np.count_nonzero(d["segment_ids"] == 0)) - 1


def dmg_label_past_vocab(d: dict) -> dict:
    labels = d["masked_lm_ids"].copy()
    labels[0] = 1000  # vocab_size of train_shards: ids are 0..999
    return {**d, "sep": dmg_sep(d), "masked_lm_ids": labels}


def dmg_position_past_length(d: dict) -> dict:
    pos = d["masked_lm_positions"].copy()
    pos[-1] = len(d["input_ids"])
    return {**d, "sep": dmg_sep(d), "masked_lm_positions": pos}


def dmg_position_repeated(d: dict) -> dict:
    pos = d["masked_lm_positions"].copy()
    pos[1] = pos[0]  # still inside the sequence, but one token predicted twice and one not at all
    return {**d, "sep": dmg_sep(d), "masked_lm_positions": pos}


def dmg_segment_boundary(d: dict) -> dict:
    """Segment 1 starts after a token that is not [SEP]: segment ids that contradict the tokens."""
    sep, ids = dmg_sep(d), d["input_ids"]
    moved = next(j for j in range(1, len(ids) - 1) if j != sep and ids[j] != 3)  # 3 = [SEP]
    return {**d, "sep": moved}


def dmg_nsp_label_two(folder: Path) -> None:
    """The record's flags byte with the bit above the 1-bit NSP field set as well: an NSP label of 2 (or 3) as it
    can reach bytes of this format."""
    path = dmg_shard(folder)
    members = dmg_members(path)
    name, data = members[DMG_SAMPLE]
    members[DMG_SAMPLE] = (name, data[:1] + bytes([data[1] | 0x10]) + data[2:])
    dmg_write_members(path, members)


def dmg_non_utf8_name(folder: Path) -> None:
    path = dmg_shard(folder)
    members = dmg_members(path)
    name, data = members[DMG_SAMPLE]
    members[DMG_SAMPLE] = (name.replace(".bin", "\udcff.bin"), data)  # written as the byte 0xff
    dmg_write_members(path, members)


def dmg_gzip(folder: Path) -> None:
    path = dmg_shard(folder)
    path.write_bytes(gzip.compress(path.read_bytes()))


def dmg_oversized_member(folder: Path) -> None:
    path = dmg_shard(folder)
    members = dmg_members(path)
    members[DMG_SAMPLE] = (members[DMG_SAMPLE][0], bytes(DMG_BIG))
    dmg_write_members(path, members)


def dmg_fifo(folder: Path) -> None:
    path = dmg_shard(folder)
    path.unlink()
    os.mkfifo(path)


def dmg_symlink_out(folder: Path) -> None:
    """The shard replaced by a symlink to an intact copy outside the folder."""
    path = dmg_shard(folder)
    outside = folder.parent / "elsewhere" / path.name
    outside.parent.mkdir()
    shutil.move(path, outside)
    path.symlink_to(outside)


def dmg_edit_manifest(edit: Callable[[Path, list[dict]], None]) -> Callable[[Path], None]:
    """A fault in manifest.json: ``edit`` changes the train shard entries (and may move files); the split's
    totals are recomputed, so only the edited field is wrong."""
    def fault(folder: Path) -> None:
        mpath = folder / ds.MANIFEST
        m = json.loads(mpath.read_text())
        train = m["splits"]["train"]
        edit(folder, train["shards"])
        train["samples"] = sum(sh["samples"] for sh in train["shards"])
        train["tokens"] = sum(sh["tokens"] for sh in train["shards"])
        mpath.write_text(json.dumps(m))
    return fault


def dmg_absolute(folder: Path, entries: list[dict]) -> None:
    entries[0]["name"] = str(folder / entries[0]["name"])  # the very same shard, by its absolute path


def dmg_dotdot(folder: Path, entries: list[dict]) -> None:
    shutil.move(folder / entries[0]["name"], folder.parent / entries[0]["name"])
    entries[0]["name"] = "../" + entries[0]["name"]


def dmg_subfolder(folder: Path, entries: list[dict]) -> None:
    (folder / "sub").mkdir()
    shutil.move(folder / entries[0]["name"], folder / "sub" / entries[0]["name"])
    entries[0]["name"] = "sub/" + entries[0]["name"]


def dmg_duplicate(folder: Path, entries: list[dict]) -> None:
    entries[2] = dict(entries[0])


def dmg_negative(folder: Path, entries: list[dict]) -> None:
    entries[0]["samples"] = -entries[0]["samples"]


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DmgRow:
    name: str
    fault: Callable[[Path], None]
    corrupt: tuple[int, ...] = ()  # samples of the victim counted corrupt (the rest of the block trains)
    found: int | None = None  # the victim is a damaged shard: samples read before the damage
    refused: str = ""  # the manifest is refused: this text follows "manifest.json: incomplete or invalid manifest: "
    reason: str = ""  # words the loader's log and --verify give for the loss
    key_suffix: str = ""  # what the fault appended to the damaged sample's key


DMG_ROWS = [
    DmgRow("label >= vocab", dmg_edit_record(dmg_label_past_vocab), corrupt=(DMG_SAMPLE,),
           reason="masked_lm_ids: label outside [0, 1000)"),
    DmgRow("position >= length", dmg_edit_record(dmg_position_past_length), corrupt=(DMG_SAMPLE,),
           reason=">= length"),
    DmgRow("position repeated", dmg_edit_record(dmg_position_repeated), corrupt=(DMG_SAMPLE,),
           reason="masked_lm_positions: not strictly increasing"),
    DmgRow("segment ids against the tokens", dmg_edit_record(dmg_segment_boundary), corrupt=(DMG_SAMPLE,),
           reason="input_ids: not [CLS] A [SEP] B [SEP]"),
    DmgRow("NSP label 2", dmg_nsp_label_two, corrupt=(DMG_SAMPLE,), reason="bad flags"),
    DmgRow("non-UTF-8 member name", dmg_non_utf8_name, corrupt=(DMG_SAMPLE,), reason="member name is not UTF-8",
           key_suffix="\udcff"),
    DmgRow("gzip-compressed shard", dmg_gzip, found=0, reason="gzip-compressed"),
    DmgRow("oversized member", dmg_oversized_member, found=DMG_SAMPLE, reason="a member larger than the largest record"),
    DmgRow("FIFO named as a shard", dmg_fifo, found=0, reason="a FIFO, not a tar file"),
    DmgRow("symlink out of the folder", dmg_symlink_out, found=0, reason="outside the shard folder"),
    DmgRow("absolute shard name", dmg_edit_manifest(dmg_absolute),
           refused="splits.train.shards[0].name '/"),
    DmgRow("'..' in a shard name", dmg_edit_manifest(dmg_dotdot),
           refused="splits.train.shards[0].name '../train-000000.tar' is not a plain file name"),
    DmgRow("folder in a shard name", dmg_edit_manifest(dmg_subfolder),
           refused="splits.train.shards[0].name 'sub/train-000000.tar' is not a plain file name"),
    DmgRow("duplicate shard name", dmg_edit_manifest(dmg_duplicate),
           refused="splits.train.shards[2].name 'train-000000.tar' is listed twice (also at splits.train.shards[0])"),
    DmgRow("negative sample count", dmg_edit_manifest(dmg_negative),
           refused="splits.train.shards[0].samples -300 is not a non-negative integer"),
]


# ---------------------------------------------------------------------------------------------------
# Observing
# ---------------------------------------------------------------------------------------------------
class DmgFifoWatch:
    """Records whether anyone opened ``path`` (a FIFO) for reading: a writer's non-blocking open succeeds only
    while a reader has it open (else ENXIO). It also releases such a reader (the writer closes at once: the
    reader sees end of file), so code that opens the FIFO fails this test instead of hanging it."""

    def __init__(self, path: Path):
        self.path, self.opened, self._stop = path, False, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
                self.opened = True
            except OSError as e:
                assert e.errno == errno.ENXIO, e

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def dmg_loader_pass(folder: Path, workers: int) -> tuple[set[str], dict]:
    """Keys of one pass over the whole train split (eval mode: every position once) and the loader's report."""
    loader = PretrainLoader(folder, "train", 8, num_workers=workers, seed=5, shuffle=True, loop=False,
                            block_shards=2, timeout_s=120)
    keys = [k for b in loader if not b["is_padding"] for k in b["keys"]]
    assert len(keys) == len(set(keys))
    return set(keys), loader.health_report()


def dmg_verify(folder: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    rc = dmg_inspect_main([str(folder), "--verify", "--json"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def dmg_oracle(train_shards):
    """shard name -> keys in stored order, of the pristine shards, by the standard library's tar reader."""
    m = ds.read_manifest(train_shards)
    return {sh["name"]: [n[:-len(".bin")] for n, _ in dmg_members(Path(train_shards) / sh["name"])]
            for sh in m["splits"]["train"]["shards"]}


@pytest.fixture
def dmg_copy(train_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(train_shards, folder)
    return folder


@pytest.mark.parametrize("row", DMG_ROWS, ids=[r.name for r in DMG_ROWS])
def test_data_fault(row, dmg_copy, dmg_oracle, capsys, caplog):
    row.fault(dmg_copy)
    if row.refused:
        dmg_check_refused(row, dmg_copy, capsys)
        return
    names = list(dmg_oracle)
    victim = names[DMG_VICTIM]
    lost = {dmg_oracle[victim][i] for i in row.corrupt}
    if row.found is not None:
        lost |= set(dmg_oracle[victim][row.found:])
    expect_keys = {k for ks in dmg_oracle.values() for k in ks} - lost
    expected_damaged = {} if row.found is None else {victim: (row.found, len(dmg_oracle[victim]))}
    watching = DmgFifoWatch(dmg_shard(dmg_copy)) if row.fault is dmg_fifo else contextlib.nullcontext()
    with watching as watch:
        for workers in (0, 1):
            caplog.clear()
            keys, report = dmg_loader_pass(dmg_copy, workers)
            # the rest of the block (and of the shard, for a sample) trains; only the declared samples are lost
            assert keys == expect_keys, (workers, sorted(lost ^ (expect_keys ^ keys))[:5])
            assert report["corrupt"] == ({victim: len(row.corrupt)} if row.corrupt else {})
            assert {n: (d["found"], d["expected"]) for n, d in report["damaged"].items()} == expected_damaged
            assert report["missing"] == sum(e - f for f, e in expected_damaged.values())
            assert row.reason in caplog.text and victim in caplog.text
        rc, verified = dmg_verify(dmg_copy, capsys)
    assert not (watch and watch.opened), "the FIFO was opened for reading"
    # --verify names exactly the shard the loader lost samples of, with the same counts
    assert rc == 1 and [r["name"] for r in verified["damaged"]] == [victim]
    (bad,) = verified["damaged"]
    assert bad["corrupt"] == len(row.corrupt) and row.reason in " ".join(bad["problems"])
    assert bad["samples"] == (row.found if row.found is not None else len(dmg_oracle[victim]))
    assert bad["corrupt_keys"] == [dmg_oracle[victim][i] + row.key_suffix for i in row.corrupt]
    if row.fault is dmg_oversized_member:  # read with bounded memory: tar never held the 16 MiB member
        tracemalloc.start()
        ds.verify_shard(str(dmg_shard(dmg_copy)), {"samples": 300, "tokens": 0},
                        ds.sample_limits(ds.read_manifest(str(dmg_copy))))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < DMG_BIG // 8, peak


def dmg_check_refused(row: DmgRow, folder: Path, capsys) -> None:
    """Loader and --verify refuse the folder with one message naming the manifest and the field."""
    where = f"{folder / ds.MANIFEST}: incomplete or invalid manifest: "
    with pytest.raises(DataError) as e:
        PretrainLoader(folder, "train", 8, num_workers=0)
    assert str(e.value).startswith(where + row.refused), str(e.value)
    capsys.readouterr()
    assert dmg_inspect_main([str(folder), "--verify"]) == 2
    err = capsys.readouterr().err
    assert where + row.refused in err and "Traceback" not in err
