"""Run configuration: YAML -> dataclasses, with dotted command-line overrides.

Precedence: ``key.sub=value`` overrides > the YAML file > the defaults below. Unknown keys are errors that
name the key (a typo such as ``train.max_step`` must never be silently ignored). Values of overrides are
parsed as YAML scalars, so ``train.max_steps=10`` is an int, ``train.init_from=null`` is None and
``data.dynamic_masking=true`` a bool.

What is NOT here, on purpose: batch sizes, optimizer, learning rate and precision. Those live only in the
DeepSpeed JSON (``--deepspeed``) and are read back from the engine, so there is one source per value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from bert import BertConfig, PRESETS


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key or file."""


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
    """Corrupt samples (per rank) tolerated before the run stops; each one is logged and counted."""


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
    """Validation examples shown as decoded Input / Target / Predicted text in TensorBoard."""
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = "auto"
    """``auto`` = continue from output_dir/checkpoints/latest if present; ``none``; or a checkpoint path."""
    init_from: Optional[str] = None
    """Weights only (no optimizer, step or data state), e.g. phase 1's checkpoints folder for phase 2."""
    log_batch_keys: bool = False
    """Record every rank's sample keys of each step in metrics.jsonl (for exact-resume comparisons)."""
    peak_tflops: Optional[float] = None
    """Per-device peak for MFU; None = measured once at start with a large matmul in the training dtype."""
    max_nonfinite: int = 5
    """fp16: stop after this many consecutive overflow steps at the minimum loss scale."""


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": "base"})
    """``preset`` (tiny/mini/small/medium/base/large) plus any BertConfig field as an override.
    ``vocab_size`` defaults to the shards' tokenizer vocabulary size."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def bert_config(self, vocab_size: int) -> BertConfig:
        """The model's BertConfig; ``vocab_size`` from the shards unless the YAML fixes it."""
        fields = dict(self.model)
        preset = fields.pop("preset", "base")
        fields.setdefault("vocab_size", vocab_size)
        return BertConfig.preset(preset, **fields)


_SECTIONS = {"data": DataConfig, "train": TrainConfig}
_MODEL_KEYS = {"preset"} | {f.name for f in dataclasses.fields(BertConfig)}


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
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{name}.{key}'; valid keys of '{name}': {', '.join(sorted(known))}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key '{name}.{key}' must be {_type_name(hints[key])}, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and _wants_float(hints[key]):
            raw[key] = float(value)
    return cls(**raw)


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


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be key.sub=value (e.g. train.max_steps=10)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not a YAML scalar ({e})") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string; a number is what anyone typing it means
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def from_dict(tree: dict) -> RunConfig:
    if not isinstance(tree, dict):
        raise ConfigError(f"run config must be a mapping of sections (model, data, train), got {type(tree).__name__}")
    unknown = sorted(set(tree) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; valid top-level keys: data, model, train")
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"'model' must be a mapping, got {type(model).__name__}")
    for key in model:
        if key not in _MODEL_KEYS:
            raise ConfigError(f"unknown config key 'model.{key}'; valid: preset or a BertConfig field "
                              f"({', '.join(sorted(_MODEL_KEYS - {'preset'}))})")
    model = {"preset": "base", **model}
    if model["preset"] not in PRESETS:
        raise ConfigError(f"model.preset {model['preset']!r} is not one of {', '.join(PRESETS)}")
    cfg = RunConfig(model=model, data=_build_section("data", DataConfig, dict(tree.get("data") or {})),
                    train=_build_section("train", TrainConfig, dict(tree.get("train") or {})))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    t, d = cfg.train, cfg.data
    if not d.train:
        raise ConfigError("data.train is required: the shard folder written by `python -m data.build`")
    if t.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be > 0, got {t.max_steps}")
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
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops must be > 0 or null, got {t.peak_tflops}")
    if d.num_workers < 0 or d.max_bad_samples < 0:
        raise ConfigError("data.num_workers and data.max_bad_samples must be >= 0")


def warmup_steps(t: TrainConfig) -> int:
    """Resolved warmup length in optimizer steps (fraction -> round(fraction * max_steps))."""
    if t.warmup_steps is not None:
        return t.warmup_steps
    fraction = 0.01 if t.warmup_fraction is None else t.warmup_fraction
    return int(round(fraction * t.max_steps))


def load(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read the YAML at ``path`` (may be None: defaults only) and apply ``key.sub=value`` overrides."""
    tree: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                tree = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read run config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping (model/data/train), got {type(tree).__name__}")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
