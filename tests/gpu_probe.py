"""Probes that tests/test_gpu.py runs in a fresh process; each prints one JSON line of what it saw.

A fresh process because what they look at is per process: which modules were imported (pytest imports every
test module, trainer/cpu.py among them), whether the allocator was preloaded, whether a process group exists.

    python tests/gpu_probe.py overflow [--force-fp16]   fp16 engine from ds_configs/zero2.json; inf gradients
    python tests/gpu_probe.py host CKPT_DIR              an engine built, stepped, saved and resumed: which
                                                         CPU workarounds this process ran (trainer/cpu.py)

``--force-fp16`` lets a CPU run fp16 (DeepSpeed's CPU accelerator reports no fp16 and our precision decision
would pick bf16): the loss-scaling logic is then tested without a GPU. The host probe starts through
``trainer.launch.main``, exactly as every launcher does, so the tcmalloc re-exec happens if it would.
"""

from __future__ import annotations

import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo is installed (-e) or on PYTHONPATH;
# tests/ (helpers) is on the path as this script's folder

removed: list[str] = []  # files this process deleted, seen by an audit hook (the shm unlink is one)
sys.addaudithook(lambda event, args: removed.append(str(args[0])) if event == "os.remove" else None)

import torch  # noqa: E402

from trainer import launch  # noqa: E402

ZERO2 = os.path.join(REPO, "ds_configs", "zero2.json")


def _engine(fp16_facts, **fp16):
    """The engine pretraining builds from zero2.json as shipped (but a micro batch of 4 = the global batch),
    over a tiny BERT without dropout; ``fp16`` overrides keys of the JSON's fp16 block."""
    from helpers import make_batch, tiny_config
    from bert import BertForPreTraining
    from trainer import engine as eng, precision

    ds = eng.load_ds_config(ZERO2)
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=4)
    ds["fp16"].update(fp16)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    facts = fp16_facts or precision.device_facts(kind)
    resolved = eng.resolve(ds, ZERO2, facts, world=1)
    torch.manual_seed(0)
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(cfg)
    engine = eng.build_engine(model, resolved.ds)
    batch = {k: v.to(engine.device) for k, v in make_batch(cfg).items()}
    return resolved, model, engine, batch


def _step(engine, batch, poison: bool) -> dict:
    """One optimizer step; ``poison``: the loss times inf, so every gradient is inf or nan."""
    from trainer.engine import loss_scale

    weight = next(engine.module.parameters())
    before = weight.detach().clone()
    out = engine(**batch)
    engine.backward(out.loss * float("inf") if poison else out.loss)
    engine.step()
    return {"poisoned": poison, "overflow": bool(engine.optimizer.overflow), "loss_scale": loss_scale(engine),
            "skipped_steps": int(engine.skipped_steps), "weights_changed": not torch.equal(before, weight.detach())}


def overflow(force_fp16: bool) -> dict:
    from trainer import dist
    from trainer.guards import NonFiniteGuard
    from trainer.precision import DeviceFacts

    facts = None
    if force_fp16:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        acc.is_fp16_supported = lambda: True  # DeepSpeed's own check (engine sanity check) and ours below
        acc.supported_dtypes = lambda: [torch.float32, torch.float16, torch.bfloat16]
        facts = DeviceFacts(acc.device_name(), fast_fp16=True, native_bf16=False, detail="fp16 forced by the probe")
    dist.init()
    resolved, _, engine, batch = _engine(facts)
    # Shipped JSON: scale 2^16, hysteresis 2. The first overflow uses up hysteresis, the second halves the scale.
    steps = [_step(engine, batch, poison) for poison in (False, True, True, False)]
    # Scale pinned at its minimum (2^0 = min_loss_scale 1): DeepSpeed keeps skipping, the guard decides.
    _, _, engine, batch = _engine(facts, initial_scale_power=0)
    guard = NonFiniteGuard("fp16", max_consecutive=2, min_loss_scale=1.0)
    at_min = []
    for _ in range(4):
        s = _step(engine, batch, poison=True)
        s["verdict"] = guard.update(True, s["overflow"], s["loss_scale"])
        at_min.append(s)
        if s["verdict"]:
            break
    return {"precision": resolved.precision, "precision_line": resolved.decision.line, "device": engine.device.type,
            "steps": steps, "at_min_scale": at_min}


def host(ckpt_dir: str) -> dict:
    """Build, step, save and resume as pretraining does; report every CPU workaround's trace in this process."""
    from torch import nn

    from bert.model import sdpa_attention
    from trainer import checkpoint, dist, rng

    dist.init()
    resolved, model, engine, batch = _engine(None)
    _step(engine, batch, poison=False)
    meta = {"tokenizer_fingerprint": "probe", "max_seq_len": batch["input_ids"].shape[1],
            "model_config": model.config.to_dict()}
    ckpt = checkpoint.Checkpointer(ckpt_dir, keep=1, meta=meta)
    ckpt.register("rng", rng.Streams(), per_rank=True)
    path = ckpt.save(engine, 1)
    ckpt.load(engine, ckpt.plan((ckpt_dir, os.path.basename(path))))
    from deepspeed.accelerator import get_accelerator

    with open("/proc/self/maps") as f:
        maps = f.read()
    fn = lambda f: f"{f.__module__}.{f.__qualname__}"  # noqa: E731
    return {
        "device": engine.device.type,
        "precision": resolved.precision,
        "trainer_cpu_imported": "trainer.cpu" in sys.modules,
        "dropout_types": sorted({fn(type(m)) for m in model.modules() if isinstance(m, nn.Dropout)}),
        "attend": sorted({fn(m.attend) for m in model.modules() if hasattr(m, "attend")}),
        "sdpa_attention": fn(sdpa_attention),
        "tcmalloc_mapped": "libtcmalloc" in maps,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "host_malloc_env": os.environ.get("BERT_HOST_MALLOC"),
        "shm_unlinked": [p for p in removed if "deepspeed_allreduce_buffer" in p],
        "shm_buffers": glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*"),
        "fused_adam_builder": type(get_accelerator().create_op_builder("FusedAdamBuilder")).__module__,
        "optimizer": type(engine.optimizer).__name__,
    }


def main(argv: list[str]) -> int:
    if argv[0] == "overflow":
        report = overflow("--force-fp16" in argv[1:])
    elif argv[0] == "host":
        report = host(argv[1])
    else:
        raise SystemExit(f"unknown probe {argv[0]!r}")
    print("PROBE " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch.main(lambda argv: main(sys.argv[1:])))
