"""CPU host workarounds, all of them, in one place. Nothing here runs on a CUDA host: the model and the
trainer import this module only when the device is the CPU (trainer.pretrain, trainer.engine,
trainer.checkpoint, trainer.dist each have one guarded call), and tests/test_gpu.py checks that on CUDA it
is never imported. Each workaround says what it fixes and what it costs; docs/cpu.md has the measurements.
It imports nothing of the project but the trainer's error types and its start-time half (cpu_start): callers
pass in what it works on, so it stays a leaf of the import graph that engine, dist and checkpoint may import
without a cycle.

1. Host allocator, and 6. py-cpuinfo asked once: trainer/cpu_start.py, which acts at a process's start,
   before torch is imported.
2. Dropout masks (`FastDropout`). torch draws a CPU dropout mask one single-threaded mt19937 number per
   element (~6 ns): BERT-base at B=8, S=128 drops 37 tensors, 38M elements per step, 16% of the step.
   numpy's PCG64 draws 16-bit uniforms at ~1 ns each, seeded from torch's generator, so torch.manual_seed
   and a checkpointed RNG state still fix every mask. Drop iff u < round(p * 2^16): p = 0.1 drops 6554/65536.
3. Attention with dropout (`softmax_attention`). SDPA's CPU kernels cannot drop probabilities: with
   dropout they run the same math with torch's slow mask (and in fp32). Written out here to use mask 2.
4. Adam's bias correction after a resume (`replay_adam_bias_correction`). DeepSpeed's CPU Adam kernel keeps
   beta^t as a running float32 product in a C++ object a new process does not have (0.999f^6 by std::pow
   is one ulp off the product), so the first resumed update would differ by ~1 ulp and runs drift apart.
   Replaying the kernel on empty tensors rebuilds the product exactly (~1.5 us per step and group).
5. Shared-memory allreduce buffers (`unlink_shm_buffer`). DeepSpeed's CPU comm creates a 69 MB
   /dev/shm/deepspeed_allreduce_buffer_* file per rank and never unlinks it; after every rank mapped them
   the names are not needed, so they are removed (the memory stays mapped until the process ends).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------
# 2, 3. Dropout masks and attention


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with a fast mask (see 2 above); F.dropout itself off the CPU."""
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    seed = int(torch.randint(0, 2**62, ()))
    u = np.random.Generator(np.random.PCG64(seed)).integers(0, 1 << 16, size=x.shape, dtype=np.uint16)
    # Viewed as int16, u becomes u - 2^15 (same order). keep = 1/(1-p) or 0, in x's dtype: one multiply.
    keep = torch.from_numpy(u.view(np.int16)).ge_(round(p * (1 << 16)) - (1 << 15))
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """nn.Dropout with the fast CPU mask (still an nn.Dropout for code that looks for one)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def softmax_attention(q, k, v, attn_mask, dropout_p: float):
    """bert.model.sdpa_attention's math written out so that dropout uses the fast mask; SDPA when there is
    no dropout (eval), which its CPU kernels do well. Precision as Megatron's bf16 path: scores are rounded
    to the compute dtype once, softmax accumulates in fp32. Scaling q first is exact for D = 64."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, N, S, S)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    return dropout(scores.softmax(-1), dropout_p, True) @ v  # (B, N, S, D)


def install_kernels(model: nn.Module) -> nn.Module:
    """Swap the CPU kernels into a model of bert.model (in place; the state dict is unchanged): every
    nn.Dropout becomes a FastDropout, every attention's kernel the softmax above. Returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p))
        if hasattr(parent, "attend"):
            parent.attend = softmax_attention
    return model


# ---------------------------------------------------------------------------------------------------
# 4. Adam's bias correction after a resume


def replay_adam_bias_correction(opt: torch.optim.Optimizer) -> int:
    """Bring the hidden beta^t state of DeepSpeed's CPU Adam kernel to where an uninterrupted run has it
    (see 4 above); returns the number of steps replayed (0 when ``opt`` is not the CPU FusedAdam). ``opt`` is
    the torch optimizer under DeepSpeed's wrappers (trainer.engine.base_optimizer), passed in so that this
    module imports nothing of the trainer.

    The kernel (csrc/includes/cpu_adam.h, Adam_Optimizer::IncrementStep) computes std::pow(beta, 1) on a
    process's first call, then beta_t *= beta in float32 on each following one. Calling it for steps 1..t on
    empty tensors runs only IncrementStep, in FusedAdam.step's order (every step, each group with its
    betas), so the object ends with exactly the product the uninterrupted run has."""
    from deepspeed.ops.adam import FusedAdam

    from trainer.errors import ConfigError

    if not isinstance(opt, FusedAdam):
        return 0
    # Every state entry, not the groups' params: ZeRO-3 points its groups at one sub-group's fp32 partition
    # only while that sub-group steps (empty lists otherwise), which made this replay nothing there.
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    if len(steps) > 1:
        # ZeRO steps every partition together; different counts mean per-parameter steps we cannot replay.
        raise ConfigError(f"optimizer state has different step counts per parameter {sorted(steps)}: cannot "
                          f"restore the CPU Adam kernel's bias-correction state exactly")
    last = steps.pop() if steps else 0
    empty = torch.empty(0)
    noop = torch.zeros(1, dtype=torch.int)
    for t in range(1, last + 1):
        for g in opt.param_groups:
            beta1, beta2 = g["betas"]
            # lr, eps, weight decay only matter for elements, and there are none.
            opt.multi_tensor_adam(2048 * 32, noop, [[empty], [empty], [empty], [empty]], 0.0, beta1, beta2,
                                  g["eps"], t, opt.adam_w_mode, 1 if g["bias_correction"] else 0, 0.0)
    return last


# ---------------------------------------------------------------------------------------------------
# 5. Shared-memory allreduce buffers


def shm_buffer_path(rank: int) -> str:
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's shared-memory allreduce buffer once every rank mapped them."""
    import torch.distributed as tdist

    tdist.barrier()
    try:
        os.remove(shm_buffer_path(rank))
    except FileNotFoundError:  # the shm op is not in use (ranks on several nodes, or not built)
        pass


def workarounds() -> str:
    """One log line naming what this module changes in this process."""
    from trainer.cpu_start import tcmalloc_loaded

    alloc = "tcmalloc" if tcmalloc_loaded() else "glibc"
    return (f"cpu host workarounds (trainer/cpu.py): {alloc} allocator, fast dropout masks, softmax attention "
            f"with dropout, CPU Adam beta^t replay on resume, shm buffer names unlinked")
