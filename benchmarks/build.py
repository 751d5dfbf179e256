"""`build`: output tokens/s per core of the shard builder (data.build)."""

from __future__ import annotations

import os
import tempfile
import time

from benchmarks.report import children_cpu, print_table
from data.build import BuildSettings, build
from data.tokenizer import load_tokenizer


def run(a) -> dict:
    """Output tokens/s of one build of the corpus, per core and per CPU-second (its workers' included)."""
    tok = load_tokenizer(a.tokenizer)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        cpu0 = children_cpu() + time.process_time()
        m = build(a.input, tok, os.path.join(out, "shards"),
                  BuildSettings(max_seq_len=a.seq, max_predictions=a.max_pred), workers=a.workers, progress=False)
        wall = time.perf_counter() - t0
        cpu = children_cpu() + time.process_time() - cpu0
    tokens = m["stats"]["tokens"]
    row = {"workers": a.workers, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "tokens_per_s_per_core": tokens / wall / a.workers, "tokens_per_cpu_s": tokens / cpu}
    print_table([row], [("workers", "{}"), ("tokens", "{:.0f}"), ("wall_s", "{:.1f}"),
                        ("tokens_per_s_per_core", "{:.0f}"), ("tokens_per_cpu_s", "{:.0f}")])
    return {"input": a.input, "results": [row]}


def add_parser(sub) -> None:
    bu = sub.add_parser("build", help="output tokens/s per core of data.build")
    bu.add_argument("--input", action="append", required=True)
    bu.add_argument("--tokenizer", required=True)
    bu.add_argument("--workers", type=int, default=1)
    bu.add_argument("--seq", type=int, default=128)
    bu.add_argument("--max-pred", type=int, default=20)
    bu.set_defaults(run=run)
