"""Saving and resuming a training run's checkpoints (the write side; trainer.checkpoint_files names and
judges the folders, trainer.checkpoint_read loads a trained model offline).

A checkpoint is complete or invisible: every rank writes into a hidden temporary folder and fsyncs its own
files; after a barrier rank 0 writes the completion marker, renames the folder to step_N and only then
replaces ``latest``. A run resumes from the tag checkpoint_files.pick_tag chooses; one written by another
number of ranks is converted once to DeepSpeed's universal checkpoint beside it.

State registers itself (torchtitan's shape): each stateful component of a run (the trainer's counters, the
loader's position, the RNG streams, the data's health, the non-finite guard, the schedule, the rollback
history, the audit) is handed to ``Checkpointer.register`` under a name, with ``state_dict()`` /
``load_state_dict()``; a save gathers them, a resume or a rollback hands each its part back. The checkpointer
also owns the save interval (``due``). DeepSpeed writes the client state from rank 0 only, so a component that
differs per rank (``per_rank``: the loader position, the RNG states) is gathered first and stored as a list
indexed by rank. Client-state schema, ``state_version`` 2::

    {"state_version": 2, "step": int, "world_size": int,
     "state": {name: state_dict(), or [state_dict() of rank 0, rank 1, ...] for the names in "per_rank"},
     "per_rank": [name, ...],
     "run_config": dict, "model_config": dict, "ds_config": dict,
     "tokenizer_fingerprint": str, "max_seq_len": int, "format_version": int}

Version 1 (no ``state_version``) had the parts at the top level (``samples_seen``, ``tokens_seen``,
``data_state``, ``rng``, ``data_health``); ``migrate`` reads it as version 2, so those checkpoints still resume.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

from common import files
from common.errors import UserError
from trainer import dist
from trainer.checkpoint_files import (MARKER, ZERO_FILE_RE, check_folder_trusted, holds_checkpoints, list_tags,
                                      locate, pick_tag, read_client_state, step_of, tag_for)
from trainer.errors import CheckpointError, ConfigError

# files.atomic_dir's temporary folder of a save (".step_N.<random>.tmp", and ".old" while one replaces a tag)
_SAVE_LEFTOVER_RE = re.compile(r"^\.step_(\d{7,})\..*\.tmp(?:\.old)?$")


@dataclass(frozen=True)
class Resume:
    """Where a resume loads from: a tag of load_dir, the universal conversion of it when the rank count
    changed (the engine must then be built with ``checkpoint.load_universal``)."""

    load_dir: str
    tag: str
    saved_world: int
    universal: bool = False

    @property
    def path(self) -> str:
        return os.path.join(self.load_dir, self.tag)


STATE_VERSION = 2
_V1_PARTS = ("samples_seen", "tokens_seen", "data_state", "rng", "data_health")


def migrate(client: dict) -> dict:
    """A client state of any version this code knows, as version 2 (the module docstring's schema)."""
    version = client.get("state_version", 1)
    if version == STATE_VERSION:
        return client
    if version != 1:
        raise ConfigError(f"checkpoint client state version {version!r}: this code reads versions 1 and "
                          f"{STATE_VERSION}; resume it with the code that wrote it")
    for key in ("step", "samples_seen", "tokens_seen", "data_state", "rng"):
        if key not in client:
            raise ConfigError(f"checkpoint lacks client state '{key}': not written by this trainer")
    state = {"trainer": {k: client[k] for k in ("step", "samples_seen", "tokens_seen")},
             "loader": client["data_state"], "rng": client["rng"]}
    if client.get("data_health"):  # absent from the oldest ones
        state["data_health"] = client["data_health"]
    rest = {k: v for k, v in client.items() if k not in _V1_PARTS}
    return {**rest, "state_version": STATE_VERSION, "state": state, "per_rank": ["loader", "rng"]}


class Checkpointer:
    """Saves and resumes a training run's checkpoints in ``ckpt_dir``, keeping the newest ``keep``, every
    ``every`` steps (``due``; 0: only when the trainer asks, at a stop or the end).

    ``meta`` is the run's fixed description stored with every checkpoint (run/model/ds config, tokenizer
    fingerprint, max_seq_len, format_version); ``save`` adds the registered components' states, the per-rank
    ones gathered. A checkpoint of N ranks resumes on M ranks through DeepSpeed's universal checkpoint
    (``plan``), and the loader continues from the same global sample."""

    def __init__(self, ckpt_dir: str, keep: int, meta: dict, log=print, every: int = 0):
        self.dir, self.keep, self.meta, self.log, self.every = ckpt_dir, keep, meta, log, every
        self.last_saved: Optional[str] = None
        self._loaded: Optional[Resume] = None  # what the last load read (a rollback to it reads it again)
        self._parts: dict[str, tuple[object, bool]] = {}

    def register(self, name: str, component, per_rank: bool = False) -> None:
        """Save ``component.state_dict()`` under ``name`` with every checkpoint and hand it back to
        ``component.load_state_dict`` on a restore (``per_rank``: one per rank; a rank the saving run did not
        have gets None)."""
        if name in self._parts:
            raise ValueError(f"a component is already registered as {name!r}")
        self._parts[name] = (component, per_rank)

    def due(self, step: int) -> bool:
        """Whether the save interval ends at ``step``."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def restore(self, view: dict, keep: tuple[str, ...] = ()) -> None:
        """Hand each registered component its part of ``view`` (``load``'s answer), but those named in ``keep``
        (a rollback keeps its own history); a component the checkpoint has no part for stays as it is."""
        for name, (component, _) in self._parts.items():
            if name not in keep and name in view["state"]:
                component.load_state_dict(view["state"][name])

    def save(self, engine, step: int) -> str:
        """Collective: every rank calls it at the same ``step``, with its own registered components. The
        checkpoint is written into a hidden temporary folder (files.atomic_dir on rank 0, its name shared), each
        rank fsyncs its own files, and after a barrier rank 0 writes the completion marker, renames the folder
        to the tag and replaces ``latest``. A rank failing or killed on the way leaves the previous checkpoint
        and ``latest`` as they were."""
        rank, world = dist.rank_world()
        tag = tag_for(step)
        client = self._client_state(step, world)
        target = os.path.join(self.dir, tag)
        if rank == 0:
            os.makedirs(self.dir, exist_ok=True)
        with (files.atomic_dir(target, replace=True) if rank == 0 else contextlib.nullcontext()) as mine:
            tmp = dist.all_gather_object(mine)[0]  # rank 0's temporary folder, for every rank to write into
            try:
                engine.save_checkpoint(self.dir, tag=os.path.basename(tmp), client_state=client, save_latest=False)
                _fsync_own_files(tmp, rank)
            except OSError as e:  # a full disk or quota, a failing file system
                raise CheckpointError(f"rank {rank}: saving checkpoint {tag} (step {step}) failed: {e}; the "
                                      f"last complete checkpoint, {self.last_saved or 'none'}, is untouched") from None
            dist.barrier()  # every rank's files are written and on disk
            if rank == 0:
                files.write_json(os.path.join(tmp, MARKER), {"tag": tag, "step": step, "world_size": world,
                                                            "files": _listing(tmp, MARKER)})
        if rank == 0:
            files.write_text(os.path.join(self.dir, "latest"), tag)
            self._retain(tag)
        dist.barrier()
        self.last_saved = target
        return self.last_saved

    def _client_state(self, step: int, world: int) -> dict:
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        state = {name: dist.all_gather_object(c.state_dict()) if per_rank else c.state_dict()
                 for name, (c, per_rank) in self._parts.items()}
        per_rank = [name for name, (_, p) in self._parts.items() if p]
        return {"state_version": STATE_VERSION, "step": step, "world_size": world, "state": state,
                "per_rank": per_rank, **self.meta,
                # what ds_to_universal needs to convert it for another rank count (ZeRO <= 2)
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}

    def _retain(self, tag: str) -> None:
        """Keep ``tag`` and the newest keep-1 tags older than it; tags newer than it (an earlier run's, when this
        one resumed from an older tag) are never deleted. Leftovers of saves cut short before it go too."""
        step = step_of(tag)
        older = [t for t in list_tags(self.dir) if step_of(t) < step]
        for old in older[:max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)
            shutil.rmtree(os.path.join(self.dir, old + UNIVERSAL), ignore_errors=True)
        for name in os.listdir(self.dir):
            m = _SAVE_LEFTOVER_RE.match(name)
            if m and int(m.group(1)) < step:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def plan(self, resume: tuple[str, Optional[str]]) -> Resume:
        """Before the engine exists (collective): rank 0 picks the tag (pick_tag: the complete one ``latest``
        names, else the newest complete one), scans its files, and converts it to a universal checkpoint beside
        it when it was written by another number of ranks; every rank gets the same answer or the same refusal."""
        load_dir, tag = resume
        _, world = dist.rank_world()

        def decide(heartbeat) -> Resume:
            chosen = pick_tag(load_dir, tag, self.log)
            check_folder_trusted(os.path.join(load_dir, chosen))
            client = read_client_state(load_dir, chosen)
            saved = int(client.get("world_size") or len(client.get("data_state") or [None]))
            if saved == world:
                return Resume(load_dir, chosen, saved)
            universal = convert_to_universal(os.path.join(load_dir, chosen), self.log, heartbeat=heartbeat)
            check_folder_trusted(universal)
            return Resume(load_dir, chosen + UNIVERSAL, saved, universal=True)

        return on_rank0(decide, f"resume from {tag or load_dir}: choosing, scanning and converting the checkpoint")

    def load(self, engine, resume: Resume) -> dict:
        """Load weights, optimizer and loss-scale state into ``engine`` (collective); returns this rank's view of
        the client state, {"step", "path", "state": {name: part}} (a per-rank part: this rank's, or None for a
        rank the saving run did not have; the loader position is global, so any rank's), after checking it fits
        this run. ``restore`` hands the parts to the registered components."""
        from trainer.engine import load_checkpoint

        path, client = load_checkpoint(engine, resume.load_dir, resume.tag, resume.universal)
        if path is None:
            raise ConfigError(f"could not load a checkpoint from {resume.path}")
        client = migrate(client)
        self.check(client, resume.path)
        if engine.device.type == "cpu":
            from trainer import cpu
            from trainer.engine import base_optimizer

            cpu.replay_adam_bias_correction(base_optimizer(engine))  # else the first resumed update differs by ~1 ulp
        rank, _ = dist.rank_world()
        self.last_saved = os.path.join(resume.load_dir, resume.tag.removesuffix(UNIVERSAL))
        self._loaded = resume
        state = dict(client["state"])
        for name in client["per_rank"]:
            parts = state[name]
            state[name] = parts[min(rank, len(parts) - 1)] if name == "loader" else (
                parts[rank] if rank < len(parts) else None)
        return {"step": client["step"], "state": state, "path": self.last_saved}

    def last_good(self) -> Optional[Resume]:
        """The newest checkpoint of this run to roll back to, as ``load`` reads it (a resumed one as it was
        resumed: its universal conversion when the rank count changed); None before the first."""
        if self.last_saved is None:
            return None
        if self._loaded is not None and self._loaded.path.removesuffix(UNIVERSAL) == self.last_saved:
            return self._loaded
        _, world = dist.rank_world()
        return Resume(os.path.dirname(self.last_saved), os.path.basename(self.last_saved), world)

    def check(self, client: dict, path: str) -> None:
        """Refuse a checkpoint (client state of version 2: ``migrate``) this run cannot continue, showing both
        sides."""
        for key in ("step", "state", "tokenizer_fingerprint"):
            if key not in client:
                raise ConfigError(f"checkpoint {path} lacks client state '{key}': not written by this trainer")
        m = self.meta
        if client["tokenizer_fingerprint"] != m["tokenizer_fingerprint"]:
            raise ConfigError(f"checkpoint {path} was trained with tokenizer fingerprint "
                              f"{client['tokenizer_fingerprint']} but the shards' tokenizer is "
                              f"{m['tokenizer_fingerprint']}")
        if client.get("max_seq_len") != m["max_seq_len"]:
            raise ConfigError(f"checkpoint {path} was trained on max_seq_len {client.get('max_seq_len')} shards, "
                              f"these are {m['max_seq_len']}; for phase 2 use train.init_from (weights only) in a "
                              f"new output_dir")
        if client.get("model_config") != m["model_config"]:
            raise ConfigError(f"checkpoint {path}: model config {client.get('model_config')} differs from the "
                              f"run's {m['model_config']}")
        positions = {(d.get("epoch"), d.get("sample_in_epoch")) for d in client["state"].get("loader") or ()}
        if len(positions) > 1:  # (a run without a loader, e.g. a probe of the engine alone, has none)
            raise ConfigError(f"checkpoint {path}: its ranks' data positions disagree ({sorted(positions)})")


# ---------------------------------------------------------------------------------------------------
# Universal checkpoints (another rank count)

UNIVERSAL = "_universal"  # step_N -> step_N_universal, beside it
_UNIVERSAL_MANIFEST = "universal_manifest.json"


def _listing(folder: str, manifest: str) -> dict[str, int]:
    """{relative path: size} of every file below ``folder`` but the manifest that lists them."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != manifest:
                out[rel] = os.path.getsize(full)
    return out


def _fsync_own_files(folder: str, rank: int) -> None:
    """fsync the files of ``folder`` this rank wrote: DeepSpeed names a data-parallel rank's files
    ``*zero_pp_rank_<rank>_*``; the rest (model states, the folder itself) are rank 0's. Each rank syncs its
    own because on a shared file system only the writer's client can flush them."""
    owned = [folder] if rank == 0 else []
    for root, _, names in os.walk(folder):
        for name in names:
            m = ZERO_FILE_RE.search(name)
            if (int(m.group(1)) if m else 0) == rank:
                owned.append(os.path.join(root, name))
    for path in owned:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def on_rank0(job, what: str, poll_s: float = 5.0):
    """Run ``job(heartbeat)`` on rank 0 only (collective): every rank returns its result or raises its
    refusal. While the job works it calls ``heartbeat()`` every few seconds, one small all_gather that tells
    the waiting ranks it is alive, so each of their waits is bounded by train.collective_timeout however long
    the job may legitimately take (the job bounds itself); a rank 0 that died or hung is reported naming the
    waiting rank and ``what``."""
    rank, _ = dist.rank_world()

    def exchange(msg):
        try:
            return dist.all_gather_object(msg)[0]
        except Exception as e:  # noqa: BLE001 - a failed collective is reported, anything else re-raised
            if not dist.is_collective_failure(e):
                raise
            first = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointError(f"rank {rank}: no word from rank 0 during {what} ({type(e).__name__}: "
                                  f"{first}): rank 0 stopped (see its message) or train.collective_timeout "
                                  f"passed") from None

    if rank == 0:
        try:
            msg = ("done", job(lambda: exchange(("running", None))))
        except UserError as e:
            msg = ("error", str(e))
        exchange(msg)
    else:
        msg = exchange(None)
        while msg[0] == "running":
            msg = exchange(None)
    if msg[0] == "error":
        raise CheckpointError(msg[1])
    return msg[1]


def universal_complete(folder: str) -> bool:
    """Whether ``folder`` is a finished conversion whose files are all there at their sizes."""
    try:
        with open(os.path.join(folder, _UNIVERSAL_MANIFEST), encoding="utf-8") as f:
            return json.load(f)["files"] == _listing(folder, _UNIVERSAL_MANIFEST)
    except (OSError, ValueError, KeyError):
        return False


UNIVERSAL_TIMEOUT_S = 3600.0  # ds_to_universal of BERT-large on one CPU core takes minutes; an hour means stuck


def convert_to_universal(src: str, log=print, timeout_s: float = UNIVERSAL_TIMEOUT_S, heartbeat=None,
                         poll_s: float = 5.0) -> str:
    """DeepSpeed's ds_to_universal of checkpoint folder ``src`` into ``src`` + "_universal", once: written to a
    temporary folder (files.atomic_dir), listed in a manifest, then renamed into place, so a half-written
    conversion is never used; one that is incomplete or whose files changed is redone. ``src`` is scanned
    first (the converter unpickles with weights_only=False). ``heartbeat`` is called every ``poll_s`` while the
    converter runs (on_rank0's keep-alive); past ``timeout_s`` it is killed. Returns the universal folder."""
    import time

    target = src.rstrip("/") + UNIVERSAL
    if universal_complete(target):
        log(f"universal checkpoint {target} already converted: reused")
        return target
    check_folder_trusted(src)
    parent, base = os.path.split(target)
    for old in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.*.tmp*")):
        shutil.rmtree(old, ignore_errors=True)  # a conversion cut short by a crash
    t0 = time.time()
    with files.atomic_dir(target, replace=True) as tmp:
        _run_converter(src, tmp, timeout_s, heartbeat or (lambda: None), poll_s)
        files.write_json(os.path.join(tmp, _UNIVERSAL_MANIFEST),
                         {"source": os.path.abspath(src), "files": _listing(tmp, _UNIVERSAL_MANIFEST)}, indent=1)
    log(f"converted {src} to a universal checkpoint {target} in {time.time() - t0:.0f}s (DeepSpeed's "
        f"ds_to_universal; once, beside the original)")
    return target


def _run_converter(src: str, out: str, timeout_s: float, heartbeat, poll_s: float) -> None:
    import subprocess
    import time

    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src, "--output_folder", out,
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    where = f"rank 0, resume from {os.path.basename(src.rstrip('/'))}, phase universal conversion"
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        while True:
            try:
                output, _ = p.communicate(timeout=max(0.0, min(poll_s, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    p.kill()
                    p.communicate()
                    raise CheckpointError(f"converting {src} to a universal checkpoint took over {timeout_s:.0f}s "
                                          f"({where}); killed it") from None
                heartbeat()
    if p.returncode != 0:
        raise CheckpointError(f"converting {src} to a universal checkpoint failed (exit {p.returncode}, {where}): "
                              f"{(output or '').strip().splitlines()[-1:]}")


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[tuple[str, Optional[str]]]:
    """``train.resume`` -> (load_dir, tag or None: Checkpointer.plan picks it), or None for a fresh start.

    ``auto``: output_dir/checkpoints when it holds a ``latest`` or any step_N tag (whatever state ``latest``
    is in: plan falls back or refuses, never starts afresh); ``none``: never; a path: checkpoint_files.locate.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return (ckpt_dir, None) if holds_checkpoints(ckpt_dir) else None
    return locate(resume)
