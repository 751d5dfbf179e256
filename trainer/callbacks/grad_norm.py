"""The global gradient norm of the last step, as DeepSpeed computed it (before clipping)."""

from __future__ import annotations

from trainer.callbacks.base import Callback


class GradNorm(Callback):
    """``grad_norm``: NaN when the engine has none (it computes the norm only when it clips or scales)."""

    def on_log(self, trainer, record, sums, elapsed) -> None:
        norm = trainer.engine.get_global_grad_norm()
        record["grad_norm"] = float(norm) if norm is not None else float("nan")
