"""`loader`: samples/s of the training loader from real shards, per worker count, beside the record decode
alone."""

from __future__ import annotations

import time

from benchmarks.report import print_table
from data import shards
from data.loader import PretrainLoader


def run(a) -> dict:
    """Samples/s of the training loader; the first batch (worker start-up, the first block's read) apart."""

    t0 = time.perf_counter()
    n = sum(1 for _ in shards.iter_examples(a.data, "train"))  # the record decode alone: no order, no collate
    dt = time.perf_counter() - t0
    rows = [{"workers": "decode only", "samples": n, "first_batch_s": None, "samples_per_s": n / dt,
             "samples_per_s_per_core": n / dt}]
    for workers in [int(w) for w in a.workers.split(",")]:
        loader = PretrainLoader(a.data, "train", a.micro_batch, num_workers=workers, seed=0,
                                dynamic_masking=a.dynamic_masking)
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        t0, n = time.perf_counter(), 0
        for _ in range(a.batches):
            n += next(it)["input_ids"].shape[0]
        dt = time.perf_counter() - t0
        rows.append({"workers": workers, "first_batch_s": first, "samples_per_s": n / dt,
                     "samples_per_s_per_core": n / dt / max(1, workers)})
        del it, loader
    print_table(rows, [("workers", "{}"), ("first_batch_s", "{:.2f}"), ("samples_per_s", "{:.0f}"),
                       ("samples_per_s_per_core", "{:.0f}")])
    return {"data": a.data, "micro_batch": a.micro_batch, "dynamic_masking": a.dynamic_masking, "results": rows}




def add_parser(sub) -> None:
    lo = sub.add_parser("loader", help="samples/s of the training loader from real shards")
    lo.add_argument("--data", required=True)
    lo.add_argument("--micro-batch", type=int, default=64)
    lo.add_argument("--workers", default="0,1,2")
    lo.add_argument("--batches", type=int, default=300)
    lo.add_argument("--dynamic-masking", action="store_true")
    lo.set_defaults(run=run)
