"""The gradient-noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A.1): about the batch size past which a bigger batch stops buying a proportional speed-up.

Why this one rather than per-layer gradient norms: it answers the question the DeepSpeed JSON poses (is the global
batch right for this phase of training?) in one number, and it needs no second copy of the gradients. Per-layer
norms of the accumulated gradient would need the gradients between the last backward and the optimizer step,
which DeepSpeed frees (ZeRO) before any hook runs.

How: two batch sizes. B_small is a micro-batch: a hook on every parameter adds up the squared norms of each
micro-batch's gradient during the backward passes of a log step only (armed at the end of the step before: every
other step costs nothing). B_big is the global batch: its gradient's norm is the engine's (``get_global_grad_norm``,
before clipping). The unbiased estimates
    |G|²  ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)
    tr(Σ) ≈ (|G_small|² - |G_big|²) / (1 / B_small - 1 / B_big)
are noisy step to step, so each is smoothed (exponential moving average over log steps, as the paper does) before
the ratio. Logged: ``gns/grad_sq``, ``gns/trace_cov`` (this step's estimates) and ``grad_noise_scale`` (samples).
The averages start over with each process (they are not checkpointed). Nothing is logged when the step had a
single micro-batch in all (one batch size) or the engine has no gradient norm.
"""

from __future__ import annotations

import math

import torch

from trainer.callbacks.base import Callback
from trainer.engine import loss_scale


class GradNoiseScale(Callback):
    """``grad_noise_scale`` and its two estimates in each log line whose step was armed (the module docstring
    says how); ``beta``: the moving averages' weight of the past."""

    def __init__(self, beta: float = 0.9):
        self.beta = beta  # weight of the past in the moving averages
        self._hooks: list = []
        self._acc = None  # sum over this rank's micro-batches of their squared gradient norms (device)
        self._scale = 1.0  # fp16's loss scale during the armed step's backward passes (DeepSpeed's host float)
        self._avg = None  # (tr(Σ), |G|²) moving averages

    def on_step_end(self, trainer, batches, window) -> None:
        if self._hooks:  # the armed step ended: its sums go to the window, to be reduced at its log
            real = [b for b in batches if not b["is_padding"]]
            # per micro-batch gradients: the engine's backward divided each loss by the accumulation steps
            # (and fp16 multiplied it by the loss scale)
            unscale = (trainer.engine.gradient_accumulation_steps() / self._scale) ** 2
            small_sq = self._acc * unscale if self._acc is not None else 0.0
            window.add({"gns_small_sq": small_sq, "gns_micro": len(real),
                        "gns_samples": sum(b["input_ids"].shape[0] for b in real)})
            self._disarm()
        if trainer.logs_at(trainer.step + 1):
            self._arm(trainer)

    def _arm(self, trainer) -> None:
        self._acc = None
        self._scale = loss_scale(trainer.engine) if trainer.info.precision == "fp16" else 1.0
        self._hooks = [p.register_hook(self._add) for p in trainer.engine.parameters() if p.requires_grad]

    def _add(self, grad: torch.Tensor) -> None:
        sq = grad.detach().float().pow(2).sum()
        self._acc = sq if self._acc is None else self._acc + sq

    def _disarm(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_log(self, trainer, record, sums, elapsed) -> None:
        n, b_big = sums.get("gns_micro", 0.0), sums.get("gns_samples", 0.0)
        norm = trainer.engine.get_global_grad_norm()
        if n <= 1 or norm is None:  # one micro-batch in all: a single batch size
            return
        b_small = b_big / n
        small_sq = sums["gns_small_sq"] / n
        big_sq = float(norm) ** 2
        grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return
        self._avg = (trace, grad_sq) if self._avg is None else tuple(
            self.beta * a + (1 - self.beta) * x for a, x in zip(self._avg, (trace, grad_sq)))
        record.update({"gns/grad_sq": grad_sq, "gns/trace_cov": trace,
                       "grad_noise_scale": self._avg[0] / self._avg[1] if self._avg[1] > 0 else float("nan")})
