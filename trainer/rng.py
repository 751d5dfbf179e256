"""The random streams of a process (Python, NumPy, torch, the accelerator's): seeded at start, captured into
every checkpoint per rank, restored on resume so a resumed run draws the same masks and dropout as one that
never stopped.

States are plain ints, lists and tensors (the NumPy state's key array as a list), so a checkpoint needs no
NumPy object to be read back.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch


def state() -> dict:
    """This process's RNG streams: {"python", "numpy", "torch"} and "accelerator" off the CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
           "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        out["accelerator"] = acc.get_rng_state()
    return out


def set_state(saved: dict) -> None:
    """Restore what ``state`` captured."""
    from deepspeed.accelerator import get_accelerator

    random.setstate(saved["python"])
    np.random.set_state(tuple(saved["numpy"]))  # keys: a list, or an array where a checkpoint holds one
    torch.set_rng_state(saved["torch"])
    if "accelerator" in saved:
        get_accelerator().set_rng_state(saved["accelerator"])


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's seeds the accelerator's too)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Streams:
    """This process's streams as a checkpointed component (trainer.checkpoint, per rank). A rank the saving run
    did not have (a run resumed on more ranks) gets None: its streams stay as seeded."""

    def state_dict(self) -> dict:
        return state()

    def load_state_dict(self, saved: Optional[dict]) -> None:
        if saved is not None:
            set_state(saved)
