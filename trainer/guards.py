"""When a run stops: stop signals, non-finite numbers, and the per-step agreement of all ranks on both.

Nothing here blocks. The signal handler only sets a flag (no I/O, no collectives in a handler); the ranks
agree on what to do at a step boundary with one small all_reduce (``agree``), so that all of them save or
stop at the same step and none is left waiting in a collective.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import torch

from trainer import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORCE_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a second one of these ends the process at once


@dataclass
class StopFlag:
    """SIGTERM / SIGUSR1 / SIGINT ask for a stop at the next step (all ranks save, then exit 0). A second
    SIGTERM or SIGINT while the stop is pending ends the process at once, by that signal."""

    requested: bool = False
    signum: Optional[int] = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.requested and signum in FORCE_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signum = signum


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


@dataclass
class Verdict:
    """What every rank agreed on at a step boundary."""

    stop: bool = False  # a stop was requested (signal) on some rank: save and exit 0
    fatal: Optional[str] = None  # non-finite numbers: exit without saving the bad state
    data_errors: list[str] = field(default_factory=list)  # "rank R: message" of ranks whose data failed
    damaged: Optional[str] = None  # the data lost more than its thresholds allow (data.health): save, exit 2
    sums: list[float] = field(default_factory=list)  # the extra numbers, summed over ranks

    @property
    def halt(self) -> bool:
        return self.stop or self.fatal is not None or bool(self.data_errors) or self.damaged is not None


def agree(stop: bool, fatal: Optional[str], data_error: Optional[str], device, extra=()) -> Verdict:
    """One all_reduce of three flags and the ``extra`` numbers (summed); the messages travel
    (all_gather_object) only when something failed."""
    import torch.distributed as tdist

    flags = torch.tensor([float(stop), float(fatal is not None), float(data_error is not None), *map(float, extra)],
                         dtype=torch.float64, device=device)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(flags)
    v = Verdict(stop=bool(flags[0] > 0), sums=flags[3:].tolist())
    if flags[1] > 0 or flags[2] > 0:
        notes = dist.all_gather_object((fatal, data_error))
        fatals = [f for f, _ in notes if f]
        v.fatal = (fatals[0] if fatals else None) if flags[1] > 0 else None
        if flags[1] > 0 and v.fatal is None:
            v.fatal = "a non-finite loss on another rank"
        v.data_errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(notes) if e]
    return v
