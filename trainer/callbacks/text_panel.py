"""Decoded Input / Target / Predicted of fixed held-out examples, a TensorBoard text panel after each validation."""

from __future__ import annotations

from typing import Optional

from trainer.callbacks.base import Callback
from trainer.evaluation import examples_text, predict_batch


class TextPanel(Callback):
    """``batch``: the first valid batch, kept by every rank (under ZeRO-3 every rank must run each forward);
    ``tokenizer``: rank 0's (None elsewhere), which writes the first ``n_examples`` to ``validation/examples``."""

    def __init__(self, batch: Optional[dict], tokenizer=None, pad_id: int = 0, n_examples: int = 3):
        self.batch, self.tokenizer, self.pad_id, self.n_examples = batch, tokenizer, pad_id, n_examples

    def on_eval(self, trainer, step) -> None:
        if self.batch is None:
            return
        predictions = predict_batch(trainer.engine, self.batch)
        if self.tokenizer is not None:
            text = examples_text(self.tokenizer, self.batch, predictions, self.pad_id, self.n_examples)
            trainer.metrics.text(step, "validation/examples", text)
