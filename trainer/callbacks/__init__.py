"""What a run reports beyond its loss, one callback per file (the loop in trainer/trainer.py stays unchanged when
one is added): ``standard()`` is the set every pretraining run logs; a new metric is a new file here and one entry
in that list. The protocol is ``base.Callback``."""

from __future__ import annotations

from trainer.callbacks.base import Callback
from trainer.callbacks.data_health import DataHealthReport
from trainer.callbacks.grad_noise import GradNoiseScale
from trainer.callbacks.grad_norm import GradNorm
from trainer.callbacks.mfu import MFU
from trainer.callbacks.text_panel import TextPanel

__all__ = ["Callback", "DataHealthReport", "GradNoiseScale", "GradNorm", "MFU", "TextPanel", "standard"]


def standard() -> list[Callback]:
    """The callbacks of every pretraining run (the text panel needs the run's tokenizer: trainer.pretrain adds it)."""
    return [MFU(), GradNorm(), DataHealthReport(), GradNoiseScale()]
