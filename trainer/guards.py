"""When a run stops: stop signals, non-finite numbers, and the per-step agreement of all ranks on both.

Nothing here blocks the loop. Stop signals are never handled in the main thread: they are held (blocked) in
every thread from the entry point on, and one reader thread takes them with ``sigwaitinfo``, which names the
sender. The ranks agree on what to do at a step boundary with one small all_reduce (``agree``), so that all
of them save or stop at the same step and none is left waiting in a collective.

Why the sender matters: a terminal's Ctrl-C, ``kill -PGID``, ``timeout`` and schedulers signal the whole
process group, the launcher (deepspeed, torchrun) included, and the launcher then sends every rank a SIGTERM
of its own. That SIGTERM comes from the rank's parent; it is the same stop, not the user's second one. A
second SIGINT/SIGTERM from anyone else (the terminal again, a user's kill) ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from trainer import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORCE_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a second one of these, not from the launcher, ends at once


def block_stop_signals() -> None:
    """Hold the stop signals in the calling thread. Threads and processes it starts later inherit the mask, and
    so does the same process after ``exec`` (the CPU host's re-exec on tcmalloc): a signal sent during start-up
    waits for ``StopFlag``'s reader instead of killing the process. Call first thing in an entry point."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _note(msg: str) -> None:
    """One line on stderr, prefixed with the rank in a multi-rank run (as common.errors.run_main does)."""
    prefix = "" if os.environ.get("WORLD_SIZE", "1") == "1" else f"[rank {os.environ.get('RANK', '?')}] "
    print(f"{prefix}{msg}", file=sys.stderr, flush=True)


def _start_up() -> str:
    return "start-up"


@dataclass
class StopFlag:
    """SIGTERM / SIGUSR1 / SIGINT ask for a stop (every rank saves at the next step boundary, then exits 0).

    Further signals while the stop is pending: those from this process's parent (the launcher forwarding the
    stop it received) and SIGUSR1 are part of the same stop; a SIGTERM or SIGINT from anyone else (a second
    Ctrl-C) ends the process at once, by that signal, without saving. ``where`` says what the process was doing
    (the trainer sets it); ``parent`` is read at construction, before a dying launcher can orphan the process.
    """

    requested: bool = False
    signum: Optional[int] = None
    sender: str = ""  # who sent the stop, in words
    landed: str = ""  # what the process was doing when it arrived
    where: Callable[[], str] = field(default=_start_up)
    parent: int = field(default_factory=os.getppid)
    _reader: Optional[threading.Thread] = field(default=None, repr=False)

    def install(self) -> None:
        """Hold the stop signals in this thread (threads started later inherit that) and start the reader.
        Call from the main thread before other threads start; calling it again does nothing."""
        if self._reader is not None:
            return
        block_stop_signals()
        for sig in FORCE_SIGNALS:  # Python's SIGINT handler raises KeyboardInterrupt: the default action instead,
            signal.signal(sig, signal.SIG_DFL)  # which only the reader ever unblocks, to end at once
        self._reader = threading.Thread(target=self._read, name="stop-signals", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if self.receive(info.si_signo, info.si_pid) == "force":
                self._end_now(info.si_signo)

    def receive(self, signum: int, pid: int) -> str:
        """Decide what a stop signal from ``pid`` means: "stop" (the first), "same stop" (the launcher's
        forwarding, or SIGUSR1), or "force" (a second SIGINT/SIGTERM from anyone but the launcher)."""
        name = signal.Signals(signum).name
        sender = ("the terminal" if pid == 0 else
                  f"the launcher (pid {pid})" if pid == self.parent and pid > 1 else f"pid {pid}")
        if not self.requested:
            self.signum, self.sender, self.landed = signum, sender, self.where()
            self.requested = True
            _note(f"{name} from {sender} during {self.landed}: every rank saves at the next step boundary and exits "
                  f"0; a second Ctrl-C (or SIGTERM) ends at once without saving")
            return "stop"
        if (pid == self.parent and pid > 1) or signum not in FORCE_SIGNALS:
            _note(f"{name} from {sender}: part of the stop already under way")
            return "same stop"
        _note(f"second stop signal ({name} from {sender}): ending at once, without saving")
        return "force"

    @staticmethod
    def _end_now(signum: int) -> None:
        """Die by ``signum``: unblocked in this thread only, so its default action (set by install) is taken here."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # reached only if something replaced the default action after install


@dataclass
class NonFiniteGuard:
    """Decides when non-finite numbers end the run.

    fp16: an overflow step is skipped by DeepSpeed and the loss scale halves; we count them. Overflow while
    the scale is already at min_loss_scale for more than ``max_consecutive`` consecutive steps means the
    gradients are genuinely inf/NaN: stop. bf16/fp32: no loss scale protects the weights, so a non-finite
    loss stops the run at once.
    """

    precision: str
    max_consecutive: int
    min_loss_scale: float = 1.0
    consecutive: int = 0

    def update(self, loss_finite: bool, overflow: bool, loss_scale: Optional[float]) -> Optional[str]:
        if self.precision == "fp16":
            if overflow and loss_scale is not None and loss_scale <= self.min_loss_scale:
                self.consecutive += 1
            elif not overflow:
                self.consecutive = 0
            if self.consecutive > self.max_consecutive:
                return (f"fp16 loss scale collapsed: {self.consecutive} consecutive overflow steps at the minimum "
                        f"loss scale {self.min_loss_scale} (train.max_nonfinite={self.max_consecutive})")
            return None
        if not loss_finite:
            return f"non-finite loss in {self.precision} (no loss scaling can skip it)"
        return None

    def state_dict(self) -> dict:
        """The count of consecutive overflow steps at the floor: a resume goes on counting from it."""
        return {"consecutive": self.consecutive}

    def load_state_dict(self, sd: dict) -> None:
        self.consecutive = int(sd["consecutive"])


@dataclass
class Verdict:
    """What every rank agreed on at a step boundary."""

    stop: bool = False  # a stop was requested (signal) on some rank: save and exit 0
    fatal: Optional[str] = None  # non-finite numbers: exit without saving the bad state (set by the trainer)
    data_errors: list[str] = field(default_factory=list)  # "rank R: message" of ranks whose data failed
    damaged: Optional[str] = None  # the data lost more than its thresholds allow (data.health): save, exit 2
    sums: list[float] = field(default_factory=list)  # the extra numbers, summed over ranks

    @property
    def halt(self) -> bool:
        return self.stop or self.fatal is not None or bool(self.data_errors) or self.damaged is not None


def agree(stop: bool, data_error: Optional[str], device, extra=()) -> Verdict:
    """One all_reduce of two flags and the ``extra`` numbers (summed; host numbers or 0-dim device tensors, which
    this one read brings to the host: the trainer's non-finite loss count travels here); the data errors'
    messages travel (all_gather_object) only when some rank's data failed. ``fatal`` is the caller's to decide
    from the sums (the same on every rank)."""
    flags = dist.all_reduce_sum([float(stop), float(data_error is not None)], device, extra=extra)
    v = Verdict(stop=flags[0] > 0, sums=flags[2:])
    if flags[1] > 0:
        notes = dist.all_gather_object(data_error)
        v.data_errors = [f"rank {r}: {e}" for r, e in enumerate(notes) if e]
    return v


def agree_stop(stop: bool, device) -> bool:
    """Whether a stop was requested on any rank: one all_reduce of one number, where nothing but a stop signal
    can have changed since the last ``agree`` (between validation batches, after a checkpoint save)."""
    return dist.all_reduce_sum([float(stop)], device)[0] > 0
