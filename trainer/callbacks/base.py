"""The callback protocol of the training loop (trainer.trainer.Trainer); every hook is optional.

Every rank calls every hook at the same point, so a hook may run collectives, and each rank must add the same
named sums at the same steps (they are reduced as one tensor, name by name).
"""

from __future__ import annotations


class Callback:
    """Base class: hooks that do nothing. Subclass and override the ones you need."""

    def on_step_end(self, trainer, batches: list[dict], window) -> None:
        """After every optimizer step (``trainer.step`` already counts it). Runs every step, so it must not read
        a device value back to the host; it may add named sums to ``window`` (``Window.add``): they are summed
        over ranks at the next log step and reach ``on_log`` as ``sums``."""

    def on_log(self, trainer, record: dict, sums: dict, elapsed: float) -> None:
        """At a log step: ``sums`` are the window's named sums over every rank (floats), ``elapsed`` its training
        seconds. Add entries to ``record`` (one line of metrics.jsonl, TensorBoard's ``train/`` scalars)."""

    def on_eval(self, trainer, step: int) -> None:
        """After a validation pass that ran to its end (trainer.evaluation.Validator)."""
