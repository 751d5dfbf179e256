"""common.processes, the one way commands are run with a bound (GPU kit stages, signal drill, tests' Procs):
the bound ends the command's whole process group, children included, and a command gets its SIGTERM grace."""

import os
import sys
import time

from common import processes

# A parent that starts a child in its own process group and prints the child's pid, then waits.
PARENT = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
          " print(c.pid, flush=True); time.sleep(60)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its dead parent's heir) is gone
        return f.read().split(")")[-1].split()[0] != "Z"


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` ends within ``timeout`` (a SIGKILL takes effect a moment after it is sent)."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def wait_for_text(path, timeout=20.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} stayed empty"
        time.sleep(0.05)
    return path.read_text()


def test_a_finished_command_reports_its_status_and_output(tmp_path):
    log = tmp_path / "out.log"
    ended = processes.run([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], log, timeout=60)
    assert (ended.returncode, ended.timed_out) == (3, False)
    assert log.read_text() == "hi\n"


def test_the_bound_kills_the_whole_group_children_included(tmp_path):
    log = tmp_path / "parent.log"
    p = processes.start([sys.executable, "-c", PARENT], log)
    child = int(wait_for_text(log).split()[0])
    assert processes.wait_all([p], 0.5) is False  # still running at the bound
    processes.stop_group(p)
    assert p.returncode is not None and gone(child)


def test_sigterm_first_then_sigkill_after_the_grace(tmp_path):
    graceful = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True),"
                " sys.exit(0))); print('up', flush=True); time.sleep(60)")
    ended = processes.run([sys.executable, "-c", graceful], tmp_path / "g.log", timeout=2, grace=10)
    assert ended.timed_out and ended.returncode == 0  # it heard SIGTERM and exited by itself
    assert (tmp_path / "g.log").read_text() == "up\nsaved\n"
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    t0 = time.monotonic()
    ended = processes.run([sys.executable, "-c", deaf], tmp_path / "d.log", timeout=1, grace=1)
    assert ended.timed_out and ended.returncode == -9 and time.monotonic() - t0 < 20


def test_stop_group_also_ends_children_of_a_leader_that_is_gone(tmp_path):
    log = tmp_path / "orphan.log"
    leader = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              " print(c.pid, flush=True)")  # exits at once, leaving its child in the group
    p = processes.start([sys.executable, "-c", leader], log)
    assert processes.wait_all([p], 30)
    child = int(log.read_text().split()[0])
    assert alive(child)
    processes.stop_group(p)
    assert gone(child)
