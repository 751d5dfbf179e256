"""Checkpoints and run directories: save and resume training, and read a trained model back on one process.

A run directory is what pretraining writes (trainer.pretrain)::

    RUN_DIR/config.yaml            the resolved run configuration
    RUN_DIR/ds_config.json         the resolved DeepSpeed config (batch triple and precision as trained)
    RUN_DIR/model_config.json      BertConfig.to_dict()
    RUN_DIR/tokenizer/             copy of the shards' tokenizer
    RUN_DIR/metrics.jsonl, tensorboard/
    RUN_DIR/checkpoints/latest     name of the newest published tag (replaced atomically)
    RUN_DIR/checkpoints/step_N/    DeepSpeed's checkpoint: mp_rank_00_model_states.pt (weights + client state),
                                   *_optim_states.pt (one per data-parallel rank under ZeRO),
                                   checkpoint_complete.json (every file and its size: the completion marker)

A checkpoint is complete or invisible: every rank writes into a hidden temporary folder and fsyncs its own
files; after a barrier rank 0 writes the completion marker, renames the folder to step_N and only then
replaces ``latest``. Reading picks the tag ``latest`` names when it is complete, else the newest complete
tag (with a warning), else refuses naming what it found; it never silently starts from step 0 while tags
exist. Loading never executes code: every file of a tag is scanned for the pickle globals it references
(without unpickling it) against a short allow-list before anything, ours or DeepSpeed's, opens it, and our
own reads use ``weights_only=True`` (docs/reliability.md, "Checkpoints").

DeepSpeed writes the client state from rank 0 only, so anything that differs per rank (the loader position,
the RNG states) is gathered first and stored as a list indexed by rank. Client-state schema::

    {"step": int, "samples_seen": int, "tokens_seen": int,
     "data_state": [loader.state_dict() of rank 0, rank 1, ...],
     "rng": [{"python", "numpy", "torch", "accelerator"} of rank 0, rank 1, ...],
     "world_size": int, "run_config": dict, "model_config": dict, "ds_config": dict,
     "tokenizer_fingerprint": str, "max_seq_len": int, "format_version": int}

RNG states are stored as plain ints, lists and tensors (the NumPy state's key array as a list), so a
checkpoint needs no NumPy object to be read back.

Reading back: the weights are consolidated to fp32 with DeepSpeed's own API
(`get_fp32_state_dict_from_zero_checkpoint`: any ZeRO stage, any rank count, one CPU process). Without ZeRO
files (stage 0) the fp32 master copy of DeepSpeed's fp16/bf16 optimizer is unflattened, or, for plain fp32
training, the module weights are taken as they are. The result is checked against the module weights stored
next to it (master rounded to the training dtype must equal them), so a consolidation that mixes up
parameters cannot go unnoticed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bert import BertConfig, BertForPreTraining
from bert.hf import HF_FINGERPRINT_FIELD, TIED_KEYS
from common import files
from common.errors import UserError
from trainer import dist
from trainer.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{7,})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_" + MODEL_STATES  # stage 3 writes one per rank instead
CLIENT_KEYS = ("step", "samples_seen", "tokens_seen", "data_state", "rng", "world_size", "run_config",
               "model_config", "ds_config", "tokenizer_fingerprint", "max_seq_len", "format_version")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def list_tags(ckpt_dir: str) -> list[str]:
    """Tags ``step_N`` present in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def _step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


# ---------------------------------------------------------------------------------------------------
# Trust: what a checkpoint file may reference

def _allowed_globals() -> list:
    """The non-torch objects a checkpoint of this project may hold: DeepSpeed's loss scalers, its ZeRO stage
    enum and the fragment addresses of its flat optimizer partitions, and (in checkpoints written before the
    RNG states became plain lists) the three names NumPy arrays are rebuilt from. None of them runs code
    of the file's choosing: each only sets attributes or rebuilds an array of a plain dtype."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from numpy._core.multiarray import _reconstruct

    # the dtype class is produced by np.dtype's own reduction (never a pickle global): listed for the unpickler
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, _reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__name__}" for g in _allowed_globals()}


def check_trusted(path: str) -> None:
    """Refuse a torch.save file whose pickle references anything beyond torch's own weights-only set and
    _allowed_globals. The pickle is disassembled, never run (torch.serialization.get_unsafe_globals_in_checkpoint),
    so this is what makes it safe for DeepSpeed, which unpickles with weights_only=False, to open it next."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - any failure to disassemble it means: do not unpickle it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: refused: not a readable torch.save file ({type(e).__name__}: {first}); "
                              f"it was not unpickled") from None
    bad = sorted(set(unsafe) - _allowed_names())
    if bad:
        raise CheckpointError(f"{path}: refused: its pickle references {', '.join(bad)}, which loading would "
                              f"call; a checkpoint holds tensors, plain data and DeepSpeed's own state classes "
                              f"only (docs/reliability.md). It was not unpickled")


def check_folder_trusted(folder: str) -> None:
    """check_trusted on every *.pt file below ``folder`` (a tag, or a universal conversion)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.pt"), recursive=True)):
        check_trusted(path)


def torch_load(path: str):
    """torch.load of a checkpoint file after check_trusted, with weights_only=True and the allow-list."""
    check_trusted(path)
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "but got" in ln or "global" in ln.lower()), lines[0] if lines else "")
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {why.strip()[:300]})") from None


# ---------------------------------------------------------------------------------------------------
# Completeness: which tag a reader may use

MARKER = "checkpoint_complete.json"
# files.atomic_dir's temporary folder of a save (".step_N.<random>.tmp", and ".old" while one replaces a tag)
_SAVE_LEFTOVER_RE = re.compile(r"^\.step_(\d{7,})\..*\.tmp(?:\.old)?$")
_ZERO_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")


def _read_latest(ckpt_dir: str) -> tuple[Optional[str], str]:
    """(tag ``latest`` names, or None; what was found, in words for a message)."""
    path = os.path.join(ckpt_dir, "latest")
    try:
        with open(path, "rb") as f:
            raw = f.read(256)
    except FileNotFoundError:
        return None, "is missing"
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"is garbled ({raw[:40]!r})"
    if not text:
        return None, "is empty"
    if not TAG_RE.match(text):
        return None, f"is garbled ({text[:40]!r} is not a step_N tag)"
    if not os.path.isdir(os.path.join(ckpt_dir, text)):
        return None, f"names {text}, which does not exist"
    return text, f"names {text}"


def _legacy_problem(tag_dir: str) -> Optional[str]:
    """A tag written before completion markers existed is taken as complete when rank 0's model states are
    readable and every data-parallel rank's ZeRO file (world_size of its client state) is there and readable."""
    try:
        client = read_client_state(os.path.dirname(tag_dir), os.path.basename(tag_dir))
        check_folder_trusted(tag_dir)
    except CheckpointError as e:
        return str(e)
    ranks = {int(m.group(1)) for name in os.listdir(tag_dir) if (m := _ZERO_FILE_RE.search(name))}
    world = int(client.get("world_size") or 1)
    missing = sorted(set(range(world)) - ranks) if ranks else []
    if missing:
        return f"{tag_dir}: the ZeRO files of rank(s) {missing} are missing ({world} rank(s) saved it)"
    return None


def tag_problem(tag_dir: str) -> Optional[str]:
    """None when ``tag_dir`` is a complete checkpoint: its marker lists every file at its size (or, without a
    marker, _legacy_problem finds nothing); otherwise what is wrong, in words."""
    marker = os.path.join(tag_dir, MARKER)
    if not os.path.isfile(marker):
        return _legacy_problem(tag_dir)
    try:
        listed = files.read_json(marker, "checkpoint completion marker")["files"]
        listed = {str(k): int(v) for k, v in listed.items()}
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
        return f"{marker}: unreadable ({e})"
    for rel, size in sorted(listed.items()):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def choose_tag(ckpt_dir: str, warn=print) -> Optional[str]:
    """The tag a reader of ``ckpt_dir`` loads: the one ``latest`` names when it is complete; else the newest
    tag with a completion marker that is complete (``warn`` says so); None when the folder holds no tag and no
    ``latest`` at all. Anything else is refused naming what was found: never a silent fresh start."""
    latest = os.path.join(ckpt_dir, "latest")
    tags = list_tags(ckpt_dir)
    named, found = _read_latest(ckpt_dir)
    if named is not None:
        problem = tag_problem(os.path.join(ckpt_dir, named))
        if problem is None:
            return named
        found = f"names {named}, which is incomplete ({problem})"
    if not tags and found == "is missing":
        return None
    for tag in reversed(tags):
        tag_dir = os.path.join(ckpt_dir, tag)
        if tag != named and os.path.isfile(os.path.join(tag_dir, MARKER)) and tag_problem(tag_dir) is None:
            warn(f"warning: {latest} {found}: using the newest complete checkpoint, {tag}")
            return tag
    raise CheckpointError(f"{latest} {found}, and no other complete checkpoint is in {ckpt_dir} (tags: "
                          f"{', '.join(tags) or 'none'}); name one with train.resume / --tag, or start afresh "
                          f"with train.resume=none")


def pick_tag(load_dir: str, tag: Optional[str], warn=print) -> str:
    """``tag`` when given (it must be a complete checkpoint), else choose_tag; refuses when there is none."""
    if tag is None:
        tag = choose_tag(load_dir, warn)
        if tag is None:
            raise CheckpointError(f"{load_dir}: no checkpoint (no 'latest' and no step_N tag)")
        return tag
    problem = tag_problem(os.path.join(load_dir, tag))
    if problem is not None:
        raise CheckpointError(f"checkpoint {os.path.join(load_dir, tag)} is incomplete: {problem}")
    return tag


def _holds_checkpoints(ckpt_dir: str) -> bool:
    return os.path.lexists(os.path.join(ckpt_dir, "latest")) or bool(list_tags(ckpt_dir))


# ---------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))  # keys: a list (or an array in older checkpoints)
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Training checkpoints


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


class Checkpointer:
    """Saves and resumes a training run's checkpoints in ``ckpt_dir``, keeping the newest ``keep``.

    ``meta`` is the run's fixed description stored with every checkpoint (run/model/ds config, tokenizer
    fingerprint, max_seq_len, format_version); ``save`` adds the trainer's per-rank state, gathered. A
    checkpoint of N ranks resumes on M ranks through DeepSpeed's universal checkpoint (``plan``), and the
    loader continues from the same global sample."""

    def __init__(self, ckpt_dir: str, keep: int, meta: dict, log=print):
        self.dir, self.keep, self.meta, self.log = ckpt_dir, keep, meta, log
        self.last_saved: Optional[str] = None

    def save(self, engine, state: dict) -> str:
        """Collective: every rank calls it with its own ``state`` (Trainer.state_dict()). The checkpoint is
        written into a hidden temporary folder (files.atomic_dir on rank 0, its name shared), each rank fsyncs
        its own files, and after a barrier rank 0 writes the completion marker, renames the folder to the tag
        and replaces ``latest``. A rank failing or killed on the way leaves the previous checkpoint and
        ``latest`` as they were."""
        rank, world = dist.rank_world()
        step = state["step"]
        tag = tag_for(step)
        client = self._client_state(state, world)
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

    def _client_state(self, state: dict, world: int) -> dict:
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        return {"step": state["step"], "samples_seen": state["samples_seen"], "tokens_seen": state["tokens_seen"],
                "data_state": dist.all_gather_object(state["data_state"]),
                "rng": dist.all_gather_object(state["rng"]), "world_size": world,
                "data_health": state.get("data_health"), **self.meta,
                # what ds_to_universal needs to convert it for another rank count (ZeRO <= 2)
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}

    def _retain(self, tag: str) -> None:
        """Keep ``tag`` and the newest keep-1 tags older than it; tags newer than it (an earlier run's, when this
        one resumed from an older tag) are never deleted. Leftovers of saves cut short before it go too."""
        step = _step_of(tag)
        older = [t for t in list_tags(self.dir) if _step_of(t) < step]
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
        the client state (the loader position, its own RNG streams or None for a rank the saving run did not
        have) after checking it fits this run."""
        path, client = engine.load_checkpoint(resume.load_dir, tag=resume.tag)
        if path is None:
            raise ConfigError(f"could not load a checkpoint from {resume.path}")
        self.check(client, resume.path)
        if engine.device.type == "cpu":
            from trainer import cpu

            cpu.replay_adam_bias_correction(engine)  # else the first resumed update differs by ~1 ulp
        rank, _ = dist.rank_world()
        self.last_saved = os.path.join(resume.load_dir, resume.tag.removesuffix(UNIVERSAL))
        rngs, states = client["rng"], client["data_state"]
        return {"step": client["step"], "samples_seen": client["samples_seen"], "tokens_seen": client["tokens_seen"],
                "data_state": states[min(rank, len(states) - 1)],  # the position is global: any rank's
                "rng": rngs[rank] if rank < len(rngs) else None, "data_health": client.get("data_health"),
                "path": self.last_saved}

    def check(self, client: dict, path: str) -> None:
        """Refuse a checkpoint this run cannot continue, showing both sides."""
        for key in ("step", "samples_seen", "tokens_seen", "data_state", "rng", "tokenizer_fingerprint"):
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
        positions = {(d.get("epoch"), d.get("sample_in_epoch")) for d in client["data_state"]}
        if len(positions) != 1:
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
            m = _ZERO_FILE_RE.search(name)
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
    is in: plan falls back or refuses, never starts afresh); ``none``: never; a path: a checkpoints folder,
    one tag folder inside it, or a run directory.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return (ckpt_dir, None) if _holds_checkpoints(ckpt_dir) else None
    path = os.path.abspath(resume)
    if _holds_checkpoints(path):
        return path, None
    if any(os.path.isfile(os.path.join(path, name)) for name in (MODEL_STATES, ZERO3_MODEL_STATES)):
        return os.path.dirname(path), os.path.basename(path)
    if _holds_checkpoints(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    raise ConfigError(f"{resume!r}: not a checkpoints folder (with 'latest' or step_N tags), a checkpoint tag "
                      f"folder holding {MODEL_STATES} (ZeRO-3: {ZERO3_MODEL_STATES}), nor a run directory with "
                      f"checkpoints")


def load_weights(model: torch.nn.Module, init_from: str) -> dict:
    """Consolidated fp32 weights of a checkpoint (any ZeRO stage) into ``model``; returns its client state.
    Only the weights: optimizer, step, data position and RNG start fresh (phase 2 from phase 1)."""
    resolved = resolve_resume(init_from, init_from) if init_from not in ("auto", "none") else None
    if resolved is None:
        raise ConfigError(f"train.init_from={init_from!r} is not a checkpoint path")
    load_dir, tag = resolved
    try:
        tag = pick_tag(load_dir, tag, log.warning)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from={init_from}: {e}") from None
    states = read_model_states(os.path.join(load_dir, tag))
    sd, _how = consolidate_fp32(load_dir, tag, states, model)
    try:
        load_state_into(model, sd, f"train.init_from {load_dir}/{tag}")
    except RuntimeError as e:  # shape mismatches: the model config differs from the checkpoint's
        raise ConfigError(f"train.init_from {load_dir}/{tag}: weights do not fit the model: {e}") from None
    except CheckpointError as e:
        raise ConfigError(f"{e} (model config differs?)") from None
    states.pop("module", None)
    return states


def read_client_state(load_dir: str, tag: Optional[str] = None) -> dict:
    """Client state of a checkpoint (``tag``, else pick_tag's choice) without building an engine."""
    states = read_model_states(os.path.join(load_dir, tag or pick_tag(load_dir, None)))
    return {k: states[k] for k in CLIENT_KEYS if k in states}


# ---------------------------------------------------------------------------------------------------
# Reading a trained model back


@dataclass
class RunMeta:
    """Where the weights came from and what the pretraining run recorded about them."""

    path: str  # the run directory or HF directory given
    kind: str  # "run" or "hf"
    tokenizer_dir: str
    tokenizer_fingerprint: str  # the fingerprint of the tokenizer the model was pretrained with
    fingerprint_recorded: bool  # False: an HF dir without our field (the dir's own tokenizer is assumed)
    tag: str | None = None
    checkpoint_dir: str | None = None
    step: int | None = None
    max_seq_len: int | None = None
    ds_config: dict | None = None
    consolidation: str = ""  # how fp32 weights were obtained (for the log line)
    client_state: dict = field(default_factory=dict, repr=False)

    def eval_micro_batch(self) -> int | None:
        """The micro batch the run validated with (train_micro_batch_size_per_gpu of its DeepSpeed config)."""
        if not self.ds_config:
            return None
        return self.ds_config.get("train_micro_batch_size_per_gpu")

    def eval_dtype(self) -> str:
        """The precision the run's engine held its module in (its resolved ds_config.json)."""
        from trainer.precision import requested

        return requested(self.ds_config or {})


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "model_config.json"))


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def resolve_tag(checkpoints_dir: str, tag: str | None) -> str:
    """``tag`` if given (it must exist and be complete), else pick_tag's choice (``latest`` when complete)."""
    if not os.path.isdir(checkpoints_dir):
        raise CheckpointError(f"{checkpoints_dir}: no checkpoints directory (has the run saved a checkpoint yet?)")
    if tag is not None and not os.path.isdir(os.path.join(checkpoints_dir, tag)):
        available = list_tags(checkpoints_dir)
        raise CheckpointError(f"{checkpoints_dir}: no checkpoint tag {tag!r} (available tags: "
                              f"{', '.join(available) or 'none'})")
    return pick_tag(checkpoints_dir, tag, lambda m: print(m, file=sys.stderr))


def model_states_file(ckpt_dir: str) -> str:
    """Rank 0's model-states file: mp_rank_00_model_states.pt (stages 0-2) or
    zero_pp_rank_0_mp_rank_00_model_states.pt (stage 3, one per rank)."""
    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            return path
    found = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    raise CheckpointError(f"{os.path.join(ckpt_dir, MODEL_STATES)}: missing (not a DeepSpeed checkpoint; "
                          f"the folder holds {found})")


def read_model_states(ckpt_dir: str) -> dict:
    """DeepSpeed's model-states file: module weights, param_shapes, optimizer (stage 0), and the
    client_state keys at top level (torch_load: scanned, then weights_only with DeepSpeed's classes allowed)."""
    states = torch_load(model_states_file(ckpt_dir))
    if not isinstance(states, dict):
        raise CheckpointError(f"{model_states_file(ckpt_dir)}: holds a {type(states).__name__}, not DeepSpeed's "
                              f"model states")
    return states


# ---------------------------------------------------------------------------------------------------
# Consolidation


def _unflatten_master(states: dict, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Stage 0 with fp16/bf16: DeepSpeed's FP16_Optimizer keeps one flat fp32 master tensor per param
    group (`fp32_groups_flat`, a plain concatenation in group order, no padding). The group's parameter
    order is `param_shapes` when saved; DeepSpeed leaves it None at stage 0, and then a single group holding
    every parameter is in `model.parameters()` order (what the optimizer was built from). Several groups
    without param_shapes cannot be attributed: None (the caller falls back to the module weights).
    The caller verifies the result against the stored module weights either way."""
    opt = states.get("optimizer")
    if not isinstance(opt, dict) or "fp32_groups_flat" not in opt:
        return None
    flats = opt["fp32_groups_flat"]
    shapes = states.get("param_shapes")
    if not shapes:
        named = list(model.named_parameters())  # tied parameters listed once, as the optimizer saw them
        if len(flats) != 1:
            return _attribute_groups(flats, named, states.get("module") or {})
        if flats[0].numel() != sum(p.numel() for _, p in named):
            return None
        shapes = [{name: p.shape for name, p in named}]
    elif isinstance(shapes, dict):
        shapes = [shapes]
    if len(flats) != len(shapes):
        raise CheckpointError(f"fp32_groups_flat has {len(flats)} groups but param_shapes {len(shapes)}")
    out = {}
    for flat, group in zip(flats, shapes):
        offset = 0
        for name, shape in group.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[offset: offset + n].view(shape).clone().float()
            offset += n
        if offset != flat.numel():
            raise CheckpointError(f"fp32_groups_flat group has {flat.numel()} elements, param_shapes sum to {offset}")
    return out


def _attribute_groups(flats: list[torch.Tensor], named: list, module: dict) -> dict[str, torch.Tensor] | None:
    """Several flat master groups without param_shapes (e.g. weight-decay / no-decay groups at stage 0):
    each group holds its parameters in model order, so walk the model's parameters and give each to the one
    group whose next slice, rounded to the saved module dtype, is exactly the saved module tensor. None when
    that is not unique for some parameter (or sizes do not add up): the caller then uses the module weights."""
    offsets = [0] * len(flats)
    out = {}
    for name, p in named:
        stored = module.get(name)
        if stored is None or stored.numel() != p.numel():
            return None
        n = p.numel()
        fits = [g for g, flat in enumerate(flats) if offsets[g] + n <= flat.numel() and torch.equal(
            flat[offsets[g]: offsets[g] + n].view(stored.shape).to(stored.dtype), stored)]
        if len(fits) != 1:
            return None
        g = fits[0]
        out[name] = flats[g][offsets[g]: offsets[g] + n].view(p.shape).clone().float()
        offsets[g] += n
    if offsets != [flat.numel() for flat in flats]:
        return None
    return out


def consolidate_fp32(checkpoints_dir: str, tag: str, states: dict,
                     model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 state dict of checkpoints_dir/tag (any ZeRO stage, any rank count) and how it was made.
    `model` is a freshly built instance of the checkpoint's architecture (parameter order at stage 0)."""
    ckpt_dir = os.path.join(checkpoints_dir, tag)
    if glob.glob(os.path.join(ckpt_dir, "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_folder_trusted(ckpt_dir)  # DeepSpeed's reader unpickles with weights_only=False

        # DeepSpeed prints progress to stdout; keep stdout for our result lines.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                sd = get_fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag)
            except (ValueError, FileNotFoundError, KeyError) as e:
                raise CheckpointError(f"{ckpt_dir}: cannot consolidate ZeRO checkpoint: {e}") from None
        n_files = len(glob.glob(os.path.join(ckpt_dir, "*_optim_states.pt")))
        return {k: v.float() for k, v in sd.items()}, f"zero_to_fp32 ({n_files} rank file(s))"
    master = _unflatten_master(states, model)
    if master is not None:
        return master, "fp32 master of DeepSpeed's fp16/bf16 optimizer (stage 0)"
    module = states.get("module")
    if not isinstance(module, dict) or not module:
        raise CheckpointError(f"{ckpt_dir}: no ZeRO optimizer files and no module weights in {MODEL_STATES}")
    dtypes = {v.dtype for v in module.values() if v.is_floating_point()}
    if dtypes != {torch.float32}:
        log.warning("%s: module weights are %s and no fp32 master copy was saved; upcasting",
                    ckpt_dir, sorted(map(str, dtypes)))
    return {k: v.float() for k, v in module.items()}, "module weights (stage 0)"


def _check_against_module(sd: dict[str, torch.Tensor], states: dict, where: str) -> None:
    """fp32 master rounded to the stored module's dtype must equal the module weights (stages 0-2 store
    full module tensors; ZeRO-3 stores empty placeholders, which are skipped)."""
    module = states.get("module") or {}
    bad = []
    for name, stored in module.items():
        if name not in sd or stored.numel() == 0 or stored.numel() != sd[name].numel():
            continue
        if not torch.equal(sd[name].to(stored.dtype).view(stored.shape), stored):
            bad.append(name)
    if bad:
        raise CheckpointError(f"{where}: consolidated fp32 weights disagree with the saved module weights for "
                              f"{len(bad)} tensor(s), e.g. {bad[:3]}; the checkpoint is inconsistent")


def load_state_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load after filling tied aliases (checkpoints store one name per shared tensor)."""
    sd = dict(sd)
    expected = set(model.state_dict())
    for alias, target in TIED_KEYS.items():
        if alias in expected and alias not in sd and target in sd:
            sd[alias] = sd[target]
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: checkpoint does not match {type(model).__name__}:\n"
                              f"  missing keys: {missing}\n  unexpected keys: {unexpected}")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------------
# Entry points


def load_run(run_dir: str, tag: str | None = None):
    """(BertForPreTraining in fp32 eval mode, BertTokenizer, RunMeta) from a training run directory."""
    from data.tokenizer import load_tokenizer

    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir}: not a directory (expected a training run directory)")
    checkpoints_dir = os.path.join(run_dir, "checkpoints")
    tag = resolve_tag(checkpoints_dir, tag)
    ckpt_dir = os.path.join(checkpoints_dir, tag)
    states = read_model_states(ckpt_dir)

    cfg_path = os.path.join(run_dir, "model_config.json")
    if os.path.isfile(cfg_path):
        cfg_dict = _read_json(cfg_path, "BertConfig of the run")
    elif isinstance(states.get("model_config"), dict):
        cfg_dict = states["model_config"]
    else:
        raise CheckpointError(f"{cfg_path}: missing, and the checkpoint's client_state has no model_config")
    try:
        config = BertConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None

    ds_path = os.path.join(run_dir, "ds_config.json")
    ds_config = _read_json(ds_path, "DeepSpeed config") if os.path.isfile(ds_path) else states.get("ds_config")

    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    recorded = states.get("tokenizer_fingerprint")
    if recorded is None:
        raise CheckpointError(f"{model_states_file(ckpt_dir)}: client_state has no tokenizer_fingerprint")
    if tokenizer.fingerprint != recorded:
        raise CheckpointError(f"{tok_dir}: tokenizer fingerprint {tokenizer.fingerprint} differs from the one the "
                              f"checkpoint was trained with ({recorded}); the run's tokenizer/ was replaced")

    model = BertForPreTraining(config)
    sd, how = consolidate_fp32(checkpoints_dir, tag, states, model)
    _check_against_module(sd, states, ckpt_dir)
    load_state_into(model, sd, ckpt_dir)
    model.eval()

    meta = RunMeta(path=run_dir, kind="run", tokenizer_dir=tok_dir, tokenizer_fingerprint=recorded,
                   fingerprint_recorded=True, tag=tag, checkpoint_dir=ckpt_dir, step=states.get("step"),
                   max_seq_len=states.get("max_seq_len"), ds_config=ds_config, consolidation=how,
                   client_state={k: states[k] for k in CLIENT_KEYS if k in states and k not in ("data_state", "rng")})
    return model, tokenizer, meta


def load_hf(hf_dir: str):
    """(BertForPreTraining, BertTokenizer, RunMeta) from an HF directory (ours via export_hf, or Google's).
    The pretraining fingerprint is tokenizer_config.json's `bert_fingerprint` when we exported it;
    otherwise the directory's own tokenizer is all there is and it is taken as the pretraining one."""
    from bert.hf import from_hf
    from data.tokenizer import load_tokenizer

    hf_dir = os.fspath(hf_dir)
    try:
        model = from_hf(hf_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    tokenizer = load_tokenizer(hf_dir)
    tc_path = os.path.join(hf_dir, "tokenizer_config.json")
    recorded = None
    if os.path.isfile(tc_path):
        recorded = _read_json(tc_path, "tokenizer config").get(HF_FINGERPRINT_FIELD)
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise CheckpointError(f"{hf_dir}: tokenizer files have fingerprint {tokenizer.fingerprint} but "
                              f"{tc_path} records the pretraining tokenizer as {recorded}; the files were replaced")
    model.eval()
    meta = RunMeta(path=hf_dir, kind="hf", tokenizer_dir=hf_dir,
                   tokenizer_fingerprint=recorded or tokenizer.fingerprint,
                   fingerprint_recorded=recorded is not None, consolidation="hf safetensors")
    return model, tokenizer, meta


def load_pretrained(path: str, tag: str | None = None):
    """A run directory or an HF directory, whichever `path` is."""
    path = os.fspath(path)
    if is_run_dir(path):
        return load_run(path, tag)
    if tag is not None:
        raise CheckpointError(f"{path}: --tag applies to run directories only (this is not one)")
    if is_hf_dir(path):
        return load_hf(path)
    raise CheckpointError(f"{path}: neither a run directory (checkpoints/, model_config.json) nor a "
                          f"Hugging Face directory (config.json)")
