"""The start of every training command, pretraining (trainer.pretrain) and fine-tuning (trainer.finetune): one
sequence, so both stop on a signal, save and resume the same way.

1. ``begin``: the stop signals are read from the first moment (a SIGTERM during the slow start-up stops the run
   at its first step boundary), the run YAML and the DeepSpeed JSON with their overrides, the device, the world
   size. Nothing expensive has started: the caller refuses a bad start here.
2. ``configure_device`` once the process group is up: the GPU of this rank, or the CPU host's workarounds.
3. ``open_engine``: the DeepSpeed engine, built to read the checkpoint it resumes (DeepSpeed's universal layout
   when the rank count changed), and that checkpoint loaded into it (``trainer.checkpoint.Checkpointer``).
4. ``resume_trainer``: the Trainer's registered components (step, data position, RNG streams, ...) continue from
   the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from trainer import checkpoint, config as run_config, dist, engine as eng, precision
from trainer.errors import ConfigError
from trainer.guards import StopFlag


@dataclass
class Start:
    """What a command knows before the process group exists."""

    stop: StopFlag
    cfg: object  # the command's config dataclass (trainer.config)
    ds_raw: dict  # the DeepSpeed JSON with its ds. overrides, not yet resolved for the device
    device_kind: str  # "cuda", "cpu", ...
    facts: precision.DeviceFacts
    world: int

    def resolve(self, ds: dict, ds_path: str) -> eng.Resolved:
        """``ds`` resolved for this device and world size (or refused naming the key)."""
        return eng.resolve(ds, ds_path, self.facts, self.world)


def begin(ds_path: str, config_path: Optional[str], overrides: list[str], cls) -> Start:
    """Stop flag, configs (``cls`` from trainer.config; ``ds.``-prefixed overrides edit the JSON), device, world."""
    stop = StopFlag()
    stop.install()  # from the first moment: a SIGTERM during start-up stops at the first step boundary
    cfg = run_config.load(config_path, [o for o in overrides if not o.startswith("ds.")], cls)
    ds_overrides = run_config.parse_overrides([o for o in overrides if o.startswith("ds.")])
    ds_raw = eng.apply_ds_overrides(eng.load_ds_config(ds_path), ds_path, ds_overrides)
    from deepspeed.accelerator import get_accelerator

    device_kind = get_accelerator().device_name()
    world = int(dist.setup_env()["WORLD_SIZE"])
    return Start(stop, cfg, ds_raw, device_kind, precision.device_facts(device_kind), world)


def configure_device(device_kind: str, local_rank: int, log: Callable[[str], None]) -> None:
    """This rank's GPU, or on a CPU host its workarounds (trainer/cpu.py and cpu_start, never imported on CUDA)."""
    from deepspeed.accelerator import get_accelerator

    if device_kind == "cuda":
        get_accelerator().set_device(local_rank)
    elif device_kind == "cpu":
        from trainer import cpu, cpu_start

        log(cpu_start.configure_allocator())
        log(cpu.workarounds())


def open_engine(model, ds: dict, checkpointer: checkpoint.Checkpointer, resume_from):
    """(engine, resume plan or None, this rank's client state or None): the engine around ``model`` with the
    resolved JSON ``ds`` and, when ``resume_from`` (checkpoint.resolve_resume) names a checkpoint, that
    checkpoint loaded into it. Collective."""
    resume = checkpointer.plan(resume_from) if resume_from is not None else None
    if resume is not None and resume.universal:  # DeepSpeed reads the universal layout only when told to
        ds = {**ds, "checkpoint": {**(ds.get("checkpoint") or {}), "load_universal": True}}
    engine = eng.build_engine(model, ds)
    state = checkpointer.load(engine, resume) if resume is not None else None
    return engine, resume, state


def resume_trainer(trainer, state: dict, resume: checkpoint.Resume, world: int, log: Callable[[str], None]) -> None:
    """``trainer`` continues from ``state`` (Checkpointer.load's view: every registered component takes its part),
    and says so."""
    try:
        note = trainer.restore(state)
    except ValueError as e:
        raise ConfigError(f"resume from {state['path']}: {e}") from None
    log(f"resumed from {state['path']} at step {trainer.step} ({trainer.samples_seen} samples, "
        f"{trainer.tokens_seen} tokens seen)")
    if resume.universal:
        log(f"the checkpoint was written by {resume.saved_world} rank(s), this run has {world}: weights, "
            f"optimizer and loss scale through {resume.path}; the data continues at the same global "
            f"sample; dropout streams of ranks >= {resume.saved_world} start fresh" + (f"; {note}" if note else ""))
