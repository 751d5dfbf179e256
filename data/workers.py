"""How the loader's DataLoader workers start, hear signals and end (data.loader uses it; docs/loader.md has
the measurements): from a fork server started with the stop signals blocked, obeying only their own rank's
SIGTERM, and ending with their rank however it ended."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time


class WorkerSignals:
    """worker_init_fn: a worker obeys SIGTERM from its own rank and ignores everyone else's stop signals.

    Slurm signals every process of a step, and a terminal's Ctrl-C its whole process group; a worker ending
    then would crash its rank mid-step, before it can save. The rank decides when to stop: it ends the workers
    itself (torch's shutdown, multiprocessing's exit hook) with SIGTERM, and a worker that ignored that too
    would leave the rank's exit waiting on it forever. So SIGTERM is blocked and read by one thread that
    knows the sender (sigwaitinfo): the rank's own is obeyed, others are dropped."""

    def __init__(self) -> None:
        self.owner = os.getpid()  # the rank's main process, which builds the DataLoader

    def __call__(self, worker_id: int) -> None:
        for sig in (signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        threading.Thread(target=self._end_with_owner, name="owner-watch", daemon=True).start()
        if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to read, so obey every SIGTERM
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked from birth (worker_context)
            return
        # Blocked from birth (the fork server's mask, worker_context), and here for any other start method.
        # Threads started after this (the result queue's feeder) inherit the block, so only the watcher below
        # ever receives SIGTERM, one sent before this ran included.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=self._watch, name="sigterm-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == self.owner:
                os._exit(0)

    def _end_with_owner(self) -> None:
        """End when the rank is gone, however it ended (kill -9, a second Ctrl-C). torch's own check compares
        the parent's pid, and a worker's parent is the fork server, which outlives the rank as long as any
        worker holds its pipe: without this, a rank killed outright left its workers and the fork server
        running forever. A pidfd (Linux 5.3+) wakes at the owner's exit; elsewhere the owner is polled."""
        try:
            fd = os.pidfd_open(self.owner)
        except (AttributeError, OSError):  # no pidfd, or the owner is already gone
            while _alive(self.owner):
                time.sleep(1.0)
            os._exit(0)
        select.select([fd], [], [])
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to another user's process
        return False
    return True


STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def worker_context():
    """Start method of the DataLoader workers: a fork server where there is one (Linux, macOS), preloading
    this module so that a worker starts in milliseconds; else the platform default.

    Slurm and the deepspeed launcher signal a rank's whole process group: the fork server, multiprocessing's
    resource tracker and the workers too. With the default actions a SIGTERM or SIGUSR1 killed the fork server
    or the tracker (the next workers then could not start) or a worker in its first milliseconds, before its
    ``WorkerSignals`` ran ("DataLoader worker exited unexpectedly": found by scripts/signal_drill.py). So both
    helpers are started here with the stop signals blocked: they keep that mask, the workers inherit it from
    the fork server, and a SIGTERM sent to a worker waits until its ``WorkerSignals`` thread reads it (and
    obeys only the rank's). The helpers end with their rank (end of file on their pipes), not on a signal."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    from multiprocessing import forkserver, resource_tracker

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data.loader"])  # the loader, and with it this module and the order  # only takes effect before the server's first start
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # this thread only; others still take them
    try:
        resource_tracker.ensure_running()  # a no-op while it runs; it unblocks SIGINT/SIGTERM when done, so:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return ctx
