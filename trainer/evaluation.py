"""Held-out MLM/NSP metrics, aggregated exactly (trainer.metrics.summarize): the same code for training-time
validation and ``launcher/evaluate.py``, so both report the same numbers."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch

from data.loader import model_inputs
from trainer import dist
from trainer.metrics import SUM_KEYS, summarize

def model_device(model_or_engine) -> torch.device:
    device = getattr(model_or_engine, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model_or_engine.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """The model inputs of a loader's batch (data.loader.model_inputs), on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}


@torch.no_grad()
def pretraining_sums(model_or_engine, loader: Iterable[dict], *, autocast_dtype: Optional[torch.dtype] = None,
                     max_batches: Optional[int] = None,
                     stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """This process's totals of the SUM_KEYS names over one pass of ``loader`` (eval mode). Padding batches
    (``is_padding``, eval loaders give every rank the same number of batches) are run — ZeRO-3 needs every rank in every
    forward — but not counted. ``max_batches`` must be the same on every rank. ``stop`` is asked before every
    batch (on every rank: it may be a collective); when it says yes the pass ends there and None is returned."""
    device = model_device(model_or_engine)
    was_training = model_or_engine.training
    model_or_engine.eval()
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if stop is not None and stop():
                return None
            with autocast:
                out = model_or_engine(**to_device(batch, device))
            if not batch.get("is_padding", False):
                sums += torch.stack([getattr(out, k).detach().to(torch.float64) for k in SUM_KEYS])
    finally:
        model_or_engine.train(was_training)
    return dict(zip(SUM_KEYS, sums.tolist()))


def evaluate_pretraining(model_or_engine, loader: Iterable[dict], **kwargs) -> Optional[dict]:
    """Metrics over every rank's share of a split: the per-rank sums are all-reduced, then divided once.
    Returns ``mlm_loss, perplexity, mlm_acc, nsp_loss, nsp_acc, samples, predictions``; None when ``stop``
    (pretraining_sums) cut the pass short."""
    sums = pretraining_sums(model_or_engine, loader, **kwargs)
    return None if sums is None else summarize(dist.all_reduce_named(sums, model_device(model_or_engine)))


class Validator:
    """Training-time validation: metrics over the valid split (every rank its share), logged to TensorBoard
    and metrics.jsonl. ``make_loader`` builds a fresh one-pass loader (its workers start from the fork server each
    time). The text panel of held-out examples is a callback (trainer.callbacks.TextPanel)."""

    def __init__(self, engine, make_loader: Callable[[], Iterable[dict]], metrics, *, max_batches: Optional[int],
                 log: Callable[[str], None] = print):
        self.engine, self.make_loader, self.metrics, self.max_batches = engine, make_loader, metrics, max_batches
        self.log = log
        self.best: dict = {}

    def __call__(self, step: int, stop: Optional[Callable[[], bool]] = None) -> bool:
        """Validate and log at ``step``; False (nothing logged) when ``stop`` cut the pass short."""
        res = evaluate_pretraining(self.engine, self.make_loader(), max_batches=self.max_batches, stop=stop)
        if res is None:
            self.log(f"step {step}: validation cut short by the stop (not logged)")
            return False
        rec = {f"val/{k}": v for k, v in res.items()}
        self.metrics.scalars(step, rec)
        self.metrics.record({"step": step, **rec})
        if not self.best or res["mlm_loss"] < self.best["mlm_loss"]:
            self.best = dict(res, step=step)
        self.log(f"step {step}: validation mlm_loss {res['mlm_loss']:.4f} (perplexity {res['perplexity']:.2f}), "
                 f"mlm_acc {res['mlm_acc']:.4f}, nsp_acc {res['nsp_acc']:.4f} on {res['samples']} sequences")
        return True


@torch.no_grad()
def predict_batch(model_or_engine, batch: dict) -> torch.Tensor:
    """MLM argmax predictions (CPU) of one batch, in eval mode."""
    was_training = model_or_engine.training
    model_or_engine.eval()
    try:
        out = model_or_engine(**to_device(batch, model_device(model_or_engine)))
    finally:
        model_or_engine.train(was_training)
    return out.mlm_predictions.cpu()


def examples_text(tokenizer, batch: dict, predictions: torch.Tensor, pad_id: int, limit: int) -> str:
    """Markdown of decoded Input / Target / Predicted for the first ``limit`` sequences of ``batch``: the
    validation text panel in TensorBoard, and ``launcher/evaluate.py --examples``."""
    from trainer.metrics import format_examples

    return format_examples(tokenizer, batch["input_ids"].cpu(), batch["masked_lm_positions"].cpu(),
                           batch["masked_lm_ids"].cpu(), predictions, batch["masked_lm_weights"].cpu(), pad_id,
                           limit)


# ---------------------------------------------------------------------------------------------------
# launcher/evaluate.py: a checkpoint on one process


def check_data_matches(manifest: dict, shards: str, meta) -> None:
    """The shards must be tokenized with the checkpoint's tokenizer and built at its sequence length."""
    from trainer.errors import CheckpointError

    data_fp = manifest["tokenizer"]["fingerprint"]
    if data_fp != meta.tokenizer_fingerprint:
        raise CheckpointError(f"tokenizer mismatch: shards {shards} were built with tokenizer {data_fp}, "
                              f"checkpoint {meta.checkpoint_dir} was trained with {meta.tokenizer_fingerprint}")
    data_len = manifest["settings"]["max_seq_len"]
    if meta.max_seq_len is not None and data_len != meta.max_seq_len:
        raise CheckpointError(f"sequence length mismatch: shards {shards} have max_seq_len {data_len}, "
                              f"checkpoint {meta.checkpoint_dir} was trained at max_seq_len {meta.max_seq_len}")


def evaluate_as_ranks(model, shards: str, split: str, micro_batch: int, ranks: int, max_batches: Optional[int],
                      seed: int) -> dict:
    """Each of ``ranks`` data-parallel ranks' share of the split in turn, with the same batches the run's ranks
    read; their sums are added (the run's all_reduce) and divided once."""
    from data.loader import PretrainLoader

    total = dict.fromkeys(SUM_KEYS, 0.0)
    for rank in range(ranks):
        loader = PretrainLoader(shards, split, micro_batch, rank=rank, world_size=ranks, seed=seed, shuffle=False,
                                loop=False)
        sums = pretraining_sums(model, loader, max_batches=max_batches)
        total = {k: total[k] + sums[k] for k in SUM_KEYS}
    return summarize(total)


def first_batch_examples(model, tokenizer, shards: str, split: str, micro_batch: int, ranks: int, seed: int,
                         limit: int) -> str:
    """The text panel of the run's validation for this model: rank 0's first batch of the split (the batch the
    run's text panel keeps), decoded as Input / Target / Predicted."""
    from data.loader import PretrainLoader

    loader = PretrainLoader(shards, split, micro_batch, rank=0, world_size=ranks, seed=seed, shuffle=False,
                            loop=False)
    batch = next(iter(loader))
    return examples_text(tokenizer, batch, predict_batch(model, batch), tokenizer.pad_id, limit)


def run_eval(config_path: Optional[str], overrides: list[str], examples: int = 0) -> dict:
    """MLM loss/perplexity/accuracy and NSP loss/accuracy of a checkpoint, read exactly as the run's validation
    read the split by default: the run's micro batch, precision (as this device allows: trainer.precision),
    world size and cap on batches. Prints a table and returns the record (the launcher prints it as JSON).
    ``examples`` > 0: also prints (and returns) that many held-out examples as the run's text panel shows them."""
    import math
    import os
    import sys
    import time

    from data.shards import read_manifest
    from trainer import config as configs, engine as eng, precision
    from trainer.checkpoint_read import load_run
    from trainer.errors import CheckpointError

    t0 = time.time()
    e = configs.load(config_path, overrides, configs.EvalConfig).eval
    model, tokenizer, meta = load_run(e.checkpoint, e.tag)
    manifest = read_manifest(e.data)
    check_data_matches(manifest, e.data, meta)
    if e.split not in manifest["splits"] or manifest["splits"][e.split]["samples"] == 0:
        raise CheckpointError(f"{e.data}: split {e.split!r} is absent or empty")
    micro_batch = e.micro_batch or meta.eval_micro_batch()
    if micro_batch is None:
        raise CheckpointError(f"{e.checkpoint}: no ds_config.json with train_micro_batch_size_per_gpu; pass "
                              f"--micro-batch")
    device = torch.device(e.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    decision = precision.decide(e.dtype or meta.eval_dtype(), precision.device_facts(device.type))
    print(decision.line, file=sys.stderr)
    if device.type == "cpu":
        from trainer import cpu_start

        print(cpu_start.configure_allocator(), file=sys.stderr)
    # The training engine holds its module in the run's precision (DeepSpeed casts it), so do the same:
    # fp32 masters rounded to bf16 give exactly the engine's bf16 weights.
    model.to(device=device, dtype=eng.torch_dtype(decision.precision))
    run_train = (meta.client_state.get("run_config") or {}).get("train") or {}
    ranks = e.ranks or meta.client_state.get("world_size") or 1
    max_batches = run_train.get("eval_batches") if e.max_batches is None else (e.max_batches or None)
    print(f"checkpoint {meta.checkpoint_dir} (step {meta.step}, weights: {meta.consolidation}); data {e.data} "
          f"split {e.split} ({manifest['splits'][e.split]['samples']} samples) as {ranks} rank(s), "
          f"{'all' if max_batches is None else max_batches} batch(es) per rank; micro batch {micro_batch}, "
          f"{decision.precision}, {device}", file=sys.stderr)
    result = evaluate_as_ranks(model, e.data, e.split, micro_batch, ranks, max_batches, run_train.get("seed", 0))
    if not math.isfinite(result["mlm_loss"]):
        print("warning: MLM loss is not finite", file=sys.stderr)
    rows = [(k, f"{result[k]:.6f}") for k in ("mlm_loss", "perplexity", "mlm_acc", "nsp_loss", "nsp_acc")]
    rows += [("samples", str(result["samples"])), ("predictions", str(result["predictions"]))]
    print("\n".join(f"  {k:<11}  {v:>14}" for k, v in rows))
    record = {"checkpoint": os.path.abspath(e.checkpoint), "tag": meta.tag, "step": meta.step,
              "data": os.path.abspath(e.data), "split": e.split, "micro_batch": micro_batch,
              "dtype": decision.precision, "ranks": ranks, "max_batches": max_batches, **result}
    if examples > 0:
        text = first_batch_examples(model, tokenizer, e.data, e.split, micro_batch, ranks, run_train.get("seed", 0),
                                    examples)
        # The panel's Markdown, bold marks dropped for a terminal; masked positions stay [bracketed].
        print(f"\nheld-out examples (step {meta.step}, split {e.split}; masked positions in brackets):\n\n"
              + text.replace("**", "") + "\n")
        record["examples"] = text
    print(f"evaluated {result['samples']} samples in {time.time() - t0:.1f}s", file=sys.stderr)
    return record
