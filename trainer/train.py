"""BERT pretraining on a DeepSpeed engine: building the objects, and the one training loop.

    deepspeed [--num_gpus N] launcher/pretrain.py --deepspeed ds_configs/zero2.json --config RUN.yaml \
        [train.max_steps=10 ...]

Also under torchrun, srun (trainer.dist derives the env from SLURM_*) and as one plain python process.

Sources of values: batch sizes, optimizer (and its peak lr), gradient clipping and precision come from the
DeepSpeed JSON and are read back from the engine; everything else from the run YAML (trainer.config).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from trainer import checkpoint, config as run_config, dist, malloc
from trainer.config import ConfigError, RunConfig
from trainer.evaluation import evaluate_pretraining, to_device
from trainer.metrics import MetricsWriter, format_examples
from trainer.schedule import lr_at, set_lr

# Optimizers DeepSpeed implements with CUDA-only kernels (no CPU path).
_CUDA_ONLY_OPTIMIZERS = {"lamb", "onebitadam", "onebitlamb", "zerooneadam"}


def log(rank: int, msg: str) -> None:
    """Rank 0 prints; through tqdm.write so a line never lands inside the progress bar's line."""
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"[pretrain] {msg}", file=sys.stdout)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launcher/pretrain.py", description="Pretrain BERT (MLM + NSP) with DeepSpeed.",
        epilog="Overrides are key.sub=value pairs (e.g. train.max_steps=10 model.hidden_dropout_prob=0.0); "
               "they win over the YAML, which wins over the defaults.")
    # Our own flag: DeepSpeed's --deepspeed is a boolean (paired with --deepspeed_config), we take the path.
    p.add_argument("--deepspeed", required=True, metavar="DS_CONFIG.json",
                   help="DeepSpeed JSON: ZeRO stage, optimizer + peak lr, precision, micro batch, accumulation")
    p.add_argument("--config", required=True, metavar="RUN.yaml", help="run configuration (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK in the environment is what is used")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="run-config overrides (train.max_steps=10); 'ds.'-prefixed ones edit an existing key of "
                        "the DeepSpeed JSON for this run (ds.optimizer.params.lr=1e-3)")
    return p


def apply_ds_overrides(ds: dict, path: str, overrides: list[tuple[str, object]]) -> dict:
    """``ds.a.b=value`` replaces the existing key a.b of the DeepSpeed JSON (typos are errors, not new keys).
    The JSON stays the one source of batch sizes, optimizer and precision; the result goes to ds_config.json."""
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


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config


def load_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return ds


def resolve_ds_config(ds: dict, path: str, fp16_ok: bool, bf16_ok: bool, device: str) -> tuple[dict, Optional[str]]:
    """Validate the DeepSpeed JSON for this device; switch fp16 -> bf16 where fp16 is unsupported.

    Returns (resolved config, the one log line describing the switch or None).
    """
    ds = copy.deepcopy(ds)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        v = ds.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{path}: '{key}' must be a positive integer (got {v!r}); 'auto' is filled only by "
                              f"Hugging Face's integration, raw DeepSpeed needs numbers")
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or not isinstance((opt.get("params") or {}).get("lr"), (int, float)):
        raise ConfigError(f"{path}: needs an 'optimizer' with params.lr (the peak learning rate our linear "
                          f"warmup/decay schedule scales)")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the LR schedule is BERT's linear warmup + linear decay "
                          f"in trainer/schedule.py (DeepSpeed's WarmupDecayLR warms up logarithmically by default)")
    if str(opt.get("type", "")).lower().replace("_", "") in _CUDA_ONLY_OPTIMIZERS and device != "cuda":
        raise ConfigError(f"{path}: optimizer {opt['type']} has only CUDA kernels in DeepSpeed; this device is "
                          f"{device}: use Adam/AdamW")
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled; enable one (or neither for fp32)")
    note = None
    if fp16 and not fp16_ok:
        if not bf16_ok:
            raise ConfigError(f"{path}: fp16 is enabled but the {device} device supports neither fp16 nor bf16; "
                              f"disable fp16 to train in fp32")
        ds.pop("fp16")
        ds["bf16"] = {"enabled": True}
        note = (f"the {device} device has no fp16: switched {os.path.basename(path)} from fp16 (dynamic loss "
                f"scaling) to bf16 (no loss scaling needed); nothing else changes")
    elif bf16 and not bf16_ok:
        raise ConfigError(f"{path}: bf16 is enabled but the {device} device does not support it")
    return ds, note


def precision(ds: dict) -> str:
    if (ds.get("fp16") or {}).get("enabled"):
        return "fp16"
    if (ds.get("bf16") or {}).get("enabled"):
        return "bf16"
    return "fp32"


# ---------------------------------------------------------------------------------------------------
# Shards vs model


def check_shards(manifest: dict, where: str, model_cfg, expected_format: int) -> None:
    """Refuse shards the model cannot read, showing both sides."""
    fv = manifest.get("format_version")
    if fv != expected_format:
        raise ConfigError(f"{where}: shard format_version {fv} but this code reads format_version {expected_format}; "
                          f"rebuild the shards with `python -m data.build`")
    tok = manifest.get("tokenizer") or {}
    if tok.get("vocab_size") != model_cfg.vocab_size:
        raise ConfigError(f"{where}: shards' tokenizer has vocab_size {tok.get('vocab_size')} (fingerprint "
                          f"{tok.get('fingerprint')}) but the model has vocab_size {model_cfg.vocab_size}")
    seq = (manifest.get("settings") or {}).get("max_seq_len")
    if not isinstance(seq, int) or seq > model_cfg.max_position_embeddings:
        raise ConfigError(f"{where}: shards' max_seq_len is {seq} but the model's max_position_embeddings is "
                          f"{model_cfg.max_position_embeddings}")


def check_same_tokenizer(a: dict, a_where: str, b: dict, b_where: str) -> None:
    fa, fb = (a.get("tokenizer") or {}).get("fingerprint"), (b.get("tokenizer") or {}).get("fingerprint")
    if fa != fb:
        raise ConfigError(f"tokenizer mismatch: {a_where} has fingerprint {fa}, {b_where} has {fb}")


# ---------------------------------------------------------------------------------------------------
# Model pieces


def param_groups(model: torch.nn.Module) -> list[dict]:
    """BERT's rule: no weight decay on biases and LayerNorm weights (Google's exclude list
    ["LayerNorm", "layer_norm", "bias"]). The decay group takes weight_decay from the DeepSpeed JSON."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied decoder weight appears once (named_parameters dedups)
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds_cfg: dict):
    """The DeepSpeed engine as pretraining uses it (also timed by launcher/bench.py): optimizer, precision and
    batch sizes all come from the resolved JSON; BERT's weight-decay groups."""
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_cfg)
    return engine


def flop_counts(model) -> dict:
    """Parameter counts for FLOPs per step (REFERENCE §7: ≈ 6 N per token + 12 L H S attention).

    ``per_token``: encoder weights, used by every (non-pad) token. ``per_prediction``: the MLM head
    (transform + the H x V decoder + bias), applied only at masked positions (sparse prediction).
    ``per_sequence``: pooler + NSP classifier. Embedding lookups are not matmuls and are not counted.
    """
    c = model.config
    enc = sum(p.numel() for p in model.bert.encoder.parameters())
    head = (sum(p.numel() for p in model.cls.predictions.transform.parameters())
            + c.vocab_size * c.hidden_size + c.vocab_size)
    seq = sum(p.numel() for p in model.bert.pooler.parameters()) + sum(
        p.numel() for p in model.cls.seq_relationship.parameters())
    return {"per_token": enc, "per_prediction": head, "per_sequence": seq,
            "layers": c.num_hidden_layers, "hidden": c.hidden_size}


def step_flops(fc: dict, tokens: float, predictions: float, sequences: float, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward = 6 per parameter per use) for one micro batch."""
    return (6.0 * (fc["per_token"] * tokens + fc["per_prediction"] * predictions + fc["per_sequence"] * sequences)
            + 12.0 * fc["layers"] * fc["hidden"] * seq_len * tokens)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0,
                        n: Optional[int] = None) -> float:
    """Achievable matmul TFLOPS on this device in the dtype (MFU denominator when not configured):
    2 n^3 FLOPs per n x n GEMM, the best rate of about eight windows over `seconds` (a peak is what the
    device can do; a window slowed by a neighbour on a shared machine would inflate every MFU)."""
    g = torch.Generator(device="cpu").manual_seed(0)  # own generator: the global RNG stays untouched
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        iters, t0 = 0, time.perf_counter()
        while iters == 0 or time.perf_counter() - t0 < seconds / 8:
            a @ b
            iters += 1
            sync()
        best = max(best, 2.0 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
    return best


# ---------------------------------------------------------------------------------------------------
# Stop requests (signals)


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGUSR1; the handler does nothing else (no I/O, no collectives inside a handler)."""

    requested: bool = False
    signum: Optional[int] = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum


@dataclass
class NonFiniteGuard:
    """Decides when non-finite numbers end the run.

    fp16: an overflow step is skipped by DeepSpeed and the loss scale halves; we count them. Overflow while
    the scale is already at min_loss_scale for more than ``max_nonfinite`` consecutive steps means the
    gradients are genuinely inf/NaN: stop. bf16/fp32: no loss scale protects the weights, so a non-finite
    loss stops the run at once.
    """

    precision: str
    max_consecutive: int
    min_loss_scale: float = 1.0
    consecutive: int = 0

    def update(self, loss_finite: bool, overflow: bool, loss_scale: Optional[float]) -> Optional[str]:
        if self.precision == "fp16":
            if overflow and loss_scale is not None and loss_scale <= self.min_loss_scale:
                self.consecutive += 1
            elif not overflow:
                self.consecutive = 0
            if self.consecutive > self.max_consecutive:
                return (f"fp16 loss scale collapsed: {self.consecutive} consecutive overflow steps at the minimum "
                        f"loss scale {self.min_loss_scale} (train.max_nonfinite={self.max_consecutive})")
            return None
        if not loss_finite:
            return f"non-finite loss in {self.precision} (no loss scaling can skip it)"
        return None


# ---------------------------------------------------------------------------------------------------
# Windowed training statistics


@dataclass
class Window:
    """Sums since the last log line; reduced over ranks when logged."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    sums: dict = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    keys: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.__init__()


_SUM_KEYS = ("mlm_loss_sum", "mlm_correct", "mlm_count", "nsp_loss_sum", "nsp_correct", "nsp_count")


def reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if tdist.is_initialized():
        tdist.all_reduce(t)
    return t.tolist()


def loader_stats(loader) -> dict:
    stats = getattr(loader, "stats", None)
    stats = stats() if callable(stats) else (stats or {})
    return {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------------------------------
# The run


def run(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    run_overrides = [o for o in args.overrides if not o.startswith("ds.")]
    ds_overrides = run_config.parse_overrides([o for o in args.overrides if o.startswith("ds.")])
    cfg = run_config.load(args.config, run_overrides)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from deepspeed.accelerator import get_accelerator

    from bert import BertForPreTraining
    from data import shards as shard_io
    from data.tokenizer import load_tokenizer
    from trainer.loader import DataCorruptionError, PretrainLoader

    acc = get_accelerator()
    device_kind = acc.device_name()  # "cuda", "cpu", ...
    ds_raw = apply_ds_overrides(load_ds_config(args.deepspeed), args.deepspeed, ds_overrides)
    ds_cfg, switch_note = resolve_ds_config(ds_raw, args.deepspeed, bool(acc.is_fp16_supported()),
                                            bool(acc.is_bf16_supported()), device_kind)

    # Shards and model must agree before anything expensive happens.
    t = cfg.train
    train_dir = cfg.data.train
    valid_dir = cfg.data.valid or cfg.data.train
    train_manifest = shard_io.read_manifest(train_dir)
    valid_manifest = shard_io.read_manifest(valid_dir) if valid_dir != train_dir else train_manifest
    try:
        model_cfg = cfg.bert_config(vocab_size=train_manifest["tokenizer"]["vocab_size"])
    except ValueError as e:
        raise ConfigError(f"{args.config}: model: {e}") from None
    check_shards(train_manifest, f"data.train={train_dir}", model_cfg, shard_io.FORMAT_VERSION)
    if valid_dir != train_dir:
        check_shards(valid_manifest, f"data.valid={valid_dir}", model_cfg, shard_io.FORMAT_VERSION)
        check_same_tokenizer(train_manifest, f"data.train={train_dir}", valid_manifest, f"data.valid={valid_dir}")
    fingerprint = train_manifest["tokenizer"]["fingerprint"]
    max_seq_len = train_manifest["settings"]["max_seq_len"]

    ckpt_dir = os.path.join(t.output_dir, "checkpoints")
    resume_from = checkpoint.resolve_resume(t.resume, ckpt_dir)

    rank, local_rank, world = dist.init()
    if switch_note:
        log(rank, switch_note)
    if device_kind == "cuda":
        acc.set_device(local_rank)
    elif device_kind == "cpu":
        log(rank, malloc.configure())

    # Same seed on every rank for the weights (DeepSpeed also broadcasts rank 0's), then per-rank streams
    # for dropout so ranks do not drop the same units.
    _seed_all(t.seed)
    model = BertForPreTraining(model_cfg)
    init_client = None
    if t.init_from and resume_from is not None:
        log(rank, f"train.init_from={t.init_from} ignored: resuming this run's own checkpoint instead")
    if t.init_from and resume_from is None:
        init_client = checkpoint.load_weights(model, t.init_from)
        if init_client.get("tokenizer_fingerprint") != fingerprint:
            raise ConfigError(f"train.init_from={t.init_from}: checkpoint tokenizer fingerprint "
                              f"{init_client.get('tokenizer_fingerprint')} but the shards' is {fingerprint}")
        log(rank, f"initialised weights from {t.init_from} (step {init_client.get('step')}); optimizer, "
                  f"schedule and data position start fresh")
    _seed_all(t.seed + 1000 * rank)
    fc = flop_counts(model)

    engine = build_engine(model, ds_cfg)
    device = engine.device
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    global_batch = engine.train_batch_size()
    peak_lr = engine.optimizer.param_groups[0]["lr"]  # the JSON's lr, read before a resume overwrites it
    prec = precision(ds_cfg)
    warmup = run_config.warmup_steps(t)
    guard = NonFiniteGuard(prec, t.max_nonfinite, float((ds_cfg.get("fp16") or {}).get("min_loss_scale", 1)))

    if rank == 0:
        _write_run_files(t.output_dir, cfg, ds_cfg, model_cfg, train_dir)
    log(rank, f"model {cfg.model.get('preset')} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
              f"{prec}, ZeRO-{engine.zero_optimization_stage()}, {world} rank(s) x micro {micro} x accum {accum} "
              f"= {global_batch} sequences/step, peak lr {peak_lr:g}, warmup {warmup} of {t.max_steps} steps")
    log(rank, "resolved run config:\n" + run_config.dump_yaml(cfg).rstrip())

    try:
        loader = PretrainLoader(train_dir, "train", micro, rank=rank, world_size=world, seed=t.seed,
                                num_workers=cfg.data.num_workers, shuffle=True, loop=True,
                                dynamic_masking=cfg.data.dynamic_masking, max_bad_samples=cfg.data.max_bad_samples)
    except ValueError as e:
        raise ConfigError(f"data.train: {e}") from None

    def valid_loader():
        try:
            return PretrainLoader(valid_dir, "valid", micro, rank=rank, world_size=world, seed=t.seed,
                                  num_workers=cfg.data.num_workers, shuffle=False, loop=False,
                                  max_bad_samples=cfg.data.max_bad_samples)
        except ValueError as e:
            raise ConfigError(f"validation data {valid_dir}: {e}") from None

    has_valid = (valid_manifest.get("splits", {}).get("valid", {}).get("samples") or 0) > 0
    if not has_valid:
        log(rank, f"{valid_dir} has no valid split samples: validation is off for this run")

    step, samples_seen, tokens_seen = 0, 0, 0
    rng_to_restore = None
    if resume_from is not None:
        load_dir, tag = resume_from
        path, client = engine.load_checkpoint(load_dir, tag=tag)
        if path is None:
            raise ConfigError(f"could not load a checkpoint from {load_dir} (tag {tag or 'latest'})")
        _check_resume(client, path, fingerprint, max_seq_len, model_cfg, world)
        checkpoint.replay_adam_bias_correction(engine)  # else the first resumed update differs by ~1 ulp
        step, samples_seen, tokens_seen = client["step"], client["samples_seen"], client["tokens_seen"]
        try:
            loader.load_state_dict(client["data_state"][rank])
        except ValueError as e:
            raise ConfigError(f"resume from {path}: {e}") from None
        rng_to_restore = client["rng"][rank]
        log(rank, f"resumed from {path} at step {step} ({samples_seen} samples, {tokens_seen} tokens seen)")
    elif t.resume == "auto":
        log(rank, f"no checkpoint in {ckpt_dir}: starting from step 0")

    metrics = MetricsWriter(t.output_dir, enabled=rank == 0, resume_step=step if resume_from else None)
    tokenizer = load_tokenizer(os.path.join(train_dir, "tokenizer")) if rank == 0 else None
    pad_id = train_manifest["tokenizer"]["pad_id"]

    # Installed before any DataLoader worker is forked: workers inherit the flag-only handler, so a SIGTERM to
    # the whole process group (Slurm, the deepspeed launcher) cannot kill them before the checkpoint is saved.
    stop = StopFlag()
    stop.install()

    # Fixed validation examples for the text panel: every rank keeps its first valid batch (every rank must
    # run each forward under ZeRO-3), rank 0 shows its first few.
    fixed_batch = _first_batch(valid_loader()) if has_valid else None

    # Start the training stream before restoring the RNG: creating DataLoader workers draws a seed from the
    # global torch RNG; doing it first makes the resumed dropout stream equal the uninterrupted one.
    it = iter(loader)
    pending = _next_batch(it, loader)
    if rng_to_restore is not None:
        checkpoint.set_rng_state(rng_to_restore)

    peak_tflops = t.peak_tflops
    if peak_tflops is None:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec, torch.float32)
        peak_tflops = measure_peak_tflops(device, dtype)
        log(rank, f"measured matmul peak {peak_tflops:.3f} TFLOPS per rank ({prec}) for MFU; set train.peak_tflops "
                  f"to use the device's datasheet value")

    def client_state() -> dict:
        data_states = checkpoint.gather(loader.state_dict())
        rngs = checkpoint.gather(checkpoint.rng_state())
        return {"step": step, "samples_seen": samples_seen, "tokens_seen": tokens_seen,
                "data_state": data_states, "rng": rngs, "world_size": world,
                "run_config": cfg.to_dict(), "model_config": model_cfg.to_dict(), "ds_config": ds_cfg,
                "tokenizer_fingerprint": fingerprint, "max_seq_len": max_seq_len,
                "format_version": train_manifest["format_version"]}

    last_saved_path: Optional[str] = os.path.join(ckpt_dir, checkpoint.tag_for(step)) if resume_from else None

    def save() -> str:
        nonlocal last_saved_path
        last_saved_path = checkpoint.save(engine, ckpt_dir, step, client_state(), t.keep_checkpoints, rank)
        return last_saved_path

    best_val: dict = {}
    last_eval_step = -1

    def validate() -> None:
        nonlocal last_eval_step
        last_eval_step = step
        if not has_valid:
            return
        res = evaluate_pretraining(engine, valid_loader(), max_batches=t.eval_batches)
        rec = {f"val/{k}": v for k, v in res.items()}
        metrics.scalars(step, rec)
        metrics.record({"step": step, **rec})
        if not best_val or res["mlm_loss"] < best_val["mlm_loss"]:
            best_val.update(res, step=step)
        log(rank, f"step {step}: validation mlm_loss {res['mlm_loss']:.4f} (perplexity {res['perplexity']:.2f}), "
                  f"mlm_acc {res['mlm_acc']:.4f}, nsp_acc {res['nsp_acc']:.4f} on {res['samples']} sequences")
        if fixed_batch is not None:
            _text_panel(engine, fixed_batch, tokenizer, pad_id, t.eval_examples, metrics, step)

    if step == 0 and t.eval_every > 0:
        validate()  # the starting point, so the curve shows where accuracy began

    from tqdm import tqdm
    bar = tqdm(total=t.max_steps, initial=step, disable=rank != 0, desc="pretrain", unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stdout)
    win = Window()
    t_start, start_step, train_time = time.perf_counter(), step, 0.0
    stop_reason: Optional[str] = None
    exit_code = 0
    lr = lr_at(min(step, t.max_steps - 1), peak_lr, warmup, t.max_steps)

    while step < t.max_steps:
        lr = lr_at(step, peak_lr, warmup, t.max_steps)
        set_lr(engine.optimizer, lr)
        loss_finite = True
        step_keys = []
        while True:
            batch = pending if pending is not None else _next_batch(it, loader)
            pending = None
            step_keys.extend(batch.pop("keys"))
            batch.pop("is_padding", None)
            tensors = to_device(batch, device)
            out = engine(**tensors)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            # One device->host transfer per micro-batch (not one per number: each is a sync on a GPU).
            loss, *sums, n_tok, n_pred = torch.stack(
                [out.loss.detach().float(), *(getattr(out, k).float() for k in _SUM_KEYS),
                 tensors["attention_mask"].sum().float(), tensors["masked_lm_weights"].sum().float()]).tolist()
            n_tok = int(n_tok)
            loss_finite &= math.isfinite(loss)
            win.loss_sum += loss
            win.micro_batches += 1
            for k, v in zip(_SUM_KEYS, sums):
                win.sums[k] = win.sums.get(k, 0.0) + v
            n_seq = int(tensors["input_ids"].shape[0])
            win.samples += n_seq
            win.tokens += n_tok
            win.flops += step_flops(fc, n_tok, n_pred, n_seq, int(tensors["input_ids"].shape[1]))
            if boundary:
                break
        step += 1
        win.keys.append(step_keys)

        overflow = bool(getattr(engine.optimizer, "overflow", False)) if prec == "fp16" else False
        loss_scale = _loss_scale(engine) if prec == "fp16" else None
        fatal = guard.update(loss_finite, overflow, loss_scale)
        # One small collective per optimizer step: every rank learns whether any rank was signalled or hit a
        # fatal non-finite, so all of them save (or stop) at the same step and nobody waits in a collective.
        flags = torch.tensor([float(stop.requested), float(fatal is not None)], device=device)
        if tdist.is_initialized():
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        if flags[1] > 0:
            stop_reason = fatal or "a non-finite loss on another rank"
            exit_code = 3
            break
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            elapsed = time.perf_counter() - win.t0
            train_time += elapsed
            rec, s_seen, tok_seen = _log_record(win, step, lr, engine, prec, loader, device, elapsed, peak_tflops,
                                                world, t.log_batch_keys)
            samples_seen += s_seen
            tokens_seen += tok_seen
            rec["samples_seen"], rec["tokens_seen"] = samples_seen, tokens_seen
            metrics.scalars(step, {k: v for k, v in rec.items() if k not in ("step", "keys")}, prefix="train/")
            metrics.record(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            win.reset()
        eval_now = t.eval_every > 0 and step % t.eval_every == 0
        save_now = step % t.save_every == 0
        if eval_now or save_now or flags[0] > 0:
            # Fold the unlogged part of the window into the counters so a checkpoint holds exact totals.
            if win.micro_batches:
                s_seen, tok_seen = (int(x) for x in reduce_sum([win.samples, win.tokens], device))
                samples_seen += s_seen
                tokens_seen += tok_seen
                train_time += time.perf_counter() - win.t0
                win.reset()
            if eval_now:
                validate()
            if save_now or flags[0] > 0:
                save()
            win.t0 = time.perf_counter()  # throughput excludes validation and checkpoint time
        if flags[0] > 0:
            stop_reason = "signal"
            break

    bar.close()
    if stop_reason is None:
        if has_valid and last_eval_step != step:
            validate()
        if checkpoint.tag_for(step) != os.path.basename(last_saved_path or ""):
            save()
    metrics.flush()
    wall = time.perf_counter() - t_start
    done = step - start_step
    if stop_reason == "signal":
        log(rank, f"stop requested (signal {stop.signum or 'on another rank'}): saved {last_saved_path} at step "
                  f"{step}; run the same command to resume")
    elif stop_reason is not None:
        good = last_saved_path or "none (no checkpoint saved yet)"
        msg = (f"error: stopping at step {step}: {stop_reason}. The bad state was NOT saved; last good checkpoint: "
               f"{good}. Lower the peak lr in {args.deepspeed} or check the data, then resume from it.")
        print(msg, file=sys.stderr, flush=True)
    metrics.close()
    best = (f"best validation mlm_loss {best_val['mlm_loss']:.4f} / mlm_acc {best_val['mlm_acc']:.4f} at step "
            f"{best_val['step']}" if best_val else "no validation")
    log(rank, f"done: {done} steps ({step}/{t.max_steps}) in {wall:.0f}s, "
              f"{done * global_batch / max(train_time, 1e-9):.1f} samples/s, {best}; checkpoint "
              f"{last_saved_path}; logs {os.path.join(t.output_dir, 'metrics.jsonl')}; "
              f"tensorboard --logdir {os.path.join(t.output_dir, 'tensorboard')}")
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    return exit_code


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _write_run_files(output_dir: str, cfg: RunConfig, ds_cfg: dict, model_cfg, train_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(run_config.dump_yaml(cfg))
    with open(os.path.join(output_dir, "ds_config.json"), "w", encoding="utf-8") as f:
        json.dump(ds_cfg, f, indent=2)
    with open(os.path.join(output_dir, "model_config.json"), "w", encoding="utf-8") as f:
        json.dump(model_cfg.to_dict(), f, indent=2)
    src = os.path.join(train_dir, "tokenizer")
    if os.path.isdir(src):
        shutil.copytree(src, os.path.join(output_dir, "tokenizer"), dirs_exist_ok=True)


def _check_resume(client: dict, path: str, fingerprint: str, max_seq_len: int, model_cfg, world: int) -> None:
    for key in ("step", "samples_seen", "tokens_seen", "data_state", "rng", "tokenizer_fingerprint"):
        if key not in client:
            raise ConfigError(f"checkpoint {path} lacks client state '{key}': not written by this trainer")
    if client["tokenizer_fingerprint"] != fingerprint:
        raise ConfigError(f"checkpoint {path} was trained with tokenizer fingerprint {client['tokenizer_fingerprint']} "
                          f"but the shards' tokenizer is {fingerprint}")
    if client.get("max_seq_len") != max_seq_len:
        raise ConfigError(f"checkpoint {path} was trained on max_seq_len {client.get('max_seq_len')} shards, these "
                          f"are {max_seq_len}; for phase 2 use train.init_from (weights only) in a new output_dir")
    if client.get("model_config") != model_cfg.to_dict():
        raise ConfigError(f"checkpoint {path}: model config {client.get('model_config')} differs from the run's "
                          f"{model_cfg.to_dict()}")
    if len(client["data_state"]) != world:
        raise ConfigError(f"checkpoint {path} was written by {len(client['data_state'])} ranks, this run has {world}")


def _next_batch(it, loader) -> dict:
    try:
        return next(it)
    except StopIteration:
        raise RuntimeError("training loader ended although it loops over epochs") from None


def _first_batch(loader) -> Optional[dict]:
    for batch in loader:
        return batch
    return None


def _loss_scale(engine) -> Optional[float]:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float, torch.Tensor)):
            return float(v)
    return None


def _text_panel(engine, batch: dict, tokenizer, pad_id: int, limit: int, metrics: MetricsWriter, step: int) -> None:
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        out = engine(**to_device(batch, engine.device))
    engine.train(was_training)
    if tokenizer is None:
        return
    text = format_examples(tokenizer, batch["input_ids"].cpu(), batch["masked_lm_positions"].cpu(),
                           batch["masked_lm_ids"].cpu(), out.mlm_predictions.cpu(), batch["masked_lm_weights"].cpu(),
                           pad_id, limit)
    metrics.text(step, "validation/examples", text)


def _log_record(win: Window, step: int, lr: float, engine, prec: str, loader, device, elapsed: float,
                peak_tflops: float, world: int, log_keys: bool) -> tuple[dict, int, int]:
    stats = loader_stats(loader)
    stat_keys = sorted(stats)
    vals = ([win.loss_sum, win.micro_batches, win.samples, win.tokens, win.flops]
            + [win.sums.get(k, 0.0) for k in _SUM_KEYS] + [float(stats[k]) for k in stat_keys])
    red = reduce_sum(vals, device)
    loss_sum, micro_batches, samples, tokens, flops = red[:5]
    s = dict(zip(_SUM_KEYS, red[5:5 + len(_SUM_KEYS)]))
    data_stats = dict(zip(stat_keys, red[5 + len(_SUM_KEYS):]))
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    tflops = flops / max(elapsed, 1e-9) / 1e12
    rec = {
        "step": step,
        "loss": loss_sum / max(micro_batches, 1),
        "mlm_loss": s["mlm_loss_sum"] / max(s["mlm_count"], 1.0),
        "nsp_loss": s["nsp_loss_sum"] / max(s["nsp_count"], 1.0),
        "mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1.0),
        "nsp_acc": s["nsp_correct"] / max(s["nsp_count"], 1.0),
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_s": samples / max(elapsed, 1e-9),
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "tflops": tflops,
        "mfu": tflops / (peak_tflops * world),
        "skipped_steps": int(engine.skipped_steps),
    }
    if prec == "fp16":
        rec["loss_scale"] = _loss_scale(engine)
    for k, v in data_stats.items():
        rec[f"data/{k}"] = v
    if log_keys:
        rec["keys"] = checkpoint.gather(win.keys[-1] if win.keys else [])
    return rec, int(samples), int(tokens)


def main(argv: Optional[list[str]] = None) -> int:
    from data.errors import DataError
    from trainer.loader import DataCorruptionError

    try:
        return run(argv)
    except (ConfigError, DataError, DataCorruptionError, dist.DistError) as e:
        rank = os.environ.get("RANK", "0")
        prefix = "" if os.environ.get("WORLD_SIZE", "1") == "1" else f"[rank {rank}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
