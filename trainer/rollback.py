"""Self-healing: a divergence rolls every rank back to the last good checkpoint, in the same process, past the
data that led into it.

Divergences (every input is the same on every rank, so every rank decides the same at the same step):
- a non-finite loss (bf16/fp32) or the fp16 loss scale stuck at its floor: trainer.guards.NonFiniteGuard's
  verdict, from the per-step agreement's non-finite count and DeepSpeed's overflow flag and scale;
- a loss spike (``SpikeDetector``): the step's loss, averaged over every rank's micro-batches (its sum and count
  ride the same agreement), above median + k x 1.4826 x MAD of the last ``spike_window`` finite step losses for
  ``spike_steps`` consecutive steps. 1.4826 x MAD estimates the standard deviation of normal noise robustly (a
  few outliers in the window move neither the median nor the MAD), so k = 6 means six standard deviations,
  three steps running. A healthy run's loss falls or stays level: it stays under its own recent median.

What ``Rollback.heal`` does: restore the engine (weights, optimizer, the loss scaler) and every registered
component (counters, loader, RNG streams, guard, spike window, schedule, audit) from the last good checkpoint;
keep its own history and the data's health counts (those shards were read); pass over the stream range
[position at the checkpoint, position after the divergent step) — or only its last ``skip_steps`` steps —
for good, on every rank (global stream positions, so a later world-size change keeps it); start the fp16 loss
scale afresh; scale the lr by ``lr_factor`` for ``lr_steps`` steps; record the event in metrics.jsonl (the
lines of the undone steps are set aside, as a resume does) and TensorBoard; go on. At most ``max_rollbacks``
within ``within_steps`` steps: past that (or with ``enabled: false``, or before any checkpoint) the run stops
as without this module, the whole history in its message.

The history is checkpointed (registered as "rollback"), so a resumed or re-run job passes over the same
ranges, uses the same lr and makes the same decisions; the loader's order is a pure function of (seed, epoch,
manifest, skip list).
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Optional

from trainer.config import RollbackConfig
from trainer.engine import set_loss_scale


class SpikeDetector:
    """The robust spike rule over recent step losses (module docstring); its window is checkpointed."""

    def __init__(self, window: int, k: float, steps: int):
        self.k, self.steps = k, steps
        self.losses: deque[float] = deque(maxlen=window)
        self.high = 0  # consecutive high steps so far

    def update(self, loss_sum: float, count: float) -> Optional[str]:
        """The verdict on one step (its loss summed over every rank's micro-batches, and their count): a cause,
        or None. Non-finite losses are the guard's; a high loss does not enter the window."""
        if self.steps == 0 or count <= 0 or not math.isfinite(loss_sum):
            return None
        loss = loss_sum / count
        if len(self.losses) == self.losses.maxlen:
            ordered = sorted(self.losses)
            med = _median(ordered)
            mad = _median(sorted(abs(x - med) for x in ordered))
            limit = med + self.k * max(1.4826 * mad, 1e-6 * abs(med))  # a floor: a window of equal losses
            if loss > limit:
                self.high += 1
                if self.high >= self.steps:
                    return (f"loss spike: {self.high} consecutive steps above median {med:.4g} + {self.k:g} x "
                            f"1.4826 x MAD {mad:.3g} = {limit:.4g} (last {loss:.4g})")
                return None
        self.high = 0
        self.losses.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "high": self.high}

    def load_state_dict(self, sd: dict) -> None:
        self.losses.clear()
        self.losses.extend(float(x) for x in sd["losses"])
        self.high = int(sd["high"])


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class Rollback:
    """The policy and the history of a run's rollbacks (module docstring). ``history``: one dict per rollback,
    {"step", "cause", "checkpoint", "restored_step", "skip": [start, end), "samples_skipped", "lr": [start,
    steps, factor]}."""

    def __init__(self, cfg: Optional[RollbackConfig] = None, initial_loss_scale: float = 2.0 ** 16):
        self.cfg = cfg or RollbackConfig()
        self.initial_loss_scale = initial_loss_scale
        self.spikes = SpikeDetector(self.cfg.spike_window, self.cfg.spike_k, self.cfg.spike_steps)
        self.history: list[dict] = []

    def register(self, checkpointer) -> None:
        checkpointer.register("rollback", self)
        checkpointer.register("spike", self.spikes)

    def state_dict(self) -> dict:
        return {"history": [dict(e) for e in self.history]}

    def load_state_dict(self, sd: dict) -> None:
        self.history = [dict(e) for e in sd["history"]]

    def describe(self) -> str:
        """The history, one clause per rollback."""
        return "; ".join(f"step {e['step']}: {e['cause']} -> rolled back to {e['checkpoint']}, skipped "
                         f"{e['samples_skipped']} samples (stream {e['skip'][0]}-{e['skip'][1]})"
                         for e in self.history) or "none"

    def _refusal(self, trainer) -> Optional[str]:
        c = self.cfg
        if not c.enabled:
            return "rollback.enabled is false"
        if trainer.checkpointer.last_good() is None:
            return "no checkpoint to roll back to yet"
        recent = [e for e in self.history if e["step"] > trainer.step - c.within_steps]
        if len(recent) >= c.max_rollbacks:
            return (f"{len(recent)} rollbacks within {c.within_steps} steps already (rollback.max_rollbacks="
                    f"{c.max_rollbacks}); rollbacks: {self.describe()}")
        return None

    def heal(self, trainer, cause: str) -> Optional[str]:
        """Roll back past the divergence ``cause`` found after step trainer.step (collective: every rank calls it
        at the same step). None when done (trainer.step is then the checkpoint's); else why the run stops."""
        refusal = self._refusal(trainer)
        if refusal is not None:
            return cause if not self.cfg.enabled else f"{cause}; not rolled back: {refusal}"
        trainer.phase = "rollback"
        step, loader, g = trainer.step, trainer.loader, trainer.info.global_batch
        end = trainer.boundary.state_dict()["samples_seen"]  # logical position after the divergent step
        view = trainer.checkpointer.load(trainer.engine, trainer.checkpointer.last_good())
        start = loader.stream_of(view["state"]["loader"])
        if self.cfg.skip_steps is not None:
            start = max(start, loader.stream_position(max(0, end - self.cfg.skip_steps * g)))
        stop = loader.stream_position(end - 1) + 1
        before = sum(b - a for a, b in loader.skips)
        trainer.checkpointer.restore(view, keep=("rollback", "data_health"))
        restored = trainer.step
        self.history.append({"step": step, "cause": cause, "checkpoint": os.path.basename(view["path"]),
                             "restored_step": restored, "skip": [start, stop],
                             "samples_skipped": 0, "lr": [restored, self.cfg.lr_steps, self.cfg.lr_factor]})
        self.apply(trainer)
        self.history[-1]["samples_skipped"] = sum(b - a for a, b in loader.skips) - before
        if trainer.info.precision == "fp16":
            set_loss_scale(trainer.engine, self.initial_loss_scale)
        self._report(trainer, self.history[-1])
        return None

    def apply(self, trainer) -> None:
        """Bring the loader and the schedule in line with the whole history (after a restore or a resume)."""
        if self.history:  # (a loader without a skip list, fine-tuning's, never rolls back)
            trainer.loader.skip([e["skip"] for e in self.history])
        for e in self.history:
            trainer.schedule.scale(*e["lr"])
        trainer.boundary.mark()

    def _report(self, trainer, event: dict) -> None:
        m = trainer.metrics
        m.rewind(event["restored_step"])
        m.record({"step": event["restored_step"], "rollback": event})
        m.scalars(event["restored_step"], {"rollbacks": len(self.history), "samples_skipped": event["samples_skipped"]},
                  prefix="rollback/")
        trainer.log(f"step {event['step']}: {event['cause']}: rolled back to {event['checkpoint']} (step "
                    f"{event['restored_step']}) in this process, passing over {event['samples_skipped']} samples "
                    f"(stream {event['skip'][0]}-{event['skip'][1]}); rollback {len(self.history)}, at most "
                    f"{self.cfg.max_rollbacks} within {self.cfg.within_steps} steps")
