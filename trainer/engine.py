"""The DeepSpeed side: the JSON (read, overridden, validated, batch and precision resolved) and the engine.

The JSON is the one source of batch sizes, optimizer (and its peak lr), gradient clipping and precision;
everything here reads it, checks it against this run (world size, device) and writes the resolved values
back into it, so the engine, the run folder's ds_config.json and the logs agree.

Batch: a recipe states its global batch once, ``train_batch_size``, with ``train_micro_batch_size_per_gpu``;
gradient accumulation is derived: 256 sequences on 8 ranks at micro 32 -> accumulation 1, on 2 ranks -> 4.
A JSON that gives micro and accumulation instead gets ``train_batch_size = micro x accum x world``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from common.files import read_json
from trainer import precision as prec
from trainer.errors import ConfigError

# Optimizers DeepSpeed implements with CUDA-only kernels (no CPU path).
_CUDA_ONLY_OPTIMIZERS = {"lamb", "onebitadam", "onebitlamb", "zerooneadam"}
# Google's BERT optimizer: no weight decay for these parameters (its exclude list).
NO_DECAY = ("LayerNorm", "layer_norm", "bias")


def load_ds_config(path: str) -> dict:
    return read_json(path, "DeepSpeed JSON")


def apply_ds_overrides(ds: dict, path: str, overrides: list[tuple[str, object]]) -> dict:
    """``ds.a.b=value`` replaces the existing key a.b of the DeepSpeed JSON (typos are errors, not new keys)."""
    ds = copy.deepcopy(ds)
    for dotted, value in overrides:
        parts = dotted.split(".")[1:]
        node = ds
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"override {dotted}: {path} has no key '{where}' (ds. overrides only replace "
                                  f"existing keys)")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return ds


def _positive_int(ds: dict, key: str, path: str, required: bool) -> Optional[int]:
    v = ds.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{path}: '{key}' must be a positive integer (got {v!r}); 'auto' is filled only by "
                          f"Hugging Face's integration, raw DeepSpeed needs numbers")
    return v


@dataclass(frozen=True)
class Batch:
    micro: int
    accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def __str__(self) -> str:  # the arithmetic, as the logs and docs write it
        return f"micro {self.micro} x accum {self.accum} x {self.world} rank(s) = {self.global_batch} sequences/step"


def resolve_batch(ds: dict, path: str, world: int) -> Batch:
    micro = _positive_int(ds, "train_micro_batch_size_per_gpu", path, required=True)
    accum = _positive_int(ds, "gradient_accumulation_steps", path, required=False)
    total = _positive_int(ds, "train_batch_size", path, required=False)
    if total is None:
        return Batch(micro, accum or 1, world)
    per_pass = micro * world
    if total % per_pass:
        raise ConfigError(f"{path}: train_batch_size {total} is not a multiple of micro batch {micro} x {world} "
                          f"rank(s) = {per_pass}, so no gradient accumulation gives it; change "
                          f"train_micro_batch_size_per_gpu (ds.train_micro_batch_size_per_gpu=N) or the rank count")
    derived = total // per_pass
    if accum is not None and accum != derived:
        raise ConfigError(f"{path}: gradient_accumulation_steps {accum} disagrees with train_batch_size {total} / "
                          f"(micro {micro} x {world} rank(s)) = {derived}; state the global batch only "
                          f"(remove gradient_accumulation_steps)")
    return Batch(micro, derived, world)


def validate(ds: dict, path: str, device: str) -> None:
    opt = ds.get("optimizer")
    lr = (opt.get("params") or {}).get("lr") if isinstance(opt, dict) else None
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise ConfigError(f"{path}: needs an 'optimizer' with params.lr (the peak learning rate our linear "
                          f"warmup/decay schedule scales)")
    if not (math.isfinite(lr) and lr > 0):  # lr 0 trains nothing, a negative one ascends the loss
        raise ConfigError(f"{path}: optimizer.params.lr must be a finite number > 0, got {lr!r}")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the LR schedule is BERT's linear warmup + linear decay "
                          f"in trainer/schedule.py (DeepSpeed's WarmupDecayLR warms up logarithmically by default)")
    if str(opt.get("type", "")).lower().replace("_", "") in _CUDA_ONLY_OPTIMIZERS and device != "cuda":
        raise ConfigError(f"{path}: optimizer {opt['type']} has only CUDA kernels in DeepSpeed; this device is "
                          f"{device}: use Adam/AdamW")
    if (ds.get("fp16") or {}).get("enabled") and (ds.get("bf16") or {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled; enable one (or neither for fp32)")


@dataclass(frozen=True)
class Resolved:
    """A DeepSpeed JSON made concrete for this run: what the engine gets, and what was decided."""

    ds: dict
    batch: Batch
    decision: prec.Decision
    device: str  # "cuda", "cpu", ...

    @property
    def precision(self) -> str:
        return self.decision.precision


def resolve(ds: dict, path: str, facts: prec.DeviceFacts, world: int) -> Resolved:
    """Validate ``ds`` for this device and world size; fix the batch triple and the precision in it."""
    validate(ds, path, facts.kind)
    batch = resolve_batch(ds, path, world)
    decision = prec.decide(prec.requested(ds), facts)
    out = prec.apply(ds, decision.precision)
    out.update(train_micro_batch_size_per_gpu=batch.micro, gradient_accumulation_steps=batch.accum,
               train_batch_size=batch.global_batch)
    return Resolved(out, batch, decision, facts.kind)


def precision_note(resolved: Resolved) -> str:
    """The decision's log line; for bf16 asked for on a device that only emulates it, with the measured cost."""
    line = resolved.decision.line
    if resolved.decision.emulated:
        ratio = prec.emulation_ratio(resolved.device)
        line += (f"; warning: a bf16 matmul measured {ratio:.0f}x slower than fp32 here: set bf16.enabled "
                 f"false (or request fp16) to train in fp32")
    return line


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def param_groups(model: torch.nn.Module) -> list[dict]:
    """BERT's rule (Google's exclude list): no weight decay on biases and LayerNorm weights. The decay group
    takes weight_decay from the DeepSpeed JSON."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied weight appears once (named_parameters dedups)
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds: dict):
    """The DeepSpeed engine around ``model`` as every entry point builds it (pretraining, fine-tuning and the
    benchmark's (a)): optimizer, precision and batch from the resolved JSON, BERT's weight-decay groups, and
    on a CPU host the CPU kernels (trainer/cpu.py) swapped into the model."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from trainer import cpu

        cpu.install_kernels(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
    from trainer import dist

    dist.bound_collectives()  # DeepSpeed's own groups get the run's collective timeout too
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if getattr(scaler, "raise_error_at_min_scale", False):
        # fp16: at the minimum loss scale, once hysteresis is used up, DeepSpeed's DynamicLossScaler raises a
        # bare Exception from inside step() (not configurable from the JSON), so the run would end in a
        # traceback before trainer.guards.NonFiniteGuard ever counted train.max_nonfinite such steps. It keeps
        # skipping instead, and the guard stops every rank together, naming the last good checkpoint.
        scaler.raise_error_at_min_scale = False
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO / fp16 / bf16 optimizers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def loss_scale(engine) -> Optional[float]:
    """fp16's current dynamic loss scale (None for bf16/fp32)."""
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float, torch.Tensor)):
            return float(v)
    return None


def set_loss_scale(engine, scale: float) -> None:
    """Set fp16's dynamic loss scale (a rollback starts it afresh); nothing for bf16/fp32."""
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        if isinstance(getattr(opt, attr, None), (int, float, torch.Tensor)):
            setattr(opt, attr, scale)
            return


def load_checkpoint(engine, load_dir: str, tag: str, universal: bool):
    """``engine.load_checkpoint`` of ``tag``; DeepSpeed reads the universal layout when its config says so, and
    one process may load both kinds (a resume on another rank count, then a rollback to a checkpoint of its
    own), so the flag is set for each load. Returns DeepSpeed's (path, client state)."""
    engine._config.load_universal_checkpoint = universal
    return engine.load_checkpoint(load_dir, tag=tag)
