"""Evaluate a pretraining checkpoint: MLM loss, perplexity, MLM accuracy, NSP loss and accuracy.

    python launcher/evaluate.py --checkpoint RUN_DIR [--tag TAG] --data SHARDS [--split valid]
                                [--micro-batch N] [--dtype fp32|bf16|fp16] [--device cpu|cuda]

One process, CPU or GPU, any ZeRO stage and any number of ranks that saved the checkpoint (weights are
consolidated to fp32 by trainer.run_dir). The loop is trainer.evaluation.evaluate_pretraining over
trainer.loader.PretrainLoader in eval mode -- the code the training run validates with. By default the
split is read exactly as the run's validation read it: the run's micro batch and precision (ds_config.json),
its data-parallel split (--ranks = the run's world size: each rank's share is evaluated in turn, with the
same batches, and the sums added as the run's all_reduce does) and its cap on batches per rank
(train.eval_batches). So the numbers equal the run's logged `val/*` records for the same checkpoint and data.

Prints a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from data.errors import DataError, run_main
from data.shards import read_manifest
from trainer import malloc
from trainer.run_dir import DTYPES, RunDirError, load_run

METRICS = ("mlm_loss", "perplexity", "mlm_acc", "nsp_loss", "nsp_acc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shard folder (with manifest.json)")
    p.add_argument("--split", default="valid", help="split of the shard folder (default: valid)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward (default: the run's train_micro_batch_size_per_gpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="precision of the model (default: the run's, from its ds_config.json)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--ranks", type=int, default=None,
                   help="read the split as this many data-parallel ranks would (default: the run's world size)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="batches per rank (default: the run's train.eval_batches; 0 = the whole split)")
    return p.parse_args(argv)


def check_data_matches(manifest: dict, shards: str, meta) -> None:
    """The shards must be tokenized with the checkpoint's tokenizer and built at its sequence length."""
    data_fp = manifest["tokenizer"]["fingerprint"]
    if data_fp != meta.tokenizer_fingerprint:
        raise RunDirError(f"tokenizer mismatch: shards {shards} were built with tokenizer {data_fp}, "
                          f"checkpoint {meta.checkpoint_dir} was trained with {meta.tokenizer_fingerprint}")
    data_len = manifest["settings"]["max_seq_len"]
    if meta.max_seq_len is not None and data_len != meta.max_seq_len:
        raise RunDirError(f"sequence length mismatch: shards {shards} have max_seq_len {data_len}, "
                          f"checkpoint {meta.checkpoint_dir} was trained at max_seq_len {meta.max_seq_len}")


def evaluate_as_ranks(model, shards: str, split: str, micro_batch: int, ranks: int, max_batches: int | None,
                      seed: int) -> dict:
    """evaluate_pretraining on each rank's share of the split in turn, combined exactly: the per-rank
    means times their counts are the per-rank sums the run all_reduces; divide once at the end."""
    from trainer.evaluation import evaluate_pretraining
    from trainer.loader import PretrainLoader

    sums = dict.fromkeys(("mlm_loss", "mlm_acc", "predictions", "nsp_loss", "nsp_acc", "samples"), 0.0)
    for rank in range(ranks):
        loader = PretrainLoader(shards, split, micro_batch, rank=rank, world_size=ranks, seed=seed,
                                shuffle=False, loop=False)
        r = evaluate_pretraining(model, loader, max_batches=max_batches)
        if r["predictions"]:
            sums["mlm_loss"] += r["mlm_loss"] * r["predictions"]
            sums["mlm_acc"] += r["mlm_acc"] * r["predictions"]
        if r["samples"]:
            sums["nsp_loss"] += r["nsp_loss"] * r["samples"]
            sums["nsp_acc"] += r["nsp_acc"] * r["samples"]
        sums["predictions"] += r["predictions"]
        sums["samples"] += r["samples"]
    n_pred, n_seq = sums["predictions"], sums["samples"]
    mlm_loss = sums["mlm_loss"] / n_pred if n_pred else float("nan")
    return {"mlm_loss": mlm_loss,
            "perplexity": math.exp(mlm_loss) if n_pred and mlm_loss < 700 else float("inf" if n_pred else "nan"),
            "mlm_acc": sums["mlm_acc"] / n_pred if n_pred else float("nan"),
            "nsp_loss": sums["nsp_loss"] / n_seq if n_seq else float("nan"),
            "nsp_acc": sums["nsp_acc"] / n_seq if n_seq else float("nan"),
            "samples": int(n_seq), "predictions": int(n_pred)}


def format_table(result: dict) -> str:
    rows = [(k, f"{result[k]:.6f}") for k in METRICS]
    rows += [("samples", str(result["samples"])), ("predictions", str(result["predictions"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>14}" for k, v in rows)


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    model, _tokenizer, meta = load_run(a.checkpoint, a.tag)
    manifest = read_manifest(a.data)
    check_data_matches(manifest, a.data, meta)
    if a.split not in manifest["splits"] or manifest["splits"][a.split]["samples"] == 0:
        raise RunDirError(f"{a.data}: split {a.split!r} is absent or empty")

    micro_batch = a.micro_batch or meta.eval_micro_batch()
    if micro_batch is None:
        raise RunDirError(f"{a.checkpoint}: no ds_config.json with train_micro_batch_size_per_gpu; "
                          f"pass --micro-batch")
    dtype = a.dtype or meta.eval_dtype()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        print(malloc.configure(), file=sys.stderr)  # see trainer/malloc.py
    # The training engine holds its module in the run's precision (DeepSpeed casts it), so do the same:
    # fp32 masters rounded to bf16 give exactly the engine's bf16 weights.
    model.to(device=device, dtype=DTYPES[dtype])
    print(f"checkpoint {meta.checkpoint_dir} (step {meta.step}, weights: {meta.consolidation}); "
          f"data {a.data} split {a.split} ({manifest['splits'][a.split]['samples']} samples); "
          f"micro batch {micro_batch}, {dtype}, {device}", file=sys.stderr)

    run_train = (meta.client_state.get("run_config") or {}).get("train") or {}
    ranks = a.ranks or meta.client_state.get("world_size") or 1
    max_batches = run_train.get("eval_batches") if a.max_batches is None else (a.max_batches or None)
    seed = run_train.get("seed", 0)
    print(f"reading split {a.split} as {ranks} rank(s), "
          f"{'all' if max_batches is None else max_batches} batch(es) per rank", file=sys.stderr)
    result = evaluate_as_ranks(model, a.data, a.split, micro_batch, ranks, max_batches, seed)
    if not math.isfinite(result["mlm_loss"]):
        print("warning: MLM loss is not finite", file=sys.stderr)
    record = {"checkpoint": os.path.abspath(a.checkpoint), "tag": meta.tag, "step": meta.step,
              "data": os.path.abspath(a.data), "split": a.split, "micro_batch": micro_batch, "dtype": dtype,
              "ranks": ranks, "max_batches": max_batches, **result}
    print(format_table(result))
    print(f"evaluated {result['samples']} samples in {time.time() - t0:.1f}s", file=sys.stderr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    malloc.preload_tcmalloc()  # CPU hosts: restart on tcmalloc, see trainer/malloc.py
    sys.exit(run_main(main, errors=(RunDirError, DataError)))
