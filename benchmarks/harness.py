"""Benchmarks: training step vs transformers and the plain loop, device matmul peak, loader, builder, memory,
and the cost of the paper's BERT-large run projected from measured rates.

Everything prints a table and writes JSON; nothing here asserts a speed (speed is measured, not tested).
Run through `python launcher/bench.py {train,peak,loader,build,wikidump,memory,project} ...`.

`train` runs (a) our model through the DeepSpeed engine exactly as pretraining builds it, (b) our model in a
plain torch loop, (c) transformers' BertForPreTraining (SDPA, autocast, torch's AdamW, fused on CUDA) in ONE
process and interleaves their timed steps (a b c a b c ...), so a noisy machine slows them alike and the
ratios hold. On CPU that process has the host allocator our launchers give training (trainer/cpu.py) and
(c0) is transformers as users run it: a fresh process on glibc's malloc defaults, timed just before. The
precision is what pretraining would train in on this device (trainer.precision) unless --dtype says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from bert import BertConfig, BertForPreTraining
from data.pretraining import num_to_predict
from trainer import engine as eng, metrics, precision

DTYPES = ("fp32", "bf16", "fp16")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The paper's BERT-large run (Devlin et al.): 1M steps of 256 sequences, 90% at seq 128 then 10% at 512.
PAPER_RUN = {128: 0.9 * 1_000_000 * 256, 512: 0.1 * 1_000_000 * 256}  # sequences per phase
PAPER_MAX_PRED = {128: 20, 512: 80}  # Google's max_predictions_per_seq of each phase
# Published BERT-large pretraining rates per device (REFERENCE.md section 7), projected beside ours by `project`.
# Not measured here: a row says where its number comes from, and how it became sequences/s.
ANCHORS = [
    {"device": "A100-80GB", "source": "NVIDIA DeepLearningExamples BERT-large, mixed precision (published)",
     "samples_per_s": {128: 580.0, 512: 78.0}},
    {"device": "V100", "source": "DeepSpeed bing_bert BERT-large, sparse MLM + fused kernels + pre-LN (published "
     "TFLOPS / our FLOPs per full-length sequence)", "tflops": {128: 64.0, 512: 53.0}},
]


def _built_on_device():
    """Where the models are built: on a GPU directly (BERT-large's random init on the host took seconds per
    model, three models per run); on a CPU as before."""
    return torch.device(DEVICE) if DEVICE.type == "cuda" else contextlib.nullcontext()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    facts = precision.cpu_facts()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores ({facts.detail})"


# ---------------------------------------------------------------------------------------------------
# Batches


def synthetic_batch(cfg: BertConfig, micro: int, seq: int, max_pred: int, seed: int = 0) -> dict:
    """Full-length sequences with Google's prediction count: clean, padding-free comparisons."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (micro, seq), generator=g)  # (B, S)
    tt = torch.zeros_like(ids)
    tt[:, seq // 2:] = 1
    n_pred = num_to_predict(seq, max_pred, 0.15)  # 128 -> 19, 512 -> 77
    pos = torch.stack([torch.randperm(seq - 2, generator=g)[:n_pred] + 1 for _ in range(micro)]).sort(1).values
    positions = torch.zeros(micro, max_pred, dtype=torch.long)
    positions[:, :n_pred] = pos
    weights = torch.zeros(micro, max_pred)
    weights[:, :n_pred] = 1.0
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": torch.ones_like(ids),
            "masked_lm_positions": positions,
            "masked_lm_ids": torch.randint(5, cfg.vocab_size, (micro, max_pred), generator=g),
            "masked_lm_weights": weights, "next_sentence_label": torch.randint(0, 2, (micro,), generator=g)}


def shard_batch(shards: str, micro: int) -> dict:
    """A real batch from shards (padding and masking exactly as training sees them)."""
    from data.loader import PretrainLoader, model_inputs

    loader = PretrainLoader(shards, "train", micro, num_workers=0, seed=0)
    return model_inputs(next(iter(loader)))


def batch_counts(batch: dict) -> dict:
    return {"tokens": float(batch["attention_mask"].sum()), "predictions": float(batch["masked_lm_weights"].sum()),
            "sequences": float(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1])}


# ---------------------------------------------------------------------------------------------------
# The implementations, each a zero-argument "one full training step" closure


def _loop_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], dtype: str) -> Callable[[], float]:
    """One plain-torch training step: autocast forward (loss scaling for fp16), backward, clip 1.0, torch's
    AdamW (fused on CUDA) with BERT's settings."""
    fused = {"fused": True} if DEVICE.type == "cuda" else {}
    opt = torch.optim.AdamW(eng.param_groups(model), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                            **fused)
    amp = dtype != "fp32"
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=dtype == "fp16")

    def step() -> float:
        with torch.autocast(DEVICE.type, dtype=eng.torch_dtype(dtype), enabled=amp):
            loss = forward()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()
    return step


def _plain_step(cfg: BertConfig, batch: dict, dtype: str, unpad: bool) -> Callable[[], float]:
    """(b) our model (with the host's kernels, as trainer.engine builds it), plain torch loop."""
    torch.manual_seed(0)
    with _built_on_device():
        model = BertForPreTraining(cfg).to(DEVICE).train()
    model.unpad = unpad
    if DEVICE.type == "cpu":
        from trainer import cpu

        cpu.install_kernels(model)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    return _loop_step(model, lambda: model(**batch).loss, dtype)


def _hf_step(cfg: BertConfig, batch: dict, dtype: str) -> Optional[Callable[[], float]]:
    """(c) transformers' BertForPreTraining: same config, SDPA attention, same batch and masks, AdamW."""
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hcfg = transformers.BertConfig(**cfg.to_dict(), attn_implementation="sdpa")
    with _built_on_device():
        model = transformers.BertForPreTraining(hcfg).to(DEVICE).train()
    labels = torch.full_like(batch["input_ids"], -100)  # HF's dense labels: -100 = no prediction
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(batch["masked_lm_positions"])
    real = batch["masked_lm_weights"] > 0
    labels[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    labels = labels.to(DEVICE)
    return _loop_step(model, lambda: model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                           attention_mask=batch["attention_mask"], labels=labels,
                                           next_sentence_label=batch["next_sentence_label"]).loss, dtype)


def _ds_step(cfg: BertConfig, batch: dict, ds_config_path: str, dtype: str, unpad: bool) -> Callable[[], float]:
    """(a) our model through the DeepSpeed engine, built exactly as pretraining builds it (trainer.engine),
    with the JSON's optimizer, one rank and one micro batch per step."""
    from trainer import dist

    ds = eng.load_ds_config(ds_config_path)
    ds.update(train_micro_batch_size_per_gpu=int(batch["input_ids"].shape[0]), gradient_accumulation_steps=1)
    ds.pop("train_batch_size", None)
    ds = precision.apply(ds, dtype)
    resolved = eng.resolve(ds, ds_config_path, precision.device_facts(DEVICE.type), world=1)
    dist.init()
    torch.manual_seed(0)
    with _built_on_device():
        model = BertForPreTraining(cfg)
    model.unpad = unpad
    engine = eng.build_engine(model, resolved.ds)
    b = {k: v.to(engine.device) for k, v in batch.items()}

    def step() -> float:
        out = engine(**b)
        engine.backward(out.loss)
        engine.step()
        return out.loss.detach().item()
    return step


@dataclass
class Impl:
    name: str
    step: Callable[[], float]
    times: list = field(default_factory=list)
    faults: list = field(default_factory=list)  # minor page faults of the process during the step: the allocator
    peak_mem: int = 0  # CUDA: most device memory allocated during its steps (every impl's resident state too)
    step_mem: int = 0  # CUDA: of that, what its step added on top of what was resident (activations, buffers)
    syncs: int = 0  # CUDA: host synchronisations in one step (torch's sync debug mode)


def _count_syncs(step: Callable[[], float]) -> int:
    """Host-device synchronisations of one step (each one stalls the CPU until the GPU is done), counted
    with torch's sync debug mode; the final .item() of the step is one of them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _timed(impls: list[Impl], warmup: int, repeats: int) -> None:
    for _ in range(warmup):
        for im in impls:
            im.step()
    if DEVICE.type == "cuda":
        for im in impls:
            im.syncs = _count_syncs(im.step)
    for _ in range(repeats):  # interleaved: every implementation sees the same machine noise
        for im in impls:
            _sync()
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            im.step()  # ends in .item(): the step has finished when it returns
            _sync()
            im.times.append(time.perf_counter() - t0)
            im.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if DEVICE.type == "cuda":
                im.peak_mem = max(im.peak_mem, torch.cuda.max_memory_allocated())
                im.step_mem = max(im.step_mem, torch.cuda.max_memory_allocated() - resident)


# ---------------------------------------------------------------------------------------------------
# Commands


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _machine() -> dict:
    return {"device": device_name(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count()}


def _print_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    widths = [max(len(h), *(len(fmt.format(r[k]) if r.get(k) is not None else "-") for r in rows))
              for (k, fmt), h in zip(cols, [c[0] for c in cols])]
    print("  ".join(h.rjust(w) for (h, _), w in zip(cols, widths)))
    for r in rows:
        print("  ".join((fmt.format(r[k]) if r.get(k) is not None else "-").rjust(w)
                        for (k, fmt), w in zip(cols, widths)))


def measure_peak(dtypes: list[str], n: Optional[int], seconds: float) -> dict:
    """Measured matmul peak per dtype. fp16 only where the device has fast fp16 (never chosen on a CPU);
    without n the GEMM is sized from a probe, so even emulated bf16 finishes within ``seconds``."""
    facts = precision.device_facts(DEVICE.type)
    out = {}
    for name in dtypes:
        if name == "fp16" and not facts.fast_fp16:
            print(f"peak: fp16 skipped ({facts.kind} has no fast fp16: {facts.detail})")
            continue
        out[name] = metrics.measure_peak_tflops(DEVICE, eng.torch_dtype(name), seconds=seconds, n=n)
    return out


def cmd_peak(a) -> dict:
    peak = measure_peak(a.dtypes.split(","), a.n, a.seconds)
    rows = [{"dtype": k, "tflops": v} for k, v in peak.items()]
    _print_table(rows, [("dtype", "{}"), ("tflops", "{:.3f}")])
    return {"peak_tflops": peak, "n": a.n}


def _config_and_batch(a) -> tuple[BertConfig, dict]:
    if a.data:  # the model takes the shards' vocabulary; the batch comes from the shards
        return BertConfig.preset(a.preset, vocab_size=_vocab_of(a.data)), shard_batch(a.data, a.micro_batch)
    cfg = BertConfig.preset(a.preset, max_position_embeddings=max(512, a.seq))
    return cfg, synthetic_batch(cfg, a.micro_batch, a.seq, a.max_pred)


def _dtype(a) -> str:
    """--dtype, else what pretraining with --deepspeed would train in here."""
    if a.dtype:
        return a.dtype
    ds = eng.load_ds_config(a.deepspeed)
    return precision.decide(precision.requested(ds), precision.device_facts(DEVICE.type)).precision


def projection(samples_per_s: float, seq: int) -> Optional[dict]:
    """GPU(or device)-hours of the paper's phase at this sequence length, at ``samples_per_s`` per device."""
    if seq not in PAPER_RUN or samples_per_s <= 0:
        return None
    return {"seq": seq, "sequences": PAPER_RUN[seq], "device_hours": PAPER_RUN[seq] / samples_per_s / 3600}


def cmd_train(a) -> dict:
    dtype = _dtype(a)
    peak = a.peak_tflops or measure_peak([dtype], None, 2.0)[dtype]
    want = a.impl.split(",")
    # (c0) first, while this process is still small: run after it, the child was 20-80% slower and erratic
    # (2.4-4.9 s/step against 2.0-2.2 alone) while the parent held its three models.
    untuned = _untuned_hf_rows(a, peak, dtype) if "hf-default" in want and DEVICE.type == "cpu" else []
    allocator = _host_allocator(a.malloc)
    cfg, batch = _config_and_batch(a)
    counts = batch_counts(batch)
    impls = []
    for unpad in ([True, False] if a.unpad == "both" else [a.unpad == "on"]):
        tag = "" if a.unpad != "both" else (" (unpadded)" if unpad else " (padded)")
        if "ds" in want:
            impls.append(Impl("a: ours+DeepSpeed" + tag, _ds_step(cfg, batch, a.deepspeed, dtype, unpad)))
        if "plain" in want:
            impls.append(Impl("b: ours plain" + tag, _plain_step(cfg, batch, dtype, unpad)))
    if "hf" in want:
        hf = _hf_step(cfg, batch, dtype)
        if hf is None:
            print("transformers not installed: (c) and (c0) skipped")
        else:
            impls.append(Impl("c: transformers", hf))
    _timed(impls, a.warmup, a.repeats)
    flops = metrics.step_flops(metrics.flop_counts(_meta_model(cfg)), counts["tokens"], counts["predictions"],
                               counts["sequences"], counts["seq_len"])
    rows = []
    for im in impls:
        t = statistics.median(im.times)
        rows.append({"impl": im.name, "step_s": t, "tokens_per_s": counts["tokens"] / t,
                     "samples_per_s": counts["sequences"] / t, "tflops": flops / t / 1e12,
                     "mfu": flops / t / 1e12 / peak, "faults_per_step": statistics.median(im.faults),
                     "malloc": allocator, "times": im.times,
                     **({"peak_mem_gb": im.peak_mem / 2 ** 30, "step_mem_gb": im.step_mem / 2 ** 30,
                         "syncs_per_step": im.syncs}
                        if DEVICE.type == "cuda" else {})})
    rows += untuned
    by: dict = {}
    for r in rows:  # with --unpad both, (a) and (b) are their unpadded rows (listed first)
        by.setdefault(r["impl"].split(":")[0], r)
    ratios = {}
    for c in ("c", "c0"):
        if "a" in by and c in by:
            ratios[f"a/{c}"] = by["a"]["tokens_per_s"] / by[c]["tokens_per_s"]
    if "a" in by and "b" in by:
        ratios["a/b"] = by["a"]["tokens_per_s"] / by["b"]["tokens_per_s"]
        ratios["ds_overhead"] = by["a"]["step_s"] / by["b"]["step_s"] - 1.0
    print(f"BERT-{a.preset}, seq {counts['seq_len']}, micro batch {a.micro_batch}, {dtype}, "
          f"{'shards ' + a.data if a.data else 'synthetic full-length'}; median of {a.repeats} interleaved steps; "
          f"peak {peak:.3f} TFLOPS ({dtype} matmul); {device_name()}; host allocator {allocator}")
    cols = [("impl", "{}"), ("step_s", "{:.3f}"), ("tokens_per_s", "{:.1f}"), ("samples_per_s", "{:.2f}"),
            ("tflops", "{:.3f}"), ("mfu", "{:.1%}")]
    if DEVICE.type == "cuda":
        cols += [("peak_mem_gb", "{:.1f}"), ("step_mem_gb", "{:.1f}"), ("syncs_per_step", "{}")]
    else:
        cols += [("faults_per_step", "{:.0f}")]
    _print_table(rows, cols)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    # The paper's data is mostly full-length: project from synthetic full-length batches only.
    proj = projection(by["a"]["samples_per_s"], counts["seq_len"]) if "a" in by and a.preset == "large" \
        and not a.data else None
    if proj:
        print(f"the paper's BERT-large phase at seq {proj['seq']} ({proj['sequences']:.3g} sequences) at this rate: "
              f"{proj['device_hours']:,.0f} device-hours on {device_name()} (launcher/bench.py project sums both)")
    return {"preset": a.preset, "seq": counts["seq_len"], "micro_batch": a.micro_batch, "dtype": dtype,
            "data": a.data or "synthetic", "flops_per_step": flops, "peak_tflops": peak, "counts": counts,
            "malloc": allocator, "results": rows, "ratios": ratios, "projection": proj, "peak_rss_mb": _rss_mb()}


def sequence_flops(cfg: BertConfig, seq: int, max_pred: int) -> float:
    """Training FLOPs of one full-length sequence with Google's prediction count (the harness's formula)."""
    return metrics.step_flops(metrics.flop_counts(_meta_model(cfg)), seq, num_to_predict(seq, max_pred, 0.15), 1, seq)


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


def cmd_project(a) -> dict:
    """Device-hours of the paper's full BERT-large run from `train --preset large` results at seq 128 and 512,
    beside the same projection of the published anchors (ANCHORS)."""
    anchors = anchor_rows()
    print("published anchors (derived from published numbers, NOT measured here), the paper's run "
          "(900k steps x 256 x 128 tokens + 100k x 256 x 512):")
    _print_table(anchors, [("device", "{}"), ("samples_per_s_128", "{:.0f}"), ("samples_per_s_512", "{:.0f}"),
                           ("phase1_h", "{:,.0f}"), ("phase2_h", "{:,.0f}"), ("total_h", "{:,.0f}")])
    for r in anchors:
        print(f"  {r['device']}: {r['source']}")
    rows = []
    for path in a.results:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        ours = next(r for r in res["results"] if r["impl"].startswith("a:"))
        proj = projection(ours["samples_per_s"], res["seq"])
        if res["preset"] == "large" and proj and res.get("data", "synthetic") == "synthetic":
            rows.append({"device": res["machine"]["device"], "dtype": res["dtype"], "seq": res["seq"],
                         "samples_per_s": ours["samples_per_s"], "device_hours": proj["device_hours"]})
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["device"], r["dtype"]), {})[r["seq"]] = r
    table = []
    for (device, dtype), phases in by_key.items():
        if set(phases) == set(PAPER_RUN):
            total = sum(p["device_hours"] for p in phases.values())
            table.append({"device": device, "dtype": dtype, "phase1_h": phases[128]["device_hours"],
                          "phase2_h": phases[512]["device_hours"], "total_h": total})
    if rows:
        _print_table(rows, [("device", "{}"), ("dtype", "{}"), ("seq", "{}"), ("samples_per_s", "{:.1f}"),
                            ("device_hours", "{:,.0f}")])
    if table:
        print("measured here, the paper's run (900k steps x 256 x 128 tokens + 100k x 256 x 512):")
        _print_table(table, [("device", "{}"), ("dtype", "{}"), ("phase1_h", "{:,.0f}"), ("phase2_h", "{:,.0f}"),
                             ("total_h", "{:,.0f}")])
    elif a.results:
        print("measured here: no device has `train --preset large` results at both seq 128 and 512 yet")
    return {"phases": rows, "paper_run": table, "anchors": anchors}


def _host_allocator(choice: str) -> str:
    """Set up and name this process's host allocator: "ours" is what the launchers do (tcmalloc, preloaded by
    launcher/bench.py when installed, else glibc keeping freed blocks), "default" leaves glibc untouched."""
    if DEVICE.type != "cpu":
        return "device"
    from trainer import cpu

    if cpu.tcmalloc_loaded():
        if choice == "default":
            raise SystemExit(f"--malloc default: this process runs on tcmalloc; start it with {cpu.CHOICE_ENV}=glibc")
        return "tcmalloc"
    return "glibc-keep" if choice == "ours" and cpu.keep_freed_memory() else "glibc-default"


def _train_in_child(args: list[str], **run_kwargs) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """`train ARGS` in a fresh interpreter; its JSON result (None if it failed)."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "launcher", "bench.py"), "train", *args, "--json", "-"],
                       stdout=subprocess.PIPE, text=True, cwd=REPO, **run_kwargs)
    return p, json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None


def _untuned_hf_rows(a, peak: float, dtype: str) -> list[dict]:
    """(c0): `train --impl hf --malloc default` in a fresh process on glibc's malloc."""
    from trainer import cpu

    args = ["--impl", "hf", "--malloc", "default", "--preset", a.preset, "--seq", str(a.seq), "--micro-batch",
            str(a.micro_batch), "--max-pred", str(a.max_pred), "--dtype", dtype, "--warmup", str(a.warmup),
            "--repeats", str(a.repeats), "--peak-tflops", str(peak)] + (["--data", a.data] if a.data else [])
    p, res = _train_in_child(args, env=cpu.glibc_env(dict(os.environ)))
    if res is None:
        raise RuntimeError(f"(c0) failed with exit code {p.returncode}: {' '.join(p.args)} (its error is above)")
    return [dict(r, impl="c0: transformers, own process, glibc malloc") for r in res["results"]]


def _meta_model(cfg: BertConfig):
    with torch.device("meta"):
        return BertForPreTraining(cfg)


def _vocab_of(shards: str) -> int:
    from data.shards import read_manifest

    return int(read_manifest(shards)["tokenizer"]["vocab_size"])


def cmd_loader(a) -> dict:
    """Samples/s of the training loader; the first batch (worker start-up, the first block's read) apart."""
    from data.loader import PretrainLoader

    from data import shards

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
    _print_table(rows, [("workers", "{}"), ("first_batch_s", "{:.2f}"), ("samples_per_s", "{:.0f}"),
                        ("samples_per_s_per_core", "{:.0f}")])
    return {"data": a.data, "micro_batch": a.micro_batch, "dynamic_masking": a.dynamic_masking, "results": rows}


def cmd_build(a) -> dict:
    import tempfile

    from data.build import BuildSettings, build
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(a.tokenizer)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        cpu0 = _children_cpu() + time.process_time()
        m = build(a.input, tok, os.path.join(out, "shards"),
                  BuildSettings(max_seq_len=a.seq, max_predictions=a.max_pred), workers=a.workers, progress=False)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() + time.process_time() - cpu0
    tokens = m["stats"]["tokens"]
    row = {"workers": a.workers, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "tokens_per_s_per_core": tokens / wall / a.workers, "tokens_per_cpu_s": tokens / cpu}
    _print_table([row], [("workers", "{}"), ("tokens", "{:.0f}"), ("wall_s", "{:.1f}"),
                         ("tokens_per_s_per_core", "{:.0f}"), ("tokens_per_cpu_s", "{:.0f}")])
    return {"input": a.input, "results": [row]}


_WORDS = ("the of and in to was is for on as by with he that at from his it an were are which this also be "
          "has or had first one their its new after who they two her she been other when there all during into "
          "school time may years more most only over city some world would where later up such used many can "
          "state about national out known university united then made team river century government music "
          "album film war church village county série Zürich Ålesund café naïve Müller São Paulo Kraków "
          "Москва 東京 München Ærø Dvořák").split()


def synthetic_wiki_pages(n: int, seed: int = 0):
    """``n`` pages shaped like enwiki's pages-articles: ~10% redirects, ~2% disambiguation pages, ~8% other
    namespaces; articles of ~4 KB wikitext with an infobox, refs with cite templates, links, a table, an
    image with a linked caption, headings, lists, categories and interwiki links."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    def sentence():
        parts = [words(rng.randint(3, 8)), f"[[{words(2).title()}|{words(2)}]]", words(rng.randint(2, 6)),
                 f"'''{words(1)}'''", words(rng.randint(2, 6))]
        ref = rng.random()
        if ref < 0.3:
            parts.append(f"<ref>{{{{cite web |url=https://example.org/{rng.randint(1, 10**6)} |title={words(3)} "
                         f"|access-date=2020-01-01}}}}</ref>")
        elif ref < 0.4:
            parts.append(f'<ref name="r{rng.randint(1, 9)}" />')
        return " ".join(parts).capitalize() + "."

    def paragraph():
        return " ".join(sentence() for _ in range(rng.randint(3, 7)))

    for i in range(n):
        pid = 10 + i
        title = f"{words(2).title()} {i}"
        r = rng.random()
        if r < 0.10:
            yield {"id": pid, "title": title, "redirect": f"{words(2).title()}",
                   "text": f"#REDIRECT [[{words(2).title()}]]\n\n{{{{R from move}}}}"}
            continue
        if r < 0.12:
            yield {"id": pid, "title": f"{title} (disambiguation)",
                   "text": f"'''{title}''' may refer to:\n* [[{words(2)}]]\n* [[{words(2)}]]\n\n{{{{disambiguation}}}}"}
            continue
        if r < 0.20:
            yield {"id": pid, "title": f"Talk:{title}", "ns": 1, "text": f"== Comment ==\n{paragraph()} ~~~~"}
            continue
        infobox = ("{{Infobox settlement\n| name = " + title + "\n| population = {{formatnum:" + str(rng.randint(1, 10**6))
                   + "}}\n| image = Example.jpg\n}}\n")
        body = [infobox, f"'''{title}''' is {paragraph()}", paragraph()]
        for _ in range(rng.randint(2, 4)):
            body.append(f"== {words(2).title()} ==")
            body.append(paragraph())
            if rng.random() < 0.5:
                body.append("\n".join(f"* {words(rng.randint(2, 6))}" for _ in range(rng.randint(2, 5))))
            if rng.random() < 0.3:
                body.append(f"[[File:{words(1)}.jpg|thumb|left|{words(3)} in [[{words(1)}]]]]")
            if rng.random() < 0.3:
                body.append('{| class="wikitable"\n|-\n! Year !! Value\n|-\n| 1999 || ' + words(2) + "\n|}")
            body.append(paragraph())
        body.append("== References ==\n{{reflist}}")
        body.append(f"[[Category:{words(2).title()}]]\n[[Category:{words(1).title()}]]\n[[de:{words(2)}]]")
        yield {"id": pid, "title": title, "text": "\n\n".join(body)}


def _page_rates(pages: int, wall: float, cpu: float, sizes: tuple[int, float]) -> dict:
    """Rates of one pass over a dump of ``sizes`` = (bz2 bytes, wikitext MB): per second of wall time, and per
    CPU-second (= per core)."""
    return {"pages": pages, "wall_s": wall, "pages_per_s": pages / wall, "pages_per_cpu_s": pages / cpu,
            "bz2_mb_per_cpu_s": sizes[0] / 1e6 / cpu, "wikitext_mb_per_cpu_s": sizes[1] / cpu}


def _timed_pages(pages, sizes: tuple[int, float]) -> dict:
    """Drain an iterator with one item per page of the dump, on this core."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in pages)
    return _page_rates(n, time.perf_counter() - t0, time.process_time() - c0, sizes)


def cmd_wikidump(a) -> dict:
    """A generated enwiki-like multistream dump: the reader alone (mwxml over bz2, one core), reading plus
    WikiExtractor cleaning, then end-to-end builds from the multistream file (workers decompress their own
    streams) and from the same file without its index (one reader in the main process feeds the workers)."""
    import shutil
    import tempfile

    from data import wikidump
    from data.build import BuildSettings, build
    from data.corpus import CorpusOptions, iter_corpus_sentences
    from data.tokenizer import load_tokenizer, train_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench-wikidump-")
    try:
        dump = os.path.join(tmp, "enwiki-bench-pages-articles-multistream.xml.bz2")
        wikidump.write_multistream(dump, synthetic_wiki_pages(a.pages, seed=1))
        plain = os.path.join(tmp, "enwiki-bench-pages-articles.xml.bz2")
        os.link(dump, plain)
        size = os.path.getsize(dump)
        wikitext_mb = sum(len(t.encode("utf-8")) for _, t in wikidump.iter_pages(dump)) / 1e6
        cleaned = (wikidump.wikitext_to_text(t) if r is None else r for r, t in wikidump.iter_pages(dump))
        sizes = (size, wikitext_mb)
        rows = [{"what": "read (mwxml, bz2)", "workers": 1, **_timed_pages(wikidump.iter_pages(dump), sizes)},
                {"what": "read + clean", "workers": 1, **_timed_pages(cleaned, sizes)}]
        tok = (load_tokenizer(a.tokenizer) if a.tokenizer else
               train_tokenizer(iter_corpus_sentences(CorpusOptions([dump]), limit=20000), vocab_size=8000,
                               show_progress=False))
        for path, what in ((dump, "build, multistream"), (plain, "build, one reader")):
            for w in a.workers:
                t0 = time.perf_counter()
                cpu0 = _children_cpu() + time.process_time()
                m = build([path], tok, os.path.join(tmp, f"s-{w}-{len(rows)}"), BuildSettings(dupe_factor=1),
                          workers=w, progress=False)
                wall = time.perf_counter() - t0
                cpu = _children_cpu() + time.process_time() - cpu0
                rows.append({"what": what, "workers": w, **_page_rates(a.pages, wall, cpu, sizes),
                             "pages_per_s_per_core": a.pages / wall / w, "tokens": m["stats"]["tokens"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(rows, [("what", "{}"), ("workers", "{}"), ("pages", "{}"), ("wall_s", "{:.1f}"),
                        ("pages_per_s", "{:.0f}"), ("pages_per_s_per_core", "{:.0f}"), ("pages_per_cpu_s", "{:.0f}"),
                        ("bz2_mb_per_cpu_s", "{:.2f}"), ("wikitext_mb_per_cpu_s", "{:.2f}")])
    reader = rows[0]["pages_per_cpu_s"]
    for r in rows[2:]:
        r["reader_headroom"] = reader / r["pages_per_s"]  # > 1: one reader outpaces what the build consumes
    one_reader = [r for r in rows if r["what"] == "build, one reader"]
    print(f"dump {size / 1e6:.1f} MB bz2 ({wikitext_mb:.1f} MB wikitext, {a.pages} pages); the reader alone reads "
          f"{reader:.0f} pages per CPU-second: " + ", ".join(
              f"{r['reader_headroom']:.1f}x what the one-reader build with {r['workers']} worker(s) consumed"
              for r in one_reader))
    return {"pages": a.pages, "dump_bytes": size, "wikitext_mb": wikitext_mb, "results": rows}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cmd_memory(a) -> dict:
    """Peak RSS of one rank for each (preset, seq): a fresh process each, a few DeepSpeed steps."""
    rows = []
    for preset in a.presets.split(","):
        for seq in [int(s) for s in a.seqs.split(",")]:
            p, res = _train_in_child(
                ["--preset", preset, "--seq", str(seq), "--micro-batch", str(a.micro_batch), "--impl", "ds",
                 "--warmup", "1", "--repeats", "1", "--max-pred", str(80 if seq > 128 else 20), "--peak-tflops", "1",
                 "--deepspeed", a.deepspeed] + (["--dtype", a.dtype] if a.dtype else []), stderr=subprocess.PIPE)
            if res is None:
                rows.append({"preset": preset, "seq": seq, "micro_batch": a.micro_batch, "peak_rss_mb": None,
                             "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"})
                continue
            rows.append({"preset": preset, "seq": seq, "micro_batch": a.micro_batch, "peak_rss_mb": res["peak_rss_mb"],
                         "step_s": res["results"][0]["step_s"], "dtype": res["dtype"]})
    _print_table(rows, [("preset", "{}"), ("seq", "{}"), ("micro_batch", "{}"), ("dtype", "{}"),
                        ("peak_rss_mb", "{:.0f}"), ("step_s", "{:.2f}")])
    return {"results": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launcher/bench.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    zero2 = os.path.join(REPO, "ds_configs", "zero2.json")
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
    t.add_argument("--deepspeed", default=zero2)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured)")
    t.add_argument("--json", default=None)
    pk = sub.add_parser("peak", help="measured matmul peak per precision (MFU denominator)")
    pk.add_argument("--dtypes", default="fp32,bf16,fp16")
    pk.add_argument("--n", type=int, default=None, help="GEMM size (default: sized from a probe to the budget)")
    pk.add_argument("--seconds", type=float, default=3.0, help="time budget per dtype")
    pk.add_argument("--json", default=None)
    lo = sub.add_parser("loader", help="samples/s of the training loader from real shards")
    lo.add_argument("--data", required=True)
    lo.add_argument("--micro-batch", type=int, default=64)
    lo.add_argument("--workers", default="0,1,2")
    lo.add_argument("--batches", type=int, default=300)
    lo.add_argument("--dynamic-masking", action="store_true")
    lo.add_argument("--json", default=None)
    bu = sub.add_parser("build", help="output tokens/s per core of data.build")
    bu.add_argument("--input", action="append", required=True)
    bu.add_argument("--tokenizer", required=True)
    bu.add_argument("--workers", type=int, default=1)
    bu.add_argument("--seq", type=int, default=128)
    bu.add_argument("--max-pred", type=int, default=20)
    bu.add_argument("--json", default=None)
    wd = sub.add_parser("wikidump", help="pages/s and MB/s per core of the Wikipedia dump reader and builds")
    wd.add_argument("--pages", type=int, default=12000, help="pages of the generated dump (~1 KB of bz2 each)")
    wd.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    wd.add_argument("--tokenizer", default=None, help="default: one trained on the dump (vocab 8000)")
    wd.add_argument("--json", default=None)
    me = sub.add_parser("memory", help="peak RSS per rank for presets x sequence lengths")
    me.add_argument("--presets", default="base,large")
    me.add_argument("--seqs", default="128,512")
    me.add_argument("--micro-batch", type=int, default=8)
    me.add_argument("--dtype", choices=DTYPES, default=None)
    me.add_argument("--deepspeed", default=zero2)
    me.add_argument("--json", default=None)
    pr = sub.add_parser("project", help="device-hours of the paper's BERT-large run from `train` results")
    pr.add_argument("results", nargs="*", help="train JSONs of --preset large at --seq 128 and 512 (none: the "
                                               "published anchors only)")
    pr.add_argument("--json", default=None)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    cmds = {"train": cmd_train, "peak": cmd_peak, "loader": cmd_loader, "build": cmd_build, "wikidump": cmd_wikidump,
            "memory": cmd_memory, "project": cmd_project}
    with contextlib.redirect_stdout(sys.stderr) if a.json == "-" else contextlib.nullcontext():
        res = {"cmd": a.cmd, "machine": _machine(), **cmds[a.cmd](a)}
    if a.json == "-":
        print(json.dumps(res))
        return 0
    path = a.json or os.path.join("bench_results", f"{a.cmd}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"bench {a.cmd}: done in {time.perf_counter() - t0:.0f}s on {res['machine']['device']}; results in {path}")
    return 0
