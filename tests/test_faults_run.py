"""Fault matrix, the run folder: each row is a fault a user meets and the outcome the project promises.

Outcomes: "refused with message M, run folder byte-identical" (every file's SHA-256 before and after), "took
over and resumed from tag T", "set aside, nothing deleted". Rows that start training processes reuse the
session's 8-step run (tests/conftest.py ``eval_run``: 1 process, ZeRO-2), copied per row so rows never share
a folder. Helpers are prefixed ``frun_`` so this module can be merged with its sibling fault modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, base_env, start_ranks, write_ds, write_run

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
