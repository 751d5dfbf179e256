"""`memory`: peak RSS of one rank per (preset, sequence length), each a few DeepSpeed steps of `train` in a
fresh process."""

from __future__ import annotations

import subprocess

from benchmarks.peak import DTYPES
from benchmarks.report import ZERO2, print_table
from benchmarks.train import train_in_child


def run(a) -> dict:
    """Peak RSS of one rank for each (preset, seq): a fresh process each, a few DeepSpeed steps."""
    rows = []
    for preset in a.presets.split(","):
        for seq in [int(s) for s in a.seqs.split(",")]:
            p, res = train_in_child(
                ["--preset", preset, "--seq", str(seq), "--micro-batch", str(a.micro_batch), "--impl", "ds",
                 "--warmup", "1", "--repeats", "1", "--max-pred", str(80 if seq > 128 else 20), "--peak-tflops", "1",
                 "--deepspeed", a.deepspeed] + (["--dtype", a.dtype] if a.dtype else []), stderr=subprocess.PIPE)
            if res is None:
                rows.append({"preset": preset, "seq": seq, "micro_batch": a.micro_batch, "peak_rss_mb": None,
                             "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"})
                continue
            rows.append({"preset": preset, "seq": seq, "micro_batch": a.micro_batch, "peak_rss_mb": res["peak_rss_mb"],
                         "step_s": res["results"][0]["step_s"], "dtype": res["dtype"]})
    print_table(rows, [("preset", "{}"), ("seq", "{}"), ("micro_batch", "{}"), ("dtype", "{}"),
                       ("peak_rss_mb", "{:.0f}"), ("step_s", "{:.2f}")])
    return {"results": rows}


def add_parser(sub) -> None:
    me = sub.add_parser("memory", help="peak RSS per rank for presets x sequence lengths")
    me.add_argument("--presets", default="base,large")
    me.add_argument("--seqs", default="128,512")
    me.add_argument("--micro-batch", type=int, default=8)
    me.add_argument("--dtype", choices=DTYPES, default=None)
    me.add_argument("--deepspeed", default=ZERO2)
    me.set_defaults(run=run)
