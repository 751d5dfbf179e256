"""The real Trainer loop in-process on a tiny BERT: host syncs per step (the budget), named metric sums, the
callback hooks and the gradient-noise-scale callback. The engine is a stand-in with the parts of a DeepSpeed
engine the loop uses (forward, backward scaled by the accumulation, step at the boundary, the global grad norm)."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from bert import BertForPreTraining
from data.health import DataHealth
from helpers import make_batch, tiny_config
from trainer import checkpoint
from trainer.callbacks import Callback, GradNoiseScale, standard
from trainer.config import TrainConfig
from trainer.metrics import MetricsWriter, flop_counts
from trainer.trainer import RunInfo, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIRS = tuple(os.path.join(REPO, d) + os.sep for d in ("bert", "data", "trainer", "common"))


class Engine(torch.nn.Module):
    """A DeepSpeed engine's surface, without DeepSpeed: SGD, gradients summed over ``gas`` micro-batches."""

    def __init__(self, model, gas: int):
        super().__init__()
        self.module, self.gas, self.device, self.skipped_steps = model, gas, torch.device("cpu"), 0
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, foreach=False)
        self._micro, self._norm = 0, None

    def forward(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        (loss / self.gas).backward()

    def step(self):
        self._micro += 1
        if self._micro % self.gas == 0:
            self._norm = torch.cat([p.grad.reshape(-1) for p in self.parameters() if p.grad is not None]).norm()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def gradient_accumulation_steps(self):
        return self.gas

    def get_global_grad_norm(self):
        return self._norm


def host_batch(config, seed: int, no_padding: bool = False) -> dict:
    """A batch as data.loader yields it: tensors plus the host facts collate computes."""
    b = make_batch(config, seed=seed)
    if no_padding:
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
    am = b["attention_mask"].numpy()
    return {**b, "keys": [f"s{seed}-{i}" for i in range(len(am))], "is_padding": False,
            "no_padding": bool(np.all(am)), "tokens": int(am.sum()), "predictions": int(b["masked_lm_weights"].sum())}


class Loader:
    """An endless list of batches with the loader's state and health surface."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while True:
            yield self.batches[self.position % len(self.batches)]
            self.position += 1

    def state_dict(self):
        return {"position": self.position}

    def health_report(self):
        return {"read": 0, "corrupt": {}, "missing": 0, "opened": {}, "damaged": {}}


class Checkpointer(checkpoint.Checkpointer):
    """The real registry and save interval; a save only names its tag (nothing is written)."""

    def __init__(self):
        super().__init__("unused", keep=1, meta={}, every=10 ** 6)

    def save(self, engine, step):
        self.last_saved = f"nowhere/step_{step:07d}"


def make_trainer(tmp_path, *, steps: int, log_every: int, gas: int = 2, callbacks=None, seed: int = 0,
                 batch_seeds=(0, 1, 2, 3)):
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = BertForPreTraining(config)
    engine = Engine(model, gas)
    batches = [host_batch(config, s, no_padding=s % 2 == 1) for s in batch_seeds]
    cfg = TrainConfig(max_steps=steps, log_every=log_every, eval_every=0, save_every=10 ** 6, output_dir=str(tmp_path),
                      warmup_steps=0)
    info = RunInfo(rank=0, world=1, precision="fp32", global_batch=4 * gas, peak_lr=0.01, warmup=0, peak_tflops=1.0,
                   flops=flop_counts(model), ds_path="ds.json")
    metrics = MetricsWriter(str(tmp_path), enabled=True)
    return Trainer(engine, Loader(batches), cfg, info, metrics=metrics, checkpointer=Checkpointer(),
                   health=DataHealth(0, 0.0, 1), log=lambda m: None, callbacks=callbacks), batches


SYNC_POINTS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class SyncCounter:
    """Counts host reads of tensor values made from the project's code (each is a pipeline drain on a GPU), by
    the Trainer method they happen in: wraps torch.Tensor's sync points and its methods of the loop. Not counted:
    the size of a data-dependent result (``nonzero`` in the unpadding of a padded batch), a wait on a GPU too."""

    def __init__(self, monkeypatch, trainer):
        self.calls, self.where = [], []
        for name in SYNC_POINTS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name))
        for name in ("train_step", "_agree", "_log"):
            monkeypatch.setattr(trainer, name, self._inside(getattr(trainer, name), name, trainer))

    def _counting(self, real, name):
        def wrapper(t, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT_DIRS) and self.where:
                self.calls.append((self.where[-1], name, caller))
            return real(t, *a, **k)
        return wrapper

    def _inside(self, method, name, trainer):
        def wrapper(*a, **k):
            self.where.append((name, trainer.step))
            try:
                return method(*a, **k)
            finally:
                self.where.pop()
        return wrapper

    def during(self, method: str, step: int) -> list:
        return [c for c in self.calls if c[0] == (method, step)]


def test_a_non_logging_step_reads_the_device_once(tmp_path, monkeypatch):
    """Budget: a step that does not log reads one value from the device, the per-step agreement of the ranks
    (stop / data / non-finite flags in one tensor); the forward, backward and step of every micro-batch read
    none. A log step adds the one reduction of the window."""
    trainer, _ = make_trainer(tmp_path, steps=4, log_every=4)
    count = SyncCounter(monkeypatch, trainer)
    assert trainer.train() == 0
    for step in (0, 1, 2):  # steps 1-3 (``trainer.step`` counts steps done): no log line
        assert count.during("train_step", step) == [], count.during("train_step", step)
        assert [c[1] for c in count.during("_agree", step + 1)] == ["tolist"]
    assert count.during("train_step", 3) == []
    assert len(count.during("_log", 4)) >= 1  # the log step reads its sums, once per reduction
    log = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in log] == [4] and math.isfinite(log[0]["loss"])


def finetune_trainer(tmp_path, monkeypatch, peak_lr: float = 0.01):
    """Fine-tuning's Trainer as trainer.finetune wires it (classifier objective, epoch loader, dev evaluator), on
    the stand-in engine: micro 4 x accumulation 2; 20 examples = 5 micro-batches, so each epoch's third step
    has a padding batch. Two epochs of 3 steps; the best model is not written (the stand-in cannot save)."""
    from types import SimpleNamespace

    from bert import BertForSequenceClassification
    from trainer import finetune, startup
    from trainer.config import FinetuneConfig
    from trainer.finetune_task import Encoded, Split, TaskData
    from trainer.guards import StopFlag

    monkeypatch.setattr(finetune, "_save_best", lambda *a, **k: None)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config, 2)
    g = torch.Generator().manual_seed(0)

    def encoded(n):
        ids = [[2, *torch.randint(5, 64, (int(k),), generator=g).tolist(), 3]
               for k in torch.randint(3, 10, (n,), generator=g)]
        return Encoded(ids, [[0] * len(x) for x in ids], [i % 2 for i in range(n)])

    cfg = FinetuneConfig()
    cfg.train.epochs = 2
    none = Split([], None, [])
    ctx = finetune.Context(cfg, "ds.json", startup.Start(StopFlag(), cfg, {}, "cpu", None, 1), 0, 1, None,
                           SimpleNamespace(pad_id=0, fingerprint="fp"), TaskData("t", none, none, ["a", "b"]),
                           encoded(20), encoded(8), {})
    plan = finetune.Plan(str(tmp_path), peak_lr, micro=4, batch_size=8, steps_per_epoch=3, epochs=2, warmup_fraction=0.0)
    trainer, _ = finetune._trainer(ctx, plan, Engine(model, gas=2), model, SimpleNamespace(precision="fp32", ds={}),
                                   Checkpointer(), MetricsWriter(str(tmp_path), enabled=True))
    return trainer


def test_a_fine_tuning_step_reads_the_device_once_too(tmp_path, monkeypatch):
    """Fine-tuning runs the same step and loop: a step that does not log (once per epoch here) reads one value,
    the agreement; its micro-batches, the padding batch among them, read none."""
    trainer = finetune_trainer(tmp_path, monkeypatch)
    count = SyncCounter(monkeypatch, trainer)
    assert trainer.train() == 0
    for step in (0, 1, 3, 4):  # steps 1, 2, 4, 5: no log line (one per epoch: steps 3 and 6)
        assert count.during("train_step", step) == [], count.during("train_step", step)
        assert [c[1] for c in count.during("_agree", step + 1)] == ["tolist"]
    assert count.during("train_step", 2) == count.during("train_step", 5) == []
    recs = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if "accuracy" in r] == [3, 6]  # the loop's log lines, the objective's keys
    assert [(r["epoch"], r["total_steps"]) for r in recs if "dev/accuracy" in r] == [(1, 6), (2, 6)]
    assert trainer.samples_seen == 2 * 20  # the padding batches are stepped, not counted
    assert recs[-1]["best/dev_accuracy"] == max(r["dev/accuracy"] for r in recs if "dev/accuracy" in r)


def test_a_non_finite_fine_tuning_loss_stops_without_saving(tmp_path, monkeypatch, capsys):
    """Fine-tuning has the non-finite guard of the loop: lr 1e30 throws the weights into overflow at the first
    update, the second step's loss is not finite, every rank stops there (exit 3) and the bad state is not saved."""
    trainer = finetune_trainer(tmp_path, monkeypatch, peak_lr=1e30)
    assert trainer.train() == 3
    assert trainer.step == 2 and trainer.checkpointer.last_saved is None
    assert "stopping at step 2: non-finite loss in fp32" in capsys.readouterr().err


def test_the_budget_test_sees_a_sync_put_back(tmp_path, monkeypatch):
    """The counter is not blind: a `.item()` in the step (the per-micro-batch read the loop used to do) shows."""
    trainer, _ = make_trainer(tmp_path, steps=2, log_every=2)
    real_step = trainer.train_step

    def step_with_a_read(batches):
        stats = real_step(batches)
        torch.isfinite(stats.sums["loss_sum"]).item()  # the read under test
        return stats

    monkeypatch.setattr(trainer, "train_step", step_with_a_read)
    # the read sits in this file: count it as the project's
    monkeypatch.setattr(sys.modules[__name__], "PROJECT_DIRS", PROJECT_DIRS + (os.path.abspath(__file__),))
    count = SyncCounter(monkeypatch, trainer)
    trainer.train()
    assert [c[1] for c in count.during("train_step", 0)] == ["item"]


def test_the_model_reads_nothing_back(monkeypatch):
    """The model's forward and loss, on batches with and without padding, never read a tensor's value to the host."""
    config = tiny_config()
    model = BertForPreTraining(config)
    calls = []
    for name in SYNC_POINTS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name, **k: (
            calls.append((_name, sys._getframe(1).f_code.co_filename)), _real(t, *a, **k))[1])
    for no_padding in (False, True):
        from data.loader import model_inputs

        out = model(**model_inputs(host_batch(config, 0, no_padding=no_padding)))
        out.loss.backward()
    assert [c for c in calls if c[1].startswith(PROJECT_DIRS)] == []


def test_named_sums_survive_a_validation_between_log_lines(tmp_path):
    """A validation (or save) between two log lines folds the window's sums over ranks but keeps them: the log
    line covers every step since the last one, with the same loss as a run without the validation."""
    def run(eval_every, out):
        trainer, _ = make_trainer(out, steps=4, log_every=4)
        trainer.cfg.eval_every = eval_every
        trainer.validate_fn = lambda step, stop=None: True
        assert trainer.train() == 0
        return [json.loads(ln) for ln in open(out / "metrics.jsonl")][-1], trainer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, t1 = run(0, tmp_path / "a")
    folded, t2 = run(3, tmp_path / "b")  # validation at step 3, not a multiple of log_every
    assert plain["step"] == folded["step"] == 4
    for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"):
        assert folded[k] == pytest.approx(plain[k], rel=1e-12), k
    assert t1.samples_seen == t2.samples_seen == 4 * 4 * 2  # 4 steps x 2 micro-batches x 4 sequences
    assert t1.tokens_seen == t2.tokens_seen > 0


def test_hooks_run_where_the_protocol_says(tmp_path):
    """on_step_end every step (before the log of that step), on_log at log steps with the reduced named sums
    (the callback's own included), on_eval after a validation pass."""
    seen = []

    class Probe(Callback):
        def on_step_end(self, trainer, batches, window):
            seen.append(("step", trainer.step))
            window.add({"probe": 1.0})

        def on_log(self, trainer, record, sums, elapsed):
            seen.append(("log", trainer.step))
            record["probe_steps"] = sums["probe"]

        def on_eval(self, trainer, step):
            seen.append(("eval", step))

    trainer, _ = make_trainer(tmp_path, steps=4, log_every=2, callbacks=standard() + [Probe()])
    trainer.cfg.eval_every = 3
    trainer.validate_fn = lambda step, stop=None: True
    assert trainer.train() == 0
    assert seen == [("eval", 0), ("step", 1), ("step", 2), ("log", 2), ("step", 3), ("eval", 3), ("step", 4),
                    ("log", 4), ("eval", 4)]
    log = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["probe_steps"] for r in log] == [2.0, 2.0]
    for k in ("tflops", "mfu", "grad_norm", "data/corrupt_samples"):  # the standard callbacks' keys
        assert k in log[0], k


def test_gradient_noise_scale_matches_the_estimator(tmp_path):
    """The callback's B_simple equals McCandlish et al.'s estimator computed by hand from the per-micro-batch
    gradients of the log step (same weights, same batches), and it is armed only for log steps."""
    gns = GradNoiseScale()
    armed = []
    real_arm = gns._arm
    gns._arm = lambda trainer: (armed.append(trainer.step + 1), real_arm(trainer))
    # three equal micro-batches and one other: the mean gradient dominates, so |G|^2 > 0 (with 4 unrelated tiny
    # batches the estimate of |G|^2 can be negative: the ratio is then NaN)
    trainer, batches = make_trainer(tmp_path, steps=3, log_every=3, gas=4, callbacks=[gns], batch_seeds=(0, 0, 0, 1))
    model = trainer.engine.module
    snapshot = {}
    real_step = trainer.train_step

    def keep_weights(b):  # the weights the log step starts from
        if trainer.step == 2:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_step(b)

    trainer.train_step = keep_weights
    assert trainer.train() == 0
    assert armed == [3]
    rec = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")][-1]

    ref = BertForPreTraining(model.config)
    ref.load_state_dict(snapshot)
    from data.loader import model_inputs

    grads = []
    for b in batches:  # step 3 reads batches 8..11 of the endless list: the same 4 batches
        ref.zero_grad()
        ref(**model_inputs(b)).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).double())
    b_small, b_big = 4.0, 16.0
    small_sq = sum(float(g.pow(2).sum()) for g in grads) / len(grads)
    big_sq = float(torch.stack(grads).mean(0).pow(2).sum())
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    assert rec["gns/grad_sq"] == pytest.approx(grad_sq, rel=1e-4)
    assert rec["gns/trace_cov"] == pytest.approx(trace, rel=1e-4)
    assert grad_sq > 0 and trace > 0
    assert rec["grad_noise_scale"] == pytest.approx(trace / grad_sq, rel=1e-4)
    assert not any(p._backward_hooks for p in model.parameters())  # disarmed after its step
