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
    from trainer.checkpoint import load_weights

    model = BertForPreTraining(BertConfig.from_dict(json.loads((c.run / "model_config.json").read_text())))
    return Loaded(f"step_{load_weights(model, str(c.ckpt))['step']:07d}")


# ---------------------------------------------------------------------------------------------------
# The table

@dataclass(frozen=True)
class CkfRow:
    name: str
    source: str  # "eval_run" (step_0000008 only) or "two_tags" (step_0000002, step_0000004)
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
    source = request.getfixturevalue("eval_run" if row.source == "eval_run" else "ckf_two_tags")
    run = tmp_path / "run"
    shutil.copytree(source, run)
    case = CkfCase(run=run, shards=train_shards, tmp=tmp_path, marker=tmp_path / "PAYLOAD_RAN")
    before = train_records(run) if (run / "metrics.jsonl").exists() else {}
    row.fault(case)
    got = row.act(case)
    assert not case.marker.exists(), "the crafted pickle's code ran"
    if isinstance(row.expect, Refused):
        ckf_assert_refused(got, row.expect.fragments)
    else:
        assert got == row.expect
    if isinstance(row.expect, Resumed):  # nothing of the earlier run was lost: its logged steps are still there
        after = train_records(run)
        assert all(after[s]["loss"] == r["loss"] for s, r in before.items() if s <= int(row.expect.tag[5:]))
