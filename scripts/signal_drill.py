"""Stop-signal drill: SIGTERM / SIGUSR1 delivered at random moments to a 2-rank CPU pretraining run; every run
must exit 0 with a checkpoint and its resumption must reproduce an uninterrupted run exactly (per-step losses,
learning rates and sample keys). Any hang is a failure: every wait is bounded, and what is left is killed.

    python scripts/signal_drill.py --shards SHARDS --out DIR [--runs 30] [--seed 0] [--json report.json]

Moments (cycled through, each with a random delay): ``rank`` (rank 1's process, mid-training), ``group``
(rank 1's whole process group: its DataLoader workers too, as Slurm and the deepspeed launcher signal),
``validation`` (right after the step that starts a validation pass), ``save`` (while a checkpoint is
written), ``first_step`` (after start-up, before or in the first step). tests/test_signals.py runs one of
each; docs/pretrain.md has the result of a 30-run drill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import processes
from trainer.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
MOMENTS = ("rank", "group", "validation", "save", "first_step")
TRAIN = dict(max_steps=8, warmup_steps=2, log_every=1, eval_every=5, eval_batches=4, save_every=3,
             keep_checkpoints=2, log_batch_keys=True, peak_tflops=1.0, seed=7, collective_timeout=120)
COMPARED = ("loss", "mlm_loss", "nsp_loss", "lr", "keys", "samples_seen", "tokens_seen")
BOUND_S = 300  # longest any run may take before the drill calls it a hang


class Hang(RuntimeError):
    pass


def _files(tmp: Path, shards: str, out: Path) -> tuple[str, str]:
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.pop("train_batch_size")
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    ds["optimizer"]["params"]["lr"] = 1e-3
    ds_path, cfg_path = tmp / "ds.json", tmp / f"run_{out.name}.yaml"
    ds_path.write_text(json.dumps(ds))
    cfg_path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"train": shards, "num_workers": 1},
                                        "train": {"output_dir": str(out), **TRAIN}}))
    return str(ds_path), str(cfg_path)


def start_ranks(tmp: Path, shards: str, out: Path, tag: str, port: int) -> list[subprocess.Popen]:
    """Two ranks as torchrun/srun would start them (RANK etc. in the environment), each its own group."""
    ds, cfg = _files(tmp, shards, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = []
    for r in range(2):
        ranks.append(processes.start([sys.executable, REPO / "launcher" / "pretrain.py", "--deepspeed", ds,
                                      "--config", cfg], tmp / f"{out.name}_{tag}_rank{r}.log",
                                     env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
    return ranks


def kill_groups(ranks: list[subprocess.Popen]) -> None:
    for p in ranks:
        processes.stop_group(p)


def wait_ranks(ranks: list[subprocess.Popen], bound: float = BOUND_S) -> list[int]:
    if not processes.wait_all(ranks, bound):
        kill_groups(ranks)
        raise Hang(f"a rank did not exit within {bound:.0f}s (killed)")
    return [p.returncode for p in ranks]


def records(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    return {r["step"]: r for r in read_records(path) if "loss" in r} if path.exists() else {}


def wait_until(cond, ranks, what: str, bound: float = BOUND_S) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        if any(p.poll() is not None for p in ranks):
            raise RuntimeError(f"a rank ended before {what}")
        if time.monotonic() > deadline:
            kill_groups(ranks)
            raise Hang(f"never reached {what} within {bound:.0f}s")
        time.sleep(0.01)


def deliver(moment: str, rng: random.Random, ranks, out: Path, log0: Path) -> tuple[int, str]:
    """Wait for the moment, then send the signal; returns (signal number, when it was sent)."""
    sig = rng.choice([signal.SIGTERM, signal.SIGUSR1])
    if moment == "first_step":
        wait_until(lambda: "starting from step 0" in log0.read_text(errors="replace"), ranks, "the start")
        time.sleep(rng.uniform(0, 0.5))
    elif moment == "validation":
        wait_until(lambda: TRAIN["eval_every"] in records(out), ranks, "validation")
    elif moment == "save":
        wait_until(lambda: TRAIN["save_every"] in records(out), ranks, "a checkpoint save")
        time.sleep(rng.uniform(0, 0.05))
    else:
        step = rng.randint(1, TRAIN["max_steps"] - 2)
        wait_until(lambda: step in records(out), ranks, f"step {step}")
        time.sleep(rng.uniform(0, 0.3))
    target = ranks[1] if moment in ("rank", "group") else ranks[rng.randrange(2)]
    if moment == "group":
        os.killpg(target.pid, sig)
    else:
        target.send_signal(sig)
    return sig, f"after step {max(records(out), default=0)}"


def drill_one(tmp: Path, shards: str, i: int, moment: str, rng: random.Random, ref: dict, port: int) -> dict:
    out = tmp / f"drill{i:02d}"
    ranks = start_ranks(tmp, shards, out, "first", port)
    try:
        sig, when = deliver(moment, rng, ranks, out, tmp / f"{out.name}_first_rank0.log")
        codes = wait_ranks(ranks)
    finally:
        kill_groups(ranks)
    latest = out / "checkpoints" / "latest"
    result = {"run": i, "moment": moment, "signal": signal.Signals(sig).name, "sent": when, "exit": codes,
              "checkpoint": latest.read_text().strip() if latest.exists() else None}
    problems = []
    if codes != [0, 0]:
        problems.append(f"exit codes {codes}")
    if result["checkpoint"] is None:
        problems.append("no checkpoint")
    if not problems:  # resume and compare with the uninterrupted run
        ranks = start_ranks(tmp, shards, out, "resume", port + 1)
        try:
            codes = wait_ranks(ranks)
        finally:
            kill_groups(ranks)
        got = records(out)
        if codes != [0, 0]:
            problems.append(f"resume exit codes {codes}")
        elif sorted(got) != sorted(ref):
            problems.append(f"resumed steps {sorted(got)} != {sorted(ref)}")
        else:
            bad = [(s, k) for s in ref for k in COMPARED if got[s][k] != ref[s][k]]
            if bad:
                problems.append(f"differs from the uninterrupted run at {bad[:3]}")
    result["ok"] = not problems
    result["problems"] = problems
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="shard folder (tiny preset, e.g. the tests' seq-64 shards)")
    ap.add_argument("--out", required=True, help="work folder (run folders and logs)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=29600)
    ap.add_argument("--json", default=None, help="write the report here")
    a = ap.parse_args(argv)
    tmp = Path(a.out)
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    t0 = time.time()
    ranks = start_ranks(tmp, a.shards, tmp / "reference", "first", a.port)
    try:
        if wait_ranks(ranks) != [0, 0]:
            print(f"drill: the reference run failed; see {tmp}/reference_first_rank0.log", file=sys.stderr)
            return 1
    finally:
        kill_groups(ranks)
    ref = records(tmp / "reference")
    results = []
    for i in range(a.runs):
        moment = MOMENTS[i % len(MOMENTS)]
        try:
            res = drill_one(tmp, a.shards, i, moment, rng, ref, a.port + 2 + 2 * i)
        except (Hang, RuntimeError) as e:
            res = {"run": i, "moment": moment, "ok": False, "problems": [str(e)]}
        results.append(res)
        print(f"drill {i + 1}/{a.runs}: {moment:<10} {res.get('signal', '?'):<7} {res.get('sent', ''):<14} "
              f"-> {res.get('checkpoint')}: {'ok' if res['ok'] else '; '.join(res['problems'])}", flush=True)
    failed = [r for r in results if not r["ok"]]
    report = {"runs": a.runs, "failed": len(failed), "hangs": sum("within" in " ".join(r["problems"]) for r in failed),
              "seconds": round(time.time() - t0), "results": results}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    print(f"drill: {a.runs - len(failed)}/{a.runs} runs stopped with a checkpoint and resumed exactly, "
          f"{report['hangs']} hangs, in {report['seconds']}s; logs in {tmp}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
