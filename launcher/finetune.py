"""Fine-tune a pretrained BERT for sequence classification (single sentences or sentence pairs).

    deepspeed launcher/finetune.py --deepspeed ds_configs/finetune.json [--config configs/finetune.yaml] \\
        --model RUN_DIR|HF_DIR (--task sst2 | --train FILE --dev FILE) [--sweep | --lr 2e-5] --out DIR \\
        [section.key=value ...]

Also runs as plain `python launcher/finetune.py ...` (a world of one), under torchrun or srun. Settings are
the YAML (configs/finetune.yaml documents every key) with dotted overrides; each flag below is sugar for one
of those keys. Batch size, optimizer, lr and precision live in the DeepSpeed JSON: `--lr X` is the override
`ds.optimizer.params.lr=X`, and `--sweep` runs the paper's grid (5e-5, 3e-5, 2e-5), each lr as such an
override in OUT/lr_<lr>/. The tokenizer must be the one the model was pretrained with (fingerprint) unless
--allow-tokenizer-mismatch.

A stop signal (SIGTERM, SIGUSR1, Ctrl-C) saves the run in progress and exits 0; the same command resumes the
sweep where it stopped (finished runs are not run again).
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer import launch

# flag -> the config key it sets
FLAGS = {"model": "model.path", "tag": "model.tag", "tokenizer": "model.tokenizer", "dropout": "model.dropout",
         "task": "task.name", "train": "task.train", "dev": "task.dev", "text_column": "task.text_column",
         "text_b_column": "task.text_b_column", "label_column": "task.label_column", "max_len": "task.max_len",
         "epochs": "train.epochs", "warmup_fraction": "train.warmup_fraction", "seed": "train.seed",
         "out": "train.out"}
SWITCHES = {"allow_tokenizer_mismatch": "model.allow_tokenizer_mismatch", "export_hf": "train.export_hf"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config (ds_configs/finetune.json)")
    p.add_argument("--config", default=None, metavar="YAML", help="fine-tuning config (configs/finetune.yaml)")
    for flag, key in FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), default=None, help=f"= {key}")
    for flag, key in SWITCHES.items():
        p.add_argument("--" + flag.replace("_", "-"), action="store_true", help=f"= {key}=true")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", default=None, help="= ds.optimizer.params.lr (the peak learning rate)")
    lr.add_argument("--sweep", action="store_true", help="= train.sweep_lrs=[5e-5, 3e-5, 2e-5]")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def overrides_of(a: argparse.Namespace) -> list[str]:
    """The flags as the config overrides they stand for, then the explicit overrides (which win)."""
    from trainer.config import SWEEP_LRS

    out = [f"{key}={getattr(a, flag)}" for flag, key in FLAGS.items() if getattr(a, flag) is not None]
    out += [f"{key}=true" for flag, key in SWITCHES.items() if getattr(a, flag)]
    if a.lr is not None:
        out.append(f"ds.optimizer.params.lr={a.lr}")
    if a.sweep:
        out.append(f"train.sweep_lrs={list(SWEEP_LRS)}")
    return out + a.overrides


def main(argv=None) -> int:
    a = build_parser().parse_intermixed_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    from trainer.finetune import run

    return run(a.deepspeed, a.config, overrides_of(a))


if __name__ == "__main__":
    sys.exit(launch.main(main, stop_signals=True))
