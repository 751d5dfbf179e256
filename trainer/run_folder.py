"""The run folder (``train.output_dir``): what a start checks before it writes anything, and what it writes.

Rank 0 of a start ``claim``s the folder: it takes the lock (trainer.lock), then compares this start against
what the folder and the checkpoint to resume record, and refuses — releasing the lock, leaving every byte as
it was — when the start would damage or silently abandon the earlier run:

- a resume whose settings fixed for a run's life (``fixed_settings``: the model, the tokenizer, the shards'
  sequence length and format, precision, ZeRO stage, optimizer type) differ from the recorded ones; the
  message names each key with both values and where the recorded one is written;
- ``train.resume=auto`` in a folder holding earlier work (checkpoints, metrics lines, TensorBoard events)
  but no checkpoint to resume: starting from step 0 over it would lose it;
- a resume of another folder's checkpoint into a folder holding earlier work.

Only an explicit ``train.resume=none`` starts afresh over earlier work, and even then nothing is deleted: the
earlier run's files are moved into ``earlier/<UTC time>/`` (``set_aside``). Settings that may change on a
resume (``max_steps``, intervals, workers, thresholds, the lr, the world size) are written to config.yaml and
ds_config.json when the start has passed every check (``write_run_files``, atomically).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Callable, Optional

from common import files
from trainer import checkpoint_files, precision
from trainer.errors import ConfigError
from trainer.lock import RunLock

EARLIER = "earlier"
RUN_FILES = ("config.yaml", "ds_config.json", "model_config.json", "tokenizer")
WORK = ("checkpoints", "metrics.jsonl", "tensorboard")
_FIXED_HINT = ("keep them for this folder, or train a new train.output_dir from this run's weights with "
               "train.init_from=<its checkpoints folder>")


def fixed_settings(model_config: Optional[dict] = None, ds: Optional[dict] = None,
                   fingerprint: Optional[str] = None, max_seq_len: Optional[int] = None,
                   format_version: Optional[int] = None) -> dict:
    """The settings a resume must keep, by the name a message shows (only those a source records)."""
    out: dict = {f"model.{k}": v for k, v in (model_config or {}).items()}
    if ds is not None:
        out["precision"] = precision.requested(ds)
        out["zero_optimization.stage"] = (ds.get("zero_optimization") or {}).get("stage", 0)
        out["optimizer.type"] = (ds.get("optimizer") or {}).get("type")
    for name, value in (("tokenizer fingerprint", fingerprint), ("max_seq_len of the shards", max_seq_len),
                        ("format_version of the shards", format_version)):
        if value is not None:
            out[name] = value
    return out


def _compare(new: dict, recorded: dict, where: str) -> None:
    diffs = [f"{key} is {recorded[key]!r} in {where} but {new.get(key)!r} in this start"
             for key in sorted(recorded) if recorded[key] != new.get(key)]
    if diffs:
        raise ConfigError("cannot resume: " + "; ".join(diffs) + f"; {_FIXED_HINT}")


def _folder_records(folder: str) -> list[tuple[dict, str]]:
    """(fixed settings, the file recording them) of each run file in ``folder``."""
    from data.tokenizer import load_tokenizer

    out = []
    for name, read in (("model_config.json", lambda p: fixed_settings(model_config=files.read_json(p, "model config"))),
                       ("ds_config.json", lambda p: fixed_settings(ds=files.read_json(p, "DeepSpeed config"))),
                       ("tokenizer", lambda p: fixed_settings(fingerprint=load_tokenizer(p).fingerprint))):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            out.append((read(path), path))
    return out


def _checkpoint_record(load_dir: str, tag: Optional[str]) -> tuple[dict, str]:
    client = checkpoint_files.read_client_state(load_dir, tag)
    return (fixed_settings(client.get("model_config"), client.get("ds_config"), client.get("tokenizer_fingerprint"),
                           client.get("max_seq_len"), client.get("format_version")),
            f"checkpoint {os.path.join(load_dir, tag or 'latest')}")


def earlier_work(folder: str) -> list[str]:
    """What of an earlier run's work ``folder`` holds, one phrase each; empty when none."""
    found = []
    ckpt = os.path.join(folder, "checkpoints")
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        found.append(f"checkpoints/ ({', '.join(sorted(os.listdir(ckpt)))})")
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        with open(metrics, "rb") as f:
            found.append(f"metrics.jsonl ({sum(1 for _ in f)} lines)")
    events = [n for _, _, names in os.walk(os.path.join(folder, "tensorboard")) for n in names]
    if events:
        found.append(f"tensorboard/ ({len(events)} files)")
    return found


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check(folder: str, resume: str, resume_from: Optional[tuple[str, Optional[str]]], new: dict) -> None:
    """Refuse a start that would damage or silently abandon what ``folder`` holds (module docstring);
    ``new`` is this start's ``fixed_settings``. Reads only."""
    if resume_from is not None:
        load_dir, tag = resume_from
        _compare(new, *_checkpoint_record(load_dir, tag))
        if _same_folder(load_dir, os.path.join(folder, "checkpoints")):
            for recorded, where in _folder_records(folder):
                _compare(new, recorded, where)
            return
    work = earlier_work(folder)
    if not work or resume == "none":
        return
    if resume_from is None:
        raise ConfigError(f"{folder} holds an earlier run ({'; '.join(work)}) but no checkpoint to resume "
                          f"(train.resume={resume}): refusing to start from step 0 over it. To start afresh here "
                          f"set train.resume=none (the earlier run's files are moved to {folder}/{EARLIER}/<time>/, "
                          f"nothing is deleted); to leave it as it is, choose another train.output_dir")
    raise ConfigError(f"{folder} holds an earlier run ({'; '.join(work)}) and train.resume={resume} is another "
                      f"folder's checkpoint: choose an empty train.output_dir for it")


def claim(folder: str, resume: str, resume_from: Optional[tuple[str, Optional[str]]], new: dict,
          log: Callable[[str], None]) -> RunLock:
    """Lock ``folder`` and ``check`` it; on a refusal the lock is released and the folder left as it was
    (one this call created is removed again)."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        lock = RunLock.acquire(folder, log)
    except BaseException:
        _remove_if_created(folder, created)
        raise
    try:
        check(folder, resume, resume_from, new)
    except BaseException:
        lock.release()
        _remove_if_created(folder, created)
        raise
    return lock


def _remove_if_created(folder: str, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile; leave it
            os.rmdir(folder)


def earlier_dir(folder: str) -> str:
    """Where this start puts what it sets aside: ``earlier/<UTC time>-<pid>/`` (made when first used)."""
    return os.path.join(folder, EARLIER, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}")


def set_aside(folder: str, aside: str) -> list[str]:
    """Move an earlier run's work and run files from ``folder`` into ``aside`` (renames: nothing is copied or
    deleted); returns the names moved."""
    moved = [name for name in WORK + RUN_FILES if os.path.lexists(os.path.join(folder, name))]
    if moved:
        os.makedirs(aside, exist_ok=True)
    for name in moved:
        os.rename(os.path.join(folder, name), os.path.join(aside, name))
    return moved


def write_run_files(folder: str, config_yaml: str, ds: dict, model_config: dict, tokenizer_src: str) -> None:
    """config.yaml, ds_config.json, model_config.json (each written atomically) and tokenizer/ (copied once:
    a resume has checked that the folder's is the shards' one)."""
    files.write_text(os.path.join(folder, "config.yaml"), config_yaml)
    files.write_json(os.path.join(folder, "ds_config.json"), ds)
    files.write_json(os.path.join(folder, "model_config.json"), model_config)
    tokenizer = os.path.join(folder, "tokenizer")
    if not os.path.isdir(tokenizer):
        with files.atomic_dir(tokenizer) as tmp:
            shutil.copytree(tokenizer_src, tmp, dirs_exist_ok=True)
