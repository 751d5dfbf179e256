"""Checkpoint folders on disk, as both sides see them: tag names, the trust scan, completeness, and reading a
tag's model states. trainer.checkpoint writes and resumes them; trainer.checkpoint_read loads a trained model
from them offline. Both read through this module, so a tag is named, trusted and judged complete one way.

A checkpoints folder (RUN_DIR/checkpoints)::

    latest                     name of the newest published tag (replaced atomically)
    step_N/                    DeepSpeed's checkpoint: mp_rank_00_model_states.pt (weights + client state),
                               *_optim_states.pt (one per data-parallel rank under ZeRO),
                               checkpoint_complete.json (every file and its size: the completion marker)

Reading picks the tag ``latest`` names when it is complete, else the newest complete tag (with a warning),
else refuses naming what it found; it never silently starts from step 0 while tags exist. Loading never
executes code: every file of a tag is scanned for the pickle globals it references (without unpickling it)
against a short allow-list before anything, ours or DeepSpeed's, opens it, and our own reads use
``weights_only=True`` (docs/reliability.md, "Checkpoints").
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from typing import Optional

import numpy as np
import torch

from common import files
from common.errors import UserError
from trainer.errors import CheckpointError, ConfigError

TAG_RE = re.compile(r"^step_(\d{7,})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_" + MODEL_STATES  # stage 3 writes one per rank instead
# The run's facts of a client state (trainer.checkpoint's schema), beside its components' "state"
CLIENT_KEYS = ("step", "world_size", "run_config", "model_config", "ds_config", "tokenizer_fingerprint",
               "max_seq_len", "format_version", "state_version")
# ... and its components' parts (version 2), or the same at the top level (version 1: trainer.checkpoint.migrate)
_CLIENT_PARTS = ("state", "per_rank", "samples_seen", "tokens_seen", "data_state", "rng", "data_health")


def tag_for(step: int) -> str:
    """The tag a checkpoint of ``step`` is saved under (TAG_RE reads it back)."""
    return f"step_{step:07d}"


def list_tags(ckpt_dir: str) -> list[str]:
    """Tags ``step_N`` present in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


# ---------------------------------------------------------------------------------------------------
# Trust: what a checkpoint file may reference

def _allowed_globals() -> list:
    """The non-torch objects a checkpoint of this project may hold: DeepSpeed's loss scalers, its ZeRO stage
    enum and the fragment addresses of its flat optimizer partitions, and (in checkpoints that hold the NumPy
    RNG state as an array rather than a list) the three names NumPy arrays are rebuilt from. None of them runs
    code of the file's choosing: each only sets attributes or rebuilds an array of a plain dtype."""
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
ZERO_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")


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


def _unmarked_problem(tag_dir: str) -> Optional[str]:
    """A tag without a completion marker is taken as complete when rank 0's model states are readable and
    every data-parallel rank's ZeRO file (world_size of its client state) is there and readable."""
    try:
        client = read_client_state(os.path.dirname(tag_dir), os.path.basename(tag_dir))
        check_folder_trusted(tag_dir)
    except CheckpointError as e:
        return str(e)
    ranks = {int(m.group(1)) for name in os.listdir(tag_dir) if (m := ZERO_FILE_RE.search(name))}
    world = int(client.get("world_size") or 1)
    missing = sorted(set(range(world)) - ranks) if ranks else []
    if missing:
        return f"{tag_dir}: the ZeRO files of rank(s) {missing} are missing ({world} rank(s) saved it)"
    return None


def tag_problem(tag_dir: str) -> Optional[str]:
    """None when ``tag_dir`` is a complete checkpoint: its marker lists every file at its size (or, without a
    marker, _unmarked_problem finds nothing); otherwise what is wrong, in words."""
    marker = os.path.join(tag_dir, MARKER)
    if not os.path.isfile(marker):
        return _unmarked_problem(tag_dir)
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


def holds_checkpoints(ckpt_dir: str) -> bool:
    return os.path.lexists(os.path.join(ckpt_dir, "latest")) or bool(list_tags(ckpt_dir))


def locate(path: str) -> tuple[str, Optional[str]]:
    """(checkpoints folder, tag or None: pick_tag chooses) of a path a user gave: a checkpoints folder, one tag
    folder inside it, or a run directory; a ConfigError naming the three when it is none of them."""
    full = os.path.abspath(path)
    if holds_checkpoints(full):
        return full, None
    if any(os.path.isfile(os.path.join(full, name)) for name in (MODEL_STATES, ZERO3_MODEL_STATES)):
        return os.path.dirname(full), os.path.basename(full)
    if holds_checkpoints(os.path.join(full, "checkpoints")):
        return os.path.join(full, "checkpoints"), None
    raise ConfigError(f"{path!r}: not a checkpoints folder (with 'latest' or step_N tags), a checkpoint tag "
                      f"folder holding {MODEL_STATES} (ZeRO-3: {ZERO3_MODEL_STATES}), nor a run directory with "
                      f"checkpoints")


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


def read_client_state(load_dir: str, tag: Optional[str] = None) -> dict:
    """Client state of a checkpoint (``tag``, else pick_tag's choice) without building an engine."""
    states = read_model_states(os.path.join(load_dir, tag or pick_tag(load_dir, None)))
    return {k: states[k] for k in CLIENT_KEYS + _CLIENT_PARTS if k in states}
