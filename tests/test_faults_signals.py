"""Fault matrix, stop signals: a stop delivered as a terminal, a user or a scheduler delivers it, to a
`deepspeed --num_gpus 2` run started in its own process group, in each phase of the run. Every row expects:
both ranks exit 0, one checkpoint at the same step holds both ranks' files, and resuming it reproduces an
uninterrupted run exactly (per-step losses, learning rates, sample keys). A second Ctrl-C ends at once.

The deepspeed launcher reaps its ranks without reporting their exit status after a signal (it exits 1
itself), so each rank runs through a tiny module that records the status launcher/pretrain.py exits with."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, base_env, write_ds, write_run
from trainer.dist import free_port

pytestmark = pytest.mark.integration

SIGROW_TRAIN = dict(max_steps=8, warmup_steps=2, log_every=1, eval_every=4, eval_batches=None, save_every=3,
                    keep_checkpoints=5, log_batch_keys=True, collective_timeout=120)
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
    while sigrow_group_alive(launcher.pid):
        if time.monotonic() > deadline:
            procs.kill_all()
            pytest.fail(f"the run's process group did not end within {SIGROW_BOUND_S}s:\n{sigrow_log(procs, launcher)}")
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
    path = out / "metrics.jsonl"
    recs = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "loss" in r:
            recs[r["step"]] = r
    return recs


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


def sigrow_reach(phase: str, procs, launcher, out: Path) -> None:
    """Wait until the run is in ``phase`` (on log lines, files and processes: no sleeps)."""
    t = SIGROW_TRAIN
    if phase == "start-up":  # after the engine is built, before the first step
        sigrow_until(lambda: "[pretrain] model " in sigrow_log(procs, launcher), procs, launcher, "start-up")
    elif phase == "step":  # step 1 is neither a validation nor a save step
        sigrow_until(lambda: 1 in sigrow_records(out), procs, launcher, "step 1")
    elif phase == "validation":
        sigrow_until(lambda: t["eval_every"] in sigrow_records(out) and sigrow_in_validation(launcher), procs,
                     launcher, "validation")
    elif phase == "save":  # every rank writes into a hidden folder, renamed to the tag once all are on disk
        tmp = f".step_{t['save_every']:07d}.*"
        sigrow_until(lambda: any((out / "checkpoints").glob(tmp)), procs, launcher, "a checkpoint save")


def sigrow_deliver(how: str, launcher) -> None:
    if how == "ctrl-c":  # a terminal: SIGINT to the foreground group (launchers, ranks, workers)
        os.killpg(launcher.pid, signal.SIGINT)
    elif how == "kill-group":  # kill -TERM -PGID, `timeout`, a scheduler signalling the job's group
        os.killpg(launcher.pid, signal.SIGTERM)
    elif how == "launcher":  # SIGTERM to DeepSpeed's launcher only: the ranks hear it only from the launcher
        launch = [p for p in psutil.Process(launcher.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        launch[0].send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def sigrow_reference(train_shards, tmp_path_factory, session_procs):
    """Per-step records of the same run, uninterrupted."""
    tmp = tmp_path_factory.mktemp("sigrow_reference")
    launcher, status = sigrow_launch(session_procs, tmp, train_shards, "reference")
    sigrow_wait_group(session_procs, launcher)
    assert sorted(p.read_text() for p in status.iterdir()) == ["0", "0"], sigrow_log(session_procs, launcher)[-4000:]
    return sigrow_records(tmp / "run")


ROWS = [  # (how the stop is delivered, the phase it lands in)
    ("ctrl-c", "start-up"),
    ("ctrl-c", "step"),
    ("ctrl-c", "validation"),
    ("ctrl-c", "save"),
    ("kill-group", "validation"),
    ("kill-group", "save"),
    ("launcher", "step"),
]


@pytest.mark.parametrize("how,phase", ROWS, ids=[f"{h}-{p}" for h, p in ROWS])
def test_a_stop_in_any_phase_saves_one_step_on_every_rank_and_resumes_exactly(how, phase, train_shards, tmp_path,
                                                                               procs, sigrow_reference):
    out = tmp_path / "run"
    launcher, status = sigrow_launch(procs, tmp_path, train_shards, "stopped")
    sigrow_reach(phase, procs, launcher, out)
    sigrow_deliver(how, launcher)
    sigrow_wait_group(procs, launcher)
    log = sigrow_log(procs, launcher)
    codes = {p.name: p.read_text() for p in status.iterdir()}
    assert codes == {"rank0.exit": "0", "rank1.exit": "0"}, log[-5000:]
    assert sigrow_tracebacks(log) == [] and "collective failed" not in log, log[-5000:]
    trained = max(sigrow_records(out), default=0)
    tag = f"step_{trained:07d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == tag, log[-3000:]
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(os.listdir(out / "checkpoints" / tag))
    landed = {"start-up": "start-up", "step": "", "validation": "validation", "save": "checkpoint save"}[phase]
    assert f"during {landed}" in log, log[-3000:]  # it landed in the phase the row names
    if phase == "validation":
        assert f"step {trained}: validation cut short by the stop" in log, log[-3000:]

    launcher, status = sigrow_launch(procs, tmp_path, train_shards, "resumed")
    sigrow_wait_group(procs, launcher)
    assert sorted(p.read_text() for p in status.iterdir()) == ["0", "0"], sigrow_log(procs, launcher)[-4000:]
    got = sigrow_records(out)
    assert sorted(got) == sorted(sigrow_reference)
    assert [(s, k) for s in got for k in SIGROW_COMPARED if got[s][k] != sigrow_reference[s][k]] == []


def test_a_second_ctrl_c_ends_every_rank_at_once_without_saving(train_shards, tmp_path, procs):
    """The first Ctrl-C asks for a stop (start-up: it is acted upon at the first step boundary); the second,
    from the terminal again (not the launcher's forwarding), ends every rank at once, by SIGINT."""
    out = tmp_path / "run"
    launcher, status = sigrow_launch(procs, tmp_path, train_shards, "twice")
    sigrow_reach("start-up", procs, launcher, out)
    os.killpg(launcher.pid, signal.SIGINT)
    sigrow_until(lambda: sigrow_log(procs, launcher).count("every rank saves at the next step boundary") == 2, procs,
                 launcher, "both ranks taking the first Ctrl-C")
    os.killpg(launcher.pid, signal.SIGINT)
    sigrow_wait_group(procs, launcher)
    log = sigrow_log(procs, launcher)
    assert log.count("second stop signal (SIGINT from ") == 2, log[-4000:]
    assert list(status.iterdir()) == []  # no rank returned an exit status: each was ended by the signal
    assert not (out / "checkpoints").exists()  # nothing was saved
