"""One writer per run folder: a lock file that works on a shared file system across nodes.

``RUN_DIR/run.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+,
unlike ``flock``, which NFS may not carry between nodes) and names its holder: host, pid, Slurm job id and
restart count, a random token, and a heartbeat (wall-clock seconds) that a thread of the holder rewrites every
``HEARTBEAT_S``. Rank 0 of a run takes it before anything is written; the other ranks learn rank 0's verdict
through a collective and never write on their own (trainer.pretrain).

A lock whose holder is gone is taken over, with a message naming it: the same host and a pid that no longer
exists, the same Slurm job at an earlier restart (Slurm ends a job before it requeues it), or a heartbeat
older than ``STALE_AFTER_S`` (a holder on another node that died with its node). 300 s is ten missed
heartbeats: clocks of a cluster's nodes agree to well under that, and a requeued job waits at most that long
for a crashed node's lock. Any other holder makes the start fail at once, naming it.

Takeover is race-free between two starters: the stale file is renamed to a name unique to the taker (only
one rename of it can succeed), then its token is checked; a taker that grabbed a fresh lock by mistake puts
it back with ``os.link`` (which, like ``O_EXCL``, never replaces an existing file) and refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from common import files
from common.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunFolderBusy(UserError):
    """Another live run holds the run folder."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "token": uuid.uuid4().hex,
            "started": time.time(), "heartbeat": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(holder: dict) -> str:
    """One phrase naming a holder, as a message shows it."""
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    age = time.time() - float(holder.get("heartbeat") or 0)
    return f"host {holder.get('host')} pid {holder.get('pid')}{job} (heartbeat {age:.0f}s ago)"


def stale_reason(holder: dict, me: dict, now: float, stale_after: float = STALE_AFTER_S) -> Optional[str]:
    """Why ``holder`` cannot be alive (None when it may be)."""
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"process {holder['pid']} no longer exists on {me['host']}"
    if (me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]
            and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]):
        return f"it is Slurm job {me['slurm_job_id']} before its requeue (restart {holder.get('slurm_restart')})"
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat > stale_after:
        return f"its heartbeat is older than {stale_after:.0f}s"
    return None


def _read(path: str) -> Optional[dict]:
    """The holder recorded in ``path`` (None when it is gone). A file not written yet (a starter between its
    create and its write) or garbled names nobody: its modification time stands in for the heartbeat, so it
    is stale only once that is older than the bound."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    return holder if isinstance(holder, dict) else {"heartbeat": mtime}


class RunLock:
    """The lock of one run folder, held by this process from ``acquire`` until ``release``."""

    def __init__(self, folder: str, me: dict, log: Callable[[str], None], heartbeat_s: float):
        self.folder, self.path, self.me, self.log = folder, os.path.join(folder, LOCK_NAME), me, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="run-lock-heartbeat",
                                        daemon=True)

    @classmethod
    def acquire(cls, folder: str, log: Callable[[str], None] = print, heartbeat_s: float = HEARTBEAT_S,
                stale_after: float = STALE_AFTER_S) -> "RunLock":
        """Take the lock of ``folder`` (which must exist), taking over a stale one; RunFolderBusy names a live
        holder."""
        lock = cls(folder, _me(), log, heartbeat_s)
        for _ in range(3):  # a takeover that loses a race to another taker looks again
            if lock._create():
                lock._thread.start()
                return lock
            holder = _read(lock.path)
            if holder is None:
                continue  # released meanwhile
            reason = stale_reason(holder, lock.me, time.time(), stale_after)
            if reason is None:
                raise RunFolderBusy(f"{folder} is in use by another run: {describe(holder)}, per {lock.path}; "
                                    f"wait for it to end or choose another train.output_dir")
            lock._take_over(holder, reason)
        raise RunFolderBusy(f"{lock.path}: other starts keep taking this run folder; try again")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, holder: dict, reason: str) -> None:
        aside = f"{self.path}.stale-{self.me['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker was first
        taken = _read(aside) or {}
        if taken.get("token") != holder.get("token"):  # a fresh lock replaced the stale one in between
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.remove(aside)
            return
        os.remove(aside)  # only the stale holder's description; no work of any run
        self.log(f"took over the lock of {self.folder} from {describe(holder)}: {reason}")

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            holder = _read(self.path)
            if (holder or {}).get("token") != self.me["token"]:
                self.log(f"warning: {self.path} no longer names this run ({describe(holder or {})}); another "
                         f"start took the folder over: stop one of the two runs")
                return
            files.write_json(self.path, {**self.me, "heartbeat": time.time()}, indent=None)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if (_read(self.path) or {}).get("token") == self.me["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
