"""Benchmarks: training step vs transformers and the plain loop, device matmul peak, loader, builder, memory.

Everything prints a table and writes JSON; nothing here asserts a speed (speed is measured, not tested).
Run through `python launcher/bench.py {train,peak,loader,build,memory} ...`.

The `train` comparison runs (a), (b), (c) in ONE process and interleaves their timed steps (a b c a b c
...), so a noisy machine slows them alike and the ratios hold. On CPU that process has the host allocator
our launchers give training (tcmalloc when installed, else glibc keeping freed memory: trainer/malloc.py),
and (c) shares it. (c0) is transformers as users run it: a fresh process on glibc's malloc defaults, timed
just before (not interleaved: two processes taking turns on two cores slowed each other by 15-20%, so its
ratio is across runs). `faults_per_step` (minor page faults) shows the allocator at work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from bert import BertConfig, BertForPreTraining
from trainer import malloc, train as T

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Batches


def synthetic_batch(cfg: BertConfig, micro: int, seq: int, max_pred: int, seed: int = 0) -> dict:
    """Full-length sequences with Google's prediction count: clean, padding-free comparisons."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (micro, seq), generator=g)  # (B, S)
    tt = torch.zeros_like(ids)
    tt[:, seq // 2:] = 1
    n_pred = min(max_pred, max(1, round(seq * 0.15)))  # 128 -> 19, 512 -> 77
    pos = torch.stack([torch.randperm(seq - 2, generator=g)[:n_pred] + 1 for _ in range(micro)]).sort(1).values
    P = max_pred
    positions = torch.zeros(micro, P, dtype=torch.long)
    positions[:, :n_pred] = pos
    weights = torch.zeros(micro, P)
    weights[:, :n_pred] = 1.0
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": torch.ones_like(ids),
            "masked_lm_positions": positions, "masked_lm_ids": torch.randint(5, cfg.vocab_size, (micro, P), generator=g),
            "masked_lm_weights": weights, "next_sentence_label": torch.randint(0, 2, (micro,), generator=g)}


def shard_batch(shards: str, micro: int) -> dict:
    """A real batch from shards (padding and masking exactly as training sees them)."""
    from trainer.loader import PretrainLoader, model_inputs
    loader = PretrainLoader(shards, "train", micro, num_workers=0, seed=0)
    return model_inputs(next(iter(loader)))


def batch_counts(batch: dict) -> dict:
    return {"tokens": float(batch["attention_mask"].sum()), "predictions": float(batch["masked_lm_weights"].sum()),
            "sequences": float(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1])}


# ---------------------------------------------------------------------------------------------------
# The three implementations, each a zero-argument "one full training step" closure


def _loop_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], float]:
    """One plain-torch training step: autocast forward, backward, clip 1.0, torch's AdamW (BERT's settings)."""
    opt = torch.optim.AdamW(T.param_groups(model), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    amp = dtype != torch.float32

    def step() -> float:
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=amp):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()
    return step


def _plain_step(cfg: BertConfig, batch: dict, dtype: torch.dtype) -> Callable[[], float]:
    """(b) our model, plain torch loop, torch's AdamW, autocast for bf16."""
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).to(DEVICE).train()
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    return _loop_step(model, lambda: model(**batch).loss, dtype)


def _hf_step(cfg: BertConfig, batch: dict, dtype: torch.dtype) -> Optional[Callable[[], float]]:
    """(c) transformers' BertForPreTraining: same config, SDPA attention, same batch and masks, AdamW."""
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hcfg = transformers.BertConfig(**cfg.to_dict(), attn_implementation="sdpa")
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


def _ds_step(cfg: BertConfig, batch: dict, ds_config_path: str, precision: str) -> Callable[[], float]:
    """(a) our model through the DeepSpeed engine, built exactly as pretrain.py builds it."""
    from deepspeed.accelerator import get_accelerator
    from trainer import dist
    acc = get_accelerator()
    ds = T.load_ds_config(ds_config_path)
    # One rank, one micro batch per step: the batch triple must agree with this process.
    ds["train_micro_batch_size_per_gpu"] = int(batch["input_ids"].shape[0])
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    for key in ("fp16", "bf16"):
        ds.pop(key, None)
    if precision != "fp32":
        ds[precision] = {"enabled": True}
    ds, _ = T.resolve_ds_config(ds, ds_config_path, bool(acc.is_fp16_supported()), bool(acc.is_bf16_supported()),
                                acc.device_name())
    dist.init()
    torch.manual_seed(0)
    engine = T.build_engine(BertForPreTraining(cfg), ds)
    b = {k: v.to(engine.device) for k, v in batch.items()}

    def step() -> float:
        out = engine(**b)
        engine.backward(out.loss)
        engine.step()
        return out.loss.detach().item()
    return step


# ---------------------------------------------------------------------------------------------------
# Commands


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _machine() -> dict:
    return {"device": str(DEVICE) if DEVICE.type == "cpu" else torch.cuda.get_device_name(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def _print_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    widths = [max(len(h), *(len(fmt.format(r[k]) if r.get(k) is not None else "-") for r in rows))
              for (k, fmt), h in zip(cols, [c[0] for c in cols])]
    print("  ".join(h.rjust(w) for (h, _), w in zip(cols, widths)))
    for r in rows:
        print("  ".join((fmt.format(r[k]) if r.get(k) is not None else "-").rjust(w)
                        for (k, fmt), w in zip(cols, widths)))


def measure_peak(dtypes: list[str], n: int, seconds: float) -> dict:
    out = {}
    for name in dtypes:
        if name == "fp16" and not _fp16_ok():
            continue
        out[name] = T.measure_peak_tflops(DEVICE, DTYPES[name], seconds=seconds, n=n)
    return out


def _fp16_ok() -> bool:
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def cmd_peak(a) -> dict:
    peak = measure_peak(a.dtypes.split(","), a.n, a.seconds)
    rows = [{"dtype": k, "tflops": v} for k, v in peak.items()]
    _print_table(rows, [("dtype", "{}"), ("tflops", "{:.3f}")])
    return {"peak_tflops": peak, "n": a.n}


@dataclass
class Impl:
    name: str
    step: Callable[[], float]
    times: list = field(default_factory=list)
    faults: list = field(default_factory=list)  # minor page faults of the process during the step: the allocator


def _config_and_batch(a) -> tuple[BertConfig, dict]:
    if a.data:  # the model takes the shards' vocabulary; the batch comes from the shards
        return BertConfig.preset(a.preset, vocab_size=_vocab_of(a.data)), shard_batch(a.data, a.micro_batch)
    cfg = BertConfig.preset(a.preset, max_position_embeddings=max(512, a.seq))
    return cfg, synthetic_batch(cfg, a.micro_batch, a.seq, a.max_pred)


def cmd_train(a) -> dict:
    peak = a.peak_tflops or measure_peak([a.dtype], 2048, 2.0)[a.dtype]
    want = a.impl.split(",")
    # (c0) first, while this process is still small: run after it, the child was 20-80% slower and erratic
    # (2.4-4.9 s/step against 2.0-2.2 alone) while the parent held its three models.
    untuned = _untuned_hf_rows(a, peak) if "hf-default" in want and DEVICE.type == "cpu" else []
    allocator = _host_allocator(a.malloc)
    cfg, batch = _config_and_batch(a)
    counts = batch_counts(batch)
    dtype = DTYPES[a.dtype]
    impls = []
    if "ds" in want:
        impls.append(Impl("a: ours+DeepSpeed", _ds_step(cfg, batch, a.deepspeed, a.dtype)))
    if "plain" in want:
        impls.append(Impl("b: ours plain", _plain_step(cfg, batch, dtype)))
    if "hf" in want:
        hf = _hf_step(cfg, batch, dtype)
        if hf is None:
            print("transformers not installed: (c) and (c0) skipped")
        else:
            impls.append(Impl("c: transformers", hf))
    for _ in range(a.warmup):
        for im in impls:
            im.step()
    for _ in range(a.repeats):  # interleaved: every implementation sees the same machine noise
        for im in impls:
            _sync()
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            im.step()  # ends in .item(): the step has finished when it returns
            _sync()
            im.times.append(time.perf_counter() - t0)
            im.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    fc = T.flop_counts(_meta_model(cfg))
    flops = T.step_flops(fc, counts["tokens"], counts["predictions"], counts["sequences"], counts["seq_len"])
    rows = []
    for im in impls:
        t = statistics.median(im.times)
        rows.append({"impl": im.name, "step_s": t, "tokens_per_s": counts["tokens"] / t,
                     "samples_per_s": counts["sequences"] / t, "tflops": flops / t / 1e12,
                     "mfu": flops / t / 1e12 / peak, "faults_per_step": statistics.median(im.faults),
                     "malloc": allocator, "times": im.times})
    rows += untuned
    by = {r["impl"].split(":")[0]: r for r in rows}
    ratios = {}
    for c in ("c", "c0"):
        if "a" in by and c in by:
            ratios[f"a/{c}"] = by["a"]["tokens_per_s"] / by[c]["tokens_per_s"]
    if "a" in by and "b" in by:
        ratios["a/b"] = by["a"]["tokens_per_s"] / by["b"]["tokens_per_s"]
        ratios["ds_overhead"] = by["a"]["step_s"] / by["b"]["step_s"] - 1.0
    print(f"BERT-{a.preset}, seq {counts['seq_len']}, micro batch {a.micro_batch}, {a.dtype}, "
          f"{'shards ' + a.data if a.data else 'synthetic full-length'}; median of {a.repeats} interleaved steps; "
          f"peak {peak:.3f} TFLOPS ({a.dtype} matmul); host allocator {allocator}")
    _print_table(rows, [("impl", "{}"), ("step_s", "{:.3f}"), ("tokens_per_s", "{:.1f}"),
                        ("samples_per_s", "{:.2f}"), ("tflops", "{:.3f}"), ("mfu", "{:.1%}"),
                        ("faults_per_step", "{:.0f}")])
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    return {"preset": a.preset, "seq": counts["seq_len"], "micro_batch": a.micro_batch, "dtype": a.dtype,
            "data": a.data or "synthetic", "flops_per_step": flops, "peak_tflops": peak, "counts": counts,
            "malloc": allocator, "results": rows, "ratios": ratios, "peak_rss_mb": _rss_mb()}


def _host_allocator(choice: str) -> str:
    """Set up and name this process's host allocator: "ours" is what the launchers do (tcmalloc, preloaded by
    launcher/bench.py when installed, else glibc keeping freed blocks), "default" leaves glibc untouched."""
    if DEVICE.type != "cpu":
        return "device"
    if malloc.tcmalloc_loaded():
        if choice == "default":
            raise SystemExit(f"--malloc default: this process runs on tcmalloc; "
                             f"start it with {malloc.CHOICE_ENV}=glibc")
        return "tcmalloc"
    return "glibc-keep" if choice == "ours" and malloc.keep_freed_memory() else "glibc-default"


def _train_in_child(args: list[str], **run_kwargs) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """`train ARGS` in a fresh interpreter; its JSON result (None if it failed)."""
    p = subprocess.run([sys.executable, "-m", "trainer.bench", "train", *args, "--json", "-"], stdout=subprocess.PIPE,
                       text=True, cwd=REPO, **run_kwargs)
    return p, json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None


def _untuned_hf_rows(a, peak: float) -> list[dict]:
    """(c0): `train --impl hf --malloc default` in a fresh process."""
    args = ["--impl", "hf", "--malloc", "default", "--preset", a.preset, "--seq", str(a.seq), "--micro-batch",
            str(a.micro_batch), "--max-pred", str(a.max_pred), "--dtype", a.dtype, "--warmup", str(a.warmup),
            "--repeats", str(a.repeats), "--peak-tflops", str(peak)] + (["--data", a.data] if a.data else [])
    p, res = _train_in_child(args, env=malloc.glibc_env(dict(os.environ)))
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
    from trainer.loader import PretrainLoader
    rows = []
    for workers in [int(w) for w in a.workers.split(",")]:
        loader = PretrainLoader(a.data, "train", a.micro_batch, num_workers=workers, seed=0)
        it = iter(loader)
        next(it)  # worker start-up and the first block's index are not steady state
        t0, n = time.perf_counter(), 0
        for _ in range(a.batches):
            n += next(it)["input_ids"].shape[0]
        dt = time.perf_counter() - t0
        cores = max(1, workers)
        rows.append({"workers": workers, "samples_per_s": n / dt, "samples_per_s_per_core": n / dt / cores})
        del it, loader
    _print_table(rows, [("workers", "{}"), ("samples_per_s", "{:.0f}"), ("samples_per_s_per_core", "{:.0f}")])
    return {"data": a.data, "micro_batch": a.micro_batch, "results": rows}


def cmd_build(a) -> dict:
    import tempfile
    from data.build import build
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        cpu0 = _children_cpu() + time.process_time()
        m = build(a.input, tok, os.path.join(out, "shards"), workers=a.workers, progress=False,
                  max_seq_len=a.seq, max_predictions=a.max_pred)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() + time.process_time() - cpu0
    tokens = m["stats"]["tokens"]
    row = {"workers": a.workers, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "tokens_per_s_per_core": tokens / wall / a.workers, "tokens_per_cpu_s": tokens / cpu}
    _print_table([row], [("workers", "{}"), ("tokens", "{:.0f}"), ("wall_s", "{:.1f}"),
                         ("tokens_per_s_per_core", "{:.0f}"), ("tokens_per_cpu_s", "{:.0f}")])
    return {"input": a.input, "results": [row]}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cmd_memory(a) -> dict:
    """Peak RSS of one rank for each (preset, seq): a fresh process each, a few DeepSpeed steps."""
    rows = []
    for preset in a.presets.split(","):
        for seq in [int(s) for s in a.seqs.split(",")]:
            micro = a.micro_batch
            p, res = _train_in_child(
                ["--preset", preset, "--seq", str(seq), "--micro-batch", str(micro), "--dtype", a.dtype, "--impl",
                 "ds", "--warmup", "1", "--repeats", "1", "--max-pred", str(80 if seq > 128 else 20),
                 "--peak-tflops", "1", "--deepspeed", a.deepspeed], stderr=subprocess.PIPE)
            if res is None:
                rows.append({"preset": preset, "seq": seq, "micro_batch": micro, "peak_rss_mb": None,
                             "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"})
                continue
            rows.append({"preset": preset, "seq": seq, "micro_batch": micro, "peak_rss_mb": res["peak_rss_mb"],
                         "step_s": res["results"][0]["step_s"]})
    _print_table(rows, [("preset", "{}"), ("seq", "{}"), ("micro_batch", "{}"), ("peak_rss_mb", "{:.0f}"),
                        ("step_s", "{:.2f}")])
    return {"dtype": a.dtype, "results": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launcher/bench.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="time a full training step: (a) DeepSpeed, (b) plain loop, (c) transformers")
    t.add_argument("--preset", default="base")
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--micro-batch", type=int, default=8)
    t.add_argument("--max-pred", type=int, default=20)
    t.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    t.add_argument("--impl", default="ds,plain,hf,hf-default",
                   help="comma list of ds, plain, hf, hf-default (c0: transformers in an untuned process)")
    t.add_argument("--malloc", choices=["ours", "default"], default="ours",
                   help="CPU host allocator: as our launchers run (tcmalloc if installed, else glibc keeping freed "
                        "memory), or glibc's default (needs BERT_HOST_MALLOC=glibc)")
    t.add_argument("--data", default=None, help="shard folder for a real batch (default: synthetic full-length)")
    t.add_argument("--deepspeed", default=os.path.join(REPO, "ds_configs", "zero2.json"))
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured)")
    t.add_argument("--json", default=None)
    pk = sub.add_parser("peak", help="measured matmul peak per precision (MFU denominator)")
    pk.add_argument("--dtypes", default="fp32,bf16,fp16")
    pk.add_argument("--n", type=int, default=4096)
    pk.add_argument("--seconds", type=float, default=3.0)
    pk.add_argument("--json", default=None)
    lo = sub.add_parser("loader", help="samples/s of the training loader from real shards")
    lo.add_argument("--data", required=True)
    lo.add_argument("--micro-batch", type=int, default=64)
    lo.add_argument("--workers", default="0,1,2")
    lo.add_argument("--batches", type=int, default=300)
    lo.add_argument("--json", default=None)
    bu = sub.add_parser("build", help="output tokens/s per core of data.build")
    bu.add_argument("--input", action="append", required=True)
    bu.add_argument("--tokenizer", required=True)
    bu.add_argument("--workers", type=int, default=1)
    bu.add_argument("--seq", type=int, default=128)
    bu.add_argument("--max-pred", type=int, default=20)
    bu.add_argument("--json", default=None)
    me = sub.add_parser("memory", help="peak RSS per rank for presets x sequence lengths")
    me.add_argument("--presets", default="base,large")
    me.add_argument("--seqs", default="128,512")
    me.add_argument("--micro-batch", type=int, default=8)
    me.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    me.add_argument("--deepspeed", default=os.path.join(REPO, "ds_configs", "zero2.json"))
    me.add_argument("--json", default=None)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    res = {"cmd": a.cmd, "machine": _machine(), **{"train": cmd_train, "peak": cmd_peak, "loader": cmd_loader,
                                                     "build": cmd_build, "memory": cmd_memory}[a.cmd](a)}
    if a.json == "-":
        print(json.dumps(res))
        return 0
    path = a.json or os.path.join("bench_results", f"{a.cmd}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"bench {a.cmd}: done in {time.perf_counter() - t0:.0f}s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
