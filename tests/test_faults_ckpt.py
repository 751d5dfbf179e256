"""Checkpoint fault matrix: each row is one fault a month-long run meets and the outcome it must have.

Outcomes: ``Resumed(tag)`` (the resume a restart makes picks exactly that tag: Checkpointer.plan, which
launcher/pretrain.py calls, or the real launcher's log line), ``Refused(fragments)`` (one ``error:`` line,
exit 2, naming the file; a crafted pickle's payload never ran), ``Loaded(tag)`` (a one-process reader got the
weights of that tag). Runs come from the session fixtures (``eval_run``: 1-process ZeRO-2, step_0000008) and
one small module run with two tags (steps 2 and 4); the faults that need a save in progress use a real
DeepSpeed engine in a worker process (``CKF_WORKER``).
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import REPO, base_env, train_records, write_ds, write_run

pytestmark = pytest.mark.integration

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

def state(step):
    return {"step": step, "samples_seen": step, "tokens_seen": step, "rng": rng.state(),
            "data_state": {"epoch": 0, "sample_in_epoch": step}}

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
