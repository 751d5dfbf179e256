"""Stopping, for real processes: signals at random moments (the drill), a second signal, a rank whose data
dies, a rank that hangs. Every run ends by itself with a message naming the rank, the step and the phase;
nothing waits forever and nothing is left behind."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, base_env, start_ranks, train_records, write_ds, write_run
from trainer.dist import free_port

pytestmark = pytest.mark.integration
PRETRAIN = str(REPO / "launcher" / "pretrain.py")


def wait_for(cond, what, ranks, timeout=300):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never saw {what}"
        assert all(p.poll() is None for p in ranks), f"a rank ended before {what}"
        time.sleep(0.05)


def logged_steps(out):
    return sorted(train_records(out)) if (Path(out) / "metrics.jsonl").exists() else []


def test_drill_one_signal_to_one_rank_stops_with_a_checkpoint_and_resumes_exactly(train_shards, tmp_path, procs):
    """scripts/signal_drill.py, one run: a stop signal to a single rank (the others hear of it only through the
    per-step agreement) exits 0 with a checkpoint and resumes exactly. The other moments (the process group,
    validation, a save, start-up) are rows of tests/test_fault_matrix.py (SIGROW_ROWS); the full drill is run by hand."""
    report = tmp_path / "drill.json"
    p = procs.run([sys.executable, REPO / "scripts" / "signal_drill.py", "--shards", train_shards, "--out",
                   tmp_path / "drill", "--runs", "1", "--seed", "1", "--port", free_port(), "--json", report],
                  tmp_path / "drill", env=base_env(), timeout=1200, expect=None)
    res = json.loads(report.read_text())
    assert p.returncode == 0 and res["failed"] == 0 and res["hangs"] == 0, p.stdout[-4000:]
    assert [r["moment"] for r in res["results"]] == ["rank"]
    assert all(r["exit"] == [0, 0] and r["checkpoint"] for r in res["results"])


def test_second_sigterm_ends_the_process_at_once_unless_the_parent_forwards_it(tmp_path, procs):
    """The first SIGTERM asks for a stop; one from the parent (a launcher forwarding it) is the same stop; a
    second from anyone else (here `kill`, a child of the test) ends the process at once, by that signal."""
    script = tmp_path / "stop.py"
    script.write_text("import time\nfrom trainer.guards import StopFlag\ns = StopFlag()\ns.install()\nprint('ready', "
                      "flush=True)\nwhile True:\n    time.sleep(0.05)\n    print(s.requested, flush=True)\n")
    p = procs.start([sys.executable, script], tmp_path / "stop", env=base_env())
    wait_for(lambda: "ready" in procs.output(p)[0], "the handler", [p], timeout=60)
    subprocess.run(["kill", "-TERM", str(p.pid)], check=True)
    wait_for(lambda: "True" in procs.output(p)[0], "the stop flag", [p], timeout=30)
    p.send_signal(signal.SIGTERM)  # from the parent: the same stop
    wait_for(lambda: "part of the stop already under way" in procs.output(p)[1], "the forwarded one", [p], timeout=30)
    assert p.poll() is None  # neither ends it: the stop is taken at the next step
    subprocess.run(["kill", "-TERM", str(p.pid)], check=True)
    assert procs.wait([p], 30) == [-signal.SIGTERM]  # the second one ends it, by that signal


def test_a_dead_data_worker_on_one_rank_stops_every_rank_with_its_message(train_shards, tmp_path, procs):
    """Workers start from a fork server (never forked from the multi-threaded rank); when rank 1's worker dies,
    every rank stops at the same step, the last good state is saved, and the message names rank 1."""
    ds = write_ds(tmp_path, micro=4)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=400, log_every=1, save_every=1000)
    ranks = start_ranks(procs, tmp_path, ds, cfg)
    wait_for(lambda: len(logged_steps(out)) >= 3, "training", ranks)
    rank1 = psutil.Process(ranks[1].pid)
    workers = [c for c in rank1.children(recursive=True) if c.name() == "pt_data_worker"]
    assert workers and all(w.ppid() != rank1.pid for w in workers)  # forked by the fork server, not the rank
    workers[-1].kill()
    codes = procs.wait(ranks, 120)
    out0, err0 = procs.output(ranks[0])
    assert codes == [2, 2], err0[-3000:]
    stopped = max(logged_steps(out))
    assert f"stopping at step {stopped}: the data failed on 1 rank(s)" in err0 and "rank 1: " in err0
    assert "exited unexpectedly" in err0 and "Traceback" not in err0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"  # the last good state


def test_a_hung_rank_makes_the_other_time_out_naming_rank_step_and_phase(train_shards, tmp_path, procs):
    """SIGSTOP on rank 1 (a hang): rank 0's next collective times out after train.collective_timeout and it
    exits non-zero, saying which rank, step and phase, and the last good checkpoint."""
    ds = write_ds(tmp_path, micro=4)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=400, log_every=1, save_every=2, collective_timeout=8)
    ranks = start_ranks(procs, tmp_path, ds, cfg)
    wait_for(lambda: len(logged_steps(out)) >= 3, "training", ranks)
    os.killpg(ranks[1].pid, signal.SIGSTOP)
    t0 = time.monotonic()
    assert procs.wait([ranks[0]], 120) == [4]
    assert time.monotonic() - t0 < 60  # the bound, not forever
    err = procs.output(ranks[0])[1]
    assert "[rank 0] error: a collective failed during " in err and " at step " in err, err[-3000:]
    assert "last good checkpoint: " + str(out / "checkpoints" / "step_") in err
    os.killpg(ranks[1].pid, signal.SIGKILL)  # (the procs fixture would too)


# A rank's stand-in: stop signals set a flag (as trainer.guards.StopFlag does), and validation passes start
# fresh DataLoader workers from the fork server again and again. Prints the samples of every pass.
PASSES = """
import signal, sys
seen = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: seen.append(signum))
from data.loader import PretrainLoader
if __name__ == "__main__":
    loader = PretrainLoader(sys.argv[1], "valid", 2, num_workers=2, shuffle=False, loop=False)
    print("ready", flush=True)
    counts = [sum(b["input_ids"].shape[0] for b in loader if not b["is_padding"]) for _ in range(int(sys.argv[2]))]
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # exiting resets handlers to the default actions: not those
        signal.signal(sig, signal.SIG_IGN)
    print("passes", *counts, "signals", len(seen), flush=True)
"""


def test_stop_signals_to_the_group_while_workers_start_lose_no_worker(train_shards, tmp_path, procs):
    """SIGTERM and SIGUSR1 to the whole process group every few milliseconds, while a process starts DataLoader
    workers 40 times: the fork server and every worker, at any moment of its start, survive (a signal landing
    before a worker's init used to kill it: 'DataLoader worker exited unexpectedly' in validation)."""
    script = tmp_path / "passes.py"
    script.write_text(PASSES)
    p = procs.start([sys.executable, script, train_shards, 40], tmp_path / "passes", env=base_env())
    wait_for(lambda: "ready" in procs.output(p)[0], "the loader", [p], timeout=120)
    rng, sent = random.Random(0), 0
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        os.killpg(p.pid, rng.choice([signal.SIGTERM, signal.SIGUSR1]))
        sent += 1
        time.sleep(rng.uniform(0.002, 0.03))
    assert procs.wait([p], 30) == [0], procs.output(p)[1][-3000:]
    words = procs.output(p)[0].split("passes", 1)[1].split()
    counts, received = [int(w) for w in words[:40]], int(words[-1])
    expected = json.loads((Path(train_shards) / "manifest.json").read_text())["splits"]["valid"]["samples"]
    assert counts == [expected] * 40 and sent > 40 and received > 0  # every pass whole; the signals did arrive


# A rank's stand-in that keeps its DataLoader workers alive (mid-pass) until it is killed.
HOLDS_WORKERS = """
import sys, time
from data.loader import PretrainLoader
if __name__ == "__main__":
    it = iter(PretrainLoader(sys.argv[1], "valid", 2, num_workers=2, shuffle=False, loop=False))
    next(it)
    print("holding", flush=True)
    time.sleep(600)
"""


def test_workers_and_fork_server_end_when_their_rank_is_killed(train_shards, tmp_path, procs):
    """A rank killed outright (kill -9; a second Ctrl-C ends one by SIGINT, which workers ignore) must not leave
    its workers behind: their parent is the fork server, so torch's parent-pid check never fires, and the fork
    server in turn waits for its last worker. Everything the rank started ends within seconds."""
    import psutil

    script = tmp_path / "holds.py"
    script.write_text(HOLDS_WORKERS)
    p = procs.start([sys.executable, script, train_shards], tmp_path / "holds", env=base_env())
    wait_for(lambda: "holding" in procs.output(p)[0], "the workers", [p], timeout=120)
    helpers = psutil.Process(p.pid).children(recursive=True)  # tracker, fork server, 2 workers
    assert sum(h.name() == "pt_data_worker" for h in helpers) == 2, [h.name() for h in helpers]
    p.kill()
    p.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=30)
    assert alive == [], [f"{h.pid} {h.name()}" for h in alive]
