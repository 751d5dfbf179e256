"""Pretraining: build every component from the DeepSpeed JSON and the run YAML, then hand them to the Trainer.

Sources of values: batch sizes, optimizer (and its peak lr), gradient clipping and precision come from the
DeepSpeed JSON (resolved for this device and world size by trainer.engine) and are read back from the
engine; everything else comes from the run YAML (trainer.config). What can be checked cheaply is checked
before anything expensive starts: configs, shards against the model, the batch arithmetic. The start-up
sequence (stop flag, configs, device, engine, resume) is trainer.startup's, shared with fine-tuning.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Optional

from data import shards as shard_io
from trainer import checkpoint, checkpoint_read, config as run_config, dist, engine as eng, rng, run_folder, startup
from trainer.config import RunConfig
from trainer.errors import ConfigError
from trainer.guards import StopFlag
from trainer.lock import RunLock


def log(rank: int, msg: str) -> None:
    """Rank 0 prints; through tqdm.write so a line never lands inside the progress bar's line."""
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"[pretrain] {msg}", file=sys.stdout)
        sys.stdout.flush()


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
    if model_cfg.type_vocab_size < 2:  # samples have segments 0 and 1 (data.shards.check_sample)
        raise ConfigError(f"{where}: samples have token types 0 and 1 but the model's type_vocab_size is "
                          f"{model_cfg.type_vocab_size}")
    seq = (manifest.get("settings") or {}).get("max_seq_len")
    if not isinstance(seq, int) or seq > model_cfg.max_position_embeddings:
        raise ConfigError(f"{where}: shards' max_seq_len is {seq} but the model's max_position_embeddings is "
                          f"{model_cfg.max_position_embeddings}")


def check_same_tokenizer(a: dict, a_where: str, b: dict, b_where: str) -> None:
    fa, fb = (a.get("tokenizer") or {}).get("fingerprint"), (b.get("tokenizer") or {}).get("fingerprint")
    if fa != fb:
        raise ConfigError(f"tokenizer mismatch: {a_where} has fingerprint {fa}, {b_where} has {fb}")


def check_shards_tokenizer(manifest: dict, shard_dir: str) -> None:
    """The shards' tokenizer/ is the one their manifest names (it is copied into the run folder and decodes
    the validation examples): a replaced folder is refused naming both fingerprints."""
    from data.tokenizer import load_tokenizer

    want = (manifest.get("tokenizer") or {}).get("fingerprint")
    got = load_tokenizer(os.path.join(shard_dir, "tokenizer")).fingerprint
    if got != want:
        raise ConfigError(f"data.train={shard_dir}: tokenizer/ has fingerprint {got} but the shards' manifest.json "
                          f"names {want}: the shards were built with another tokenizer; restore the one they "
                          f"were built with (or rebuild the shards)")


def _init_weights(model, init_from: Optional[str], fingerprint: str, rank: int) -> None:
    """train.init_from: weights only (phase 2 from phase 1), from the same tokenizer."""
    client = checkpoint_read.load_weights(model, init_from)
    if client.get("tokenizer_fingerprint") != fingerprint:
        raise ConfigError(f"train.init_from={init_from}: checkpoint tokenizer fingerprint "
                          f"{client.get('tokenizer_fingerprint')} but the shards' is {fingerprint}")
    log(rank, f"initialised weights from {init_from} (step {client.get('step')}); optimizer, schedule and data "
              f"position start fresh")


@dataclass
class _Data:
    """The shard folders of a run, read and checked against the model before anything expensive starts."""

    train_dir: str
    valid_dir: str
    train: dict  # manifests
    valid: dict
    model_cfg: object  # bert.BertConfig

    @property
    def fingerprint(self) -> str:
        return self.train["tokenizer"]["fingerprint"]


def _read_data(cfg: RunConfig, config_path: str) -> _Data:
    d = cfg.data
    valid_dir = d.valid or d.train
    train = shard_io.read_manifest(d.train)
    valid = shard_io.read_manifest(valid_dir) if valid_dir != d.train else train
    try:
        model_cfg = cfg.bert_config(vocab_size=train["tokenizer"]["vocab_size"])
    except ValueError as e:
        raise ConfigError(f"{config_path}: model: {e}") from None
    check_shards(train, f"data.train={d.train}", model_cfg, shard_io.FORMAT_VERSION)
    check_shards_tokenizer(train, d.train)
    if valid_dir != d.train:
        check_shards(valid, f"data.valid={valid_dir}", model_cfg, shard_io.FORMAT_VERSION)
        check_same_tokenizer(train, f"data.train={d.train}", valid, f"data.valid={valid_dir}")
    return _Data(d.train, valid_dir, train, valid, model_cfg)


def _build_model(cfg: RunConfig, data: _Data, resuming: bool, rank: int):
    """BERT with the same initial weights on every rank (DeepSpeed also broadcasts rank 0's), then per-rank
    RNG streams for dropout so ranks do not drop the same units."""
    from bert import BertForPreTraining

    t = cfg.train
    rng.seed_all(t.seed)
    model = BertForPreTraining(data.model_cfg)
    if t.init_from and resuming:
        log(rank, f"train.init_from={t.init_from} ignored: resuming this run's own checkpoint instead")
    elif t.init_from:
        _init_weights(model, t.init_from, data.fingerprint, rank)
    rng.seed_all(t.seed + 1000 * rank)
    return model


def _loader_kw(cfg: RunConfig, rank: int, world: int) -> dict:
    """What the training and the validation loader share: the rank's place, the seed, the workers."""
    return dict(rank=rank, world_size=world, seed=cfg.train.seed, num_workers=cfg.data.num_workers)


def _build_loader(cfg: RunConfig, data: _Data, resolved, rank: int, world: int):
    from data.loader import PretrainLoader

    d = cfg.data
    try:
        return PretrainLoader(d.train, "train", resolved.batch.micro, shuffle=True, loop=True,
                              dynamic_masking=d.dynamic_masking, global_batch=resolved.batch.global_batch,
                              **_loader_kw(cfg, rank, world))
    except ValueError as e:
        raise ConfigError(f"data.train: {e}") from None


def _build_validator(cfg: RunConfig, data: _Data, engine, metrics, micro: int, rank: int, world: int):
    """Validation over the valid split and the text panel of its first batch (None, None when it is empty); its
    loader is made per pass."""
    from data.loader import PretrainLoader
    from trainer.callbacks import TextPanel
    from trainer.evaluation import Validator

    t = cfg.train
    if not data.valid["splits"]["valid"]["samples"]:
        log(rank, f"{data.valid_dir} has no valid split samples: validation is off for this run")
        return None, None

    def valid_loader():
        try:
            return PretrainLoader(data.valid_dir, "valid", micro, shuffle=False, loop=False,
                                  **_loader_kw(cfg, rank, world))
        except ValueError as e:
            raise ConfigError(f"validation data {data.valid_dir}: {e}") from None

    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(data.train_dir, "tokenizer")) if rank == 0 else None
    panel = TextPanel(next(iter(valid_loader()), None), tokenizer, pad_id=data.train["tokenizer"]["pad_id"],
                      n_examples=t.eval_examples)
    return Validator(engine, valid_loader, metrics, max_batches=t.eval_batches, log=lambda m: log(rank, m)), panel


def _peak_tflops(t, engine, resolved, rank: int) -> float:
    from trainer.metrics import measure_peak_tflops

    if t.peak_tflops is not None:
        return t.peak_tflops
    peak = measure_peak_tflops(engine.device, eng.torch_dtype(resolved.precision))
    log(rank, f"measured matmul peak {peak:.3f} TFLOPS per rank ({resolved.precision}) for MFU; set "
              f"train.peak_tflops to use the device's datasheet value")
    return peak


def _claim(t, meta: dict, resume_from, rank: int) -> Optional[RunLock]:
    """Rank 0 locks the run folder and checks this start against it (trainer.run_folder.claim) before anything
    is written; every rank learns the verdict, so no rank goes on to write when rank 0 refused."""
    lock, failure = None, None
    if rank == 0:
        new = run_folder.fixed_settings(meta["model_config"], meta["ds_config"], meta["tokenizer_fingerprint"],
                                        meta["max_seq_len"], meta["format_version"])
        try:
            lock = run_folder.claim(t.output_dir, t.resume, resume_from, new, log=lambda m: log(rank, m))
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            failure = e
    refused = dist.all_gather_object(None if failure is None else type(failure).__name__)[0]
    if refused is not None:  # every rank is here and knows: leave the group together, so none aborts at exit
        dist.shutdown()
    if failure is not None:
        raise failure
    if refused is not None:
        raise ConfigError(f"not started: rank 0 refused the run folder {t.output_dir} ({refused}; its message "
                          f"names the reason)")
    return lock


def _prepare_folder(cfg: RunConfig, ds: dict, data: _Data, aside: str, fresh: bool) -> None:
    """Rank 0, once every check has passed: a fresh start first moves an earlier run's files aside (only
    train.resume=none gets here with earlier work: run_folder.check), then the run files are written."""
    t = cfg.train
    if fresh:
        moved = run_folder.set_aside(t.output_dir, aside)
        if moved:
            log(0, f"train.resume={t.resume}: a fresh start; the earlier run's {', '.join(moved)} moved to {aside} "
                   f"(nothing deleted)")
    run_folder.write_run_files(t.output_dir, run_config.dump_yaml(cfg), ds, data.model_cfg.to_dict(),
                               os.path.join(data.train_dir, "tokenizer"))


def run(ds_path: str, config_path: str, overrides: list[str]) -> int:
    """Pretrain as configured; returns the exit status (0 done or stopped on a signal with a checkpoint).

    Every check that can refuse the start runs before the run folder is touched: configs, shards, batch
    arithmetic, then (rank 0, holding the folder's lock) the folder and the checkpoint to resume."""
    start = startup.begin(ds_path, config_path, overrides, RunConfig)
    cfg = start.cfg
    t = cfg.train
    data = _read_data(cfg, config_path)  # shards, model and batch arithmetic agree before anything expensive
    resolved = start.resolve(start.ds_raw, ds_path)
    resume_from = checkpoint.resolve_resume(t.resume, os.path.join(t.output_dir, "checkpoints"))
    meta = {"run_config": cfg.to_dict(), "model_config": data.model_cfg.to_dict(), "ds_config": resolved.ds,
            "tokenizer_fingerprint": data.fingerprint, "max_seq_len": data.train["settings"]["max_seq_len"],
            "format_version": data.train["format_version"]}

    rank, local_rank, world = dist.init(t.collective_timeout)
    lock = _claim(t, meta, resume_from, rank)
    try:
        code = _train(cfg, ds_path, data, resolved, resume_from, meta, start.stop, start.device_kind,
                      (rank, local_rank, world))
        if code == 0:
            dist.shutdown()  # every rank is here: leave the process group together
        return code
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, ds_path: str, data: _Data, resolved, resume_from, meta: dict, stop: StopFlag,
           device_kind: str, place: tuple[int, int, int]) -> int:
    from data.health import DataHealth, shard_budget
    from trainer.metrics import MetricsWriter, flop_counts
    from trainer import callbacks
    from trainer.rollback import Rollback
    from trainer.trainer import RunInfo, Trainer

    t, d = cfg.train, cfg.data
    rank, local_rank, world = place
    ckpt_dir = os.path.join(t.output_dir, "checkpoints")
    say = functools.partial(log, rank)
    say(eng.precision_note(resolved))
    startup.configure_device(device_kind, local_rank, say)
    if d.num_workers > 0:  # the workers' fork server imports torch (~2.5 s): started now, while the engine builds
        from data.workers import worker_context

        worker_context()
    model = _build_model(cfg, data, resume_from is not None, rank)
    flops = flop_counts(model)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    checkpointer = checkpoint.Checkpointer(ckpt_dir, t.keep_checkpoints, meta, log=say, every=t.save_every)
    engine, resume, state = startup.open_engine(model, resolved.ds, checkpointer, resume_from)
    warmup = run_config.warmup_steps(t)
    peak_lr = float(resolved.ds["optimizer"]["params"]["lr"])  # the JSON's (a resume set the engine's lr since)
    log(rank, f"model {cfg.model.get('preset')} ({n_params / 1e6:.1f}M params), "
              f"{resolved.precision}, ZeRO-{engine.zero_optimization_stage()}, "
              f"{type(eng.base_optimizer(engine)).__name__}, {resolved.batch}, peak lr "
              f"{peak_lr:g}, warmup {warmup} of {t.max_steps} steps")
    log(rank, "resolved run config:\n" + run_config.dump_yaml(cfg).rstrip())

    loader = _build_loader(cfg, data, resolved, rank, world)
    aside = run_folder.earlier_dir(t.output_dir)
    if rank == 0:
        _prepare_folder(cfg, resolved.ds, data, aside, fresh=state is None)
    metrics = MetricsWriter(t.output_dir, enabled=rank == 0, resume_step=state["step"] if state else None,
                            aside=aside)
    validate, panel = _build_validator(cfg, data, engine, metrics, resolved.batch.micro, rank, world)
    fp16 = resolved.ds.get("fp16") or {}
    info = RunInfo(rank=rank, world=world, precision=resolved.precision, global_batch=resolved.batch.global_batch,
                   peak_lr=peak_lr, warmup=warmup, peak_tflops=_peak_tflops(t, engine, resolved, rank), flops=flops,
                   ds_path=ds_path, min_loss_scale=float(fp16.get("min_loss_scale", 1)),
                   initial_loss_scale=2.0 ** fp16.get("initial_scale_power", 16))
    health = DataHealth(d.max_bad_samples, d.max_bad_fraction,
                        shard_budget(len(data.train["splits"]["train"]["shards"]), d.max_bad_shards))
    trainer = Trainer(engine, loader, t, info, metrics=metrics, checkpointer=checkpointer, health=health,
                      validate=validate, stop=stop, log=say,
                      callbacks=callbacks.standard() + ([panel] if panel is not None else []),
                      rollback=Rollback(cfg.rollback, initial_loss_scale=info.initial_loss_scale))
    if state is not None:
        startup.resume_trainer(trainer, state, resume, world, say)
    elif t.resume == "auto":
        log(rank, f"no checkpoint in {ckpt_dir}: starting from step 0")
    return trainer.train()
