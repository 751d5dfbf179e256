"""Helpers shared by the tests (importable: pytest puts tests/ on sys.path). Fixtures live in conftest.py."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from bert import BertConfig
from common import processes
from trainer import precision
from trainer.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
# What this machine trains the shipped JSONs' fp16 request in (bf16 where the CPU has it natively, else fp32):
# tests expect the decision, not one machine's answer.
CPU_PRECISION = precision.decide("fp16", precision.device_facts("cpu")).precision


def tiny_config(**overrides):
    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=32)
    fields.update(overrides)
    return BertConfig(**fields)


def make_batch(config, B=4, S=12, P=4, seed=0):
    """Random batch with padding (row 1 and 2 shorter), both token types, and padded prediction slots."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (B, S), generator=g)
    lengths = torch.tensor([S, S - 4, S // 2, S - 1])[:B]
    attention_mask = (torch.arange(S)[None, :] < lengths[:, None]).long()  # (B, S)
    ids = ids * attention_mask  # pad id 0 after each sequence
    token_type_ids = ((torch.arange(S)[None, :] >= (lengths[:, None] // 2)) & attention_mask.bool()).long()
    positions = torch.stack([torch.randperm(int(n) - 1, generator=g)[:P] + 1 for n in lengths])  # (B, P)
    weights = torch.ones(B, P)
    weights[1, -1] = 0.0  # padded prediction slots: position 0, id 0, weight 0 (as the loader writes them)
    weights[2, -2:] = 0.0
    positions = positions * weights.long()
    mlm_ids = torch.randint(5, config.vocab_size, (B, P), generator=g) * weights.long()
    nsp = torch.randint(0, 2, (B,), generator=g)
    return dict(input_ids=ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                masked_lm_positions=positions, masked_lm_ids=mlm_ids, masked_lm_weights=weights,
                next_sentence_label=nsp)


# ---------------------------------------------------------------------------------------------------
# Processes


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str, args):
        self.returncode, self.stdout, self.stderr, self.args = returncode, stdout, stderr, args


class Procs:
    """Processes a test starts: each in its own process group (a new session, so a launcher's ranks and
    their DataLoader workers share it), stdout/stderr in files. ``wait`` has a bound: when it fires, every
    group is killed and the test fails with the tail of each process's logs. ``kill_all`` (the fixtures'
    finalizer) kills whatever is still alive, so no test leaves a process behind."""

    def __init__(self):
        self.started: list[tuple[subprocess.Popen, Path, Path]] = []

    def start(self, cmd, log: Path, *, env=None, cwd=REPO) -> subprocess.Popen:
        log = Path(log)
        out, err = log.with_suffix(log.suffix + ".out"), log.with_suffix(log.suffix + ".err")
        p = processes.start(cmd, out, err, env=env, cwd=cwd)
        self.started.append((p, out, err))
        return p

    def output(self, p: subprocess.Popen) -> tuple[str, str]:
        for q, out, err in self.started:
            if q is p:
                return out.read_text(errors="replace"), err.read_text(errors="replace")
        raise KeyError(p)

    def wait(self, procs: list[subprocess.Popen], timeout: float) -> list[int]:
        if not processes.wait_all(procs, timeout):
            tails = "\n".join(f"--- {' '.join(map(str, q.args))[:200]}\n{self._tail(q)}" for q in procs)
            self.kill_all()
            pytest.fail(f"timed out after {timeout:.0f}s; killed the process groups. Logs:\n{tails}")
        return [p.returncode for p in procs]

    def run(self, cmd, log: Path, *, env=None, cwd=REPO, timeout: float = 600, expect: int | None = 0) -> Result:
        """One process to its end (bounded); asserts its exit status unless expect is None."""
        p = self.start(cmd, log, env=env, cwd=cwd)
        self.wait([p], timeout)
        res = Result(p.returncode, *self.output(p), p.args)
        if expect is not None:
            assert res.returncode == expect, (f"exit {res.returncode} (expected {expect})\nSTDOUT\n{res.stdout[-3000:]}"
                                              f"\nSTDERR\n{res.stderr[-5000:]}")
        return res

    def _tail(self, p: subprocess.Popen, n: int = 3000) -> str:
        out, err = self.output(p)
        return f"[stdout]\n{out[-n:]}\n[stderr]\n{err[-n:]}"

    def kill_all(self) -> None:
        for p, _, _ in self.started:
            processes.stop_group(p)  # also when the leader is gone: its group (ranks, workers) may not be


# ---------------------------------------------------------------------------------------------------
# Training runs


def base_env(**extra) -> dict:
    """This environment without any rank or Slurm variable, one thread per process, unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


PRETRAIN = REPO / "launcher" / "pretrain.py"


def start_ranks(procs, tmp, ds, cfg, *overrides, world=2, name="ranks", script=PRETRAIN, **extra_env):
    """``world`` ranks of launcher/pretrain.py (or a ``script`` in its place) on this host (the env:// rendezvous
    torchrun would set up)."""
    import sys

    from trainer.dist import free_port

    env = base_env(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **extra_env)
    return [procs.start([sys.executable, script, "--deepspeed", ds, "--config", cfg, *overrides],
                        Path(tmp) / f"{name}{r}", env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]


def write_ds(tmp, name="zero2.json", micro=4, accum=1, lr=1e-3, fp16=True, stage=None, clip=1.0) -> str:
    """A copy of a shipped DeepSpeed JSON with a small batch (micro x accum per rank), lr, precision, stage."""
    import json

    ds = json.loads((REPO / "ds_configs" / name).read_text())
    ds.pop("train_batch_size", None)
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, gradient_clipping=clip)
    ds["optimizer"]["params"]["lr"] = lr
    if not fp16:
        ds.pop("fp16")
    if stage is not None:
        ds["zero_optimization"]["stage"] = stage
    path = Path(tmp) / f"ds_{name}_{micro}_{accum}_{lr}_{fp16}_{stage}_{clip}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def write_run(tmp, shards, out, model=None, data=None, **train) -> str:
    """A run YAML: tiny model on `shards`, output to `out`, small defaults overridden by `train`."""
    import yaml

    cfg = {"model": {"preset": "tiny", **(model or {})},
           "data": {"train": str(shards), "num_workers": 1, **(data or {})},
           "train": {"output_dir": str(out), "seed": 7, "max_steps": 4, "log_every": 1, "eval_every": 0,
                     "save_every": 100, "peak_tflops": 1.0, **train}}
    path = Path(tmp) / f"run_{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_records(out) -> dict:
    """step -> the training record of metrics.jsonl in a run folder."""
    return {r["step"]: r for r in read_records(Path(out) / "metrics.jsonl") if "loss" in r}


def damage(root, name, kind):
    """Damage one shard the way copies and disks do."""
    p = os.path.join(root, name)
    data = open(p, "rb").read()
    with tarfile.open(p) as tf:
        offsets = [m.offset for m in tf.getmembers()]
    if kind == "cut_0.1%":  # a copy interrupted near the end: the end-of-archive blocks and the last record part
        open(p, "wb").write(data[:len(data) - len(data) // 1000 - 1024 - 500])
    elif kind == "cut_half":
        open(p, "wb").write(data[:len(data) // 2])
    elif kind == "zero_byte":
        open(p, "wb").close()
    elif kind == "missing":
        os.remove(p)
    elif kind == "garbage_member":  # the first bytes of sample 5's record overwritten: it no longer decodes
        i = offsets[5] + 512
        open(p, "wb").write(data[:i] + b"\xff" * 40 + data[i + 40:])
    elif kind == "garbage_header":  # a member's header overwritten: tar ends there
        i = offsets[9]
        open(p, "wb").write(data[:i] + b"\xff" * 512 + data[i + 512:])
