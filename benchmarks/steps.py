"""The `train` benchmark's contestants, each a zero-argument "one full training step" closure, their batches,
and the interleaved timing of them.

(a) our model through the DeepSpeed engine exactly as pretraining builds it, stepped by the Trainer's own
``train_step`` (the step pretraining and fine-tuning run), (b) our model in a plain torch loop, (c)
transformers' BertForPreTraining (SDPA, autocast, torch's AdamW, fused on CUDA). They are timed in ONE
process, step by step in turn (a b c a b c ...), so a noisy machine slows them alike and the ratios hold.
"""

from __future__ import annotations

import contextlib
import resource
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from bert import BertConfig, BertForPreTraining
from data.pretraining import num_to_predict
from trainer import engine as eng, precision


def _built_on(device: torch.device):
    """Where the models are built: on a GPU directly (BERT-large's random init on the host took seconds per
    model, three models per run); on a CPU as usual."""
    return device if device.type == "cuda" else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def meta_model(cfg: BertConfig) -> BertForPreTraining:
    """The model without storage: what FLOP counts read."""
    with torch.device("meta"):
        return BertForPreTraining(cfg)


# ---------------------------------------------------------------------------------------------------
# Batches


def synthetic_batch(cfg: BertConfig, micro: int, seq: int, max_pred: int, seed: int = 0) -> dict:
    """Full-length sequences with Google's prediction count: clean, padding-free comparisons."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (micro, seq), generator=g)  # (B, S)
    tt = torch.zeros_like(ids)
    tt[:, seq // 2:] = 1
    n_pred = num_to_predict(seq, max_pred, 0.15)  # 128 -> 19, 512 -> 77
    pos = torch.stack([torch.randperm(seq - 2, generator=g)[:n_pred] + 1 for _ in range(micro)]).sort(1).values
    positions = torch.zeros(micro, max_pred, dtype=torch.long)
    positions[:, :n_pred] = pos
    weights = torch.zeros(micro, max_pred)
    weights[:, :n_pred] = 1.0
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": torch.ones_like(ids),
            "masked_lm_positions": positions,
            "masked_lm_ids": torch.randint(5, cfg.vocab_size, (micro, max_pred), generator=g),
            "masked_lm_weights": weights, "next_sentence_label": torch.randint(0, 2, (micro,), generator=g)}


def shard_batch(shards: str, micro: int) -> dict:
    """A real batch from shards (padding and masking exactly as training sees them)."""
    from data.loader import PretrainLoader, model_inputs

    loader = PretrainLoader(shards, "train", micro, num_workers=0, seed=0)
    return model_inputs(next(iter(loader)))


def batch_counts(batch: dict) -> dict:
    return {"tokens": float(batch["attention_mask"].sum()), "predictions": float(batch["masked_lm_weights"].sum()),
            "sequences": float(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1])}


# ---------------------------------------------------------------------------------------------------
# The implementations


def _loop_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], dtype: str,
               device: torch.device) -> Callable[[], float]:
    """One plain-torch training step: autocast forward (loss scaling for fp16), backward, clip 1.0, torch's
    AdamW (fused on CUDA) with BERT's settings."""
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(eng.param_groups(model), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                            **fused)
    amp = dtype != "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def step() -> float:
        with torch.autocast(device.type, dtype=eng.torch_dtype(dtype), enabled=amp):
            loss = forward()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()
    return step


def plain_step(cfg: BertConfig, batch: dict, dtype: str, unpad: bool, device: torch.device) -> Callable[[], float]:
    """(b) our model (with the host's kernels, as trainer.engine builds it), plain torch loop."""
    torch.manual_seed(0)
    with _built_on(device):
        model = BertForPreTraining(cfg).to(device).train()
    model.unpad = unpad
    if device.type == "cpu":
        from trainer import cpu

        cpu.install_kernels(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    return _loop_step(model, lambda: model(**batch).loss, dtype, device)


def hf_step(cfg: BertConfig, batch: dict, dtype: str, device: torch.device) -> Optional[Callable[[], float]]:
    """(c) transformers' BertForPreTraining: same config, SDPA attention, same batch and masks, AdamW; None
    when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hcfg = transformers.BertConfig(**cfg.to_dict(), attn_implementation="sdpa")
    with _built_on(device):
        model = transformers.BertForPreTraining(hcfg).to(device).train()
    labels = torch.full_like(batch["input_ids"], -100)  # HF's dense labels: -100 = no prediction
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(batch["masked_lm_positions"])
    real = batch["masked_lm_weights"] > 0
    labels[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = labels.to(device)
    return _loop_step(model, lambda: model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                           attention_mask=batch["attention_mask"], labels=labels,
                                           next_sentence_label=batch["next_sentence_label"]).loss, dtype, device)


def trainer_batch(batch: dict) -> dict:
    """``batch`` as data.loader yields it to the Trainer: its tensors on the host and the host facts its step
    reads (a batch without padding goes without its attention mask, as in training)."""
    mask = batch["attention_mask"]
    return {**batch, "is_padding": False, "keys": [], "tokens": int(mask.sum()), "no_padding": bool(mask.all())}


class _NoLoader:
    """What the Trainer reads of a loader when it is built; (a) hands its step the batches itself."""

    def state_dict(self) -> dict:
        return {}


def ds_step(cfg: BertConfig, batch: dict, ds_config_path: str, dtype: str, unpad: bool,
            device: torch.device) -> Callable[[], float]:
    """(a) our model through the DeepSpeed engine, built exactly as pretraining builds it (trainer.engine), with
    the JSON's optimizer, one rank and one micro batch per step, stepped by ``Trainer.train_step``: the step
    pretraining and fine-tuning run (lr, the host batch moved to the device, forward, backward, step, the
    named sums). It ends with the one read of the device the loop makes per step (the agreement reads the
    step's count of non-finite losses)."""
    from data.health import DataHealth
    from trainer import dist
    from trainer.checkpoint import Checkpointer
    from trainer.config import TrainConfig
    from trainer.metrics import MetricsWriter
    from trainer.trainer import RunInfo, Trainer

    ds = eng.load_ds_config(ds_config_path)
    ds.update(train_micro_batch_size_per_gpu=int(batch["input_ids"].shape[0]), gradient_accumulation_steps=1)
    ds.pop("train_batch_size", None)
    ds = precision.apply(ds, dtype)
    resolved = eng.resolve(ds, ds_config_path, precision.device_facts(device.type), world=1)
    dist.init()
    torch.manual_seed(0)
    with _built_on(device):
        model = BertForPreTraining(cfg)
    model.unpad = unpad
    engine = eng.build_engine(model, resolved.ds)
    info = RunInfo(rank=0, world=1, precision=resolved.precision, global_batch=resolved.batch.global_batch,
                   peak_lr=float(resolved.ds["optimizer"]["params"]["lr"]), warmup=0, peak_tflops=1.0, flops={},
                   ds_path=ds_config_path)
    trainer = Trainer(engine, _NoLoader(), TrainConfig(max_steps=10 ** 9, warmup_steps=0), info,
                      metrics=MetricsWriter("", enabled=False), checkpointer=Checkpointer("", 1, {}),
                      health=DataHealth(0, 0.0, 0), callbacks=[])
    batches = [trainer_batch(batch)]

    def step() -> float:
        return float(trainer.train_step(batches).nonfinite)
    return step


# ---------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Impl:
    name: str
    step: Callable[[], float]
    times: list = field(default_factory=list)
    faults: list = field(default_factory=list)  # minor page faults of the process during the step: the allocator
    peak_mem: int = 0  # CUDA: most device memory allocated during its steps (every impl's resident state too)
    step_mem: int = 0  # CUDA: of that, what its step added on top of what was resident (activations, buffers)
    syncs: int = 0  # CUDA: host synchronisations in one step (torch's sync debug mode)


def _count_syncs(step: Callable[[], float]) -> int:
    """Host-device synchronisations of one step (each one stalls the CPU until the GPU is done), counted
    with torch's sync debug mode; the final .item() of the step is one of them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(impls: list[Impl], warmup: int, repeats: int, device: torch.device) -> None:
    """Warm every implementation up, count its syncs (CUDA), then time ``repeats`` interleaved rounds."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for im in impls:
            im.step()
    if cuda:
        for im in impls:
            im.syncs = _count_syncs(im.step)
    for _ in range(repeats):  # interleaved: every implementation sees the same machine noise
        for im in impls:
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            im.step()  # ends in .item(): the step has finished when it returns
            _sync(device)
            im.times.append(time.perf_counter() - t0)
            im.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if cuda:
                im.peak_mem = max(im.peak_mem, torch.cuda.max_memory_allocated())
                im.step_mem = max(im.step_mem, torch.cuda.max_memory_allocated() - resident)
