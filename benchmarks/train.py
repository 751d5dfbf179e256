"""`train`: a full training step of (a) our model through DeepSpeed, (b) our model in a plain torch loop,
(c) transformers' BertForPreTraining, timed interleaved in one process (benchmarks/steps.py).

On CPU that process has the host allocator our launchers give training (trainer/cpu.py) and (c0) is
transformers as users run it: a fresh process on glibc's malloc defaults, timed just before. The precision is
what pretraining would train in on this device (trainer.precision) unless --dtype says.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Optional

import torch

from benchmarks import steps
from benchmarks.peak import DTYPES, measure_peak
from benchmarks.project import projection
from benchmarks.report import REPO, ZERO2, bench_device, device_name, print_table, rss_mb
from bert import BertConfig
from trainer import engine as eng, metrics, precision


def _vocab_of(shards: str) -> int:
    from data.shards import read_manifest

    return int(read_manifest(shards)["tokenizer"]["vocab_size"])


def _config_and_batch(a) -> tuple[BertConfig, dict]:
    if a.data:  # the model takes the shards' vocabulary; the batch comes from the shards
        return BertConfig.preset(a.preset, vocab_size=_vocab_of(a.data)), steps.shard_batch(a.data, a.micro_batch)
    cfg = BertConfig.preset(a.preset, max_position_embeddings=max(512, a.seq))
    return cfg, steps.synthetic_batch(cfg, a.micro_batch, a.seq, a.max_pred)


def _dtype(a, device: torch.device) -> str:
    """--dtype, else what pretraining with --deepspeed would train in here."""
    if a.dtype:
        return a.dtype
    ds = eng.load_ds_config(a.deepspeed)
    return precision.decide(precision.requested(ds), precision.device_facts(device.type)).precision


def _host_allocator(choice: str, device: torch.device) -> str:
    """Set up and name this process's host allocator: "ours" is what the launchers do (tcmalloc, preloaded by
    launcher/bench.py when installed, else glibc keeping freed blocks), "default" leaves glibc untouched."""
    if device.type != "cpu":
        return "device"
    from trainer import cpu_start

    if cpu_start.tcmalloc_loaded():
        if choice == "default":
            raise SystemExit(f"--malloc default: this process runs on tcmalloc; start it with "
                             f"{cpu_start.CHOICE_ENV}=glibc")
        return "tcmalloc"
    return "glibc-keep" if choice == "ours" and cpu_start.keep_freed_memory() else "glibc-default"


def train_in_child(args: list[str], **run_kwargs) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """`train ARGS` in a fresh interpreter; its JSON result (None if it failed)."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "launcher", "bench.py"), "train", *args, "--json", "-"],
                       stdout=subprocess.PIPE, text=True, cwd=REPO, **run_kwargs)
    return p, json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None


def _untuned_hf_rows(a, peak: float, dtype: str) -> list[dict]:
    """(c0): `train --impl hf --malloc default` in a fresh process on glibc's malloc."""
    from trainer import cpu_start

    args = ["--impl", "hf", "--malloc", "default", "--preset", a.preset, "--seq", str(a.seq), "--micro-batch",
            str(a.micro_batch), "--max-pred", str(a.max_pred), "--dtype", dtype, "--warmup", str(a.warmup),
            "--repeats", str(a.repeats), "--peak-tflops", str(peak)] + (["--data", a.data] if a.data else [])
    p, res = train_in_child(args, env=cpu_start.glibc_env(dict(os.environ)))
    if res is None:
        raise RuntimeError(f"(c0) failed with exit code {p.returncode}: {' '.join(p.args)} (its error is above)")
    return [dict(r, impl="c0: transformers, own process, glibc malloc") for r in res["results"]]


def _impls(a, cfg: BertConfig, batch: dict, dtype: str, device: torch.device) -> list[steps.Impl]:
    """The implementations --impl asks for, (a) and (b) once per --unpad setting."""
    want, impls = a.impl.split(","), []
    for unpad in ([True, False] if a.unpad == "both" else [a.unpad == "on"]):
        tag = "" if a.unpad != "both" else (" (unpadded)" if unpad else " (padded)")
        if "ds" in want:
            impls.append(steps.Impl("a: ours+DeepSpeed" + tag,
                                    steps.ds_step(cfg, batch, a.deepspeed, dtype, unpad, device)))
        if "plain" in want:
            impls.append(steps.Impl("b: ours plain" + tag, steps.plain_step(cfg, batch, dtype, unpad, device)))
    if "hf" in want:
        hf = steps.hf_step(cfg, batch, dtype, device)
        if hf is None:
            print("transformers not installed: (c) and (c0) skipped")
        else:
            impls.append(steps.Impl("c: transformers", hf))
    return impls


def _row(im: steps.Impl, counts: dict, flops: float, peak: float, allocator: str, cuda: bool) -> dict:
    t = statistics.median(im.times)
    return {"impl": im.name, "step_s": t, "tokens_per_s": counts["tokens"] / t,
            "samples_per_s": counts["sequences"] / t, "tflops": flops / t / 1e12,
            "mfu": flops / t / 1e12 / peak, "faults_per_step": statistics.median(im.faults),
            "malloc": allocator, "times": im.times,
            **({"peak_mem_gb": im.peak_mem / 2 ** 30, "step_mem_gb": im.step_mem / 2 ** 30, "syncs_per_step": im.syncs}
               if cuda else {})}


def _ratios(by: dict) -> dict:
    """Tokens/s of (a) over (c), (c0) and (b), and DeepSpeed's step-time overhead over the plain loop."""
    ratios = {}
    for c in ("c", "c0"):
        if "a" in by and c in by:
            ratios[f"a/{c}"] = by["a"]["tokens_per_s"] / by[c]["tokens_per_s"]
    if "a" in by and "b" in by:
        ratios["a/b"] = by["a"]["tokens_per_s"] / by["b"]["tokens_per_s"]
        ratios["ds_overhead"] = by["a"]["step_s"] / by["b"]["step_s"] - 1.0
    return ratios


def _print_rows(rows: list[dict], ratios: dict, cuda: bool) -> None:
    cols = [("impl", "{}"), ("step_s", "{:.3f}"), ("tokens_per_s", "{:.1f}"), ("samples_per_s", "{:.2f}"),
            ("tflops", "{:.3f}"), ("mfu", "{:.1%}")]
    if cuda:
        cols += [("peak_mem_gb", "{:.1f}"), ("step_mem_gb", "{:.1f}"), ("syncs_per_step", "{}")]
    else:
        cols += [("faults_per_step", "{:.0f}")]
    print_table(rows, cols)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")


def run(a) -> dict:
    device = bench_device()
    cuda, dtype = device.type == "cuda", _dtype(a, device)
    peak = a.peak_tflops or measure_peak([dtype], None, 2.0, device)[dtype]
    # (c0) first, while this process is still small: run after it, the child was 20-80% slower and erratic
    # (2.4-4.9 s/step against 2.0-2.2 alone) while the parent held its three models.
    untuned = _untuned_hf_rows(a, peak, dtype) if "hf-default" in a.impl.split(",") and not cuda else []
    allocator = _host_allocator(a.malloc, device)
    cfg, batch = _config_and_batch(a)
    counts = steps.batch_counts(batch)
    impls = _impls(a, cfg, batch, dtype, device)
    steps.timed(impls, a.warmup, a.repeats, device)
    flops = metrics.step_flops(metrics.flop_counts(steps.meta_model(cfg)), counts["tokens"], counts["predictions"],
                               counts["sequences"], counts["seq_len"])
    rows = [_row(im, counts, flops, peak, allocator, cuda) for im in impls] + untuned
    by: dict = {}
    for r in rows:  # with --unpad both, (a) and (b) are their unpadded rows (listed first)
        by.setdefault(r["impl"].split(":")[0], r)
    ratios = _ratios(by)
    print(f"BERT-{a.preset}, seq {counts['seq_len']}, micro batch {a.micro_batch}, {dtype}, "
          f"{'shards ' + a.data if a.data else 'synthetic full-length'}; median of {a.repeats} interleaved steps; "
          f"peak {peak:.3f} TFLOPS ({dtype} matmul); {device_name(device)}; host allocator {allocator}")
    _print_rows(rows, ratios, cuda)
    # The paper's data is mostly full-length: project from synthetic full-length batches only.
    proj = projection(by["a"]["samples_per_s"], counts["seq_len"]) if "a" in by and a.preset == "large" \
        and not a.data else None
    if proj:
        print(f"the paper's BERT-large phase at seq {proj['seq']} ({proj['sequences']:.3g} sequences) at this rate: "
              f"{proj['device_hours']:,.0f} device-hours on {device_name(device)} (launcher/bench.py project sums "
              f"both)")
    return {"preset": a.preset, "seq": counts["seq_len"], "micro_batch": a.micro_batch, "dtype": dtype,
            "data": a.data or "synthetic", "flops_per_step": flops, "peak_tflops": peak, "counts": counts,
            "malloc": allocator, "results": rows, "ratios": ratios, "projection": proj, "peak_rss_mb": rss_mb()}


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="time a full training step: (a) DeepSpeed, (b) plain loop, (c) transformers")
    t.add_argument("--preset", default="base")
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--micro-batch", type=int, default=8)
    t.add_argument("--max-pred", type=int, default=20)
    t.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: what pretraining with --deepspeed trains in on this device (trainer.precision)")
    t.add_argument("--impl", default="ds,plain,hf,hf-default",
                   help="comma list of ds, plain, hf, hf-default (c0: transformers in an untuned process)")
    t.add_argument("--unpad", choices=["on", "off", "both"], default="on",
                   help="our model's unpadding (bert/padding.py); both: (a)/(b) each way")
    t.add_argument("--malloc", choices=["ours", "default"], default="ours",
                   help="CPU host allocator: as our launchers run (tcmalloc if installed, else glibc keeping freed "
                        "memory), or glibc's default (needs BERT_HOST_MALLOC=glibc)")
    t.add_argument("--data", default=None, help="shard folder for a real batch (default: synthetic full-length)")
    t.add_argument("--deepspeed", default=ZERO2)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured)")
    t.set_defaults(run=run)
