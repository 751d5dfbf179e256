"""Fine-tune a pretrained BERT for sequence classification (single sentences or sentence pairs).

    deepspeed launcher/finetune.py --deepspeed ds_configs/finetune.json --model RUN_DIR|HF_DIR \\
        (--task sst2 | --train FILE --dev FILE [--text-column text --text-b-column text_b --label-column label]) \\
        [--lr 2e-5 | --sweep] [--epochs 3] [--warmup-fraction 0.1] [--max-len 128] [--dropout 0.1] \\
        [--tokenizer DIR] [--allow-tokenizer-mismatch] [--export-hf] --out DIR

Also runs as plain `python launcher/finetune.py ...` (a world of one), under torchrun or srun.
Batch size, optimizer and precision live in the DeepSpeed JSON (batch 32 = micro x accumulation x world);
the learning rate is --lr (or --sweep: 5e-5, 3e-5, 2e-5, each in OUT/lr_<lr>/) and the schedule is linear
warmup over --warmup-fraction of the steps then linear decay. fp16 is switched to bf16 on CPU.

The tokenizer used here (the model's own, or --tokenizer) must be the one the model was pretrained with
(fingerprint recorded in the run's checkpoint or the exported tokenizer_config.json); otherwise the run is
refused unless --allow-tokenizer-mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from data.errors import DataError, run_main
from trainer import malloc
from trainer.config import ConfigError
from trainer.dist import DistError
from trainer.finetune import SWEEP_LRS, Columns, FinetuneError, Settings, format_results
from trainer.run_dir import RunDirError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config (ds_configs/finetune.json)")
    p.add_argument("--model", required=True, help="pretraining run directory or Hugging Face BERT directory")
    p.add_argument("--tag", default=None, help="checkpoint tag of a run directory (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="GLUE task via the hub: cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli")
    src.add_argument("--train", help="local training file (.csv, .tsv or .jsonl)")
    p.add_argument("--dev", help="local dev file (with --train)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-b-column", default=None,
                   help="second sentence column for pair tasks (default: 'text_b' when the file has it)")
    p.add_argument("--label-column", default="label")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default: the DeepSpeed JSON's optimizer.params.lr, 2e-5 in finetune.json)")
    lr.add_argument("--sweep", action="store_true", help=f"run each lr in {list(SWEEP_LRS)} and report the best")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokenizer", default=None, help="tokenizer to fine-tune with (default: the model's own)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="run even if the tokenizer is not the pretraining one (results will suffer)")
    p.add_argument("--export-hf", action="store_true", help="also write OUT/best_hf in transformers' format")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    a = p.parse_args(argv)
    if a.train is not None and a.dev is None:
        p.error("--train needs --dev")
    if a.task is not None and (a.dev is not None or a.text_b_column is not None):
        p.error("--dev/--text-b-column apply to local files (--train), not to --task")
    return a


def check_tokenizer(tokenizer, meta, allow_mismatch: bool, model_vocab: int) -> None:
    if tokenizer.vocab_size > model_vocab:
        raise FinetuneError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_vocab}: "
                            f"ids would be out of range")
    if tokenizer.fingerprint == meta.tokenizer_fingerprint:
        if not meta.fingerprint_recorded:
            print(f"warning: {meta.path} records no pretraining tokenizer fingerprint; assuming its own "
                  f"tokenizer files are the pretraining tokenizer", file=sys.stderr)
        return
    msg = (f"tokenizer mismatch: fine-tuning tokenizer has fingerprint {tokenizer.fingerprint}, the model "
           f"{meta.path} was pretrained with {meta.tokenizer_fingerprint}")
    if not allow_mismatch:
        raise FinetuneError(msg + "; use the pretraining tokenizer (or --allow-tokenizer-mismatch)")
    print(f"warning: {msg}; continuing because of --allow-tokenizer-mismatch", file=sys.stderr)


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    import torch.distributed as tdist

    from data.tokenizer import load_tokenizer
    from trainer import dist
    from deepspeed.accelerator import get_accelerator

    from trainer.finetune import finetune, load_glue_task, load_local_task
    from trainer.run_dir import load_pretrained
    from trainer.train import load_ds_config, resolve_ds_config

    settings = Settings(lr=a.lr, epochs=a.epochs, warmup_fraction=a.warmup_fraction, max_len=a.max_len,
                        dropout=a.dropout, seed=a.seed, export_hf=a.export_hf)
    # Same validation and fp16 -> bf16 switch (devices without fp16, e.g. CPU) as pretraining.
    acc = get_accelerator()
    ds_config, switch_note = resolve_ds_config(load_ds_config(a.deepspeed), a.deepspeed, bool(acc.is_fp16_supported()),
                                               bool(acc.is_bf16_supported()), acc.device_name())

    rank, local_rank, world = dist.init()
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
    if switch_note and rank == 0:
        print(switch_note, file=sys.stderr)
    if acc.device_name() == "cpu" and rank == 0:
        print(malloc.configure(), file=sys.stderr)  # see trainer/malloc.py
    pretrained, own_tokenizer, meta = load_pretrained(a.model, a.tag)
    tokenizer = load_tokenizer(a.tokenizer) if a.tokenizer else own_tokenizer
    check_tokenizer(tokenizer, meta, a.allow_tokenizer_mismatch, pretrained.config.vocab_size)
    if a.max_len > pretrained.config.max_position_embeddings:
        raise FinetuneError(f"--max-len {a.max_len} exceeds the model's max_position_embeddings "
                            f"{pretrained.config.max_position_embeddings} ({a.model}); pass --max-len "
                            f"{pretrained.config.max_position_embeddings} or less")

    if a.task is not None:
        # Rank 0 downloads into the datasets cache first; the others then read the cache.
        if rank != 0:
            tdist.barrier()
        task = load_glue_task(a.task)
        if rank == 0:
            tdist.barrier()
    else:
        cols = Columns(text=a.text_column, text_b=a.text_b_column or "text_b", label=a.label_column,
                       text_b_explicit=a.text_b_column is not None)
        task = load_local_task(a.train, a.dev, cols)

    info = {"pretrained": os.path.abspath(a.model), "pretrained_tag": meta.tag,
            "pretraining_tokenizer_fingerprint": meta.tokenizer_fingerprint}
    lrs = SWEEP_LRS if a.sweep else (a.lr,)
    results = []
    for lr in lrs:
        out = os.path.join(a.out, f"lr_{lr:g}") if a.sweep else a.out
        run_settings = dataclasses.replace(settings, lr=lr)
        results.append(finetune(pretrained, tokenizer, task, ds_config, run_settings, out, info=info))
    best = max(results, key=lambda r: r.best_accuracy)
    if rank == 0:
        summary = {"task": task.name, "best_lr": best.lr, "best_dev_accuracy": best.best_accuracy,
                   "best_epoch": best.best_epoch, "best_model": os.path.join(best.out_dir, "best"),
                   "runs": [{"lr": r.lr, "dev_accuracy": r.dev_accuracy, "best": r.best_accuracy,
                             "best_epoch": r.best_epoch, "steps": r.steps, "batch_size": r.batch_size,
                             "out": r.out_dir} for r in results]}
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(f"dev accuracy ({task.name}, {len(task.dev.labels)} examples):")
        print(format_results(results))
        print(f"fine-tuned {task.name}: best dev accuracy {best.best_accuracy:.4f} at lr {best.lr:g} epoch "
              f"{best.best_epoch} -> {summary['best_model']} ({time.time() - t0:.0f}s)")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    malloc.preload_tcmalloc()  # CPU hosts: restart on tcmalloc, see trainer/malloc.py
    sys.exit(run_main(main, errors=(FinetuneError, RunDirError, DataError, ConfigError, DistError)))
