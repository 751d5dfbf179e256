"""Commands run with a bound: each in its own process group, output to files, ended group and all.

A launcher's ranks, their DataLoader workers and a compiler's children all inherit the process group of the
command that started them; ending only the command would leave them running (and holding ports, files and
a GPU). So every command starts in a new session, and ending it signals the whole group. The GPU kit's
stages (scripts/gpu_check.py), the signal drill and the tests' process helper (tests/helpers.Procs) all
run commands this one way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Ended:
    """How a bounded command ended: its exit status (None if it never ended), whether the bound fired."""

    returncode: Optional[int]
    timed_out: bool
    wall_s: float


def start(argv: Sequence, out: str | os.PathLike, err: str | os.PathLike | None = None, *,
          env: Optional[dict] = None, cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start ``argv`` (items made strings) in a new session, stdout to the file ``out`` and stderr to ``err``
    (None: into ``out`` as well)."""
    with open(out, "w") as fo, (open(err, "w") if err is not None
                                else contextlib.nullcontext(subprocess.STDOUT)) as fe:
        return subprocess.Popen([str(a) for a in argv], env=env, cwd=cwd, stdout=fo, stderr=fe,
                                start_new_session=True)


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> bool:
    """Wait for every process within one shared ``timeout``; False as soon as one is still running at it."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return True


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(p.pid, sig)


def stop_group(p: subprocess.Popen, grace: float = 0.0, reap_s: float = 30.0) -> None:
    """End ``p``'s whole process group: SIGTERM first when ``grace`` > 0 (time to save and exit cleanly),
    then SIGKILL to whatever is left, also when the leader has exited already (its children may not have);
    ``p`` is reaped within ``reap_s``."""
    if grace > 0 and p.poll() is None:
        _signal_group(p, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=grace)
    _signal_group(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=reap_s)


def run(argv: Sequence, log: str | os.PathLike, timeout: float, *, env: Optional[dict] = None,
        cwd: str | os.PathLike | None = None, grace: float = 10.0) -> Ended:
    """``argv`` to its end or to ``timeout`` seconds, its output (stdout and stderr) in the file ``log``; at the
    bound its group gets SIGTERM, and SIGKILL ``grace`` seconds later."""
    t0 = time.monotonic()
    p = start(argv, log, env=env, cwd=cwd)
    ended = wait_all([p], timeout)
    if not ended:
        stop_group(p, grace)
    return Ended(p.returncode, not ended, time.monotonic() - t0)
