"""Run configuration of every command: YAML -> dataclasses, with dotted command-line overrides.

One style for all three: pretraining (``RunConfig``: model / data / train), fine-tuning (``FinetuneConfig``:
model / task / train) and evaluation (``EvalConfig``: eval). A launcher's flags are sugar for overrides of
the same keys (``--epochs 2`` is ``train.epochs=2``).

Precedence: ``key.sub=value`` overrides > the YAML file > the defaults below. Unknown keys are errors that
name the key (a typo such as ``train.max_step`` must never be silently ignored), and so are values out of
range (a negative seed, a non-finite float). Values of overrides are parsed as YAML scalars, so
``train.max_steps=10`` is an int, ``train.init_from=null`` is None and ``data.dynamic_masking=true`` a bool;
a value YAML reads as a plain string is kept exactly as typed (``train.output_dir=runs/exp #2`` is that
path: YAML would cut `` #2`` as a comment), and a ``#`` that would cut any other value is refused.

What is NOT here, on purpose: batch sizes, optimizer, learning rate and precision. Those live only in the
DeepSpeed JSON (``--deepspeed``; ``ds.a.b=value`` overrides an existing key of it) and are read back from the
engine, so there is one source per value. The fine-tuning lr sweep is a list of such overrides.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from bert import PRESETS, BertConfig
from common.files import read_yaml
from trainer.errors import ConfigError


@dataclass
class DataConfig:
    train: str = ""
    """Shard folder of the training split (output of ``python -m data.build``; holds manifest.json)."""
    valid: Optional[str] = None
    """Shard folder holding the ``valid`` split; None = the train folder (its valid split)."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    dynamic_masking: bool = False
    """Re-draw the 80/10/10 mask at load time (same rules as the builder)."""
    max_bad_samples: int = 100
    """Corrupt samples (records that do not decode), over all ranks and the run, tolerated before it stops."""
    max_bad_fraction: float = 0.001
    """Samples of damaged shards (missing, truncated, unreadable), as a fraction of the samples of every shard
    the run has read, tolerated before it stops (each damaged shard's loss counted once, data/health.py)."""
    max_bad_shards: Optional[int] = None
    """Damaged shards tolerated (over all ranks); None = 1% of the training split's shards, at least 1."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps (each = micro batch x gradient accumulation x world size samples)."""
    warmup_steps: Optional[int] = None
    """Linear warmup length in optimizer steps; exclusive with warmup_fraction."""
    warmup_fraction: Optional[float] = None
    """Warmup as a fraction of max_steps (BERT: 10k of 1M = 0.01). Default when neither is set: 0.01."""
    seed: int = 12345
    output_dir: str = "runs/pretrain"
    log_every: int = 10
    eval_every: int = 500
    """Validation every this many steps (and at the end); 0 = only at the end."""
    eval_batches: Optional[int] = None
    """Cap on validation batches per rank (None = the whole valid split)."""
    eval_examples: int = 3
    """Validation examples shown as decoded Input / Target / Predicted text in TensorBoard (0 = none)."""
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = "auto"
    """``auto`` = continue from output_dir/checkpoints if it holds a checkpoint (a folder with earlier work but
    no checkpoint is refused); ``none`` = an explicit fresh start: an earlier run in output_dir is moved to
    output_dir/earlier/<time>/ first (docs/reliability.md); or a checkpoint path."""
    init_from: Optional[str] = None
    """Weights only (no optimizer, step or data state), e.g. phase 1's checkpoints folder for phase 2."""
    log_batch_keys: bool = False
    """Record every rank's sample keys of each step in metrics.jsonl (for exact-resume comparisons)."""
    peak_tflops: Optional[float] = None
    """Per-device peak for MFU; None = measured once at start with a large matmul in the training dtype."""
    max_nonfinite: int = 5
    """fp16: stop after this many consecutive overflow steps at the minimum loss scale."""
    collective_timeout: Optional[float] = None
    """Seconds any collective may wait before every rank stops naming its phase; None = 600 on CPU (gloo),
    1800 on GPU (NCCL). Must outlast the slowest checkpoint save or validation pass."""


@dataclass
class RollbackConfig:
    """What a divergence does (trainer.rollback; docs/pretrain.md): every rank restores the last good checkpoint
    in the same process, passes over the data that led into it, and goes on, at most ``max_rollbacks`` times
    within ``within_steps`` steps; past that, or with ``enabled: false``, the run stops as it always did."""

    enabled: bool = True
    max_rollbacks: int = 3
    """Rollbacks tolerated within ``within_steps`` steps (counted at the step each divergence was found)."""
    within_steps: int = 1000
    skip_steps: Optional[int] = None
    """Steps of data to pass over, the last ones before the divergence; None = all since the checkpoint."""
    lr_factor: float = 1.0
    """Learning rate multiplier for ``lr_steps`` steps from the restored step (1.0 = unchanged)."""
    lr_steps: int = 0
    spike_window: int = 100
    """Recent finite step losses (all ranks' mean) the spike rule compares with; it is armed once it has them."""
    spike_k: float = 6.0
    """A step's loss is high above median + spike_k x 1.4826 x MAD of the window (6 robust standard deviations)."""
    spike_steps: int = 3
    """Consecutive high steps that make a spike; 0 turns spike detection off."""

    def validate(self) -> None:
        for name in ("max_rollbacks", "within_steps", "spike_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"rollback.{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_steps", "spike_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rollback.{name} must be >= 0, got {getattr(self, name)}")
        if self.skip_steps is not None and self.skip_steps <= 0:
            raise ConfigError(f"rollback.skip_steps must be > 0 or null, got {self.skip_steps}")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError(f"rollback.lr_factor must be in (0, 1], got {self.lr_factor}")
        if self.spike_k <= 0:
            raise ConfigError(f"rollback.spike_k must be > 0, got {self.spike_k}")


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": "base"})
    """``preset`` (tiny/mini/small/medium/base/large) plus any BertConfig field as an override.
    ``vocab_size`` defaults to the shards' tokenizer vocabulary size."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def bert_config(self, vocab_size: int) -> BertConfig:
        """The model's BertConfig; ``vocab_size`` from the shards unless the YAML fixes it."""
        fields = dict(self.model)
        preset = fields.pop("preset", "base")
        fields.setdefault("vocab_size", vocab_size)
        return BertConfig.preset(preset, **fields)

    def validate(self) -> None:
        for key in self.model:
            if key not in _MODEL_KEYS:
                raise ConfigError(f"unknown config key 'model.{key}'; valid: preset or a BertConfig field "
                                  f"({', '.join(sorted(_MODEL_KEYS - {'preset'}))})")
        self.model = {"preset": "base", **self.model}
        if self.model["preset"] not in PRESETS:
            raise ConfigError(f"model.preset {self.model['preset']!r} is not one of {', '.join(PRESETS)}")
        t, d = self.train, self.data
        if not d.train:
            raise ConfigError("data.train is required: the shard folder written by `python -m data.build`")
        if t.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be > 0, got {t.max_steps}")
        if not 0 <= t.seed < 2 ** 32:  # an unsigned 32-bit seed: what numpy, torch and the loader all accept
            raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}")
        if t.eval_examples < 0:
            raise ConfigError(f"train.eval_examples must be >= 0, got {t.eval_examples}")
        if not t.output_dir:
            raise ConfigError("train.output_dir must not be empty")
        if t.warmup_steps is not None and t.warmup_fraction is not None:
            raise ConfigError("set only one of train.warmup_steps and train.warmup_fraction")
        if t.warmup_steps is not None and not 0 <= t.warmup_steps <= t.max_steps:
            raise ConfigError(f"train.warmup_steps must be in [0, max_steps={t.max_steps}], got {t.warmup_steps}")
        if t.warmup_fraction is not None and not 0.0 <= t.warmup_fraction <= 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1], got {t.warmup_fraction}")
        for name in ("log_every", "save_every", "keep_checkpoints", "max_nonfinite"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(t, name)}")
        if t.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, got {t.eval_every}")
        if t.eval_batches is not None and t.eval_batches <= 0:
            raise ConfigError(f"train.eval_batches must be > 0 or null, got {t.eval_batches}")
        for name in ("peak_tflops", "collective_timeout"):
            if getattr(t, name) is not None and getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0 or null, got {getattr(t, name)}")
        if d.num_workers < 0 or d.max_bad_samples < 0 or (d.max_bad_shards is not None and d.max_bad_shards < 0):
            raise ConfigError("data.num_workers, data.max_bad_samples and data.max_bad_shards must be >= 0")
        if not 0 <= d.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
        self.rollback.validate()


_MODEL_KEYS = {"preset"} | {f.name for f in dataclasses.fields(BertConfig)}


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


SWEEP_LRS = [5e-5, 3e-5, 2e-5]  # the paper's fine-tuning grid (batch 32)


@dataclass
class FtModelConfig:
    path: str = ""
    """Pretraining run directory or Hugging Face BERT directory."""
    tag: Optional[str] = None
    """Checkpoint tag of a run directory (default: its latest)."""
    tokenizer: Optional[str] = None
    """Tokenizer to fine-tune with (default: the model's own); must be the pretraining one."""
    allow_tokenizer_mismatch: bool = False
    dropout: float = 0.1
    """Dropout of every layer and of the classifier input."""


@dataclass
class FtTaskConfig:
    name: Optional[str] = None
    """GLUE task through the hub (cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli); or train/dev local files."""
    train: Optional[str] = None
    """Local .csv / .tsv / .jsonl training file (with dev)."""
    dev: Optional[str] = None
    text_column: str = "text"
    text_b_column: Optional[str] = None
    """Second sentence for pair tasks (default: 'text_b' when the file has it)."""
    label_column: str = "label"
    max_len: int = 128


@dataclass
class FtTrainConfig:
    epochs: int = 3
    warmup_fraction: float = 0.1
    seed: int = 42
    sweep_lrs: list[float] = field(default_factory=list)
    """Peak learning rates to run one after another, each as the override ds.optimizer.params.lr=<lr> of the
    DeepSpeed JSON (recorded in out/lr_<lr>/ds_config.json); empty: one run at the JSON's lr."""
    out: str = ""
    export_hf: bool = False
    """Also write out/best_hf in transformers' layout."""
    log_every: int = 0
    """Optimizer steps between log lines (rounded down to a divisor of an epoch's steps, so that every epoch
    ends with one); 0 = one per epoch."""


@dataclass
class FinetuneConfig:
    model: FtModelConfig = field(default_factory=FtModelConfig)
    task: FtTaskConfig = field(default_factory=FtTaskConfig)
    train: FtTrainConfig = field(default_factory=FtTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        m, k, t = self.model, self.task, self.train
        if not m.path:
            raise ConfigError("model.path is required (--model): a pretraining run directory or an HF directory")
        if not t.out:
            raise ConfigError("train.out is required (--out): the output directory")
        if (k.name is None) == (k.train is None):
            raise ConfigError("give exactly one of task.name (--task, GLUE via the hub) and task.train (--train)")
        if (k.train is None) != (k.dev is None):
            raise ConfigError("task.train (--train) needs task.dev (--dev), and task.dev applies to local files")
        if k.name is not None and k.text_b_column is not None:
            raise ConfigError("task.text_b_column (--text-b-column) applies to local files (--train), not to --task")
        if t.epochs < 1:
            raise ConfigError(f"train.epochs (--epochs) must be >= 1, got {t.epochs}")
        if not 0 <= t.warmup_fraction < 1:
            raise ConfigError(f"train.warmup_fraction (--warmup-fraction) must be in [0, 1), got {t.warmup_fraction}")
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"model.dropout (--dropout) must be in [0, 1), got {m.dropout}")
        if k.max_len < 3:
            raise ConfigError(f"task.max_len (--max-len) must be >= 3 ([CLS] x [SEP]), got {k.max_len}")
        if t.log_every < 0:
            raise ConfigError(f"train.log_every must be >= 0 (0 = once per epoch), got {t.log_every}")
        if any(lr <= 0 for lr in t.sweep_lrs):
            raise ConfigError(f"train.sweep_lrs must be positive, got {t.sweep_lrs}")


# ---------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalSection:
    checkpoint: str = ""
    """Training run directory."""
    tag: Optional[str] = None
    data: str = ""
    """Shard folder (with manifest.json)."""
    split: str = "valid"
    micro_batch: Optional[int] = None
    """Sequences per forward (default: the run's train_micro_batch_size_per_gpu)."""
    dtype: Optional[str] = None
    """Precision of the model (default: the run's, from its ds_config.json, as this device allows)."""
    device: Optional[str] = None
    """torch device (default: cuda if available, else cpu)."""
    ranks: Optional[int] = None
    """Read the split as this many data-parallel ranks would (default: the run's world size)."""
    max_batches: Optional[int] = None
    """Batches per rank (default: the run's train.eval_batches; 0 = the whole split)."""


@dataclass
class EvalConfig:
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        e = self.eval
        if not e.checkpoint or not e.data:
            raise ConfigError("eval.checkpoint (--checkpoint) and eval.data (--data) are required")
        if e.dtype is not None and e.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"eval.dtype (--dtype) must be fp32, bf16 or fp16, got {e.dtype!r}")
        for name in ("micro_batch", "ranks"):
            if getattr(e, name) is not None and getattr(e, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(e, name)}")
        if e.max_batches is not None and e.max_batches < 0:
            raise ConfigError(f"eval.max_batches (--max-batches) must be >= 0 (0 = the whole split), "
                              f"got {e.max_batches}")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _wants_float(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def _build_section(name: str, cls, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{name}' must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{name}.{key}'; valid keys of '{name}': {', '.join(sorted(known))}")
        tp = hints[key]
        if typing.get_origin(tp) is list:  # list[float]: a YAML list of numbers
            (item,) = typing.get_args(tp)
            if isinstance(value, list) and item is float:  # YAML 1.1 reads 1e-3 as a string
                value = [_number(v) for v in value]
            if not isinstance(value, list) or not all(_type_ok(v, item) for v in value):
                raise ConfigError(f"config key '{name}.{key}' must be a list of {_type_name(item)}, got {value!r}")
            raw[key] = [float(v) if item is float else v for v in value]
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"config key '{name}.{key}' must be {_type_name(tp)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # .inf overflows timedelta, .nan every check
            raise ConfigError(f"config key '{name}.{key}' must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and _wants_float(tp):
            raw[key] = float(value)
    return cls(**raw)


def build(cls, tree: Any):
    """A config document (a dataclass whose fields are section dataclasses, or ``dict`` for RunConfig.model)
    from a parsed YAML tree; unknown keys and wrong types are errors naming the key; then ``cls.validate``."""
    sections = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(sections)}), got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; valid top-level keys: {', '.join(sorted(sections))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in sections:
        if hints[name] is dict:
            raw = tree.get(name) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"'{name}' must be a mapping, got {type(raw).__name__}")
            values[name] = dict(raw)
        else:
            values[name] = _build_section(name, hints[name], tree.get(name))
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{dotted}' must look like section.key=value (e.g. train.max_steps=10)")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _number(value: Any) -> Any:
    """YAML 1.1 reads "1e-3" as a string; a number is what anyone typing it means."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return value


def _override_value(item: str, text: str) -> Any:
    """An override's value: YAML's reading of a number, bool, null or list; a plain string exactly as typed.

    YAML strips a trailing `` #...`` as a comment, so ``train.output_dir=runs/exp #2`` would silently become
    ``runs/exp``: a value YAML reads as an unquoted string is the typed text instead, and a ``#`` that YAML
    drops from any other value (``train.max_steps=10 #x``, ``x=#2``) is refused rather than guessed at."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not a YAML scalar ({e})") from None
    if isinstance(value, str) and not text.lstrip().startswith(("'", '"')):
        return _number(text)
    if "#" in text and "#" not in repr(value):
        raise ConfigError(f"override {item!r}: YAML reads the '#' as the start of a comment and would cut the "
                          f"value to {value!r}; quote the value (key='...') or drop the '#'")
    return _number(value)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be key.sub=value (e.g. train.max_steps=10)")
        key, text = item.split("=", 1)
        out.append((key.strip(), _override_value(item, text)))
    return out


def warmup_steps(t: TrainConfig) -> int:
    """Resolved warmup length in optimizer steps (fraction -> round(fraction * max_steps))."""
    if t.warmup_steps is not None:
        return t.warmup_steps
    fraction = 0.01 if t.warmup_fraction is None else t.warmup_fraction
    return int(round(fraction * t.max_steps))


def load(path: Optional[str], overrides: list[str] = (), cls=None):
    """Read the YAML at ``path`` (may be None: defaults only), apply ``key.sub=value`` overrides, build ``cls``
    (default RunConfig)."""
    cls = cls or RunConfig
    tree: dict = {}
    if path is not None:
        tree = read_yaml(path, "run config")  # a mapping of sections; an empty file is {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
