"""Evaluate a pretraining checkpoint: MLM loss, perplexity, MLM accuracy, NSP loss and accuracy.

    python launcher/evaluate.py --checkpoint RUN_DIR --data SHARDS [--split valid] [--tag TAG]
        [--micro-batch N] [--dtype fp32|bf16|fp16] [--device cpu|cuda] [--ranks N] [--max-batches N]
        [--config EVAL.yaml] [--examples N] [eval.key=value ...]

One process, CPU or GPU, any ZeRO stage and rank count that saved the checkpoint. Each flag is sugar for an
`eval.*` key of the YAML + dotted-override config (trainer.config.EvalConfig). By default the split is read
exactly as the run's validation read it (its micro batch, precision, world size and cap on batches), so the
numbers equal the run's logged `val/*` records for the same checkpoint and data. Prints a table, then one
JSON line (the last line of stdout). ``--examples N`` also prints N held-out examples as Input / Target /
Predicted, as the run's TensorBoard text panel shows them (rank 0's first batch of the split).
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer import launch

FLAGS = ("checkpoint", "tag", "data", "split", "micro_batch", "dtype", "device", "ranks", "max_batches")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="YAML", help="evaluation config (an eval: section)")
    for flag in FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), default=None, help=f"= eval.{flag}")
    p.add_argument("--examples", type=int, default=0, metavar="N",
                   help="also print N held-out examples as Input / Target / Predicted (the TensorBoard text panel)")
    p.add_argument("overrides", nargs="*", metavar="eval.key=value")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_intermixed_args(argv)
    from trainer.evaluation import run_eval

    overrides = [f"eval.{f}={getattr(a, f)}" for f in FLAGS if getattr(a, f) is not None] + a.overrides
    print(json.dumps(run_eval(a.config, overrides, examples=a.examples)))
    return 0


if __name__ == "__main__":
    sys.exit(launch.main(main))
