"""Sequence-classification fine-tuning (GLUE-style) as in the BERT paper, trained by the project's one loop:
a ``trainer.trainer.Trainer`` with a classifier objective, an epoch loader and a dev evaluator.

Recipe (paper, section 4.1 / appendix A.3): batch 32 (the DeepSpeed JSON's train_batch_size), lr in
{5e-5, 3e-5, 2e-5} (train.sweep_lrs: one run per lr, each as the JSON override ds.optimizer.params.lr), 3
epochs, linear warmup over the first 10% of steps then linear decay to 0 (trainer.schedule), dropout 0.1,
max length 128. Task data and the classifier model are trainer.finetune_task's; start-up, engine, precision,
the step, stop signals, checkpoints and metrics are pretraining's own (trainer.startup, trainer.trainer).

Because it is the Trainer: a stop signal (SIGTERM, SIGUSR1, Ctrl-C) makes every rank save the same step and
exit 0; the same command resumes the sweep: finished runs (``result.json``) are skipped, the interrupted one
continues at its step with the same batches (the loader's position and the RNG streams are in its checkpoint,
the dev history in the Trainer's state); a non-finite loss stops it (exit 3). An epoch is a whole number of
optimizer steps (its last step padded with zero-weight batches when the accumulation does not divide it), so
the dev evaluation and the checkpoint of each epoch fall on a step boundary.

Output of one run (``out_dir``; OUT/lr_<lr>/ in a sweep): ``settings.json`` (what a later start must match),
``ds_config.json`` (as resolved, its lr included), ``metrics.jsonl`` + ``tensorboard/`` (the loop's log lines;
per epoch a record with dev accuracy/loss, train loss, lr; at the end the best), ``checkpoints/`` while it
runs, ``best/`` (our format: model.safetensors fp32, classifier_config.json, tokenizer/; load with
``finetune_task.load_classifier``), optionally ``best_hf/`` (transformers' layout) and, once finished,
``result.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from bert import BertForSequenceClassification
from common import files
from trainer import dist, startup
from trainer.callbacks import Callback
from trainer.config import FinetuneConfig
from trainer.errors import FinetuneError
from trainer.finetune_task import (Encoded, TaskData, build_classifier, check_tokenizer, collate, dev_batches,
                                   encode_split, export_classifier_hf, load_task, save_classifier, train_batches)

RESULT, SETTINGS = "result.json", "settings.json"


def log(rank: int, msg: str) -> None:
    """Rank 0 prints to stderr (stdout carries the final table and JSON line); through tqdm.write, so a line
    never lands inside the progress bar's line."""
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"[finetune] {msg}", file=sys.stderr)
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# What the Trainer runs: loader, objective, dev evaluator


class EpochLoader:
    """This rank's training micro-batches, epoch after epoch, as the Trainer reads a loader. Each epoch is a
    permutation from (seed, epoch) (finetune_task.train_batches), padded at its end with zero-weight batches
    (``is_padding``) to whole optimizer steps. Its position (epoch, batch) is what a checkpoint holds; it is a
    position in this rank's plan, so a resume needs the same number of ranks."""

    def __init__(self, data: Encoded, micro: int, accum: int, rank: int, world: int, seed: int, pad_id: int):
        self.data, self.micro, self.accum, self.pad_id = data, micro, accum, pad_id
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch, self.index = 1, 0  # the next micro-batch to yield
        self.steps_per_epoch = -(-len(train_batches(len(data), micro, rank, world, seed, 1)) // accum)

    def _plan(self, epoch: int) -> list[Optional[list[int]]]:
        """The epoch's micro-batches (example indices); None: a padding batch."""
        plan: list = train_batches(len(self.data), self.micro, self.rank, self.world, self.seed, epoch)
        return plan + [None] * (self.steps_per_epoch * self.accum - len(plan))

    def __iter__(self):
        while True:
            plan = self._plan(self.epoch)
            while self.index < len(plan):
                indices = plan[self.index]
                self.index += 1
                yield self._batch(plan[0] if indices is None else indices, padding=indices is None)
            self.epoch, self.index = self.epoch + 1, 0

    def _batch(self, indices: list[int], padding: bool) -> dict:
        """collate's tensors and the host facts the Trainer reads (no device value is read for them)."""
        return {**collate(self.data, indices, self.pad_id), "is_padding": padding,
                "keys": [] if padding else list(indices),
                "tokens": sum(len(self.data.input_ids[i]) for i in indices)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.index, "world_size": self.world}

    def load_state_dict(self, sd: dict) -> str:
        if sd["world_size"] != self.world:
            raise ValueError(f"its position is in the batches of {sd['world_size']} rank(s); resume fine-tuning "
                             f"on {sd['world_size']} rank(s) (this start has {self.world})")
        self.epoch, self.index = sd["epoch"], sd["batch"]
        return ""

    def health_report(self) -> dict:
        """Nothing to report: the examples are in memory (the Trainer asks every loader)."""
        return {"opened": {}, "damaged": {}, "corrupt": {}}


class ClassifierObjective:
    """bert.BertForSequenceClassification for the Trainer: cross-entropy on the labels; a log line's ``loss`` is
    the example-weighted mean and ``accuracy`` the training accuracy, from exact sums."""

    sum_keys = ("cls_loss_sum", "cls_correct", "cls_count")

    def inputs(self, batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "labels")}

    def __call__(self, out, inputs: dict) -> tuple[torch.Tensor, dict]:
        loss, logits = out
        labels = inputs["labels"]
        return loss, {"cls_loss_sum": loss.detach().float() * labels.shape[0],
                      "cls_correct": (logits.detach().argmax(-1) == labels).sum(), "cls_count": labels.shape[0]}

    def summary(self, sums: dict) -> dict:
        n = sums["cls_count"]
        return {"loss": sums["cls_loss_sum"] / n if n else float("nan"),
                "accuracy": sums["cls_correct"] / n if n else float("nan")}


@dataclass
class RunResult:
    lr: float
    out_dir: str
    dev_accuracy: list[float] = field(default_factory=list)  # per epoch
    best_accuracy: float = -1.0
    best_epoch: int = 0
    steps: int = 0
    batch_size: int = 0


@dataclass
class Plan:
    """One run of the sweep: its folder, peak lr and step arithmetic."""

    out: str
    peak_lr: float
    micro: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    warmup_fraction: float

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.total_steps)


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


class DevEvaluator(Callback):
    """The Trainer's validation for fine-tuning: at the end of each epoch, dev accuracy and loss over every rank,
    one record (with the epoch's train loss and the lr), and the best epoch's model kept in ``out/best``. Its
    history is a component of the Trainer's state (a checkpoint holds it), so a resumed run reports and keeps
    the same best as an uninterrupted one. The epoch's train loss is summed from the log lines of its steps
    (the whole epoch when the checkpoint a run resumed from was at a log step)."""

    def __init__(self, engine, model, dev: Encoded, plan: Plan, metrics, save_best, pad_id: int,
                 log=print):
        self.engine, self.model, self.dev, self.plan, self.metrics = engine, model, dev, plan, metrics
        self.save_best, self.pad_id, self.log = save_best, pad_id, log
        self.dev_accuracy: list[float] = []
        self.best_accuracy, self.best_epoch = -1.0, 0
        self.epoch_sums = [0.0, 0.0]  # train loss sum, examples of the epoch's log lines so far

    def state_dict(self) -> dict:
        return {"dev_accuracy": list(self.dev_accuracy), "best_accuracy": self.best_accuracy,
                "best_epoch": self.best_epoch, "epoch_sums": list(self.epoch_sums)}

    def load_state_dict(self, sd: dict) -> None:
        self.dev_accuracy, self.epoch_sums = list(sd["dev_accuracy"]), list(sd["epoch_sums"])
        self.best_accuracy, self.best_epoch = sd["best_accuracy"], sd["best_epoch"]

    def on_log(self, trainer, record, sums, elapsed) -> None:
        self.epoch_sums = [self.epoch_sums[0] + sums["cls_loss_sum"], self.epoch_sums[1] + sums["cls_count"]]

    def __call__(self, step: int, stop=None) -> bool:
        """At an epoch's last step, once per epoch (a resume of the last step's checkpoint does not evaluate it
        again); a dev pass is short, so it runs to its end even when a stop arrives."""
        p = self.plan
        epoch = step // p.steps_per_epoch
        if step == 0 or step % p.steps_per_epoch or epoch <= len(self.dev_accuracy):
            return True
        dev = evaluate_classifier(self.engine, self.dev, p.micro, self.pad_id)
        acc = dev["accuracy"]
        self.dev_accuracy.append(acc)
        train_loss = self.epoch_sums[0] / self.epoch_sums[1] if self.epoch_sums[1] else float("nan")
        self.epoch_sums = [0.0, 0.0]
        record = {"step": step, "epoch": epoch, "lr_peak": p.peak_lr, "lr": self.engine.optimizer.param_groups[0]["lr"],
                  "warmup_steps": p.warmup_steps, "total_steps": p.total_steps, "train/loss": train_loss,
                  "dev/accuracy": acc, "dev/loss": dev["loss"], "dev/examples": dev["count"]}
        self.metrics.record(record)
        self.metrics.scalars(step, {k: v for k, v in record.items() if "/" in k})
        improved = acc > self.best_accuracy
        if improved:
            self.best_accuracy, self.best_epoch = acc, epoch
            self.save_best(self.engine, self.model, {"epoch": epoch, "step": step, "dev_accuracy": acc})
        self.log(f"epoch {epoch}: dev accuracy {acc:.4f} (loss {dev['loss']:.4f}), train loss "
                 f"{train_loss:.4f}{'  *best*' if improved else ''}")
        if epoch == p.epochs:
            self.metrics.record({"step": step, "best/dev_accuracy": self.best_accuracy, "best/epoch": self.best_epoch,
                                 "lr_peak": p.peak_lr})
            self.metrics.scalars(step, {"best/dev_accuracy": self.best_accuracy})
        return True


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


# ----------------------------------------------------------------------------------------------
# One run of the sweep, and the sweep


@dataclass
class Context:
    """What every run of a sweep shares."""

    cfg: FinetuneConfig
    ds_path: str
    start: startup.Start
    rank: int
    world: int
    pretrained: object  # bert.BertForPreTraining
    tokenizer: object
    task: TaskData
    train: Encoded
    dev: Encoded
    info: dict  # where the pretrained model came from (recorded with the best model)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_settings(out: str, settings: dict) -> None:
    """A run folder continues only with the settings it started with (the sweep's list of lrs may change)."""
    path = os.path.join(out, SETTINGS)
    recorded = files.read_json(path, "fine-tuning settings")
    new, old = _flat(json.loads(json.dumps(settings))), _flat(recorded)
    diffs = [f"{k} is {old.get(k)!r} in {path} but {new.get(k)!r} in this start"
             for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]
    if diffs:
        raise FinetuneError(f"cannot continue the fine-tuning run in {out}: " + "; ".join(diffs)
                            + "; keep them, or fine-tune into another --out")


def _settings(ctx: Context, ds: dict) -> dict:
    cfg = ctx.cfg.to_dict()
    cfg["train"].pop("sweep_lrs")
    return {"finetune": cfg, "ds_config": ds, "world_size": ctx.world, **ctx.info}


def _open_folder(ctx: Context, out: str, ds: dict) -> Optional[RunResult]:
    """The run's folder: a finished run's result (checked against this start's settings), or None after
    checking (or, on its first start, writing) its settings. Every rank gets the same answer or refusal."""
    settings = _settings(ctx, ds)

    def decide(_heartbeat):
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, SETTINGS)):
            _check_settings(out, settings)
        else:
            files.write_json(os.path.join(out, SETTINGS), settings)
            files.write_json(os.path.join(out, "ds_config.json"), ds)
        done = os.path.join(out, RESULT)
        return files.read_json(done, "fine-tuning result") if os.path.exists(done) else None

    from trainer.checkpoint import on_rank0

    result = on_rank0(decide, f"fine-tuning run folder {out}")
    return RunResult(**result) if result is not None else None


def _trainer(ctx: Context, plan: Plan, engine, model, resolved, checkpointer, metrics):
    """The Trainer of one run: the classifier objective, the epoch loader, the dev evaluator."""
    from data.health import DataHealth
    from trainer.callbacks import GradNorm
    from trainer.config import RollbackConfig, TrainConfig
    from trainer.rollback import Rollback
    from trainer.trainer import RunInfo, Trainer

    t, say = ctx.cfg.train, (lambda m: log(ctx.rank, m))
    loader = EpochLoader(ctx.train, plan.micro, engine.gradient_accumulation_steps(), ctx.rank, ctx.world, t.seed,
                         ctx.tokenizer.pad_id)
    meta = {"task": ctx.task.name, "labels": ctx.task.label_names, "paired": ctx.task.paired,
            "max_len": ctx.cfg.task.max_len, "lr": plan.peak_lr, "tokenizer_fingerprint": ctx.tokenizer.fingerprint,
            **ctx.info}
    evaluator = DevEvaluator(engine, model, ctx.dev, plan, metrics, pad_id=ctx.tokenizer.pad_id, log=say,
                             save_best=lambda e, m, at: _save_best(e, m, ctx.tokenizer, ctx.task, ctx.cfg, plan.out,
                                                                   {**meta, **at}))
    spe = plan.steps_per_epoch
    log_every = t.log_every or spe  # a divisor of the epoch, so that every epoch ends with a log line
    log_every = max(d for d in range(1, min(log_every, spe) + 1) if spe % d == 0)
    cfg = TrainConfig(max_steps=plan.total_steps, warmup_steps=plan.warmup_steps, seed=t.seed, output_dir=plan.out,
                      log_every=log_every, eval_every=spe, save_every=spe, keep_checkpoints=1, log_batch_keys=True)
    info = RunInfo(rank=ctx.rank, world=ctx.world, precision=resolved.precision, global_batch=plan.batch_size,
                   peak_lr=plan.peak_lr, warmup=plan.warmup_steps, peak_tflops=1.0, flops={}, ds_path=ctx.ds_path,
                   min_loss_scale=float((resolved.ds.get("fp16") or {}).get("min_loss_scale", 1)), name="finetune")
    # No rollback: the epoch loader has no skip list, and a fine-tuning run is minutes long (a divergence stops it,
    # naming the last good checkpoint, as it did before rollbacks existed).
    no_rollback = Rollback(RollbackConfig(enabled=False))
    return Trainer(engine, loader, cfg, info, metrics=metrics, checkpointer=checkpointer, health=DataHealth(0, 0.0, 0),
                   validate=evaluator, stop=ctx.start.stop, log=say, callbacks=[GradNorm(), evaluator],
                   objective=ClassifierObjective(), components={"dev": evaluator}, rollback=no_rollback), evaluator


def finetune(ctx: Context, out: str, resolved) -> RunResult | int:
    """One run of the sweep (collective): its RunResult, or the exit status when it stopped early (0: a stop
    signal, saved; the same command resumes it)."""
    from trainer import checkpoint, rng
    from trainer.metrics import MetricsWriter

    done = _open_folder(ctx, out, resolved.ds)
    if done is not None:
        log(ctx.rank, f"{out}: finished earlier (best dev accuracy {done.best_accuracy:.4f}): not run again")
        return done
    t = ctx.cfg.train
    model = build_classifier(ctx.pretrained, len(ctx.task.label_names), ctx.cfg.model.dropout, t.seed)
    rng.seed_all(t.seed + 1000 * ctx.rank)  # per-rank dropout streams, the same in every run of the sweep
    meta = {"run_config": ctx.cfg.to_dict(), "model_config": {**model.config.to_dict(), "num_labels": model.num_labels},
            "ds_config": resolved.ds, "tokenizer_fingerprint": ctx.tokenizer.fingerprint,
            "max_seq_len": ctx.cfg.task.max_len, "format_version": None}
    ckpt_dir = os.path.join(out, "checkpoints")
    checkpointer = checkpoint.Checkpointer(ckpt_dir, 1, meta, log=lambda m: log(ctx.rank, m))
    engine, resume, state = startup.open_engine(model, resolved.ds, checkpointer,
                                                checkpoint.resolve_resume("auto", ckpt_dir))
    plan = _make_plan(ctx, out, resolved, engine)
    checkpointer.every = plan.steps_per_epoch  # a checkpoint at each epoch's end (the plan needs the engine)
    metrics = MetricsWriter(out, enabled=ctx.rank == 0, resume_step=state["step"] if state else None)
    trainer, evaluator = _trainer(ctx, plan, engine, model, resolved, checkpointer, metrics)
    if state is not None:
        startup.resume_trainer(trainer, state, resume, ctx.world, lambda m: log(ctx.rank, m))
    try:
        code = trainer.train()
        if code or not trainer.finished:
            return code
        result = RunResult(plan.peak_lr, out, evaluator.dev_accuracy, evaluator.best_accuracy, evaluator.best_epoch,
                           trainer.step, plan.batch_size)
        if not math.isfinite(result.best_accuracy):
            raise FinetuneError("dev accuracy is not finite")
        if ctx.rank == 0:  # the result first: a run with one is done, whatever else is left of it
            files.write_json(os.path.join(out, RESULT), dataclasses.asdict(result))
            for name in ("checkpoints", "checkpoint_tmp"):  # optimizer states: not needed once best/ is written
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        dist.barrier()
        return result
    finally:
        del engine, trainer, evaluator
        gc.collect()


def _make_plan(ctx: Context, out: str, resolved, engine) -> Plan:
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    per_epoch = len(train_batches(len(ctx.train), micro, ctx.rank, ctx.world, ctx.cfg.train.seed, 1))
    plan = Plan(out, float(resolved.ds["optimizer"]["params"]["lr"]), micro, engine.train_batch_size(),
                -(-per_epoch // accum), ctx.cfg.train.epochs, ctx.cfg.train.warmup_fraction)
    log(ctx.rank, f"fine-tune {ctx.task.name}: {len(ctx.train)} train / {len(ctx.dev)} dev examples, "
                  f"{len(ctx.task.label_names)} labels, batch {plan.batch_size} (micro {micro} x accum {accum} x "
                  f"world {ctx.world}), lr {plan.peak_lr:g}, {plan.epochs} epochs = {plan.total_steps} steps, "
                  f"warmup {plan.warmup_steps}")
    return plan


def _context(cfg: FinetuneConfig, ds_path: str, start: startup.Start, rank: int, world: int) -> Context:
    """The pretrained model, the tokenizer (checked against the model's), the task and its encoding."""
    from data.tokenizer import load_tokenizer
    from trainer.checkpoint_read import load_pretrained

    pretrained, own_tokenizer, meta = load_pretrained(cfg.model.path, cfg.model.tag)
    tokenizer = load_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else own_tokenizer
    check_tokenizer(tokenizer, meta, cfg.model.allow_tokenizer_mismatch, pretrained.config.vocab_size)
    if cfg.task.max_len > pretrained.config.max_position_embeddings:
        raise FinetuneError(f"--max-len {cfg.task.max_len} exceeds the model's max_position_embeddings "
                            f"{pretrained.config.max_position_embeddings} ({cfg.model.path}); pass --max-len "
                            f"{pretrained.config.max_position_embeddings} or less")
    task = load_task(cfg, rank)
    info = {"pretrained": os.path.abspath(cfg.model.path), "pretrained_tag": meta.tag,
            "pretraining_tokenizer_fingerprint": meta.tokenizer_fingerprint}
    return Context(cfg, ds_path, start, rank, world, pretrained, tokenizer, task,
                   encode_split(tokenizer, task.train, cfg.task.max_len),
                   encode_split(tokenizer, task.dev, cfg.task.max_len), info)


def _report(ctx: Context, results: list[RunResult], seconds: float) -> None:
    """Rank 0: summary.json, the table (one row per lr) and one JSON line on stdout."""
    if ctx.rank != 0:
        return
    best = max(results, key=lambda r: r.best_accuracy)
    summary = {"task": ctx.task.name, "best_lr": best.lr, "best_dev_accuracy": best.best_accuracy,
               "best_epoch": best.best_epoch, "best_model": os.path.join(best.out_dir, "best"),
               "runs": [{"lr": r.lr, "dev_accuracy": r.dev_accuracy, "best": r.best_accuracy,
                         "best_epoch": r.best_epoch, "steps": r.steps, "batch_size": r.batch_size,
                         "out": r.out_dir} for r in results]}
    files.write_json(os.path.join(ctx.cfg.train.out, "summary.json"), summary)
    print(f"dev accuracy ({ctx.task.name}, {len(ctx.task.dev.labels)} examples):")
    print(format_results(results))
    print(f"fine-tuned {ctx.task.name}: best dev accuracy {best.best_accuracy:.4f} at lr {best.lr:g} epoch "
          f"{best.best_epoch} -> {summary['best_model']} ({seconds:.0f}s)")
    print(json.dumps(summary))


def run(ds_path: str, config_path: str | None, overrides: list[str]) -> int:
    """Fine-tune as configured: one run per train.sweep_lrs entry (each its own JSON override of the lr, in
    OUT/lr_<lr>/), or one at the JSON's lr in OUT; prints the table and a summary JSON line (rank 0). Returns
    the exit status: 0 also when a stop signal saved the run (the same command resumes it)."""
    from trainer import engine as eng

    t0 = time.time()
    start = startup.begin(ds_path, config_path, overrides, FinetuneConfig)
    cfg = start.cfg
    start.resolve(start.ds_raw, ds_path)  # refuse a bad JSON before anything is loaded
    rank, local_rank, world = dist.init()
    startup.configure_device(start.device_kind, local_rank, lambda m: log(rank, m))
    ctx = _context(cfg, ds_path, start, rank, world)
    sweep = cfg.train.sweep_lrs
    results = []
    for lr in sweep or [None]:
        ds = start.ds_raw if lr is None else eng.apply_ds_overrides(start.ds_raw, ds_path,
                                                                   [("ds.optimizer.params.lr", lr)])
        resolved = start.resolve(ds, ds_path)
        log(rank, eng.precision_note(resolved))
        result = finetune(ctx, os.path.join(cfg.train.out, f"lr_{lr:g}") if sweep else cfg.train.out, resolved)
        if isinstance(result, int):  # stopped: by a signal (0, saved) or an error
            if result == 0:
                dist.shutdown()
            return result
        results.append(result)
    _report(ctx, results, time.time() - t0)
    dist.shutdown()
    return 0
