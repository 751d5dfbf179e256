"""Held-out MLM/NSP metrics, aggregated exactly; the same function for training-time validation and
``launcher/evaluate.py``, so both report the same numbers.

Exact aggregation: the model returns detached sums and counts per batch (``mlm_loss_sum``, ``mlm_count``,
...). We add them over batches and (all_reduce SUM) over ranks, and divide once at the end. Averaging
per-batch means instead would weight a batch of 3 predictions like one of 20.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
import torch.distributed as tdist

_SUMS = ("mlm_loss_sum", "mlm_correct", "mlm_count", "nsp_loss_sum", "nsp_correct", "nsp_count")
_NON_TENSOR = ("keys", "is_padding")


def model_device(model_or_engine) -> torch.device:
    device = getattr(model_or_engine, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model_or_engine.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in _NON_TENSOR}


@torch.no_grad()
def evaluate_pretraining(model_or_engine, loader: Iterable[dict], *, autocast_dtype: Optional[torch.dtype] = None,
                         max_batches: Optional[int] = None) -> dict:
    """One pass of ``loader`` (eval mode: every rank yields the same number of batches, padding batches
    flagged ``is_padding`` are run — ZeRO-3 needs every rank in every forward — but not counted).

    Returns ``mlm_loss, perplexity, mlm_acc, nsp_loss, nsp_acc, samples, predictions``.
    ``max_batches`` must be the same on every rank.
    """
    device = model_device(model_or_engine)
    was_training = model_or_engine.training
    model_or_engine.eval()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            padding = bool(batch.get("is_padding", False))
            with autocast:
                out = model_or_engine(**to_device(batch, device))
            if not padding:
                sums += torch.stack([getattr(out, k).detach().to(torch.float64) for k in _SUMS])
    finally:
        model_or_engine.train(was_training)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(sums)  # SUM over ranks: each rank saw a disjoint part of the split
    mlm_loss_sum, mlm_correct, mlm_count, nsp_loss_sum, nsp_correct, nsp_count = sums.tolist()
    mlm_loss = mlm_loss_sum / mlm_count if mlm_count else float("nan")
    return {
        "mlm_loss": mlm_loss,
        "perplexity": math.exp(mlm_loss) if mlm_count and mlm_loss < 700 else float("inf" if mlm_count else "nan"),
        "mlm_acc": mlm_correct / mlm_count if mlm_count else float("nan"),
        "nsp_loss": nsp_loss_sum / nsp_count if nsp_count else float("nan"),
        "nsp_acc": nsp_correct / nsp_count if nsp_count else float("nan"),
        "samples": int(nsp_count),
        "predictions": int(mlm_count),
    }
