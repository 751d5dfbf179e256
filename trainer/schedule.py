"""BERT's learning-rate schedule: linear warmup, then linear decay to zero. The one place it is defined.

``step`` is the number of optimizer steps already taken (0 for the first update), so the update that is
about to happen uses ``lr_at(step, ...)``:

- warmup (step < W):  peak * (step + 1) / W   -> the first update already moves (peak / W), the W-th
  update (step = W - 1) uses the full peak;
- decay (step >= W):  peak * (T - step) / (T - W) -> peak at step W, peak / (T - W) at the last update
  (step = T - 1), and 0 at step T (never used).

Example: peak 1e-4, W 10, T 100: step 0 -> 1e-5, step 9 -> 1e-4, step 10 -> 1e-4, step 55 -> 5e-5,
step 99 -> 1.11e-6.
"""

from __future__ import annotations


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if total <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need 0 <= warmup ({warmup}) <= total ({total}) and total > 0")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return 0.0
    return peak * (total - step) / (total - warmup)


def set_lr(optimizer, lr: float) -> None:
    """Write ``lr`` into every param group (DeepSpeed's ZeRO optimizers expose the wrapped groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Schedule:
    """``lr_at`` of a run, times the scalings a rollback asked for (trainer.rollback: ``factor`` for the steps
    ``[start, start + steps)``; overlapping ones multiply). The scalings are its checkpointed state; the peak,
    warmup and length come from the run's settings, which a resume may change."""

    def __init__(self, peak: float, warmup: int, total: int):
        self.peak, self.warmup, self.total = peak, warmup, total
        self.scalings: list[tuple[int, int, float]] = []

    def lr(self, step: int) -> float:
        lr = lr_at(step, self.peak, self.warmup, self.total)
        for start, steps, factor in self.scalings:
            if start <= step < start + steps:
                lr *= factor
        return lr

    def scale(self, start: int, steps: int, factor: float) -> None:
        """Add a scaling (once: adding the same one again changes nothing)."""
        if steps > 0 and factor != 1.0 and (start, steps, factor) not in self.scalings:
            self.scalings.append((start, steps, factor))

    def state_dict(self) -> dict:
        return {"scalings": [list(s) for s in self.scalings]}

    def load_state_dict(self, sd: dict) -> None:
        self.scalings = [(int(a), int(n), float(f)) for a, n, f in sd["scalings"]]
