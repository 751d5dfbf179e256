"""Metrics sinks (rank 0 only): TensorBoard scalars + text panels, and ``metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per logged step (``{"step": N, "loss": ..., ...}``) and one per
validation (``{"step": N, "val/mlm_loss": ..., ...}``), so runs can be compared by machine. After a resume
from step N, records of steps > N (written before a crash, and about to be redone) are dropped first, and
TensorBoard's ``purge_step`` does the same for the event files: both then read like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsWriter:
    def __init__(self, output_dir: str, enabled: bool, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(output_dir, "tensorboard")
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run (resume none) in a used folder starts a fresh log
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(self.tb_dir, purge_step=None if resume_step is None else resume_step + 1)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except json.JSONDecodeError:  # a line cut by a kill -9 mid-write
                continue
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(prefix + k, v, step)

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, markdown, step)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._file.close()
            self.enabled = False


def format_examples(tokenizer, input_ids, positions, targets, predictions, weights, pad_id: int,
                    limit: int) -> str:
    """Markdown of decoded Input / Target / Predicted for the first ``limit`` sequences of a batch.

    Masked positions are shown in brackets: Input ``[MASK]`` (or the random/kept token), Target
    ``[original]``, Predicted ``[argmax]``. All arguments are CPU tensors/arrays of one batch.
    """
    blocks = []
    for b in range(min(limit, len(input_ids))):
        ids = [int(i) for i in input_ids[b] if int(i) != pad_id]
        toks = tokenizer.convert_ids_to_tokens(ids)
        tgt, pred = list(toks), list(toks)
        shown = list(toks)
        for p, t, y, w in zip(positions[b], targets[b], predictions[b], weights[b]):
            if float(w) == 0.0 or int(p) >= len(toks):
                continue
            p = int(p)
            shown[p] = f"**{toks[p]}**"
            tgt[p] = f"**[{tokenizer.id_to_token(int(t))}]**"
            pred[p] = f"**[{tokenizer.id_to_token(int(y))}]**"
        blocks.append(f"**Input:** {' '.join(shown)}\n\n**Target:** {' '.join(tgt)}\n\n"
                      f"**Predicted:** {' '.join(pred)}")
    return "\n\n---\n\n".join(blocks)
