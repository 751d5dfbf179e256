"""What a run measures and where it goes: exact MLM/NSP sums, FLOPs and MFU, and the sinks (rank 0 only):
TensorBoard scalars + text panels, and ``metrics.jsonl``.

Exact aggregation: the model returns detached sums and counts per batch (named ``SUM_KEYS``); they are added
over batches and ranks (as named sums: trainer.dist.all_reduce_named) and divided once (``summarize``).
Averaging per-batch means instead would weight a batch of 3 predictions like one of 20.

``metrics.jsonl`` holds one JSON object per logged step (``{"step": N, "loss": ..., ...}``) and one per
validation (``{"step": N, "val/mlm_loss": ..., ...}``), so runs can be compared by machine. After a resume
from step N, records of steps > N (written before a crash, and about to be redone) are moved aside first
(to a folder of ``earlier/``, never deleted), and TensorBoard's ``purge_step`` hides those steps' events:
both then read like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from common import files

# Names of the detached sums and counts of bert.model.PreTrainingLossOutput; sums travel as dicts by these names.
SUM_KEYS = ("mlm_loss_sum", "mlm_correct", "mlm_count", "nsp_loss_sum", "nsp_correct", "nsp_count")


def summarize(sums: dict) -> dict:
    """Totals of the SUM_KEYS names (over any number of batches and ranks; other names are ignored) -> the
    metrics: ``mlm_loss, perplexity, mlm_acc, nsp_loss, nsp_acc, samples, predictions`` (NaN for an empty count).
    The one place where sums become values: validation, evaluation and the training log lines all use it."""
    mlm_loss_sum, mlm_correct, mlm_count, nsp_loss_sum, nsp_correct, nsp_count = (float(sums[k]) for k in SUM_KEYS)
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


# ---------------------------------------------------------------------------------------------------
# FLOPs and MFU


def flop_counts(model) -> dict:
    """Parameter counts for FLOPs per step (≈ 6 N per token + 12 L H S for attention, REFERENCE's formula).

    ``per_token``: encoder weights, used by every (non-pad) token. ``per_prediction``: the MLM head
    (transform + the H x V decoder + bias), applied only at masked positions (sparse prediction).
    ``per_sequence``: pooler + NSP classifier. Embedding lookups are not matmuls and are not counted.
    """
    c = model.config
    enc = sum(p.numel() for p in model.bert.encoder.parameters())
    head = (sum(p.numel() for p in model.cls.predictions.transform.parameters())
            + c.vocab_size * c.hidden_size + c.vocab_size)
    seq = sum(p.numel() for p in model.bert.pooler.parameters()) + sum(
        p.numel() for p in model.cls.seq_relationship.parameters())
    return {"per_token": enc, "per_prediction": head, "per_sequence": seq,
            "layers": c.num_hidden_layers, "hidden": c.hidden_size}


def step_flops(fc: dict, tokens: float, predictions: float, sequences: float, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward = 6 per parameter per use) for one micro batch."""
    return (6.0 * (fc["per_token"] * tokens + fc["per_prediction"] * predictions + fc["per_sequence"] * sequences)
            + 12.0 * fc["layers"] * fc["hidden"] * seq_len * tokens)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0,
                        n: Optional[int] = None) -> float:
    """Achievable matmul TFLOPS on this device in ``dtype`` (the MFU denominator): 2 n^3 FLOPs per n x n
    GEMM, the best rate of about eight windows over ``seconds`` (a window slowed by a neighbour on a shared
    machine would inflate every MFU). Without ``n``, the GEMM is sized from a first quick probe so that one
    product takes about a tenth of a window: any device, even one that emulates ``dtype``, finishes in time."""
    g = torch.Generator(device="cpu").manual_seed(0)  # own generator: the global RNG stays untouched
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def gemm(size):
        a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        return a, b

    if n is None:  # probe: 128^3 is 4 MFLOP, ~0.1 ms native and ~5 ms emulated on a CPU
        a, b = gemm(128)
        a @ b
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        rate = 2.0 * 128 ** 3 / max(time.perf_counter() - t0, 1e-7)  # FLOP/s
        n = int((rate * seconds / 80 / 2) ** (1 / 3))  # one GEMM ~ seconds / 80
        n = max(128, min(8192 if device.type == "cuda" else 2048, n // 128 * 128))
    a, b = gemm(n)
    a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        iters, t0 = 0, time.perf_counter()
        while iters == 0 or time.perf_counter() - t0 < seconds / 8:
            a @ b
            iters += 1
            sync()
        best = max(best, 2.0 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
    return best


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsWriter:
    """The sinks of rank 0 (others: every call does nothing). ``resume_step``: the step this start resumes
    from (None: a fresh start). Lines of ``metrics.jsonl`` after it (the earlier start's, about to be redone;
    all of them for a fresh start) and lines cut by a kill mid-write are moved to ``aside``/metrics.jsonl
    (default: a new folder of earlier/, trainer.run_folder.earlier_dir), never deleted: metrics.jsonl then
    reads as one uninterrupted run. TensorBoard's ``purge_step`` hides the redone steps' events from readers
    and leaves the event files whole."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: Optional[int] = None,
                 aside: Optional[str] = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(output_dir, "tensorboard")
        self._tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            if aside is None:
                from trainer.run_folder import earlier_dir

                aside = earlier_dir(output_dir)
            self._set_aside_after(-1 if resume_step is None else resume_step, aside)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(self.tb_dir, purge_step=None if resume_step is None else resume_step + 1)
        self._file = open(self.path, "a", encoding="utf-8")
        self._rewinds = 0

    def rewind(self, step: int) -> None:
        """A rollback to ``step`` (trainer.rollback) redoes the steps after it: their lines are set aside as a
        resume's are (to a folder of earlier/ of their own) and TensorBoard hides their events from here on."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        from trainer.run_folder import earlier_dir

        self._rewinds += 1
        self._file.close()
        self._tb.close()
        self._set_aside_after(step, f"{earlier_dir(os.path.dirname(self.path))}-rollback{self._rewinds}")
        self._tb = SummaryWriter(self.tb_dir, purge_step=step + 1)
        self._file = open(self.path, "a", encoding="utf-8")

    def _set_aside_after(self, step: int, aside: str) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
        keep, moved = [], []
        for ln in lines:
            try:
                (keep if json.loads(ln).get("step", 0) <= step else moved).append(ln)
            except (json.JSONDecodeError, AttributeError, TypeError):  # a line cut by a kill -9 mid-write
                moved.append(ln)
        if not moved:
            return
        os.makedirs(aside, exist_ok=True)
        files.write_text(os.path.join(aside, "metrics.jsonl"), "".join(moved))  # first: a crash between
        files.write_text(self.path, "".join(keep))  # the two writes duplicates lines, never loses one

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


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``, in file order: the one reader of what ``MetricsWriter`` writes.

    A last line without its newline that does not parse is a record cut by a kill mid-write (or one still being
    written while a run is watched): it is left out, as the writer itself sets such a line aside on the next
    start. Any other line that is not a JSON object is damage, a UserError naming the file and the line; so
    is a missing file (callers that watch a run starting check that it exists)."""
    return files.read_jsonl(path, "metrics file", cut_last_ok=True)
