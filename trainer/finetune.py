"""Sequence-classification fine-tuning (GLUE-style) on the DeepSpeed engine, as in the BERT paper.

Model: BertForSequenceClassification ([CLS] pooled output -> dropout -> linear), encoder and pooler copied
from the pretrained BertForPreTraining, classifier head freshly initialised (normal(0, 0.02), seeded).

Recipe (paper, section 4.1 / appendix A.3): batch 32 (the DeepSpeed JSON's train_batch_size), lr in
{5e-5, 3e-5, 2e-5} (train.sweep_lrs: one run per lr, each as the JSON override ds.optimizer.params.lr), 3
epochs, linear warmup over the first 10% of steps then linear decay to 0 (trainer.schedule), dropout 0.1,
max length 128. Engine, weight-decay rule, precision decision, metrics and consolidation of the best weights
are pretraining's own pieces (trainer.engine, trainer.precision, trainer.metrics, trainer.checkpoint_read).

Tasks: GLUE through `datasets` (`nyu-mll/glue`, needs the hub) or local CSV / TSV / JSONL files with a text
column, an optional second text column and a label column. Labels are mapped to ids deterministically:
GLUE keeps its ClassLabel ids; local labels are sorted (numerically when every label is an integer,
otherwise as strings) and the dev set must only use labels seen in training.

Output of one run (``out_dir``): ``ds_config.json`` (as resolved, its lr included), ``metrics.jsonl`` +
``tensorboard/`` (per epoch: dev accuracy/loss, train loss, lr; at the end the best), ``best/`` (our format:
model.safetensors fp32, classifier_config.json, tokenizer/; load with ``load_classifier``) and optionally
``best_hf/`` (transformers' BertForSequenceClassification layout).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bert import BertConfig, BertForSequenceClassification
from common import files
from data.loader import padded_length
from trainer import dist
from trainer.config import FinetuneConfig
from trainer.errors import FinetuneError

log = logging.getLogger(__name__)

# GLUE classification tasks: name -> (first text column, second text column or None, dev split).
# STS-B is regression and is not offered.
GLUE_TASKS = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
}
CLASSIFIER_CONFIG = "classifier_config.json"


# ----------------------------------------------------------------------------------------------
# Task data


@dataclass
class Split:
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    name: str
    train: Split
    dev: Split
    label_names: list[str]

    @property
    def paired(self) -> bool:
        return self.train.text_b is not None


def _sorted_labels(values: set[str]) -> list[str]:
    """Deterministic label order: numeric when every label is an integer ("0" < "2" < "10"), else by string."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _read_rows(path: str) -> tuple[list[dict], list[str]]:
    """Rows (dicts) and column names of a .csv / .tsv / .jsonl file."""
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            # TSV (GLUE's format) has unescaped quotes inside sentences: no quoting there.
            reader = (csv.DictReader(f) if ext == ".csv"
                      else csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            columns = list(reader.fieldnames or [])
            rows = list(reader)
            for n, row in enumerate(rows, 2):  # line 1 is the header
                if None in row or any(v is None for v in row.values()):
                    raise FinetuneError(f"{path}: line {n}: has {len(row) - (None in row)} fields where the "
                                        f"header has {len(columns)}")
            return rows, columns
        if ext in (".jsonl", ".json"):
            rows = files.read_jsonl(path, "data file")
            return rows, list(dict.fromkeys(k for row in rows for k in row))  # columns in order of appearance
    raise FinetuneError(f"{path}: unknown file type {ext!r}; expected .csv, .tsv or .jsonl")


@dataclass
class Columns:
    text: str = "text"
    text_b: str | None = "text_b"
    label: str = "label"
    text_b_explicit: bool = False  # the user named text_b: then it must exist


def _read_split(path: str, cols: Columns) -> tuple[list[str], list[str] | None, list[str]]:
    rows, columns = _read_rows(path)
    if not rows:
        raise FinetuneError(f"{path}: no rows")
    for name, what in ((cols.text, "--text-column"), (cols.label, "--label-column")):
        if name not in columns:
            raise FinetuneError(f"{path}: no column {name!r} (columns: {columns}); choose one with {what}")
    use_b = cols.text_b is not None and cols.text_b in columns
    if cols.text_b_explicit and not use_b:
        raise FinetuneError(f"{path}: no column {cols.text_b!r} (columns: {columns}) given by --text-b-column")
    a, b, labels = [], [] if use_b else None, []
    first_line = 2 if path.lower().endswith((".csv", ".tsv")) else 1
    for n, row in enumerate(rows, first_line):
        text = row.get(cols.text)
        if not isinstance(text, str) or not text.strip():
            raise FinetuneError(f"{path}: row {n}: column {cols.text!r} is empty or not text ({text!r})")
        a.append(text)
        if use_b:
            tb = row.get(cols.text_b)
            if not isinstance(tb, str) or not tb.strip():
                raise FinetuneError(f"{path}: row {n}: column {cols.text_b!r} is empty or not text ({tb!r})")
            b.append(tb)
        label = row.get(cols.label)
        if label is None or str(label).strip() == "":
            raise FinetuneError(f"{path}: row {n}: column {cols.label!r} is empty")
        labels.append(str(label).strip())
    return a, b, labels


def load_local_task(train_path: str, dev_path: str, cols: Columns) -> TaskData:
    """Local CSV/TSV/JSONL train + dev files -> TaskData with deterministic label ids."""
    ta, tb, tl = _read_split(train_path, cols)
    da, db, dl = _read_split(dev_path, cols)
    if (tb is None) != (db is None):
        has, lacks = (train_path, dev_path) if tb is not None else (dev_path, train_path)
        raise FinetuneError(f"{has} has a {cols.text_b!r} column but {lacks} does not; both or neither")
    names = _sorted_labels(set(tl))
    if len(names) < 2:
        raise FinetuneError(f"{train_path}: column {cols.label!r} has only one label value {names}")
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(dl) - set(ids))
    if unknown:
        raise FinetuneError(f"{dev_path}: labels {unknown} do not occur in {train_path} (labels: {names})")
    name = os.path.splitext(os.path.basename(train_path))[0]
    return TaskData(name=name, label_names=names,
                    train=Split(ta, tb, [ids[x] for x in tl]), dev=Split(da, db, [ids[x] for x in dl]))


def load_glue_task(name: str) -> TaskData:  # pragma: no cover - needs the Hugging Face hub
    """GLUE task `name` from the hub (`nyu-mll/glue`); label ids are GLUE's own ClassLabel ids."""
    if name not in GLUE_TASKS:
        raise FinetuneError(f"unknown task {name!r}; GLUE classification tasks: {', '.join(GLUE_TASKS)} "
                            f"(or use --train/--dev with local files)")
    import datasets

    col_a, col_b, dev_split = GLUE_TASKS[name]
    try:
        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as e:  # network/hub errors come in many types; the message is what matters
        raise FinetuneError(f"cannot load GLUE task {name!r} from the hub ({type(e).__name__}: {e}); "
                            f"offline, pass --train/--dev files instead") from None
    label_names = list(ds["train"].features["label"].names)

    def split(part) -> Split:
        return Split(list(part[col_a]), list(part[col_b]) if col_b else None, [int(x) for x in part["label"]])

    return TaskData(name=name, train=split(ds["train"]), dev=split(ds[dev_split]), label_names=label_names)


# ----------------------------------------------------------------------------------------------
# Encoding and batching


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode_split(tokenizer, split: Split, max_len: int) -> Encoded:
    ids, types = [], []
    for i in range(len(split)):
        a, t = tokenizer.encode_pair(split.text_a[i], split.text_b[i] if split.text_b is not None else None,
                                     max_length=max_len)
        ids.append(a)
        types.append(t)
    return Encoded(ids, types, list(split.labels))


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict:
    """Pad the chosen examples to the batch's longest, rounded up to a multiple of 8."""
    S = padded_length(max(len(data.input_ids[i]) for i in indices))
    B = len(indices)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
    token_type_ids = torch.zeros((B, S), dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros((B, S), dtype=torch.long)  # (B, S), 1 = real token
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        token_type_ids[row, :n] = torch.tensor(data.token_type_ids[i])
        attention_mask[row, :n] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels}


def train_batches(n: int, micro_batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro batches for one epoch: a permutation from (seed, epoch), position p -> rank
    p % world, the last partial round wrapped around so every rank gets the same number of batches
    (ceil(n / world) samples each, as torch's DistributedSampler)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = -(-n // world)
    order += order[: per_rank * world - n]  # wrap: a few samples seen twice when n % world != 0
    mine = order[rank::world]
    return [mine[i: i + micro_batch] for i in range(0, len(mine), micro_batch)]


def dev_batches(n: int, micro_batch: int, rank: int, world: int) -> list[tuple[list[int], list[bool]]]:
    """Disjoint dev shards (index i -> rank i % world), padded with masked copies of example 0 so every
    rank runs the same number of forwards (ZeRO-3 gathers parameters in every forward)."""
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    real = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    return [(mine[i: i + micro_batch], real[i: i + micro_batch]) for i in range(0, per_rank, micro_batch)]


# ----------------------------------------------------------------------------------------------
# Model


def build_classifier(pretrained, num_labels: int, dropout: float, seed: int) -> BertForSequenceClassification:
    """Encoder + pooler from `pretrained` (BertForPreTraining), new head; dropout set on every layer."""
    config = dataclasses.replace(pretrained.config, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)  # the head's init: same on every rank and every run with this seed
    model = BertForSequenceClassification(config, num_labels)
    model.bert.load_state_dict(pretrained.bert.state_dict(), strict=True)
    return model


def save_classifier(model: BertForSequenceClassification, out_dir: str, tokenizer, info: dict) -> None:
    """Our format: model.safetensors (fp32), classifier_config.json, tokenizer/."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_config": model.config.to_dict(), "num_labels": model.num_labels, **info}
    files.write_json(os.path.join(out_dir, CLASSIFIER_CONFIG), cfg)
    tokenizer.save(os.path.join(out_dir, "tokenizer"))


def load_classifier(path: str):
    """(BertForSequenceClassification in eval mode, BertTokenizer, classifier_config dict) from save_classifier."""
    from safetensors.torch import load_file

    from data.tokenizer import load_tokenizer
    from trainer.checkpoint_read import load_state_into

    cfg_path = os.path.join(path, CLASSIFIER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FinetuneError(f"{cfg_path}: missing (not a fine-tuned model directory)")
    with open(cfg_path, encoding="utf-8") as f:
        info = json.load(f)
    model = BertForSequenceClassification(BertConfig.from_dict(info["model_config"]), info["num_labels"])
    load_state_into(model, load_file(os.path.join(path, "model.safetensors")), path)
    return model.eval(), load_tokenizer(os.path.join(path, "tokenizer")), info


def export_classifier_hf(model: BertForSequenceClassification, out_dir: str, tokenizer_dir: str,
                         label_names: list[str], fingerprint: str) -> None:
    """transformers' BertForSequenceClassification layout (bert.hf.to_hf) with num_labels/id2label/label2id."""
    from bert.hf import to_hf

    to_hf(model.float(), out_dir, tokenizer_dir, fingerprint=fingerprint, extra_config={
        "num_labels": len(label_names), "problem_type": "single_label_classification",
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)}})


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class RunResult:
    lr: float
    out_dir: str
    dev_accuracy: list[float] = field(default_factory=list)  # per epoch
    best_accuracy: float = -1.0
    best_epoch: int = 0
    steps: int = 0
    batch_size: int = 0


@torch.no_grad()
def evaluate_classifier(engine, dev: Encoded, micro_batch: int, pad_id: int) -> dict:
    """Exact dev accuracy and mean loss over all ranks (sums and counts all-reduced, divided once)."""
    rank, world = dist.rank_world()
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # correct, loss_sum, count
    for indices, real in dev_batches(len(dev), micro_batch, rank, world):
        batch = collate(dev, indices, pad_id)
        labels = batch.pop("labels")
        logits = engine(**{k: v.to(engine.device) for k, v in batch.items()}).float().cpu()  # (B, C)
        w = torch.tensor(real, dtype=torch.float64)
        loss = F.cross_entropy(logits, labels, reduction="none").double()
        sums += torch.stack([((logits.argmax(-1) == labels).double() * w).sum(), (loss * w).sum(), w.sum()])
    engine.train()
    correct, loss_sum, count = dist.all_reduce_sum(sums.tolist(), engine.device)
    return {"accuracy": correct / count, "loss": loss_sum / count, "count": int(count)}


def _save_best(engine, model, tokenizer, task: TaskData, cfg: FinetuneConfig, out_dir: str, meta: dict) -> None:
    """Consolidated fp32 weights of the engine through a DeepSpeed checkpoint (any ZeRO stage and precision,
    trainer.checkpoint_read's consolidation) -> out_dir/best (and best_hf). Collective."""
    from trainer.checkpoint_files import read_model_states
    from trainer.checkpoint_read import consolidate_fp32, load_state_into

    ckpt_dir = os.path.join(out_dir, "checkpoint_tmp")
    engine.save_checkpoint(ckpt_dir, tag="best", save_latest=False)
    dist.barrier()
    if dist.rank_world()[0] == 0:
        states = read_model_states(os.path.join(ckpt_dir, "best"))
        best = BertForSequenceClassification(model.config, model.num_labels)
        sd, _how = consolidate_fp32(ckpt_dir, "best", states, best)
        load_state_into(best, sd, ckpt_dir)
        # each folder is complete or still the previous epoch's: written aside, renamed over the old one
        with files.atomic_dir(os.path.join(out_dir, "best"), replace=True) as tmp:
            save_classifier(best, tmp, tokenizer, meta)
        if cfg.train.export_hf:
            with files.atomic_dir(os.path.join(out_dir, "best_hf"), replace=True) as tmp:
                export_classifier_hf(best, tmp, os.path.join(out_dir, "best", "tokenizer"), task.label_names,
                                     tokenizer.fingerprint)
    dist.barrier()


def finetune(pretrained, tokenizer, task: TaskData, ds_config: dict, cfg: FinetuneConfig, out_dir: str, *,
             info: dict | None = None) -> RunResult:
    """One fine-tuning run with the resolved DeepSpeed JSON ``ds_config`` (its lr is the peak); collective
    (every rank calls it). Returns per-epoch dev accuracy and the best; rank 0 writes out_dir."""
    from tqdm import tqdm

    from trainer.engine import build_engine
    from trainer.metrics import MetricsWriter
    from trainer.schedule import lr_at, set_lr

    rank, world = dist.rank_world()
    t = cfg.train
    model = build_classifier(pretrained, len(task.label_names), cfg.model.dropout, t.seed)
    engine = build_engine(model, ds_config)
    peak_lr = float(ds_config["optimizer"]["params"]["lr"])
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    batch_size = engine.train_batch_size()  # micro x accum x world, as resolved

    train = encode_split(tokenizer, task.train, cfg.task.max_len)
    dev = encode_split(tokenizer, task.dev, cfg.task.max_len)
    micro_per_epoch = len(train_batches(len(train), micro, rank, world, t.seed, 0))
    # Optimizer steps happen every `accum` micro batches, counted across epoch boundaries.
    total_steps = max(1, t.epochs * micro_per_epoch // accum)
    warmup_steps = round(t.warmup_fraction * total_steps)

    writer = MetricsWriter(out_dir, enabled=rank == 0)
    if rank == 0:
        files.write_json(os.path.join(out_dir, "ds_config.json"), ds_config)
        print(f"fine-tune {task.name}: {len(train)} train / {len(dev)} dev examples, {len(task.label_names)} "
              f"labels, batch {batch_size} (micro {micro} x accum {accum} x world {world}), lr {peak_lr:g}, "
              f"{t.epochs} epochs = {total_steps} steps, warmup {warmup_steps}", file=sys.stderr)
    result = RunResult(lr=peak_lr, out_dir=out_dir, batch_size=batch_size)
    step = 0
    engine.train()
    try:
        for epoch in range(1, t.epochs + 1):
            loss_sum = [0.0, 0.0]  # train loss sum, examples
            batches = train_batches(len(train), micro, rank, world, t.seed, epoch)
            for indices in tqdm(batches, desc=f"epoch {epoch}/{t.epochs} lr {peak_lr:g}",
                                disable=None if rank == 0 else True, leave=False):
                batch = {k: v.to(engine.device) for k, v in collate(train, indices, tokenizer.pad_id).items()}
                loss, _logits = engine(**batch)
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():  # this step() updates the weights
                    set_lr(engine.optimizer, lr_at(min(engine.global_steps, total_steps - 1), peak_lr,
                                                   warmup_steps, total_steps))
                engine.step()
                loss_sum = [loss_sum[0] + loss.item() * len(indices), loss_sum[1] + len(indices)]
                step = engine.global_steps
            train_loss = dist.all_reduce_sum(loss_sum, engine.device)
            dev_metrics = evaluate_classifier(engine, dev, micro, tokenizer.pad_id)
            acc = dev_metrics["accuracy"]
            result.dev_accuracy.append(acc)
            record = {"step": step, "epoch": epoch, "lr_peak": peak_lr, "lr": engine.optimizer.param_groups[0]["lr"],
                      "warmup_steps": warmup_steps, "total_steps": total_steps,
                      "train/loss": train_loss[0] / train_loss[1],
                      "dev/accuracy": acc, "dev/loss": dev_metrics["loss"], "dev/examples": dev_metrics["count"]}
            writer.record(record)
            writer.scalars(step, {k: v for k, v in record.items() if "/" in k or k == "lr"})
            improved = acc > result.best_accuracy
            if improved:
                result.best_accuracy, result.best_epoch = acc, epoch
                _save_best(engine, model, tokenizer, task, cfg, out_dir, {
                    "task": task.name, "labels": task.label_names, "paired": task.paired,
                    "max_len": cfg.task.max_len, "lr": peak_lr, "epoch": epoch, "step": step, "dev_accuracy": acc,
                    "tokenizer_fingerprint": tokenizer.fingerprint, **(info or {})})
            if rank == 0:
                print(f"epoch {epoch}: dev accuracy {acc:.4f} (loss {dev_metrics['loss']:.4f}), train loss "
                      f"{record['train/loss']:.4f}{'  *best*' if improved else ''}", file=sys.stderr)
        result.steps = step
        writer.record({"step": step, "best/dev_accuracy": result.best_accuracy, "best/epoch": result.best_epoch,
                       "lr_peak": peak_lr})
        writer.scalars(step, {"best/dev_accuracy": result.best_accuracy})
    finally:
        writer.close()
        if rank == 0:  # optimizer states: not needed once best/ is written
            shutil.rmtree(os.path.join(out_dir, "checkpoint_tmp"), ignore_errors=True)
        del engine
        gc.collect()
    if not math.isfinite(result.best_accuracy):
        raise FinetuneError("dev accuracy is not finite")
    return result


def format_results(results: list[RunResult]) -> str:
    """Final table: one row per learning rate, dev accuracy per epoch, best; '*' marks the best run."""
    epochs = max(len(r.dev_accuracy) for r in results)
    best = max(results, key=lambda r: r.best_accuracy)
    head = f"{'lr':>8} " + " ".join(f"{'ep' + str(e + 1):>7}" for e in range(epochs)) + f" {'best':>7} {'epoch':>5}"
    lines = [head]
    for r in results:
        cells = " ".join(f"{a:7.4f}" for a in r.dev_accuracy)
        mark = " *" if r is best and len(results) > 1 else ""
        lines.append(f"{r.lr:8.0e} {cells} {r.best_accuracy:7.4f} {r.best_epoch:5d}{mark}")
    return "\n".join(lines)


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


def _load_task(cfg: FinetuneConfig, rank: int) -> TaskData:
    k = cfg.task
    if k.name is None:
        columns = Columns(text=k.text_column, text_b=k.text_b_column or "text_b", label=k.label_column,
                          text_b_explicit=k.text_b_column is not None)
        return load_local_task(k.train, k.dev, columns)
    if rank != 0:  # rank 0 downloads into the datasets cache first; the others then read the cache
        dist.barrier()
    task = load_glue_task(k.name)
    if rank == 0:
        dist.barrier()
    return task


def run(ds_path: str, config_path: str | None, overrides: list[str]) -> int:
    """Fine-tune as configured: one run per train.sweep_lrs entry (each its own JSON override of the lr),
    or one at the JSON's lr; prints the table and a summary JSON line (rank 0)."""
    t0 = time.time()
    from deepspeed.accelerator import get_accelerator

    from data.tokenizer import load_tokenizer
    from trainer import config as configs, engine as eng, precision
    from trainer.checkpoint_read import load_pretrained

    cfg = configs.load(config_path, [o for o in overrides if not o.startswith("ds.")], FinetuneConfig)
    ds_raw = eng.apply_ds_overrides(eng.load_ds_config(ds_path), ds_path,
                                    configs.parse_overrides([o for o in overrides if o.startswith("ds.")]))
    world = int(dist.setup_env()["WORLD_SIZE"])
    device_kind = get_accelerator().device_name()
    facts = precision.device_facts(device_kind)
    eng.resolve(ds_raw, ds_path, facts, world)  # refuse a bad JSON before anything is loaded
    rank, local_rank, world = dist.init()
    if device_kind == "cuda":
        get_accelerator().set_device(local_rank)
    pretrained, own_tokenizer, meta = load_pretrained(cfg.model.path, cfg.model.tag)
    tokenizer = load_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else own_tokenizer
    check_tokenizer(tokenizer, meta, cfg.model.allow_tokenizer_mismatch, pretrained.config.vocab_size)
    if cfg.task.max_len > pretrained.config.max_position_embeddings:
        raise FinetuneError(f"--max-len {cfg.task.max_len} exceeds the model's max_position_embeddings "
                            f"{pretrained.config.max_position_embeddings} ({cfg.model.path}); pass --max-len "
                            f"{pretrained.config.max_position_embeddings} or less")
    task = _load_task(cfg, rank)
    info = {"pretrained": os.path.abspath(cfg.model.path), "pretrained_tag": meta.tag,
            "pretraining_tokenizer_fingerprint": meta.tokenizer_fingerprint}
    sweep = cfg.train.sweep_lrs
    results = []
    for lr in sweep or [None]:
        ds = ds_raw if lr is None else eng.apply_ds_overrides(ds_raw, ds_path, [("ds.optimizer.params.lr", lr)])
        resolved = eng.resolve(ds, ds_path, facts, world)
        out = os.path.join(cfg.train.out, f"lr_{lr:g}") if sweep else cfg.train.out
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            print(eng.precision_note(resolved), file=sys.stderr)
        results.append(finetune(pretrained, tokenizer, task, resolved.ds, cfg, out, info=info))
    best = max(results, key=lambda r: r.best_accuracy)
    if rank == 0:
        summary = {"task": task.name, "best_lr": best.lr, "best_dev_accuracy": best.best_accuracy,
                   "best_epoch": best.best_epoch, "best_model": os.path.join(best.out_dir, "best"),
                   "runs": [{"lr": r.lr, "dev_accuracy": r.dev_accuracy, "best": r.best_accuracy,
                             "best_epoch": r.best_epoch, "steps": r.steps, "batch_size": r.batch_size,
                             "out": r.out_dir} for r in results]}
        files.write_json(os.path.join(cfg.train.out, "summary.json"), summary)
        print(f"dev accuracy ({task.name}, {len(task.dev.labels)} examples):")
        print(format_results(results))
        print(f"fine-tuned {task.name}: best dev accuracy {best.best_accuracy:.4f} at lr {best.lr:g} epoch "
              f"{best.best_epoch} -> {summary['best_model']} ({time.time() - t0:.0f}s)")
        print(json.dumps(summary))
    dist.shutdown()
    return 0
