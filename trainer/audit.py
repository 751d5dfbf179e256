"""Sample accounting: each step records a digest of the samples it trained on, and ``python -m trainer.audit
RUN_DIR`` proves from the run folder alone that every step trained exactly the samples the loader's plan gives
it (across restarts, preemptions, world-size changes and rollbacks), so every sample of an epoch was trained
on once, except the ranges skipped on record (trainer.rollback) and the remainder an epoch drops by design (it
uses whole global batches) — or names the first step where that is not so.

Recording (``StepDigests``, a callback of every Trainer): a sample's id is its place in the shards' manifest
order (data.loader batches carry ``ids``); its hash is a 48-bit mix of the id; a step's digest is the sum of
its samples' hashes mod 2^48, so it does not depend on which rank or micro-batch trained a sample. Each rank
sums its own samples' hashes as two 24-bit halves (exact in the float64 of the per-step agreement while a step
holds under 2^29 samples: 2^29 x 2^24 = 2^53), the agreement sums them over ranks (no extra collective), and
the digests of the steps since the last log line go into that line (``samples_digest``: [[step, digest],
...]); the not yet logged ones are checkpointed (registered as "audit"), so a resume loses none.

Checking: the plan is rebuilt from the run's ``config.yaml`` (seed, shards), ``ds_config.json`` (global
batch) and the shards' manifest — no shard is read; step ``s`` holds logical positions [(s-1) G, s G),
mapped past the skipped ranges of the rollback records to stream positions and so to ids. A step whose
recorded digest differs is named, with the step whose samples it holds instead when there is one (a batch
trained twice, or one dropped). Samples lost to damaged shards are not trained either: such a step is named
too (its metrics line counts the loss under ``data/``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

from trainer.callbacks.base import Callback

_MASK24 = (1 << 24) - 1
_MASK48 = (1 << 48) - 1


def sample_hashes(ids) -> np.ndarray:
    """48-bit hashes of sample ids (a multiply-xorshift mix, as in splitmix64); uint64 arithmetic wraps mod 2^64."""
    x = np.asarray(ids, np.int64).astype(np.uint64).reshape(-1)
    x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(29)
    return x & np.uint64(_MASK48)


def halves(ids) -> tuple[float, float]:
    """(sum of the low 24 bits, sum of the high 24 bits) of the hashes of ``ids``: what a rank adds to the
    agreement."""
    h = sample_hashes(ids)
    return float(int((h & np.uint64(_MASK24)).sum())), float(int((h >> np.uint64(24)).sum()))


def digest(lo: float, hi: float) -> int:
    """The step digest from the halves summed over ranks: (lo + 2^24 hi) mod 2^48."""
    return (int(lo) + (int(hi) << 24)) & _MASK48


def digest_of(ids) -> int:
    return digest(*halves(ids))


class StepDigests(Callback):
    """Records every step's digest (see the module docstring). ``local`` is this rank's halves of the step just
    taken, for the trainer's agreement; ``add`` takes the sums over ranks."""

    def __init__(self):
        self.local: tuple[float, float] = (0.0, 0.0)
        self.pending: list[list[int]] = []  # [step, digest] not yet in a log line

    def on_step_end(self, trainer, batches: list[dict], window) -> None:
        self.local = halves([i for b in batches if not b["is_padding"] for i in b.get("ids", ())])

    def add(self, step: int, lo: float, hi: float) -> None:
        self.pending.append([step, digest(lo, hi)])

    def on_log(self, trainer, record: dict, sums: dict, elapsed: float) -> None:
        record["samples_digest"], self.pending = self.pending, []

    def state_dict(self) -> dict:
        return {"pending": [list(p) for p in self.pending]}

    def load_state_dict(self, sd: dict) -> None:
        self.pending = [[int(s), int(d)] for s, d in sd["pending"]]


# ---------------------------------------------------------------------------------------------------
# The check


def recorded(records: list[dict]) -> tuple[dict[int, int], list[tuple[int, int]], int]:
    """(step -> recorded digest, skipped stream ranges of the rollback records, rollbacks) of metrics records."""
    digests, skips, rollbacks = {}, [], 0
    for r in records:
        for step, d in r.get("samples_digest", ()):
            digests[int(step)] = int(d)
        if "rollback" in r:
            rollbacks += 1
            skips.append(tuple(r["rollback"]["skip"]))
    return digests, skips, rollbacks


def expected(loader, global_batch: int, steps: int) -> list[int]:
    """The digest each step 1..``steps`` must have under ``loader``'s plan and skips (data.loader)."""
    ids = loader.ids_at(np.arange(steps * global_batch, dtype=np.int64))
    return [digest_of(ids[s * global_batch:(s + 1) * global_batch]) for s in range(steps)]


def check(records: list[dict], loader, global_batch: int) -> tuple[bool, str]:
    """(accounted, one summary line) of a run's metrics records against a training ``loader`` of the run's
    seed and shards (no skips of its own: the records' are added here)."""
    digests, skips, rollbacks = recorded(records)
    loader.skip(skips)
    steps = max(digests, default=0)
    if steps == 0:
        return False, "no step digests recorded (metrics.jsonl has no samples_digest)"
    want = expected(loader, global_batch, steps)
    by_digest = {d: s + 1 for s, d in enumerate(want)}
    for s in range(1, steps + 1):
        if s not in digests:
            return False, f"step {s}: no digest recorded (its log line is missing)"
        if digests[s] != want[s - 1]:
            other = by_digest.get(digests[s])
            why = (f"it trained the samples of step {other} (a batch {'repeated' if other < s else 'dropped'})"
                   if other else "its samples are not the plan's (a batch repeated, dropped, or lost to damage)")
            return False, f"step {s}: {why}"
    skipped = sum(b - a for a, b in loader.skips)
    epochs = loader.stream_position(steps * global_batch - 1) // loader.samples_per_epoch + 1
    return True, (f"accounted: steps 1-{steps} trained {steps * global_batch} samples, each once in its epoch "
                  f"(epochs 0-{epochs - 1} of {loader.samples_per_epoch} used samples of {loader.num_samples}); "
                  f"{skipped} skipped on record in {rollbacks} rollback(s)")


def audit_run(run_dir: str, shards: Optional[str] = None) -> tuple[bool, str]:
    """``check`` of a run folder: its metrics.jsonl, config.yaml, ds_config.json and the shards' manifest."""
    from common import files
    from data.loader import PretrainLoader
    from trainer.metrics import read_records

    cfg = files.read_yaml(os.path.join(run_dir, "config.yaml"), "run config")
    ds = files.read_json(os.path.join(run_dir, "ds_config.json"), "DeepSpeed config")
    g = int(ds["train_batch_size"])
    loader = PretrainLoader(shards or cfg["data"]["train"], "train", g, seed=int(cfg["train"]["seed"]),
                            num_workers=0, shuffle=True, loop=True, global_batch=g)
    return check(read_records(os.path.join(run_dir, "metrics.jsonl")), loader, g)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a pretraining run folder (train.output_dir)")
    p.add_argument("--shards", help="the training shard folder, when it moved since the run (default: the "
                                    "run's data.train)")
    a = p.parse_args(argv)
    ok, line = audit_run(a.run_dir, a.shards)
    print(line if ok else f"not accounted: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    from common.errors import run_main

    sys.exit(run_main(main, sys.argv[1:]))
