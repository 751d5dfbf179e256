"""The one training loop and the one training step, over components built elsewhere (trainer.pretrain builds
them for pretraining, trainer.finetune for fine-tuning; benchmarks.steps times ``train_step``).

``Trainer.train_step`` is the only forward/backward/optimizer step of the project. What differs between
pretraining and fine-tuning is the model's output: an ``objective`` (``PretrainingObjective`` by default)
says which inputs the model takes, which loss to step on and which named sums a log line reports.

State registers itself with the checkpointer (trainer.checkpoint): the Trainer's counters ("trainer"), the
loader's position at the last step boundary ("loader", per rank), the RNG streams ("rng", per rank), the data's
health, the non-finite guard, the schedule, the audit's unlogged step digests, the rollback history with its
spike window, and the run's own ``components`` (fine-tuning's dev history). ``restore`` hands a loaded
checkpoint's parts back. Nothing in the order of construction matters: the loader's workers draw no seed from
the global RNG, so the state can be restored before or after anything else.

A step: the batches of step N are fetched first; then every rank agrees (``guards.agree``: one tiny
all_reduce) on whether some rank's data failed, a stop was requested or the last loss was not finite; only
then does any rank enter the step's collectives. So a rank whose data broke never leaves the others waiting:
all of them stop at the same step, save the last good state and say why. Every collective is bounded
(trainer.dist); when one fails or times out, each rank exits naming its rank, step and phase. The same
agreement carries the step's loss (sum and count over every rank) and its samples' digest (trainer.audit), so a
divergence — a non-finite loss, the fp16 scale at its floor, a loss spike — is judged alike on every rank, and
trainer.rollback rolls all of them back past it together, in this process.

Host syncs (each a pipeline drain on a GPU): a step that does not log reads the device once, the agreement
(which carries the step's non-finite loss count); the loss and metric sums stay on the device, as named sums of a
``Window``, until a log step reduces them over ranks as one tensor. (Not a read of a value, but a wait all the
same on a GPU: the unpadding of a padded batch sizes its gather index with ``nonzero``, bert/padding.py.) What a
log line reports beyond the loss comes from callbacks (trainer.callbacks: on_step_end / on_log / on_eval).

A stop signal (trainer.guards.StopFlag) ends the run at the first agreement after it, in whatever phase it
lands: start-up (the loop's first agreement), a step (the next one), validation (the ranks agree before every
validation batch, so the pass ends after the batch in flight and is not logged), a checkpoint save (the save
finishes, then one agreement: no further step). Every rank saves that same step and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from data.health import DataHealth
from data.loader import model_inputs
from trainer import callbacks as cbs, checkpoint, checkpoint_files, dist, rng
from trainer.audit import StepDigests
from trainer.config import TrainConfig
from trainer.engine import loss_scale
from trainer.guards import NonFiniteGuard, StopFlag, Verdict, agree, agree_stop
from trainer.metrics import SUM_KEYS, MetricsWriter, summarize
from trainer.rollback import Rollback
from trainer.schedule import Schedule, set_lr

EXIT_OK, EXIT_DATA, EXIT_NONFINITE, EXIT_COLLECTIVE = 0, 2, 3, 4


@dataclass
class RunInfo:
    """Fixed facts of the run that the loop reports."""

    rank: int
    world: int
    precision: str
    global_batch: int
    peak_lr: float
    warmup: int
    peak_tflops: float  # per rank, for MFU
    flops: dict  # trainer.metrics.flop_counts of the model
    ds_path: str  # where the peak lr comes from (named in the non-finite message)
    min_loss_scale: float = 1.0  # fp16's floor (the JSON's fp16.min_loss_scale)
    initial_loss_scale: float = 2.0 ** 16  # fp16's start (2^fp16.initial_scale_power), where a rollback resets it
    name: str = "pretrain"  # what the progress bar says


# The step's own sums (the objective and callbacks add theirs): every rank holds these names from the start, so
# the one reduction of a window lines up even on a rank whose batches were all padding.
STEP_SUMS = ("loss_sum", "micro_batches", "samples", "tokens")


def add_sums(into: dict, values: dict) -> None:
    """Add named values (0-dim tensors, kept on their device in float64, or host numbers) into ``into``."""
    for k, v in values.items():
        v = v.detach().double() if isinstance(v, torch.Tensor) else v
        into[k] = into.get(k, 0.0) + v


class PretrainingObjective:
    """BERT's MLM + NSP (bert.BertForPreTraining): the loss, the exact sums of trainer.metrics.SUM_KEYS, and the
    metrics a log line shows from them (trainer.metrics.summarize)."""

    sum_keys = SUM_KEYS

    def inputs(self, batch: dict) -> dict:
        return model_inputs(batch)

    def __call__(self, out, inputs: dict) -> tuple[torch.Tensor, dict]:
        return out.loss, {k: getattr(out, k) for k in SUM_KEYS}

    def summary(self, sums: dict) -> dict:
        return {k: v for k, v in summarize(sums).items() if k in ("mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")}


@dataclass
class StepStats:
    """What one optimizer step leaves, nothing of it read back to the host: ``lr`` (the step's, a host number),
    ``sums`` (named: 0-dim device tensors in float64 or host numbers), ``nonfinite`` (the count of non-finite
    micro-batch losses, a device tensor the step's agreement reads) and the sample ``keys`` of its batches."""

    lr: float
    sums: dict
    nonfinite: torch.Tensor
    keys: list


@dataclass
class Window:
    """Named sums since the last log line: 0-dim device tensors or host numbers, never read back before the log
    step. ``folded``: the part already summed over ranks (at a validation or a save between two log lines)."""

    sums: dict
    folded: dict = field(default_factory=dict)
    steps: int = 0  # steps in ``sums`` (the same on every rank)
    elapsed: float = 0.0  # training seconds of ``folded``
    keys: list = field(default_factory=list)  # each step's sample keys
    t0: float = field(default_factory=time.perf_counter)

    def add(self, values: dict) -> None:
        add_sums(self.sums, values)

    def add_step(self, stats: StepStats) -> None:
        self.add(stats.sums)
        self.keys.append(stats.keys)
        self.steps += 1


class LoaderAtBoundary:
    """The loader's position at the last step boundary: what a checkpoint holds, since the loader itself has
    already fetched the next step's batches by the time a step is saved. ``note``: what the last restore said
    ("" unless the global batch changed)."""

    def __init__(self, loader):
        self.loader, self.note = loader, ""
        self.mark()

    def mark(self) -> None:
        self._state = self.loader.state_dict()

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, sd: dict) -> None:
        self.note = self.loader.load_state_dict(sd)
        self.mark()


class Trainer:
    def __init__(self, engine, loader, cfg: TrainConfig, info: RunInfo, *, metrics: MetricsWriter,
                 checkpointer: checkpoint.Checkpointer, health: DataHealth,
                 validate: Optional[Callable[..., bool]] = None, stop: Optional[StopFlag] = None,
                 log: Callable[[str], None] = print, callbacks: Optional[list] = None, objective=None,
                 components: Optional[dict] = None, rollback: Optional[Rollback] = None):
        """callbacks: what the log lines report beyond the loss (trainer.callbacks; default: ``standard()``).
        objective: the model's loss and sums (default ``PretrainingObjective``). components: name -> object with
        ``state_dict`` / ``load_state_dict`` whose state a checkpoint holds (the same on every rank). rollback:
        what a divergence does (default: trainer.config.RollbackConfig's defaults)."""
        self.engine, self.loader, self.cfg, self.info, self.health = engine, loader, cfg, info, health
        self.callbacks = cbs.standard() if callbacks is None else list(callbacks)
        self.objective = objective or PretrainingObjective()
        self.components = dict(components or {})
        self.metrics, self.checkpointer, self.validate_fn, self.log = metrics, checkpointer, validate, log
        self.step = self.samples_seen = self.tokens_seen = 0
        self.phase = "start-up"
        self.stop = stop or StopFlag()
        self.stop.where = lambda: f"{self.phase} at step {self.step}"  # read by the signal reader thread
        self.guard = NonFiniteGuard(info.precision, cfg.max_nonfinite, info.min_loss_scale)
        self.schedule = Schedule(info.peak_lr, info.warmup, cfg.max_steps)
        self.boundary = LoaderAtBoundary(loader)
        self.audit = StepDigests()
        self.callbacks.append(self.audit)
        self.rollback = rollback or Rollback(initial_loss_scale=info.initial_loss_scale)
        for name, part, per_rank in (("trainer", self, False), ("loader", self.boundary, True),
                                     ("rng", rng.Streams(), True), ("data_health", health, False),
                                     ("guard", self.guard, False), ("schedule", self.schedule, False),
                                     ("audit", self.audit, False),
                                     *((name, c, False) for name, c in self.components.items())):
            checkpointer.register(name, part, per_rank=per_rank)
        self.rollback.register(checkpointer)
        self._stream = None
        self._last_eval = -1
        self._reported = (0, 0, 0)  # (shards opened, damaged, corrupt samples) this rank told the others of

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.samples_seen, self.tokens_seen = sd["step"], sd["samples_seen"], sd["tokens_seen"]

    def restore(self, view: dict) -> str:
        """Continue from a checkpoint the checkpointer loaded (``Checkpointer.load``'s view): every registered
        component takes its part; returns the loader's note ("" unless the global batch changed)."""
        self.checkpointer.restore(view)
        self.rollback.apply(self)
        self._recheck_suspects()
        return self.boundary.note

    def _recheck_suspects(self) -> None:
        """The shards the checkpoint's run lost samples of are read again: a replaced one is sound, and its
        losses no longer count (the message that stopped the run said: replace them, run the same command)."""
        suspects = self.health.suspects()
        if not suspects:
            return
        problems = self.loader.recheck(suspects)
        sound = [n for n, p in problems.items() if not p]
        self.health.forget(sound)
        if sound and self.info.rank == 0:
            print(f"data: {len(sound)} of {len(suspects)} shard(s) with losses on record are sound now "
                  f"(replaced): {', '.join(sound)}", flush=True)

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> int:
        """Train to cfg.max_steps or to an agreed stop; returns the process exit status."""
        try:
            return self._train()
        except Exception as e:  # noqa: BLE001 - a failed collective is reported, anything else re-raised
            what = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"  # an empty message too
            last = f"last good checkpoint: {self.checkpointer.last_saved or 'none'}"
            if not dist.is_collective_failure(e):
                # The traceback follows (a bug or an unforeseen failure); this line says where the run stood.
                print(f"[rank {self.info.rank}] error during {self.phase} at step {self.step}: {what}; {last}",
                      file=sys.stderr, flush=True)
                raise
            print(f"[rank {self.info.rank}] error: a collective failed during {self.phase} at step {self.step} "
                  f"({what}): another rank stopped or hung (see its message) or the bound "
                  f"train.collective_timeout passed; {last}", file=sys.stderr, flush=True)
            return EXIT_COLLECTIVE

    def _train(self) -> int:
        t, start, t_start = self.cfg, self.step, time.perf_counter()
        self.stop.install()  # (again: trainer.pretrain installs it before the slow start-up)
        self._stream = iter(self.loader)
        batches, error = self._fetch()
        verdict = self._agree(error)
        if not verdict.halt and self.step == 0 and t.eval_every > 0:
            verdict.stop = not self._validate()  # the starting point, so the curve shows where accuracy began
        win, train_time = self._window(), 0.0
        from tqdm import tqdm

        with tqdm(total=t.max_steps, initial=self.step, disable=self.info.rank != 0, desc=self.info.name, unit="step",
                  dynamic_ncols=True, mininterval=1.0, file=sys.stdout) as bar:
            while self.step < t.max_steps and not verdict.halt:
                stats = self.train_step(batches)
                win.add_step(stats)
                bar.update(1)
                for cb in self.callbacks:
                    cb.on_step_end(self, batches, win)
                self.boundary.mark()  # before the next step's batches are fetched
                batches, error = self._fetch()
                verdict = self._agree(error, stats.nonfinite, (stats.sums["loss_sum"], stats.sums["micro_batches"]))
                if verdict.fatal:
                    verdict.fatal = self.rollback.heal(self, verdict.fatal)  # None: rolled back, go on
                    if verdict.fatal:
                        break
                    win, bar.n = self._window(), self.step
                    batches, verdict = self._restart()
                    continue
                if self.logs_at(self.step):
                    train_time += self._log(win, stats.lr, bar)
                    win = self._window()
                if t.eval_every > 0 and self.step % t.eval_every == 0:
                    train_time += self._fold(win)
                    # a stop agreed before this pass leaves it whole (the record a resume would not redo);
                    # a stop arriving during it cuts it short
                    verdict.stop = not self._validate(stoppable=not verdict.halt) or verdict.stop
                    win.t0 = time.perf_counter()  # throughput excludes validation and checkpoint time
                if self.checkpointer.due(self.step) or verdict.halt:
                    train_time += self._fold(win)
                    self._save()
                    if not verdict.halt:  # a stop during the save: this checkpoint is the one, no further step
                        verdict.stop = agree_stop(self.stop.requested, self.engine.device)
                    win.t0 = time.perf_counter()
        if not verdict.fatal:  # the end, or a stop before the first step: a checkpoint of where it is
            if not verdict.halt:
                train_time += self._fold(win)
                if self._last_eval != self.step:
                    verdict.stop = not self._validate()
            if checkpoint_files.tag_for(self.step) != os.path.basename(self.checkpointer.last_saved or ""):
                self._save()
        return self._finish(verdict, self.step - start, time.perf_counter() - t_start, train_time)

    def _restart(self) -> tuple[list[dict], Verdict]:
        """After a rollback: the loader's stream from its restored position, the first step's batches and the
        ranks' agreement on them (as at the start of the loop)."""
        self._stream = iter(self.loader)
        batches, error = self._fetch()
        return batches, self._agree(error)

    def _fetch(self) -> tuple[list[dict], Optional[str]]:
        """The next step's micro-batches (accumulation of them), or the error that prevented it."""
        self.phase = "data loading"
        try:
            return [next(self._stream) for _ in range(self.engine.gradient_accumulation_steps())], None
        except Exception as e:  # noqa: BLE001 - any failure of this rank's data stops every rank together
            from common.errors import UserError

            if not isinstance(e, UserError):
                traceback.print_exc()
            return [], f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)

    def _agree(self, data_error: Optional[str], nonfinite: Optional[torch.Tensor] = None, loss=(0.0, 0.0)) -> Verdict:
        """guards.agree, with the data's health and the step's losses. When any rank's loader found something it
        had not reported (a shard opened, a damaged shard, a corrupt sample), every rank's report is merged, so
        that all of them judge the same totals against data.max_bad_* at the same step. ``nonfinite``: this
        rank's count of non-finite losses in the step just taken, ``loss`` its (loss sum, micro-batches) — on the
        device: the agreement's one read brings them to the host, with the halves of the step's sample digest;
        None before the first step. ``fatal`` is a divergence (the guard's or the spike rule's)."""
        report = self.loader.health_report()
        known = (len(report["opened"]), len(report["damaged"]), sum(report["corrupt"].values()))
        verdict = agree(self.stop.requested, data_error, self.engine.device,
                        extra=(float(known != self._reported), 0.0 if nonfinite is None else nonfinite, *loss,
                               *self.audit.local))
        if verdict.sums[0] > 0:
            self.health.add_reports(dist.all_gather_object(report))
            self._reported = known
        verdict.damaged = self.health.verdict()
        if nonfinite is not None:
            s = verdict.sums
            self.audit.add(self.step, s[4], s[5])
            verdict.fatal = self._guard(losses_finite=s[1] == 0) or self.rollback.spikes.update(s[2], s[3])
        return verdict

    def _guard(self, losses_finite: bool) -> Optional[str]:
        """The non-finite guard's verdict on the step just taken (the same on every rank: its inputs are)."""
        fp16 = self.info.precision == "fp16"
        overflow = bool(getattr(self.engine.optimizer, "overflow", False)) if fp16 else False
        return self.guard.update(losses_finite, overflow, loss_scale(self.engine) if fp16 else None)

    def logs_at(self, step: int) -> bool:
        """Whether ``step`` (counted when done) writes a log line."""
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps

    def train_step(self, batches: list[dict]) -> StepStats:
        """The one optimizer step (pretraining, fine-tuning and the benchmark's (a) run this): the lr of step
        ``self.step`` (trainer.schedule), forward/backward over the step's micro-batches (the accumulation) and
        the optimizer step at the boundary; counts the step. A padding batch (``is_padding``: every rank must run
        the same collectives) is stepped with zero weight and not counted. Nothing is read back to the host (a
        pipeline drain on a GPU): the sums and the count of non-finite losses stay on the device."""
        self.phase = "training step"
        lr = self.schedule.lr(self.step)
        set_lr(self.engine.optimizer, lr)
        device = self.engine.device
        nonfinite = torch.zeros((), device=device)
        sums, keys = dict.fromkeys(STEP_SUMS, 0.0), []
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in self.objective.inputs(batch).items()}
            loss, named = self.objective(self.engine(**inputs), inputs)
            if batch["is_padding"]:
                self.engine.backward(loss * 0.0)
                self.engine.step()
                continue
            self.engine.backward(loss)
            self.engine.step()
            keys.extend(batch["keys"])
            loss = loss.detach().float()
            nonfinite += ~torch.isfinite(loss)
            add_sums(sums, {"loss_sum": loss, "micro_batches": 1, "samples": batch["input_ids"].shape[0],
                            "tokens": batch["tokens"], **named})
        self.step += 1
        return StepStats(lr, sums, nonfinite, keys)

    def _window(self) -> Window:
        return Window(dict.fromkeys((*STEP_SUMS, *self.objective.sum_keys), 0.0))

    # --- pieces of the loop ----------------------------------------------------------------------
    def _fold(self, win: Window) -> float:
        """Sum the window's new part over ranks into ``win.folded`` and its samples and tokens into the counters
        (so a checkpoint holds exact totals); the window keeps everything for its log line. Returns the part's
        training time."""
        elapsed = time.perf_counter() - win.t0
        win.t0 = time.perf_counter()
        if not win.steps:
            return 0.0
        reduced = dist.all_reduce_named(win.sums, self.engine.device)
        self.samples_seen += int(reduced["samples"])
        self.tokens_seen += int(reduced["tokens"])
        win.folded = {k: win.folded.get(k, 0.0) + v for k, v in reduced.items()}
        win.sums, win.steps = dict.fromkeys(win.sums, 0.0), 0
        win.elapsed += elapsed
        return elapsed

    def _log(self, win: Window, lr: float, bar) -> float:
        """One line of metrics.jsonl and TensorBoard's train/ scalars for the window; returns its training time."""
        train_time = self._fold(win)
        s, elapsed = win.folded, max(win.elapsed, 1e-9)
        rec = {"step": self.step, "loss": s["loss_sum"] / max(s["micro_batches"], 1), "lr": lr,
               **self.objective.summary(s),
               "samples_per_s": s["samples"] / elapsed, "tokens_per_s": s["tokens"] / elapsed,
               "skipped_steps": int(self.engine.skipped_steps),
               "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen}
        if self.info.precision == "fp16":
            rec["loss_scale"] = loss_scale(self.engine)
        for cb in self.callbacks:
            cb.on_log(self, rec, s, elapsed)
        if self.cfg.log_batch_keys:
            rec["keys"] = dist.all_gather_object(win.keys[-1] if win.keys else [])
        self.metrics.scalars(self.step, {k: v for k, v in rec.items() if k not in ("step", "keys")}, prefix="train/")
        self.metrics.record(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        return train_time

    def _validate(self, stoppable: bool = True) -> bool:
        """One validation pass; False when the ranks agreed on a stop before one of its batches (cut short)."""
        self.phase = "validation"
        self._last_eval = self.step
        if self.validate_fn is None:
            return True
        stop = (lambda: agree_stop(self.stop.requested, self.engine.device)) if stoppable else None
        if not self.validate_fn(self.step, stop=stop):
            return False
        for cb in self.callbacks:
            cb.on_eval(self, self.step)
        return True

    def _save(self) -> None:
        self.phase = "checkpoint save"
        self.checkpointer.save(self.engine, self.step)

    def _finish(self, verdict: Verdict, steps: int, wall: float, train_time: float) -> int:
        self.phase = "shutdown"
        self.metrics.flush()
        last = self.checkpointer.last_saved or "none (no checkpoint saved yet)"
        if verdict.fatal:
            print(f"error: stopping at step {self.step}: {verdict.fatal}. The bad state was NOT saved; last good "
                  f"checkpoint: {last}. Lower the peak lr in {self.info.ds_path} or check the data, then resume "
                  f"from it.", file=sys.stderr, flush=True)
        elif verdict.damaged:
            if self.info.rank == 0:
                print(f"error: stopping at step {self.step}: {verdict.damaged}. Saved the last good state: {last}.",
                      file=sys.stderr, flush=True)
        elif verdict.data_errors:
            if self.info.rank == 0:
                print(f"error: stopping at step {self.step}: the data failed on {len(verdict.data_errors)} rank(s):\n  "
                      + "\n  ".join(verdict.data_errors) + f"\nSaved the last good state: {last}; fix the data, "
                      f"then run the same command to resume.", file=sys.stderr, flush=True)
        elif verdict.stop:
            how = (f"{signal.Signals(self.stop.signum).name} from {self.stop.sender} during {self.stop.landed}"
                   if self.stop.requested else "on another rank")
            self.log(f"stop requested ({how}): saved {last} at step {self.step}; run the same command to resume")
        self.metrics.close()
        self.log(f"done: {steps} steps ({self.step}/{self.cfg.max_steps}) in {wall:.0f}s, "
                 f"{steps * self.info.global_batch / max(train_time, 1e-9):.1f} samples/s; checkpoint {last}; "
                 f"logs {self.metrics.path}; tensorboard --logdir {self.metrics.tb_dir}")
        if verdict.fatal or verdict.data_errors or verdict.damaged:
            return EXIT_NONFINITE if verdict.fatal else EXIT_DATA
        return EXIT_OK

    @property
    def finished(self) -> bool:
        """Whether the run trained to its last step (not stopped early by a signal, data or non-finite numbers)."""
        return self.step >= self.cfg.max_steps
