"""Checkpoints: DeepSpeed's engine checkpoint plus our client state; keep the last K; weights-only init.

Layout (DeepSpeed's): ``<output_dir>/checkpoints/latest`` names the newest tag; ``step_{N:07d}/`` holds
``mp_rank_00_model_states.pt`` (module weights + client state) and the ZeRO optimizer partitions.

DeepSpeed writes the client state from the data-parallel writer (rank 0) only, so anything that differs per
rank — the loader position and the RNG states — is gathered to every rank first and stored as a list indexed
by rank; on resume each rank takes its own entry. Client-state schema::

    {"step": int, "samples_seen": int, "tokens_seen": int,
     "data_state": [loader.state_dict() of rank 0, rank 1, ...],
     "rng": [{"python", "numpy", "torch", "accelerator"} of rank 0, rank 1, ...],
     "world_size": int, "run_config": dict, "model_config": dict, "ds_config": dict,
     "tokenizer_fingerprint": str, "max_seq_len": int, "format_version": int}
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from trainer.config import ConfigError

TAG_RE = re.compile(r"^step_(\d{7,})$")
MODEL_STATES = "mp_rank_00_model_states.pt"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def list_tags(ckpt_dir: str) -> list[str]:
    """Tags ``step_N`` present in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir, tag)) else None


# ---------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO / bf16 / fp16 optimizers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def replay_adam_bias_correction(engine) -> int:
    """Bring the hidden state of DeepSpeed's CPU Adam kernel to where an uninterrupted run has it; returns the
    number of steps replayed (0 when nothing needs it).

    Why: the CPU ``multi_tensor_adam`` (FusedAdam on the CPU accelerator) keeps beta1^t and beta2^t in a static
    C++ object (``Adam_Optimizer::IncrementStep``, csrc/includes/cpu_adam.h): std::pow(beta, 1) on the first call
    of a process, then ``beta_t *= beta`` in float32 on each following step. A resumed process starts with a
    fresh object and computes std::pow(beta, t) instead, which is not the product of t float32 multiplications:
    0.999f^6 is 0.99401504 by pow but 0.9940151 by repeated products. That one-ulp difference in the bias
    correction changes the first resumed update by ~1 ulp and the runs drift apart (a few 1e-5 in the loss
    after a handful of steps). The checkpoint holds the step count, not this product, so it cannot restore it.

    Fix: call the kernel for steps 1..t on empty tensors. Each call runs only IncrementStep (the update loop has
    no elements), in the same order FusedAdam.step uses (every step, each group with its betas), so the object
    ends with exactly the product the uninterrupted run has. Cost ~1.5 us per call: 900k steps x 2 groups ~3 s.
    The CUDA kernel derives the bias correction from the step alone and needs nothing.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import FusedAdam

    opt = base_optimizer(engine)
    if not isinstance(opt, FusedAdam) or get_accelerator().device_name() != "cpu":
        return 0
    steps = {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"] if "step" in opt.state[p]}
    if len(steps) > 1:
        # ZeRO 1/2 step every partition together; different counts mean per-parameter steps we cannot replay.
        raise ConfigError(f"optimizer state has different step counts per parameter {sorted(steps)}: cannot "
                          f"restore the CPU Adam kernel's bias-correction state exactly")
    last = steps.pop() if steps else 0
    empty = torch.empty(0)
    noop = torch.zeros(1, dtype=torch.int)
    groups = [g for g in opt.param_groups if g["params"]]
    for t in range(1, last + 1):
        for g in groups:
            beta1, beta2 = g["betas"]
            # lr, eps, weight decay only matter for elements, and there are none.
            opt.multi_tensor_adam(2048 * 32, noop, [[empty], [empty], [empty], [empty]], 0.0, beta1, beta2,
                                  g["eps"], t, opt.adam_w_mode, 1 if g["bias_correction"] else 0, 0.0)
    return last


def gather(obj) -> list:
    """Every rank's ``obj``, indexed by rank (a list of one when not distributed)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------
# Save / load


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep: int, rank: int) -> str:
    """Collective: every rank calls it. Saves tag step_N, then rank 0 prunes all but the newest ``keep``."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    if tdist.is_initialized():
        tdist.barrier()  # every rank has written its ZeRO partition before anything is deleted
    if rank == 0:
        for old in list_tags(ckpt_dir)[:-keep]:
            if old != tag:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    if tdist.is_initialized():
        tdist.barrier()
    return os.path.join(ckpt_dir, tag)


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[tuple[str, Optional[str]]]:
    """``train.resume`` -> (load_dir, tag) for engine.load_checkpoint, or None for a fresh start.

    ``auto``: output_dir/checkpoints if it has a ``latest``; ``none``: never; a path: either a
    checkpoints folder (with ``latest``) or one tag folder inside it.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return (ckpt_dir, None) if latest_tag(ckpt_dir) else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, "latest")):
        return path, None
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        return os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(os.path.join(path, "checkpoints")) and latest_tag(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    raise ConfigError(f"train.resume={resume!r}: not a checkpoints folder with a 'latest' file, nor a "
                      f"checkpoint tag folder holding {MODEL_STATES}")


def read_client_state(load_dir: str, tag: Optional[str]) -> dict:
    """Client state of a checkpoint without building an engine (for init_from checks)."""
    tag = tag or latest_tag(load_dir)
    path = os.path.join(load_dir, tag or "", MODEL_STATES)
    if tag is None or not os.path.isfile(path):
        raise ConfigError(f"no checkpoint found in {load_dir} (expected 'latest' and <tag>/{MODEL_STATES})")
    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd.pop("module", None)
    return sd


def load_weights(model: torch.nn.Module, init_from: str) -> dict:
    """Load consolidated fp32 weights (any ZeRO stage) into ``model``; return the source's client state.

    Only the weights: the optimizer, step, data position and RNG start fresh (phase 2 from phase 1).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    resolved = resolve_resume(init_from, init_from) if init_from not in ("auto", "none") else None
    if resolved is None:
        raise ConfigError(f"train.init_from={init_from!r} is not a checkpoint path")
    load_dir, tag = resolved
    tag = tag or latest_tag(load_dir)
    client = read_client_state(load_dir, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(f"train.init_from {load_dir}/{tag}: weights do not fit the model "
                          f"(model config differs?); missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shape mismatches: the model config differs from the checkpoint's
        raise ConfigError(f"train.init_from {load_dir}/{tag}: weights do not fit the model: {e}") from None
    return client
