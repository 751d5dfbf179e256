"""Self-healing and the sample audit, on the real Trainer loop in-process: the real loader (no workers) on the
session's tiny shards, the real Checkpointer writing real folders, and an engine stand-in with the surface of a
DeepSpeed engine (forward, backward, step; save/load_checkpoint; fp16's overflow flag and loss scale, which it
handles as DeepSpeed does: a step with non-finite gradients is skipped and halves the scale, down to its floor).

Faults are injected through the Trainer's public construction (a callback), never a config key, and tied to the
data where a real one would be (a sample that poisons the weights): a rolled-back run that passes over that
data must then end exactly as a run that skipped the same window from the start."""

import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from bert import BertForPreTraining
from data.health import DataHealth
from data.loader import PretrainLoader
from helpers import REPO, start_ranks, tiny_config, write_ds, write_run
from test_trainer_hooks import Engine as HooksEngine
from trainer import audit, checkpoint, checkpoint_files
from trainer.callbacks import Callback
from trainer.config import RollbackConfig, TrainConfig
from trainer.metrics import MetricsWriter, flop_counts, read_records
from trainer.rollback import Rollback, SpikeDetector
from trainer.trainer import EXIT_NONFINITE, RunInfo, Trainer

MICRO, GAS, SEED = 4, 2, 5
G = MICRO * GAS  # one process: the global batch
META = {"tokenizer_fingerprint": "t", "max_seq_len": 64, "model_config": {}}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the launched ranks have (OMP_NUM_THREADS=1): a tiny model's kernels gain nothing from
    a second thread and lose ~10x to spinning when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Engine(HooksEngine):
    """test_trainer_hooks' engine stand-in (SGD over ``gas`` accumulated micro-batches), plus checkpoints as one
    model-states file holding the client state at its top level (DeepSpeed's layout) and, with ``fp16``, the
    dynamic loss scale's overflow rule."""

    def __init__(self, model, gas: int, fp16: bool, scale: float):
        super().__init__(model, gas)
        self.fp16 = fp16
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        if fp16:
            self.optimizer.overflow, self.optimizer.cur_scale = False, scale

    def step(self):
        self._micro += 1
        if self._micro % self.gas:
            return
        finite = all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None)
        if self.fp16:
            self.optimizer.overflow = not finite
        if self.fp16 and not finite:  # skipped, the scale halves down to its floor (1)
            self.skipped_steps += 1
            self.optimizer.cur_scale = max(1.0, self.optimizer.cur_scale / 2)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        scale = self.optimizer.cur_scale if self.fp16 else None
        torch.save({"module": self.module.state_dict(), "scale": scale, **client_state},
                   os.path.join(save_dir, tag, checkpoint_files.MODEL_STATES))

    def load_checkpoint(self, load_dir, tag):
        path = os.path.join(load_dir, tag)
        sd = checkpoint_files.read_model_states(path)
        self.module.load_state_dict(sd.pop("module"))
        scale = sd.pop("scale")
        if self.fp16:
            self.optimizer.cur_scale = scale
        return path, sd


def make(tmp, shards, *, steps=8, fp16=False, rollback=None, callbacks=(), loader_cls=PretrainLoader, skips=(),
         save_every=3, gas=GAS, log_every=1, resume_step=None):
    """A Trainer over the real loader and Checkpointer in run folder ``tmp``; dropout on (its RNG streams must
    come back with a rollback too)."""
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(vocab_size=1000, max_position_embeddings=64))
    engine = Engine(model, gas, fp16=fp16, scale=2.0)
    loader = loader_cls(shards, "train", MICRO, seed=SEED, num_workers=0, global_batch=MICRO * gas)
    loader.skip(list(skips))
    cfg = TrainConfig(max_steps=steps, log_every=log_every, eval_every=0, output_dir=str(tmp), warmup_steps=0,
                      max_nonfinite=1)
    info = RunInfo(rank=0, world=1, precision="fp16" if fp16 else "fp32", global_batch=MICRO * gas, peak_lr=0.01,
                   warmup=0, peak_tflops=1.0, flops=flop_counts(model), ds_path="ds.json", initial_loss_scale=2.0)
    ckpt = checkpoint.Checkpointer(str(tmp / "checkpoints"), keep=3, meta=META, log=lambda m: None,
                                   every=save_every)
    (tmp / "config.yaml").write_text(yaml.safe_dump({"data": {"train": shards}, "train": {"seed": SEED}}))
    (tmp / "ds_config.json").write_text(f'{{"train_batch_size": {MICRO * gas}}}')
    return Trainer(engine, loader, cfg, info, metrics=MetricsWriter(str(tmp), enabled=True, resume_step=resume_step),
                   checkpointer=ckpt,
                   health=DataHealth(0, 1.0, 10), log=lambda m: None, callbacks=list(callbacks),
                   rollback=Rollback(rollback or RollbackConfig(), initial_loss_scale=2.0))


class Fault(Callback):
    """After the step that trained sample ``sample_id`` (or every step from ``from_step`` on), do ``harm`` to the
    trainer: a fault carried by the data, which a rollback passes over."""

    def __init__(self, harm, sample_id=None, from_step=None):
        self.harm, self.sample_id, self.from_step, self.fired = harm, sample_id, from_step, 0

    def on_step_end(self, trainer, batches, window):
        hit = (self.from_step is not None and trainer.step >= self.from_step) or any(
            self.sample_id in b["ids"] for b in batches)
        if hit:
            self.fired += 1
            self.harm(trainer)


def nan_weights(trainer):
    with torch.no_grad():
        trainer.engine.module.bert.embeddings.word_embeddings.weight[:] = float("nan")


def blow_up_weights(trainer):  # a real spike: the loss climbs far above its recent level for several steps
    with torch.no_grad():
        for p in trainer.engine.module.parameters():
            p.mul_(30.0)


def ids_of_step(shards, step, g=G, seed=SEED):
    """The sample ids the plain order gives step ``step`` (1-based) at global batch ``g``."""
    loader = PretrainLoader(shards, "train", g, seed=seed, num_workers=0, global_batch=g)
    for s, batch in enumerate(loader, start=1):
        if s == step:
            return batch["ids"]


def weights(trainer):
    return {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}


# kind: (harm, the step after which it strikes, fp16?, rollback settings, the cause logged). Each is found after
# step 6, before that step's save: NaN weights give a NaN loss at once in fp32; in fp16 (scale 2, floor 1,
# train.max_nonfinite 1) step 5 overflows and halves the scale to 1, step 6 overflows at the floor a second time;
# blown-up weights make steps 5 and 6 spike.
FAULTS = {
    "nan": (nan_weights, 5, False, RollbackConfig(), "non-finite loss in fp32"),
    "overflow storm": (nan_weights, 4, True, RollbackConfig(), "fp16 loss scale collapsed: 2 consecutive"),
    "spike": (blow_up_weights, 4, False, RollbackConfig(spike_window=3, spike_k=6.0, spike_steps=2), "loss spike"),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_divergence_is_rolled_back_and_ends_as_a_run_that_skipped_its_window(train_shards, tmp_path, kind):
    """A fault after step 5 (NaN weights: a NaN loss at step 6 in fp32, or in fp16 overflows that drive the loss
    scale to its floor; or weights blown up: a loss spike) is rolled back to step 3, in this process, past the
    data since then; the run finishes, its weights, losses and RNG-driven dropout equal a run that skipped that
    window from the start, its history and skips are in the checkpoint and metrics.jsonl, and the audit
    accounts for every sample."""
    harm, at, fp16, rb, cause = FAULTS[kind]
    fault = Fault(harm, sample_id=ids_of_step(train_shards, at)[0])
    healed = make(tmp_path / "healed", train_shards, fp16=fp16, rollback=rb, callbacks=[fault], steps=9)
    assert healed.train() == 0
    (event,) = healed.rollback.history
    assert fault.fired == 1 and cause in event["cause"] and (event["step"], event["restored_step"]) == (6, 3)
    assert event["skip"] == [3 * G, 6 * G] and event["samples_skipped"] == 3 * G
    assert healed.step == 9 and healed.loader.skips == [tuple(event["skip"])]

    ref = make(tmp_path / "ref", train_shards, fp16=fp16, rollback=rb, steps=9, skips=[event["skip"]])
    assert ref.train() == 0 and ref.rollback.history == []
    got, want = weights(healed), weights(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)
    recs = {r["step"]: r for r in read_records(tmp_path / "healed" / "metrics.jsonl") if "loss" in r}
    ref_recs = {r["step"]: r for r in read_records(tmp_path / "ref" / "metrics.jsonl") if "loss" in r}
    assert sorted(recs) == list(range(1, 10))  # the undone steps' lines were set aside
    assert [recs[s]["loss"] for s in recs] == [ref_recs[s]["loss"] for s in recs]
    (line,) = [r for r in read_records(tmp_path / "healed" / "metrics.jsonl") if "rollback" in r]
    assert line["step"] == 3 and line["rollback"] == event
    assert list((tmp_path / "healed" / "earlier").glob("*-rollback1/metrics.jsonl"))
    client = checkpoint_files.read_client_state(str(tmp_path / "healed" / "checkpoints"))
    assert client["state"]["rollback"]["history"] == [event]
    assert client["state"]["loader"][0]["skips"] == [event["skip"]]
    ok, line = audit.audit_run(str(tmp_path / "healed"))
    assert ok and f"{3 * G} skipped on record in 1 rollback(s)" in line, line
    # the reference skipped the same window with nothing on record: the audit names where
    assert audit.audit_run(str(tmp_path / "ref")) == (False, "step 4: it trained the samples of step 7 (a batch "
                                                            "dropped)")


def test_skip_steps_and_the_lr_factor(train_shards, tmp_path):
    """rollback.skip_steps=2 passes over steps 5-6's samples only (step 4's are trained again); lr_factor 0.5
    for 2 steps halves the lr of the two steps after the restored one, and only those."""
    from trainer.schedule import lr_at

    t = make(tmp_path, train_shards, callbacks=[Fault(nan_weights, sample_id=ids_of_step(train_shards, 5)[0])],
             rollback=RollbackConfig(skip_steps=2, lr_factor=0.5, lr_steps=2))
    assert t.train() == 0
    (event,) = t.rollback.history
    assert event["skip"] == [4 * G, 6 * G] and event["samples_skipped"] == 2 * G and event["lr"] == [3, 2, 0.5]
    lrs = {r["step"]: r["lr"] for r in read_records(tmp_path / "metrics.jsonl") if "lr" in r}
    assert [lrs[s] / lr_at(s - 1, 0.01, 0, 8) for s in range(1, 9)] == pytest.approx([1, 1, 1, .5, .5, 1, 1, 1])
    assert audit.audit_run(str(tmp_path))[0]


def test_a_run_that_keeps_diverging_stops_at_the_bound_with_its_history(train_shards, tmp_path, capsys):
    """Every step from 5 on poisons the weights: two rollbacks (rollback.max_rollbacks=2), then the third
    divergence stops the run as a non-finite loss always did (exit 3, the last good checkpoint named), with the
    whole history in the message."""
    fault = Fault(nan_weights, from_step=5)
    t = make(tmp_path, train_shards, rollback=RollbackConfig(max_rollbacks=2), callbacks=[fault])
    assert t.train() == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert len(t.rollback.history) == 2 and "not rolled back: 2 rollbacks within 1000 steps" in err
    assert err.count("-> rolled back to step_0000003") == 2 and "The bad state was NOT saved" in err
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_0000003'}" in err
    off = make(tmp_path / "off", train_shards, rollback=RollbackConfig(enabled=False), callbacks=[fault])
    assert off.train() == EXIT_NONFINITE and off.rollback.history == []
    err = capsys.readouterr().err
    assert "stopping at step 6: non-finite loss in fp32 (no loss scaling can skip it). The bad" in err


def test_a_resume_after_a_rollback_makes_the_same_decisions(train_shards, tmp_path):
    """The history, the skips, the spike window and the guard's count come back from the checkpoint: a resumed
    run continues with the same batches; a checkpoint of client-state version 1 (its parts at the top level,
before components registered) still loads, through ``migrate``."""
    healed = make(tmp_path, train_shards, callbacks=[Fault(nan_weights, sample_id=ids_of_step(train_shards, 5)[0])],
                  steps=7)
    assert healed.train() == 0
    healed.loader.load_state_dict(healed.boundary.state_dict())  # back from the batches it fetched ahead
    next_ids = next(iter(healed.loader))["ids"]
    again = make(tmp_path, train_shards, steps=9)
    view = again.checkpointer.load(again.engine, again.checkpointer.plan((str(tmp_path / "checkpoints"), None)))
    again.restore(view)
    assert again.step == 7 and again.rollback.history == healed.rollback.history
    assert again.loader.skips == healed.loader.skips and next(iter(again.loader))["ids"] == next_ids
    v1 = {"step": 7, "samples_seen": 56, "tokens_seen": 9, "data_state": [view["state"]["loader"]],
          "rng": [view["state"]["rng"]], "data_health": None, **META}
    migrated = checkpoint.migrate(v1)
    assert migrated["state_version"] == 2 and migrated["state"]["trainer"]["samples_seen"] == 56
    assert migrated["state"]["loader"][0]["skips"] == [list(r) for r in healed.loader.skips]
    again.engine.save_checkpoint(str(tmp_path / "v1"), "step_0000007", {**v1, "world_size": 1}, False)
    old = make(tmp_path / "old", train_shards, steps=9)
    old.restore(old.checkpointer.load(old.engine, checkpoint.Resume(str(tmp_path / "v1"), "step_0000007", 1)))
    assert (old.step, old.samples_seen, old.tokens_seen) == (7, 56, 9) and old.rollback.history == []
    assert next(iter(old.loader))["ids"] == next_ids  # its position and skips came through the loader part


def test_the_guards_overflow_count_is_checkpointed(train_shards, tmp_path):
    """Two overflow steps at the floor before a save, a third after the resume: the resumed run stops there as
    the uninterrupted one would (its count went on from 2, not from 0)."""
    t = make(tmp_path, train_shards, fp16=True)
    t.guard.consecutive = 2
    t.checkpointer.save(t.engine, 0)
    again = make(tmp_path, train_shards, fp16=True)
    again.restore(again.checkpointer.load(again.engine, again.checkpointer.plan((str(tmp_path / "checkpoints"),
                                                                               None))))
    assert again.guard.consecutive == 2 and "3 consecutive" in again.guard.update(False, True, 1.0)


def test_digests_not_yet_logged_travel_in_the_checkpoint(train_shards, tmp_path):
    """Log every 2 steps, save every 3, a crash during step 5: the step-4 line (step 3's and 4's digests) is set
    aside by the resume from step 3, so step 3's digest must come back from the checkpoint; the audit then
    accounts for steps 1-6."""
    class Crash(Callback):
        def on_step_end(self, trainer, batches, window):
            if trainer.step == 5:
                raise RuntimeError("the node died")

    with pytest.raises(RuntimeError):
        make(tmp_path, train_shards, steps=6, log_every=2, callbacks=[Crash()]).train()
    again = make(tmp_path, train_shards, steps=6, log_every=2, resume_step=3)
    view = again.checkpointer.load(again.engine, again.checkpointer.plan((str(tmp_path / "checkpoints"), None)))
    again.restore(view)
    assert view["state"]["audit"]["pending"][0][0] == 3 and again.train() == 0
    ok, line = audit.audit_run(str(tmp_path))
    assert ok and line.startswith("accounted: steps 1-6"), line


class Repeating(PretrainLoader):
    """Trains micro-batch 3 twice (``mode`` "repeat") or never ("drop"): the faults the audit must name."""

    mode = "repeat"

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == 3 and self.mode == "drop":
                continue
            yield batch
            if i == 3 and self.mode == "repeat":
                yield batch


@pytest.mark.parametrize("mode, line", [("repeat", "step 5: it trained the samples of step 4 (a batch repeated)"),
                                        ("drop", "step 4: it trained the samples of step 5 (a batch dropped)")])
def test_the_audit_names_a_repeated_and_a_dropped_batch(train_shards, tmp_path, monkeypatch, mode, line):
    monkeypatch.setattr(Repeating, "mode", mode)
    t = make(tmp_path, train_shards, steps=6, loader_cls=Repeating, gas=1)
    assert t.train() == 0
    assert audit.audit_run(str(tmp_path)) == (False, line)
    from common.errors import run_main

    assert run_main(audit.main, [str(tmp_path)]) == 1


def test_spike_rule_fires_only_on_a_sustained_jump():
    """A falling, noisy loss never fires; one outlier does not; three steps far above the window do."""
    d = SpikeDetector(window=20, k=6.0, steps=3)
    healthy = [8.0 - 0.05 * i + 0.1 * ((-1) ** i) for i in range(60)]
    assert all(d.update(x * 4, 4) is None for x in healthy)
    assert d.update(40.0, 1) is None and d.update(healthy[-1], 1) is None  # one outlier, then back
    assert d.update(20.0, 1) is None and d.update(20.0, 1) is None
    assert "loss spike: 3 consecutive steps above median" in d.update(20.0, 1)
    assert SpikeDetector(window=20, k=6.0, steps=0).update(1e9, 1) is None  # spike_steps 0: off


# A launched run with a fault: the ranks of launcher/pretrain.py, with one callback added to the standard ones.
FAULTY_PRETRAIN = """
import os, sys
from trainer import callbacks, launch
from trainer.callbacks import Callback

class LrBlowUp(Callback):  # the update after the step that trained the sample runs at 1e30 x the lr
    def on_step_end(self, trainer, batches, window):
        if any(int(os.environ["FAULT_SAMPLE"]) in b["ids"] for b in batches):
            trainer.schedule.scale(trainer.step, 1, 1e30)

standard = callbacks.standard
callbacks.standard = lambda: standard() + [LrBlowUp()]
from launcher.pretrain import main
sys.exit(launch.main(main, stop_signals=True))
"""


def launch_faulty(procs, tmp, ds, cfg, sample, world, name, *overrides):
    script = tmp / "faulty_pretrain.py"
    script.write_text(FAULTY_PRETRAIN)
    ranks = start_ranks(procs, tmp, ds, cfg, *overrides, world=world, name=name, script=script,
                        PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
                        FAULT_SAMPLE=str(sample))
    codes = procs.wait(ranks, 600)
    logs = ["".join(procs.output(p)) for p in ranks]
    assert codes == [0] * world, "\n".join(log[-3000:] for log in logs)
    return logs[0]


@pytest.mark.integration
def test_zero3_ranks_roll_back_together_in_the_process_also_after_a_resume_on_fewer(train_shards, tmp_path,
                                                                                     procs):
    """Two ranks of the real launcher, ZeRO-3 (parameters partitioned: the hardest in-process reload): the
    rank that trains one sample of step 4 runs step 5's update at 1e30 x the lr, so step 6's loss is NaN on
    every rank. Both roll back to step 3 together, pass over steps 4-6's samples and finish (exit 0). Then the
    run resumes from step 6 on one rank (DeepSpeed's universal conversion, the same global batch) and a sample
    of its step 7 does the same (NaN at step 9): it rolls back to that universal checkpoint, past steps 7-9.
    The audit accounts for every sample across both rollbacks and the rank change; the checkpoint holds both
    in its history."""
    ds = write_ds(tmp_path, name="zero3.json", micro=4)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=8, warmup_steps=0, save_every=3, log_every=1,
                    data={"num_workers": 0})
    log = launch_faulty(procs, tmp_path, ds, cfg, ids_of_step(train_shards, 4, g=8, seed=7)[0], 2, "faulty")
    recs = read_records(out / "metrics.jsonl")
    (event,) = [r["rollback"] for r in recs if "rollback" in r]
    assert (event["step"], event["restored_step"], event["skip"]) == (6, 3, [24, 48])
    assert "non-finite loss" in event["cause"] and "rolled back to step_0000003" in log
    assert sorted(r["step"] for r in recs if "loss" in r) == list(range(1, 9))

    order = PretrainLoader(train_shards, "train", 8, seed=7, num_workers=0, global_batch=8)
    order.skip([(24, 48)])
    sample = [b["ids"] for _, b in zip(range(7), order)][-1][0]  # step 7 after the first rollback
    log = launch_faulty(procs, tmp_path, ds, cfg, sample, 1, "resumed", "train.max_steps=10",
                        f"train.resume={out / 'checkpoints' / 'step_0000006'}", "ds.gradient_accumulation_steps=2")
    assert "written by 2 rank(s), this run has 1" in log and "rolled back to step_0000006" in log
    history = checkpoint_files.read_client_state(str(out / "checkpoints"))["state"]["rollback"]["history"]
    assert [(e["step"], e["restored_step"], e["skip"]) for e in history] == [(6, 3, [24, 48]), (9, 6, [72, 96])]
    ok, line = audit.audit_run(str(out))
    assert ok and line.startswith("accounted: steps 1-10 trained 80 samples"), line
    assert "48 skipped on record in 2 rollback(s)" in line, line
