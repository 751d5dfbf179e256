"""`project`: device-hours of the paper's BERT-large run, from measured `train` rates and from published
anchors (labelled as such: not measured here)."""

from __future__ import annotations

import json
from typing import Optional

from benchmarks.report import print_table
from benchmarks.steps import meta_model
from bert import BertConfig
from data.pretraining import num_to_predict
from trainer import metrics

# The paper's BERT-large run (Devlin et al.): 1M steps of 256 sequences, 90% at seq 128 then 10% at 512.
PAPER_RUN = {128: 0.9 * 1_000_000 * 256, 512: 0.1 * 1_000_000 * 256}  # sequences per phase
PAPER_MAX_PRED = {128: 20, 512: 80}  # Google's max_predictions_per_seq of each phase
# Published BERT-large pretraining rates per device (REFERENCE.md section 7), projected beside ours.
# Not measured here: a row says where its number comes from, and how it became sequences/s.
ANCHORS = [
    {"device": "A100-80GB", "source": "NVIDIA DeepLearningExamples BERT-large, mixed precision (published)",
     "samples_per_s": {128: 580.0, 512: 78.0}},
    {"device": "V100", "source": "DeepSpeed bing_bert BERT-large, sparse MLM + fused kernels + pre-LN (published "
     "TFLOPS / our FLOPs per full-length sequence)", "tflops": {128: 64.0, 512: 53.0}},
]
PAPER_LINE = "the paper's run (900k steps x 256 x 128 tokens + 100k x 256 x 512)"


def projection(samples_per_s: float, seq: int) -> Optional[dict]:
    """GPU(or device)-hours of the paper's phase at this sequence length, at ``samples_per_s`` per device."""
    if seq not in PAPER_RUN or samples_per_s <= 0:
        return None
    return {"seq": seq, "sequences": PAPER_RUN[seq], "device_hours": PAPER_RUN[seq] / samples_per_s / 3600}


def sequence_flops(cfg: BertConfig, seq: int, max_pred: int) -> float:
    """Training FLOPs of one full-length sequence with Google's prediction count (the benchmarks' formula)."""
    return metrics.step_flops(metrics.flop_counts(meta_model(cfg)), seq, num_to_predict(seq, max_pred, 0.15), 1, seq)


def anchor_rows() -> list[dict]:
    """The published anchors as device-hours of the paper's run (labelled: derived from published numbers)."""
    cfg = BertConfig.preset("large")
    rows = []
    for anchor in ANCHORS:
        rate = dict(anchor.get("samples_per_s") or {})
        for seq, tflops in (anchor.get("tflops") or {}).items():
            rate[seq] = tflops * 1e12 / sequence_flops(cfg, seq, PAPER_MAX_PRED[seq])
        hours = {seq: projection(rate[seq], seq)["device_hours"] for seq in PAPER_RUN}
        rows.append({"device": anchor["device"], "source": anchor["source"], "samples_per_s_128": rate[128],
                     "samples_per_s_512": rate[512], "phase1_h": hours[128], "phase2_h": hours[512],
                     "total_h": hours[128] + hours[512]})
    return rows


def measured_phases(paths: list[str]) -> list[dict]:
    """Each `train --preset large` result on synthetic full-length batches as the device-hours of its phase."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        ours = next(r for r in res["results"] if r["impl"].startswith("a:"))
        proj = projection(ours["samples_per_s"], res["seq"])
        if res["preset"] == "large" and proj and res.get("data", "synthetic") == "synthetic":
            rows.append({"device": res["machine"]["device"], "dtype": res["dtype"], "seq": res["seq"],
                         "samples_per_s": ours["samples_per_s"], "device_hours": proj["device_hours"]})
    return rows


def paper_runs(phases: list[dict]) -> list[dict]:
    """The whole paper run per (device, dtype) that has both phases measured."""
    by_key: dict = {}
    for r in phases:
        by_key.setdefault((r["device"], r["dtype"]), {})[r["seq"]] = r
    return [{"device": device, "dtype": dtype, "phase1_h": ph[128]["device_hours"],
             "phase2_h": ph[512]["device_hours"], "total_h": sum(p["device_hours"] for p in ph.values())}
            for (device, dtype), ph in by_key.items() if set(ph) == set(PAPER_RUN)]


def run(a) -> dict:
    """Device-hours of the paper's full BERT-large run from `train --preset large` results at seq 128 and 512,
    beside the same projection of the published anchors (ANCHORS)."""
    anchors = anchor_rows()
    print(f"published anchors (derived from published numbers, NOT measured here), {PAPER_LINE}:")
    print_table(anchors, [("device", "{}"), ("samples_per_s_128", "{:.0f}"), ("samples_per_s_512", "{:.0f}"),
                          ("phase1_h", "{:,.0f}"), ("phase2_h", "{:,.0f}"), ("total_h", "{:,.0f}")])
    for r in anchors:
        print(f"  {r['device']}: {r['source']}")
    rows = measured_phases(a.results)
    table = paper_runs(rows)
    if rows:
        print_table(rows, [("device", "{}"), ("dtype", "{}"), ("seq", "{}"), ("samples_per_s", "{:.1f}"),
                           ("device_hours", "{:,.0f}")])
    if table:
        print(f"measured here, {PAPER_LINE}:")
        print_table(table, [("device", "{}"), ("dtype", "{}"), ("phase1_h", "{:,.0f}"), ("phase2_h", "{:,.0f}"),
                            ("total_h", "{:,.0f}")])
    elif a.results:
        print("measured here: no device has `train --preset large` results at both seq 128 and 512 yet")
    return {"phases": rows, "paper_run": table, "anchors": anchors}


def add_parser(sub) -> None:
    pr = sub.add_parser("project", help="device-hours of the paper's BERT-large run from `train` results")
    pr.add_argument("results", nargs="*", help="train JSONs of --preset large at --seq 128 and 512 (none: the "
                                               "published anchors only)")
    pr.set_defaults(run=run)
