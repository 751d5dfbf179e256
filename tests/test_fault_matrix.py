"""The fault matrix: every ordinary fault a month-long run meets, one row each, with the outcome it must have.

Four tables, one per part of the promise "nothing lost, nothing run" (docs/reliability.md says the same in a
user's words); each row is a parametrized case named after its fault:

=================  ==========================================  ============================================
table              faults                                      outcome of every row
=================  ==========================================  ============================================
``CKF_ROWS``       crafted pickles, empty/dangling/garbled     resumed from tag T / refused naming the file
                   ``latest``, damaged tags, kill -9 and disk  (the payload never ran) / loaded tag T /
                   full during a save, retention, conversion   kept
``DMG_ROWS``       record fields out of range, non-UTF-8       one sample or one shard counted as damage
                   names, gzip/oversized/FIFO/symlinked        (loader and ``data.inspect --verify`` agree)
                   shards, manifests naming outside files      / refused naming the manifest and field
run folder rows    changed model/tokenizer on resume, earlier  refused with the run folder byte-identical /
                   work, a live or stale lock, bad config      took over and resumed / set aside, nothing
                   values, ``MAX_RESTARTS``                    deleted / refused naming the key
``SIGROW_ROWS``    Ctrl-C / ``kill -TERM -PGID`` / launcher    both ranks save one step, exit 0, and the
                   SIGTERM in start-up, step, validation, save resume reproduces an uninterrupted run
=================  ==========================================  ============================================

Rows that start training reuse the session's runs (tests/conftest.py) copied per row, so rows never share a
folder. Each table's helpers carry its prefix (``ckf_``, ``dmg_``, ``frun_``, ``sigrow_``).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from common.errors import DataError
from data import shards as ds
from data.inspect import main as dmg_inspect_main
from data.loader import PretrainLoader
from helpers import REPO, base_env, start_ranks, train_records, write_ds, write_run
from trainer.dist import free_port


# =============================================================================================================
# Checkpoints
#
# Outcomes: Resumed(tag) (the resume a restart makes picks exactly that tag: Checkpointer.plan, which
# launcher/pretrain.py calls, or the real launcher's log line), Refused(fragments) (one `error:` line, exit 2,
# naming the file; a crafted pickle's payload never ran), Loaded(tag) (a one-process reader got the weights of
# that tag). Runs come from the session fixtures (eval_run: 1-process ZeRO-2, step_0000008) and one small
# module run with two tags (steps 2 and 4); the faults that need a save in progress use a real DeepSpeed engine
# in a worker process (CKF_WORKER).
# =============================================================================================================

CKF_EXPORT = REPO / "launcher" / "export_hf.py"
CKF_EVALUATE = REPO / "launcher" / "evaluate.py"
CKF_FINETUNE = REPO / "launcher" / "finetune.py"
CKF_PRETRAIN = REPO / "launcher" / "pretrain.py"
CKF_MODEL_STATES = "mp_rank_00_model_states.pt"
CKF_OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


# ---------------------------------------------------------------------------------------------------
# Outcomes


@dataclass(frozen=True)
class Resumed:
    tag: str


@dataclass(frozen=True)
class Refused:
    fragments: tuple


@dataclass(frozen=True)
class Loaded:
    tag: str


@dataclass(frozen=True)
class Kept:
    tags: tuple


@dataclass
class CkfCase:
    """What a row's fault and action work on: a private copy of a run, the shards, a scratch folder."""

    run: Path
    shards: str
    tmp: Path
    marker: Path  # created by a crafted pickle's payload if it ever runs

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints"


def ckf_cli(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=base_env(), timeout=timeout, cwd=REPO)


def ckf_assert_refused(p, fragments):
    if isinstance(p, str):  # an in-process refusal: the UserError's message
        assert "\n" not in p.strip(), p
        for frag in fragments:
            assert frag in p, (frag, p)
        return
    assert p.returncode == 2, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-2000:]}\nSTDERR\n{p.stderr[-4000:]}"
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:") or "] error:" in ln]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])


# ---------------------------------------------------------------------------------------------------
# Faults


class CkfEvil:
    """An object whose unpickling runs a shell command (what a crafted checkpoint carries)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def ckf_fix_marker(tag_dir: Path) -> None:
    """A crafted checkpoint comes with a completion marker that matches it (the attacker writes both)."""
    marker = tag_dir / "checkpoint_complete.json"
    if marker.exists():
        listed = json.loads(marker.read_text())
        listed["files"] = {rel: (tag_dir / rel).stat().st_size for rel in listed["files"]}
        marker.write_text(json.dumps(listed))


def ckf_evil(name):
    def fault(c: CkfCase):
        tag_dir = c.ckpt / "step_0000008"
        path = tag_dir / name
        state = torch.load(path, map_location="cpu", weights_only=False)  # the genuine file, made by the fixture
        state["payload"] = CkfEvil(c.marker)
        torch.save(state, path)
        ckf_fix_marker(tag_dir)
        return path
    return fault


def ckf_latest(content: bytes):
    def fault(c: CkfCase):
        (c.ckpt / "latest").write_bytes(content)
    return fault


def ckf_damage_newest(kind):
    def fault(c: CkfCase):
        path = c.ckpt / "step_0000004" / CKF_OPTIM_STATES
        if kind == "missing":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return fault


def ckf_no_fault(c: CkfCase):
    return None


# ---------------------------------------------------------------------------------------------------
# Actions: each returns the outcome it observed


def ckf_plan(c: CkfCase):
    """What a restart of the run resumes from: resolve_resume + Checkpointer.plan, as launcher/pretrain.py."""
    from trainer import checkpoint

    resume = checkpoint.resolve_resume("auto", str(c.ckpt))
    assert resume is not None, "the run would start from step 0"
    return Resumed(checkpoint.Checkpointer(str(c.ckpt), 3, {}, log=lambda m: None).plan(resume).tag)


def ckf_pretrain_resume(c: CkfCase):
    cfg = c.tmp / "resume.yaml"
    ds = write_ds(c.tmp, micro=4, fp16=False)
    shutil.copy(c.run / "config.yaml", cfg)
    p = ckf_cli(CKF_PRETRAIN, "--deepspeed", ds, "--config", cfg, f"train.output_dir={c.run}")
    if p.returncode == 2:
        return p
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(ln for ln in p.stdout.splitlines() if "resumed from" in ln)
    return Resumed(line.split("resumed from ")[1].split(" at step")[0].rsplit("/", 1)[1])


def ckf_pretrain_init_from(c: CkfCase):
    ds = write_ds(c.tmp, micro=4, fp16=False)
    cfg = write_run(c.tmp, c.shards, c.tmp / "phase2", model={"max_position_embeddings": 64},
                    data={"num_workers": 0}, max_steps=1, init_from=str(c.ckpt))
    return ckf_cli(CKF_PRETRAIN, "--deepspeed", ds, "--config", cfg)


def ckf_export(c: CkfCase):
    p = ckf_cli(CKF_EXPORT, "--checkpoint", c.run, "--out", c.tmp / "hf")
    assert not (c.tmp / "hf").exists()  # refused or not: nothing half-written is left
    return p


def ckf_evaluate(c: CkfCase):
    return ckf_cli(CKF_EVALUATE, "--checkpoint", c.run, "--data", c.shards)


def ckf_finetune(c: CkfCase):
    ds = json.loads((REPO / "ds_configs" / "finetune.json").read_text())
    ds.pop("train_batch_size")
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    (c.tmp / "ft.json").write_text(json.dumps(ds))
    rows = "text,label\n" + "".join(f"word {i} good,{i % 2}\n" for i in range(8))
    (c.tmp / "train.csv").write_text(rows)
    (c.tmp / "dev.csv").write_text(rows)
    return ckf_cli(CKF_FINETUNE, "--deepspeed", c.tmp / "ft.json", "--model", c.run, "--train", c.tmp / "train.csv",
                   "--dev", c.tmp / "dev.csv", "--out", c.tmp / "ft")


def ckf_init_from_in_process(c: CkfCase):
    from bert import BertConfig, BertForPreTraining
    from trainer.checkpoint_read import load_weights

    model = BertForPreTraining(BertConfig.from_dict(json.loads((c.run / "model_config.json").read_text())))
    return Loaded(f"step_{load_weights(model, str(c.ckpt))['step']:07d}")


# A real DeepSpeed engine (1 process, ZeRO-2, fp32, a 1-layer BERT) saving through Checkpointer, with a fault
# armed after the first save: argv = mode, checkpoints folder.
CKF_WORKER = """
import builtins, errno, os, signal, sys
import torch
from bert import BertConfig, BertForPreTraining
from common.errors import UserError
from trainer import checkpoint, dist, rng
from trainer.engine import build_engine

mode, ckpt_dir = sys.argv[1], sys.argv[2]
dist.init()
cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=32)
torch.manual_seed(0)
engine = build_engine(BertForPreTraining(cfg), {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}})
meta = {"tokenizer_fingerprint": "ckf", "max_seq_len": 32, "model_config": cfg.to_dict()}
ckpt = checkpoint.Checkpointer(ckpt_dir, 2, meta)

class Position:  # the registered parts of a run: its counters, a loader's position, the RNG streams
    step = 0
    def state_dict(self):
        return {"step": self.step, "samples_seen": self.step, "tokens_seen": self.step}
    def load_state_dict(self, sd):
        self.step = sd["step"]

class Loader(Position):
    def state_dict(self):
        return {"epoch": 0, "sample_in_epoch": self.step}

counters, loader = Position(), Loader()
ckpt.register("trainer", counters)
ckpt.register("loader", loader, per_rank=True)
ckpt.register("rng", rng.Streams(), per_rank=True)

def state(step):
    counters.step = loader.step = step
    return step

def names_latest(path):
    return "latest" in os.path.basename(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else False

if mode == "resume":
    resume = ckpt.plan(checkpoint.resolve_resume("auto", ckpt_dir))
    print("loaded", resume.tag, ckpt.load(engine, resume)["step"])
    sys.exit(0)
if mode == "retention":  # an earlier run's newer tags, then this run's saves from step 1
    for step in (30, 40, 1, 2, 3):
        ckpt.save(engine, state(step))
    sys.exit(0)
ckpt.save(engine, state(1))
if mode == "kill_at_latest":  # SIGKILL right after a file named *latest* is opened for writing
    real_open, real_os_open = builtins.open, os.open
    def ckf_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if names_latest(file) and any(c in mode for c in "wax+"):
            os.kill(os.getpid(), signal.SIGKILL)
        return f
    def ckf_os_open(path, flags, *a, **k):
        fd = real_os_open(path, flags, *a, **k)
        if names_latest(path) and flags & (os.O_WRONLY | os.O_RDWR):
            os.kill(os.getpid(), signal.SIGKILL)
        return fd
    builtins.open, os.open = ckf_open, ckf_os_open
elif mode == "enospc":  # the disk fills while a ZeRO file is written: half of it lands, then ENOSPC
    real_save = torch.save
    def ckf_save(obj, f, *a, **k):
        if isinstance(f, str) and f.endswith("optim_states.pt"):
            with open(f, "wb") as out:
                out.write(b"PK" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
        return real_save(obj, f, *a, **k)
    torch.save = ckf_save
try:
    ckpt.save(engine, state(2))
except UserError as e:  # as every launcher reports it (common.errors.run_main): one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print("saved step 2")
"""


def ckf_worker(c: CkfCase, mode: str):
    script = c.tmp / "ckf_worker.py"
    script.write_text(CKF_WORKER)
    return subprocess.run([sys.executable, str(script), mode, str(c.ckpt)], capture_output=True, text=True,
                          env=base_env(PYTHONPATH=str(REPO)), timeout=300, cwd=REPO)


def ckf_killed_while_latest_is_replaced(c: CkfCase):
    p = ckf_worker(c, "kill_at_latest")
    assert p.returncode == -9, p.stderr[-3000:]


def ckf_disk_full_during_save(c: CkfCase):
    p = ckf_worker(c, "enospc")
    ckf_assert_refused(p, ("step_0000002", "No space left on device", "step_0000001"))
    assert not (c.ckpt / "step_0000002").exists()  # the partial save is invisible


def ckf_worker_resume(c: CkfCase):
    p = ckf_worker(c, "resume")
    assert p.returncode == 0, p.stderr[-3000:]
    _, tag, step = next(ln for ln in p.stdout.splitlines() if ln.startswith("loaded ")).split()
    assert tag == f"step_{int(step):07d}"
    return Resumed(tag)


def ckf_retention(c: CkfCase):
    p = ckf_worker(c, "retention")
    assert p.returncode == 0, p.stderr[-3000:]
    return Kept(tuple(sorted(t for t in os.listdir(c.ckpt) if t.startswith("step_"))))


def ckf_universal_past_its_bound(c: CkfCase):
    from common.errors import UserError
    from trainer.checkpoint import convert_to_universal

    try:
        convert_to_universal(str(c.ckpt / "step_0000008"), log=lambda m: None, timeout_s=0.01)
    except UserError as e:
        return str(e)
    return "converted"


def ckf_export_over_existing(c: CkfCase):
    out = c.tmp / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("a colleague's export")
    p = ckf_cli(CKF_EXPORT, "--checkpoint", c.run, "--out", out)
    assert sorted(os.listdir(out)) == ["mine.txt"] and (out / "mine.txt").read_text() == "a colleague's export"
    return p


# ---------------------------------------------------------------------------------------------------
# The table

@dataclass(frozen=True)
class CkfRow:
    name: str
    source: str  # "eval_run" (step_0000008 only), "two_tags" (step_0000002, step_0000004) or "empty"
    fault: object
    act: object
    expect: object


CKF_ROWS = [
    CkfRow("crafted pickle: export_hf", "eval_run", ckf_evil(CKF_MODEL_STATES), ckf_export,
           Refused((CKF_MODEL_STATES, "posix.system", "refused"))),
    CkfRow("crafted pickle in a ZeRO file: evaluate", "eval_run", ckf_evil(CKF_OPTIM_STATES), ckf_evaluate,
           Refused((CKF_OPTIM_STATES, "posix.system", "refused"))),
    CkfRow("crafted pickle: fine-tune model.path", "eval_run", ckf_evil(CKF_MODEL_STATES), ckf_finetune,
           Refused((CKF_MODEL_STATES, "posix.system", "refused"))),
    CkfRow("crafted pickle: train.init_from", "eval_run", ckf_evil(CKF_MODEL_STATES), ckf_pretrain_init_from,
           Refused((CKF_MODEL_STATES, "posix.system", "refused"))),
    CkfRow("crafted pickle in a ZeRO file: resume", "eval_run", ckf_evil(CKF_OPTIM_STATES), ckf_pretrain_resume,
           Refused((CKF_OPTIM_STATES, "posix.system", "refused"))),
    CkfRow("empty latest (a full quota while it was written)", "two_tags", ckf_latest(b""), ckf_pretrain_resume,
           Resumed("step_0000004")),
    CkfRow("dangling latest", "two_tags", ckf_latest(b"step_0000099"), ckf_plan, Resumed("step_0000004")),
    CkfRow("garbled latest", "two_tags", ckf_latest(b"\x00\x13\xff\xfe garbage"), ckf_plan, Resumed("step_0000004")),
    CkfRow("a rank's ZeRO file missing in the newest tag", "two_tags", ckf_damage_newest("missing"),
           ckf_pretrain_resume, Resumed("step_0000002")),
    CkfRow("a rank's ZeRO file truncated in the newest tag", "two_tags", ckf_damage_newest("truncated"), ckf_plan,
           Resumed("step_0000002")),
    CkfRow("train.init_from with an empty latest", "two_tags", ckf_latest(b""), ckf_init_from_in_process,
           Loaded("step_0000004")),
    CkfRow("kill -9 while latest is replaced", "empty", ckf_killed_while_latest_is_replaced, ckf_plan,
           Resumed("step_0000001")),
    CkfRow("disk full while a ZeRO file is written", "empty", ckf_disk_full_during_save, ckf_worker_resume,
           Resumed("step_0000001")),
    CkfRow("a run resumed from an older tag: retention", "empty", ckf_no_fault, ckf_retention,
           Kept(("step_0000002", "step_0000003", "step_0000030", "step_0000040"))),
    CkfRow("universal conversion past its bound", "eval_run", ckf_no_fault, ckf_universal_past_its_bound,
           Refused(("rank 0", "step_0000008", "universal conversion", "took over"))),
    CkfRow("export_hf into an existing folder", "eval_run", ckf_no_fault, ckf_export_over_existing,
           Refused(("exists", "--force"))),
]


@pytest.fixture(scope="module")
def ckf_two_tags(tmp_path_factory, train_shards):
    """A 1-process fp32 ZeRO-2 run of 4 steps saved at steps 2 and 4 (the real launcher)."""
    tmp = tmp_path_factory.mktemp("ckf_two_tags")
    ds = write_ds(tmp, micro=4, fp16=False)
    cfg = write_run(tmp, train_shards, tmp / "run", data={"num_workers": 0}, max_steps=4, save_every=2,
                    keep_checkpoints=3)
    p = ckf_cli(CKF_PRETRAIN, "--deepspeed", ds, "--config", cfg, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    shutil.copy(cfg, tmp / "run" / "config.yaml")  # the run's YAML as given (its resolved copy is beside it)
    return tmp / "run"


@pytest.mark.integration
@pytest.mark.parametrize("row", CKF_ROWS, ids=[r.name for r in CKF_ROWS])
def test_checkpoint_fault(row, request, tmp_path, train_shards):
    run = tmp_path / "run"
    if row.source == "empty":
        (run / "checkpoints").mkdir(parents=True)
    else:
        shutil.copytree(request.getfixturevalue("eval_run" if row.source == "eval_run" else "ckf_two_tags"), run)
    case = CkfCase(run=run, shards=train_shards, tmp=tmp_path, marker=tmp_path / "PAYLOAD_RAN")
    before = train_records(run) if (run / "metrics.jsonl").exists() else {}
    row.fault(case)
    got = row.act(case)
    assert not case.marker.exists(), "the crafted pickle's code ran"
    if isinstance(row.expect, Refused):
        ckf_assert_refused(got, row.expect.fragments)
    else:
        assert got == row.expect
    if isinstance(row.expect, Resumed) and before:  # nothing of the earlier run was lost: its logged steps are still there
        after = train_records(run)
        assert all(after[s]["loss"] == r["loss"] for s, r in before.items() if s <= int(row.expect.tag[5:]))


# =============================================================================================================
# Data: records, shards, manifests
#
# A fault written into a copy of the session's real shards (train_shards). A record that breaks a
# field's range is one corrupt sample and the rest of its block trains; a shard that is not a plain, bounded,
# regular tar file is one damaged shard (its samples from the damage on are missing); a manifest that names
# files outside its folder or counts below zero is refused naming the manifest and the field. Every row goes
# through the real loader (one eval pass over the split with 0 and with 1 worker) and through
# `python -m data.inspect --verify`, which must name exactly the shards and counts the loader skipped; the
# oracle for the keys is the standard library's tar reader on the pristine shards.
# =============================================================================================================

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


# =============================================================================================================
# The run folder, its lock, the run's settings
#
# Outcomes: "refused with message M, run folder byte-identical" (every file's SHA-256 before and after),
# "took over and resumed from tag T", "set aside, nothing deleted".
# =============================================================================================================

FRUN_PRETRAIN = REPO / "launcher" / "pretrain.py"
FRUN_TIMEOUT = 400  # bounds a start that hangs; a first FusedAdam JIT build may land inside any run


# ---------------------------------------------------------------------------------------------------
# Helpers


def frun_hashes(folder) -> dict[str, str]:
    """{relative path: SHA-256} of every file below ``folder`` (directories by their files)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def frun_copy_run(src, tmp_path, name="run") -> tuple[Path, Path, Path]:
    """A copy of a run folder, and its own resolved config.yaml / ds_config.json copied beside it as the
    inputs of the next start (so the start reads nothing it could write): (folder, config, ds)."""
    folder = Path(tmp_path) / name
    shutil.copytree(src, folder)
    cfg, ds = Path(tmp_path) / f"{name}_config.yaml", Path(tmp_path) / f"{name}_ds.json"
    shutil.copyfile(folder / "config.yaml", cfg)
    shutil.copyfile(folder / "ds_config.json", ds)
    return folder, cfg, ds


def frun_launch(procs, tmp_path, name, ds, cfg, *overrides, expect=None):
    """One process of launcher/pretrain.py to its end (bounded)."""
    return procs.run([sys.executable, FRUN_PRETRAIN, "--deepspeed", ds, "--config", cfg, *overrides],
                     Path(tmp_path) / name, env=base_env(), timeout=FRUN_TIMEOUT, expect=expect)


def frun_wait(cond, what, procs_alive, timeout=FRUN_TIMEOUT):
    """Poll ``cond`` until it holds; fail when a process ends first or the bound passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never saw {what}"
        assert all(p.poll() is None for p in procs_alive), f"a process ended before {what}"
        time.sleep(0.1)


def frun_dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def frun_lock_record(host, pid, heartbeat_age=0.0, job=None) -> dict:
    return {"host": host, "pid": pid, "slurm_job_id": job, "slurm_restart": 0, "token": f"t{pid}",
            "started": time.time() - heartbeat_age, "heartbeat": time.time() - heartbeat_age}


def frun_set_aside(folder) -> list[Path]:
    return sorted((Path(folder) / "earlier").glob("*")) if (Path(folder) / "earlier").is_dir() else []


# ---------------------------------------------------------------------------------------------------
# Rows without a process: configuration and the files a start writes


FRUN_CONFIG_ROWS = [  # (fault, overrides, the key the message must name)
    ("negative seed", ["train.seed=-1"], "train.seed"),
    ("infinite collective timeout", ["train.collective_timeout=.inf"], "train.collective_timeout"),
    ("NaN peak TFLOPS", ["train.peak_tflops=.nan"], "train.peak_tflops"),
    ("negative eval examples", ["train.eval_examples=-5"], "train.eval_examples"),
    ("a '#' that YAML would cut an int at", ["train.max_steps=10 #x"], "train.max_steps=10 #x"),
]


@pytest.mark.parametrize("fault, overrides, key", FRUN_CONFIG_ROWS, ids=[r[0] for r in FRUN_CONFIG_ROWS])
def test_invalid_config_value_is_refused_naming_the_key(tmp_path, fault, overrides, key):
    from trainer import config
    from trainer.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("data: {train: shards}\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(path), overrides)
    assert key in str(e.value)


def test_eval_max_batches_negative_is_refused_naming_the_key():
    from trainer import config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.max_batches"):
        config.load(None, ["eval.checkpoint=run", "eval.data=shards", "eval.max_batches=-1"], cls=config.EvalConfig)
    assert config.load(None, ["eval.checkpoint=run", "eval.data=shards", "eval.max_batches=0"],
                       cls=config.EvalConfig).eval.max_batches == 0  # 0 = the whole split, as documented


@pytest.mark.parametrize("lr", [0, -1e-3, float("inf")])
def test_non_positive_or_infinite_lr_is_refused_naming_the_key(lr):
    from trainer import engine
    from trainer.errors import ConfigError

    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["optimizer"]["params"]["lr"] = lr
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr must be a finite number > 0"):
        engine.validate(ds, "zero2.json", "cpu")


@pytest.mark.parametrize("override, key, want", [
    ("train.output_dir=runs/exp #2", "output_dir", "runs/exp #2"),  # YAML alone: 'runs/exp'
    ("train.output_dir=runs/a#b", "output_dir", "runs/a#b"),
    ("train.init_from=null", "init_from", None),
    ("train.init_from='ckpt #1'", "init_from", "ckpt #1"),
    ("train.max_steps=10", "max_steps", 10),
])
def test_override_strings_are_kept_as_typed(tmp_path, override, key, want):
    from trainer import config

    path = tmp_path / "run.yaml"
    path.write_text("data: {train: shards}\ntrain: {init_from: x}\n")
    assert getattr(config.load(str(path), [override]).train, key) == want


def test_resume_sets_abandoned_metrics_lines_aside(tmp_path):
    """Lines after the resumed step (and one cut by a kill -9) leave metrics.jsonl, which then reads as one
    uninterrupted run, and are kept in earlier/<time>/metrics.jsonl: every line still exists."""
    from trainer.metrics import MetricsWriter

    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 7)] + ['{"step": 7, "lo']
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    w = MetricsWriter(str(tmp_path), enabled=True, resume_step=3)
    w.record({"step": 4, "loss": 40.0})
    w.close()
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert kept == lines[:3] + [json.dumps({"step": 4, "loss": 40.0}) + "\n"]
    (aside,) = frun_set_aside(tmp_path)
    assert (aside / "metrics.jsonl").read_text() == "".join(lines[3:]) + "\n"


# ---------------------------------------------------------------------------------------------------
# The lock, in this process: holders live and dead


def test_lock_refuses_a_live_holder_naming_it_and_is_released(tmp_path):
    from trainer.lock import LOCK_NAME, RunFolderBusy, RunLock

    first = RunLock.acquire(str(tmp_path), log=lambda m: None)
    with pytest.raises(RunFolderBusy) as e:
        RunLock.acquire(str(tmp_path), log=lambda m: None)
    assert f"host {socket.gethostname()} pid {os.getpid()}" in str(e.value)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock.acquire(str(tmp_path), log=lambda m: None).release()


def test_lock_of_another_node_with_a_fresh_heartbeat_is_refused(tmp_path):
    from trainer.lock import LOCK_NAME, RunFolderBusy, RunLock

    holder = frun_lock_record("node-elsewhere", 4242, heartbeat_age=5, job="77")
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(RunFolderBusy, match="host node-elsewhere pid 4242, Slurm job 77"):
        RunLock.acquire(str(tmp_path), log=lambda m: None)
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == holder  # the live holder's lock is untouched


@pytest.mark.parametrize("fault, holder, reason", [
    ("holder's process gone on this host", lambda: frun_lock_record(socket.gethostname(), frun_dead_pid()),
     "no longer exists"),
    ("holder's node died (heartbeat stale)", lambda: frun_lock_record("node-elsewhere", 4242, heartbeat_age=3600),
     "heartbeat is older than"),
])
def test_stale_lock_is_taken_over_with_a_message(tmp_path, fault, holder, reason):
    from trainer.lock import LOCK_NAME, RunLock

    (tmp_path / LOCK_NAME).write_text(json.dumps(holder()))
    said = []
    lock = RunLock.acquire(str(tmp_path), log=said.append)
    assert len(said) == 1 and "took over the lock" in said[0] and reason in said[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_heartbeat_is_refreshed_while_held(tmp_path):
    from trainer.lock import LOCK_NAME, RunLock

    lock = RunLock.acquire(str(tmp_path), log=lambda m: None, heartbeat_s=0.05)
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    try:
        frun_wait(lambda: json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first, "a heartbeat", [],
                  timeout=60)
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------
# Rows with real starts of launcher/pretrain.py


@pytest.mark.parametrize("fault, overrides, fragments", [
    ("model shape changed on resume", ["model.num_hidden_layers=3"],
     ["model.num_hidden_layers is 2 in", "but 3 in this start"]),
])
def test_resume_with_a_fixed_setting_changed_is_refused_before_any_write(eval_run, tmp_path, procs, fault,
                                                                          overrides, fragments):
    folder, cfg, ds = frun_copy_run(eval_run, tmp_path)
    before = frun_hashes(folder)
    p = frun_launch(procs, tmp_path, "refused", ds, cfg, f"train.output_dir={folder}", *overrides, expect=2)
    assert "Traceback" not in p.stderr and "cannot resume" in p.stderr, p.stderr[-3000:]
    assert all(f in p.stderr for f in fragments), p.stderr[-3000:]
    assert frun_hashes(folder) == before


def test_resume_with_another_tokenizer_is_refused_before_any_write(eval_run, train_shards, train_shards_other_tok,
                                                                   tmp_path, procs):
    from data.shards import read_manifest

    folder, cfg, ds = frun_copy_run(eval_run, tmp_path)
    before = frun_hashes(folder)
    p = frun_launch(procs, tmp_path, "refused", ds, cfg, f"train.output_dir={folder}",
                    f"data.train={train_shards_other_tok}", "data.valid=null", expect=2)
    ours, theirs = (read_manifest(s)["tokenizer"]["fingerprint"] for s in (train_shards, train_shards_other_tok))
    assert ours != theirs and ours in p.stderr and theirs in p.stderr, p.stderr[-3000:]
    assert "tokenizer fingerprint" in p.stderr and "Traceback" not in p.stderr
    assert frun_hashes(folder) == before


def test_earlier_work_without_a_checkpoint_is_refused_not_overwritten(eval_run, tmp_path, procs):
    folder, cfg, ds = frun_copy_run(eval_run, tmp_path)
    shutil.move(folder / "checkpoints", tmp_path / "moved_checkpoints")  # e.g. moved away by hand
    before = frun_hashes(folder)
    p = frun_launch(procs, tmp_path, "refused", ds, cfg, f"train.output_dir={folder}", expect=2)
    assert "holds an earlier run" in p.stderr and "metrics.jsonl" in p.stderr and "train.resume=none" in p.stderr
    assert frun_hashes(folder) == before


def test_explicit_fresh_start_sets_the_earlier_run_aside(eval_run, tmp_path, procs):
    """train.resume=none over earlier work: the new run starts at step 0, and every file of the earlier one is
    kept, byte-identical, in earlier/<time>/."""
    folder, cfg, ds = frun_copy_run(eval_run, tmp_path)
    before = frun_hashes(folder)
    p = frun_launch(procs, tmp_path, "fresh", ds, cfg, f"train.output_dir={folder}", "train.resume=none",
                    "train.max_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.save_every=2",
                    expect=0)
    (aside,) = frun_set_aside(folder)
    assert f"moved to {aside}" in p.stdout
    assert frun_hashes(aside) == before
    assert (folder / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["max_steps"] == 2


def test_stale_lock_of_a_killed_run_is_taken_over_and_the_run_resumes(eval_run, tmp_path, procs):
    from trainer.lock import LOCK_NAME

    folder, cfg, ds = frun_copy_run(eval_run, tmp_path)
    (folder / LOCK_NAME).write_text(json.dumps(frun_lock_record(socket.gethostname(), frun_dead_pid())))
    p = frun_launch(procs, tmp_path, "takeover", ds, cfg, f"train.output_dir={folder}", "train.max_steps=9",
                    "train.eval_every=0", "train.eval_batches=1", expect=0)
    assert "took over the lock" in p.stdout and "no longer exists" in p.stdout
    assert f"resumed from {folder / 'checkpoints' / 'step_0000008'}" in p.stdout
    assert not (folder / LOCK_NAME).exists()  # released at exit


def test_second_run_into_a_live_folder_is_refused_at_once_on_every_rank(train_shards, tmp_path, procs):
    """A live 1-process run; a 2-rank start into its folder: both ranks refuse (rank 0 naming the holder),
    nothing of the live run changes, and it goes on to save and stop cleanly on its own checkpoints."""
    from trainer.lock import LOCK_NAME

    out = tmp_path / "live"
    ds = write_ds(tmp_path, micro=4)
    cfg = write_run(tmp_path, train_shards, out, data={"num_workers": 0}, max_steps=100000, save_every=5,
                    keep_checkpoints=100, eval_every=0, eval_batches=1)
    live = procs.start([sys.executable, FRUN_PRETRAIN, "--deepspeed", ds, "--config", cfg], tmp_path / "live")
    latest = out / "checkpoints" / "latest"
    frun_wait(lambda: latest.exists() and latest.read_text().strip(), "the live run's first checkpoint", [live])
    second = start_ranks(procs, tmp_path, ds, cfg, world=2, name="second")
    assert procs.wait(second, FRUN_TIMEOUT) == [2, 2]
    err0, err1 = (procs.output(r)[1] for r in second)
    assert f"in use by another run: host {socket.gethostname()} pid {live.pid}" in err0, err0[-3000:]
    assert "rank 0 refused the run folder" in err1 and "resumed from" not in procs.output(second[0])[0]
    assert live.poll() is None and json.loads((out / LOCK_NAME).read_text())["pid"] == live.pid
    live.send_signal(15)
    assert procs.wait([live], FRUN_TIMEOUT) == [0]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines: none repeated, none lost
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags == [f"step_{s:07d}" for s in range(5, steps[-1] + 1, 5)] + (
        [] if steps[-1] % 5 == 0 else [f"step_{steps[-1]:07d}"])
    assert not (out / LOCK_NAME).exists()


def frun_complete_tags(ckpts: Path) -> list[str]:
    """The published tags of ``ckpts`` whose completion marker lists both ranks' ZeRO files and every file it
    lists is on disk at its size (the checkpoint format's marker, read here independently of the trainer)."""
    done = []
    for tag in sorted(ckpts.glob("step_*")):
        marker = tag / "checkpoint_complete.json"
        files = json.loads(marker.read_text())["files"] if marker.exists() else {}
        both = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
        if both and all((tag / f).is_file() and (tag / f).stat().st_size == n for f, n in files.items()):
            done.append(tag.name)
    return done


def test_a_rank_killed_during_a_save_leaves_latest_on_a_complete_tag(train_shards, tmp_path, procs):
    """Two ranks save every 2 steps; rank 1 is killed (SIGKILL: node loss) as soon as a save's hidden folder
    appears. Rank 0 must end non-zero naming the failed collective (no hang); every published tag is complete,
    `latest` names the newest of them, the hidden folder never became a tag, and a restart resumes there."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ds = write_ds(tmp_path, micro=4)
    cfg = write_run(tmp_path, train_shards, out, data={"num_workers": 0}, max_steps=100000, save_every=2,
                    keep_checkpoints=100, eval_every=0, collective_timeout=60)
    ranks = start_ranks(procs, tmp_path, ds, cfg, world=2)
    frun_wait(lambda: (ckpts / "latest").exists() and any(ckpts.glob(".step_*")), "a save after the first one",
              ranks)
    ranks[1].kill()
    codes = procs.wait(ranks, FRUN_TIMEOUT)
    out0 = procs.output(ranks[0])
    assert codes[1] == -9 and codes[0] not in (0, -9), (codes, out0[1][-3000:])
    assert "[rank 0] error: a collective failed during " in out0[1], out0[1][-3000:]
    complete = frun_complete_tags(ckpts)
    assert complete and sorted(t.name for t in ckpts.glob("step_*")) == complete
    latest = (ckpts / "latest").read_text().strip()
    assert latest == complete[-1]
    step = int(latest.removeprefix("step_"))
    again = start_ranks(procs, tmp_path, ds, cfg, f"train.max_steps={step + 1}", world=2, name="again")
    assert procs.wait(again, FRUN_TIMEOUT) == [0, 0]
    assert f"resumed from {ckpts / latest} at step {step}" in procs.output(again[0])[0]


def test_shards_tokenizer_replaced_is_refused_naming_both_fingerprints(train_shards, train_shards_other_tok,
                                                                       tmp_path, procs):
    from data.shards import read_manifest
    from data.tokenizer import load_tokenizer

    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    shutil.rmtree(shards / "tokenizer")
    shutil.copytree(Path(train_shards_other_tok) / "tokenizer", shards / "tokenizer")
    out = tmp_path / "run"
    p = frun_launch(procs, tmp_path, "refused", write_ds(tmp_path), write_run(tmp_path, shards, out), expect=2)
    want = read_manifest(str(shards))["tokenizer"]["fingerprint"]
    got = load_tokenizer(str(shards / "tokenizer")).fingerprint
    assert want != got and want in p.stderr and got in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# Slurm: MAX_RESTARTS


@pytest.mark.integration
def test_max_restarts_not_a_number_is_refused_before_a_requeue(tmp_path):
    out = tmp_path / "phase1"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_0000002")
    (out / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 4}}))
    script = 'source "$REPO_DIR/slurm/common.sh"; after_training "$1" 0'
    env = base_env(REPO_DIR=str(REPO), MAX_RESTARTS="abc", SLURM_JOB_ID="1", SLURM_RESTART_COUNT="0",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", "-c", script, "bash", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "MAX_RESTARTS='abc' must be a non-negative integer" in p.stderr, p.stderr


# =============================================================================================================
# Stop signals in every phase
#
# A stop delivered as a terminal, a user or a scheduler delivers it, to a `deepspeed --num_gpus 2` run
# started in its own process group, in each phase of the run. Every row expects: both ranks exit 0, one
# checkpoint at the same step holds both ranks' files, and resuming it reproduces an uninterrupted run exactly
# (per-step losses, learning rates, sample keys). A second Ctrl-C ends at once. The deepspeed launcher reaps
# its ranks without reporting their exit status after a signal (it exits 1 itself), so each rank runs through
# a tiny module that records the status launcher/pretrain.py exits with.
# =============================================================================================================

SIGROW_TRAIN = dict(max_steps=18, warmup_steps=2, log_every=1, eval_every=4, eval_batches=None, save_every=3,
                    keep_checkpoints=3, log_batch_keys=True, collective_timeout=120)
SIGROW_COMPARED = ("loss", "mlm_loss", "nsp_loss", "lr", "keys", "samples_seen", "tokens_seen")
SIGROW_BOUND_S = 300  # a run that takes longer is a hang: the group is killed and the row fails
SIGROW_PROBE = '''"""A rank of launcher/pretrain.py that writes the status it exits with to $SIGROW_STATUS/rankR.exit."""
import os, runpy, sys
script = os.environ["SIGROW_PRETRAIN"]
sys.argv[0] = script
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    with open(os.path.join(os.environ["SIGROW_STATUS"], "rank%s.exit" % os.environ["RANK"]), "w") as f:
        f.write(str(e.code))
    raise
'''


def sigrow_launch(procs, tmp: Path, shards, name: str):
    """`deepspeed --num_gpus 2` on the run folder tmp/run, in a new session (a terminal's foreground group);
    returns (launcher process, status folder)."""
    ds = write_ds(tmp, micro=4, accum=1)
    cfg = write_run(tmp, shards, tmp / "run", **SIGROW_TRAIN)
    (tmp / "sigrow_rank.py").write_text(SIGROW_PROBE)
    status = tmp / f"status_{name}"
    status.mkdir()
    env = base_env(SIGROW_PRETRAIN=str(REPO / "launcher" / "pretrain.py"), SIGROW_STATUS=str(status),
                   PYTHONPATH=os.pathsep.join([str(tmp), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [Path(sys.executable).parent / "deepspeed", "--num_gpus", 2, "--master_port", free_port(), "--module",
           "sigrow_rank", "--deepspeed", ds, "--config", cfg]
    return procs.start(cmd, tmp / name, env=env), status


def sigrow_group_alive(pgid: int) -> list[psutil.Process]:
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def sigrow_wait_group(procs, launcher) -> None:
    """Until every process of the launcher's group (launchers, ranks, workers, fork servers) is gone."""
    deadline = time.monotonic() + SIGROW_BOUND_S
    while alive := sigrow_group_alive(launcher.pid):
        if time.monotonic() > deadline:
            left = [f"{p.pid} {p.name()} {' '.join(p.cmdline())[:160]}" for p in alive if p.is_running()]
            procs.kill_all()
            pytest.fail(f"the run's process group did not end within {SIGROW_BOUND_S}s; still alive:\n"
                        + "\n".join(left) + f"\n{sigrow_log(procs, launcher)}")
        time.sleep(0.1)
    launcher.wait()


def sigrow_log(procs, launcher) -> str:
    out, err = procs.output(launcher)
    return out + err


def sigrow_tracebacks(log: str) -> list[str]:
    """Tracebacks in the run's output, less the one DeepSpeed's own runner (the `deepspeed` command, not a
    rank) prints when a Ctrl-C interrupts its wait for the launcher."""
    found = log.split("Traceback (most recent call last):")[1:]
    return [tb for tb in found if not ("deepspeed/launcher/runner.py" in tb and "\nKeyboardInterrupt" in tb)]


def sigrow_until(cond, procs, launcher, what: str) -> None:
    deadline = time.monotonic() + SIGROW_BOUND_S
    while not cond():
        assert launcher.poll() is None, f"the run ended before {what}:\n{sigrow_log(procs, launcher)[-4000:]}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)


def sigrow_records(out: Path) -> dict:
    """step -> training record of a run that may still be writing (none yet: {})."""
    return train_records(out) if (out / "metrics.jsonl").exists() else {}


def sigrow_rank(launcher, rank: int) -> psutil.Process:
    for p in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(p.cmdline()):
            return p
    raise AssertionError(f"rank {rank} is not running")


def sigrow_in_validation(launcher) -> bool:
    """Rank 0 runs a validation pass: its validation loader's worker runs beside the training loader's."""
    try:
        kids = sigrow_rank(launcher, 0).children(recursive=True)
        return sum(k.name() == "pt_data_worker" for k in kids) >= 2
    except (AssertionError, psutil.Error):
        return False


def sigrow_next(every: int, after: int) -> int:
    """The first multiple of ``every`` after step ``after``."""
    return (after // every + 1) * every


def sigrow_reach(phase: str, procs, launcher, out: Path, after: int) -> None:
    """Wait until the run, resumed at step ``after``, is in ``phase`` (on log lines, files and processes)."""
    t = SIGROW_TRAIN
    if phase == "start-up":  # after the engine is built, before the first step
        sigrow_until(lambda: "[pretrain] model " in sigrow_log(procs, launcher), procs, launcher, "start-up")
    elif phase == "step":  # a step of this start; the rows put it where it is neither validation nor save
        sigrow_until(lambda: max(sigrow_records(out), default=0) > after, procs, launcher, f"a step after {after}")
    elif phase == "validation":
        v = sigrow_next(t["eval_every"], after)
        sigrow_until(lambda: v in sigrow_records(out) and sigrow_in_validation(launcher), procs, launcher,
                     f"validation at step {v}")
    elif phase == "save":  # every rank writes into a hidden folder, renamed to the tag once all are on disk
        hidden = f".step_{sigrow_next(t['save_every'], after):07d}.*"
        sigrow_until(lambda: any((out / "checkpoints").glob(hidden)), procs, launcher, f"a save ({hidden})")


def sigrow_deliver(how: str, launcher) -> None:
    if how == "ctrl-c":  # a terminal: SIGINT to the foreground group (launchers, ranks, workers)
        os.killpg(launcher.pid, signal.SIGINT)
    elif how == "kill-group":  # kill -TERM -PGID, `timeout`, a scheduler signalling the job's group
        os.killpg(launcher.pid, signal.SIGTERM)
    elif how == "launcher":  # SIGTERM to DeepSpeed's launcher only: the ranks hear it only from the launcher
        launch = [p for p in psutil.Process(launcher.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        launch[0].send_signal(signal.SIGTERM)
    elif how == "rank":  # one rank alone (a user's kill PID): the ranks must agree on stopping
        sigrow_rank(launcher, 1).send_signal(signal.SIGTERM)
    elif how == "rank-tree":  # one rank's process tree, its data workers included, as Slurm signals a task
        rank = sigrow_rank(launcher, 1)
        for p in [rank, *rank.children(recursive=True)]:
            p.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def sigrow_reference(train_shards, tmp_path_factory, session_procs):
    """Per-step records of the same run, uninterrupted."""
    tmp = tmp_path_factory.mktemp("sigrow_reference")
    launcher, status = sigrow_launch(session_procs, tmp, train_shards, "reference")
    sigrow_wait_group(session_procs, launcher)
    assert sorted(p.read_text() for p in status.iterdir()) == ["0", "0"], sigrow_log(session_procs, launcher)[-4000:]
    return sigrow_records(tmp / "run")


SIGROW_ROWS = [  # (how the stop is delivered, the phase it lands in), in the order the chain delivers them
    ("ctrl-c", "start-up"),  # acted upon at the first step boundary: tag 1
    ("ctrl-c", "step"),  # 2 (no validation, no save)
    ("ctrl-c", "validation"),  # 4
    ("ctrl-c", "save"),  # 6
    ("kill-group", "validation"),  # 8
    ("kill-group", "save"),  # 9
    ("launcher", "step"),  # 10 or 11
    ("rank", "step"),  # 12 or 13
    ("rank-tree", "step"),  # 14 or 15
]


@dataclass
class SigrowStop:
    """What one stopped start left: its ranks' exit statuses, its output, the step it trained to, the tag."""
    codes: dict
    log: str
    trained: int
    latest: str
    files: set


def sigrow_stop_once(procs, tmp: Path, shards, how: str, phase: str) -> SigrowStop:
    out = tmp / "run"
    after = max(sigrow_records(out), default=0)
    launcher, status = sigrow_launch(procs, tmp, shards, f"{how}-{phase}")
    sigrow_reach(phase, procs, launcher, out, after)
    sigrow_deliver(how, launcher)
    sigrow_wait_group(procs, launcher)
    trained = max(sigrow_records(out), default=0)
    tag = out / "checkpoints" / f"step_{trained:07d}"
    latest = out / "checkpoints" / "latest"
    return SigrowStop({p.name: p.read_text() for p in status.iterdir()}, sigrow_log(procs, launcher), trained,
                      latest.read_text().strip() if latest.exists() else "", set(os.listdir(tag)) if tag.is_dir() else set())


@pytest.fixture(scope="module")
def sigrow_chain(train_shards, tmp_path_factory, session_procs) -> dict:
    """One run folder, stopped once per row in row order, each start resuming the checkpoint of the stop
    before it (so every stop also tests the resume of the one before), then run to its end by a last start.
    {row: SigrowStop, or the message of the failure that broke the chain; "end": the last start's records}."""
    tmp = tmp_path_factory.mktemp("sigrow_chain")
    chain: dict = {}
    for how, phase in SIGROW_ROWS:
        try:
            chain[how, phase] = sigrow_stop_once(session_procs, tmp, train_shards, how, phase)
        except (AssertionError, pytest.fail.Exception) as e:
            chain[how, phase] = f"the chain broke at {how} in {phase}: {e}"
            return chain
    launcher, status = sigrow_launch(session_procs, tmp, train_shards, "end")
    sigrow_wait_group(session_procs, launcher)
    codes = sorted(p.read_text() for p in status.iterdir())
    chain["end"] = (codes, sigrow_records(tmp / "run"), sigrow_log(session_procs, launcher))
    return chain


@pytest.mark.integration
@pytest.mark.parametrize("how,phase", SIGROW_ROWS, ids=[f"{h}-{p}" for h, p in SIGROW_ROWS])
def test_a_stop_in_any_phase_saves_one_step_on_every_rank(how, phase, sigrow_chain, sigrow_reference):
    stop = sigrow_chain.get((how, phase), "not reached: an earlier row broke the chain")
    assert isinstance(stop, SigrowStop), stop
    log = stop.log
    assert stop.codes == {"rank0.exit": "0", "rank1.exit": "0"}, log[-5000:]
    assert sigrow_tracebacks(log) == [] and "collective failed" not in log, log[-5000:]
    assert stop.latest == f"step_{stop.trained:07d}", log[-3000:]
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= stop.files
    landed = {"start-up": "start-up", "step": "", "validation": "validation", "save": "checkpoint save"}[phase]
    assert f"during {landed}" in log, log[-3000:]  # it landed in the phase the row names
    if phase == "validation":
        assert f"step {stop.trained}: validation cut short by the stop" in log, log[-3000:]


@pytest.mark.integration
def test_resuming_every_stop_reproduces_the_uninterrupted_run(sigrow_chain, sigrow_reference):
    """The run stopped and resumed once per row trained exactly the uninterrupted run: per-step
    losses, learning rates and sample keys of every step."""
    assert "end" in sigrow_chain, [s for s in sigrow_chain.values() if isinstance(s, str)]
    codes, got, log = sigrow_chain["end"]
    assert codes == ["0", "0"], log[-4000:]
    assert sorted(got) == sorted(sigrow_reference)
    assert [(s, k) for s in got for k in SIGROW_COMPARED if got[s][k] != sigrow_reference[s][k]] == []


@pytest.mark.integration
def test_a_second_ctrl_c_ends_every_rank_at_once_without_saving(train_shards, tmp_path, procs):
    """The first Ctrl-C asks for a stop (start-up: it is acted upon at the first step boundary); the second,
    from the terminal again (not the launcher's forwarding), ends every rank at once, by SIGINT."""
    out = tmp_path / "run"
    launcher, status = sigrow_launch(procs, tmp_path, train_shards, "twice")
    sigrow_reach("start-up", procs, launcher, out, 0)
    os.killpg(launcher.pid, signal.SIGINT)
    sigrow_until(lambda: sigrow_log(procs, launcher).count("every rank saves at the next step boundary") == 2, procs,
                 launcher, "both ranks taking the first Ctrl-C")
    os.killpg(launcher.pid, signal.SIGINT)
    sigrow_wait_group(procs, launcher)
    log = sigrow_log(procs, launcher)
    assert log.count("second stop signal (SIGINT from ") == 2, log[-4000:]
    assert list(status.iterdir()) == []  # no rank returned an exit status: each was ended by the signal
    assert not (out / "checkpoints").exists()  # nothing was saved
