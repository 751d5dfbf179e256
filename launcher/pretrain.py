"""Pretrain BERT with DeepSpeed (thin entry point; the building is trainer/pretrain.py, the loop trainer/trainer.py).

    deepspeed [--num_gpus N] launcher/pretrain.py --deepspeed ds_configs/zero2.json --config configs/demo.yaml \\
        [train.max_steps=10 ...]

Also: torchrun, srun (env derived from SLURM_*), or plain `python launcher/pretrain.py ...` (one process).
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer import launch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launcher/pretrain.py", description="Pretrain BERT (MLM + NSP) with DeepSpeed.",
        epilog="Overrides are key.sub=value pairs (e.g. train.max_steps=10 model.hidden_dropout_prob=0.0); "
               "they win over the YAML, which wins over the defaults.")
    # Our own flag: DeepSpeed's --deepspeed is a boolean (paired with --deepspeed_config), we take the path.
    p.add_argument("--deepspeed", required=True, metavar="DS_CONFIG.json",
                   help="DeepSpeed JSON: ZeRO stage, optimizer + peak lr, precision, global and micro batch")
    p.add_argument("--config", required=True, metavar="RUN.yaml", help="run configuration (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK in the environment is what is used")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="run-config overrides (train.max_steps=10); 'ds.'-prefixed ones edit an existing key of "
                        "the DeepSpeed JSON for this run (ds.optimizer.params.lr=1e-3)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_intermixed_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    from trainer.pretrain import run

    return run(a.deepspeed, a.config, a.overrides)


if __name__ == "__main__":
    sys.exit(launch.main(main, stop_signals=True))
