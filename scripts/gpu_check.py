#!/usr/bin/env python3
"""The GPU acceptance check: stages, each with a time budget, every one run even when an earlier
one failed; one JSON (stage results, checks, numbers, versions, device, errors) and one log in --out.
scripts/gpu_check.sh installs the carried wheels and calls this; --dry-run runs the same code on a tiny CPU
configuration (CI), so the kit cannot rot.

  data      corpus (this interpreter's docstrings) -> WordPiece -> seq-128 shards     } at the same time:
  ops       DeepSpeed's FusedAdam JIT-built (CUDA: nvcc for TORCH_CUDA_ARCH_LIST)      } CPU work, and
  tests     pytest -m gpu tests/test_gpu.py (junit: each test's outcome and properties) } the tests wait on ops
  pretrain  launcher/pretrain.py with ds_configs/zero2.json as shipped: BERT-base, seq 128, a few hundred steps
  zero      ZeRO-1 and ZeRO-3 (side by side): 6 steps saving at 3; a resume from 3 must reproduce steps 4-6
  bench     launcher/bench.py peak, train (BERT-large 128 x 64 and 512 x 8, fp16 and bf16, (a) vs (c); real
            batches unpadded vs padded), project
  cpu_workarounds  nothing of trainer/cpu.py on CUDA: the tests' host probe and every launcher log

Checks decide pass/fail; targets (the speed goals) are measured and reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from common import processes

REPO = Path(__file__).resolve().parent.parent
CPU_LINES = ("host allocator:", "cpu host workarounds")  # what trainer/cpu.py makes a launcher print
LOG_TAIL = 300_000  # characters of one command's output kept in the log (it must come back: 16 MiB a file)


@dataclass(frozen=True)
class Plan:
    """Sizes of one mode. GPU: the acceptance run's; dry: the smallest run of the same code."""

    corpus_docs: Optional[int]
    vocab: int
    seq: int
    max_pred: int
    dupe: int
    workers: int
    pretrain: dict  # preset, steps, run-YAML train keys, ds overrides
    zero: dict
    bench: list  # (name, train args)
    bench_peak: list  # bench.py peak args
    budgets: dict  # stage -> seconds
    loss_drop: float  # pretraining's last logged loss must be below this fraction of the first


def gpu_plan() -> Plan:
    large = ["--preset", "large", "--impl", "ds,hf", "--warmup", "3", "--repeats", "10"]
    s128, s512 = ["--seq", "128", "--micro-batch", "64", "--max-pred", "20"], ["--seq", "512", "--micro-batch", "8",
                                                                                  "--max-pred", "80"]
    return Plan(
        corpus_docs=None, vocab=8000, seq=128, max_pred=20, dupe=5, workers=os.cpu_count() or 1,
        pretrain=dict(preset="base", steps=300, num_workers=4, overrides=[],
                      train=dict(warmup_fraction=0.05, log_every=10, eval_every=150, eval_batches=4, save_every=150)),
        zero=dict(preset="base", steps=6, num_workers=2, overrides=[]),
        bench=[("large-128-fp16", [*large, *s128, "--dtype", "fp16"]),
               ("large-512-fp16", [*large, *s512, "--dtype", "fp16"]),
               ("large-128-fp16-real", [*large, *s128, "--dtype", "fp16", "--data", "{shards}", "--unpad", "both"]),
               ("large-128-bf16", [*large, *s128, "--dtype", "bf16"]),
               ("large-512-bf16", [*large, *s512, "--dtype", "bf16"])],
        bench_peak=["--dtypes", "fp16,bf16", "--seconds", "2"],
        budgets=dict(data=120, ops=240, tests=240, pretrain=150, zero=120, bench=230),
        loss_drop=0.85)


def dry_plan(dtype: str) -> Plan:
    small = ["ds.train_batch_size=16", "ds.train_micro_batch_size_per_gpu=16", "ds.optimizer.params.lr=1e-3"]
    return Plan(
        corpus_docs=400, vocab=1000, seq=64, max_pred=10, dupe=2, workers=2,
        pretrain=dict(preset="tiny", steps=12, num_workers=1, overrides=small,
                      train=dict(warmup_steps=1, log_every=2, eval_every=6, eval_batches=2, save_every=6)),
        zero=dict(preset="tiny", steps=4, num_workers=1, overrides=small[:2]),
        bench=[("tiny-64-real", ["--preset", "tiny", "--seq", "64", "--micro-batch", "4", "--max-pred", "10",
                                 "--dtype", dtype, "--impl", "ds,hf", "--warmup", "1", "--repeats", "2",
                                 "--data", "{shards}", "--unpad", "both"])],
        bench_peak=["--dtypes", dtype, "--seconds", "0.3"],
        budgets=dict(data=60, ops=120, tests=120, pretrain=120, zero=150, bench=150),
        loss_drop=0.97)


# ---------------------------------------------------------------------------------------------------
# Commands and stages


@dataclass
class Cmd:
    name: str
    argv: str
    rc: Optional[int]
    wall_s: float
    timed_out: bool
    log: str  # path of its full output

    @property
    def text(self) -> str:
        return Path(self.log).read_text(errors="replace") if Path(self.log).exists() else ""


@dataclass
class Stage:
    name: str
    budget_s: float
    status: str = "not run"  # pass | fail | timeout | skipped | error
    wall_s: float = 0.0
    checks: dict = field(default_factory=dict)  # name -> {"ok": True/False/None (not applicable), "detail"}
    numbers: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)  # the speed goals: measured, never a failure
    errors: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    deadline: float = 0.0

    def check(self, name: str, ok: Optional[bool], detail="") -> bool:
        self.checks[name] = {"ok": None if ok is None else bool(ok), "detail": str(detail)[:2000]}
        return bool(ok)

    def finish(self) -> None:
        if any(c["timed_out"] for c in self.commands):
            self.status = "timeout"
        elif self.errors or any(c["ok"] is False for c in self.checks.values()) or not self.checks:
            self.status = "fail"
        else:
            self.status = "pass"


class Check:
    """One run of the whole check: the plan, the work folder, the log, the deadline, the stages."""

    def __init__(self, out: Path, work: Path, dry: bool, deadline: float):
        self.out, self.work, self.dry, self.deadline = out, work, dry, deadline
        self.t0 = time.time()
        self.log_path = out / "gpu_check.log"
        self.json_path = out / "gpu_check.json"
        self._lock = threading.Lock()
        self.stages: dict[str, Stage] = {}
        self.shards = work / "shards"
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path.touch()  # scripts/gpu_check.sh wrote the set-up's part
        import torch

        from benchmarks.report import machine_facts
        from trainer import engine as eng, precision

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        ds = eng.load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
        self.decision = precision.decide(precision.requested(ds), precision.device_facts(self.device))
        self.plan = dry_plan(self.decision.precision) if dry else gpu_plan()
        self.machine = machine_facts(torch.device(self.device))

    # --- output --------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        line = f"[gpu_check +{time.time() - self.t0:5.0f}s] {msg}"
        with self._lock:
            print(line, flush=True)
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def write_json(self) -> None:
        """Written after every stage (and at the end): a run cut short still leaves what it measured."""
        stages = [asdict(s) for s in self.stages.values()]
        for s in stages:
            s.pop("deadline")
        done = [s for s in stages if s["status"] != "not run"]
        doc = {"kit": "scripts/gpu_check.sh", "schema": 1, "mode": "dry-run" if self.dry else "gpu",
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
               "wall_s": round(time.time() - self.t0, 1), "deadline_s": round(self.deadline - self.t0, 1),
               "machine": self.machine, "precision_decision": self.decision.line, "plan": asdict(self.plan),
               "stages": stages,
               "summary": {"ok": bool(done) and len(done) == len(stages) and all(s["status"] == "pass" for s in done),
                           "passed": [s["name"] for s in done if s["status"] == "pass"],
                           "not_passed": {s["name"]: s["status"] for s in stages if s["status"] != "pass"}}}
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.json_path)

    # --- running -------------------------------------------------------------------------------
    def run(self, st: Stage, name: str, argv: list, timeout: Optional[float] = None, expect: int = 0,
            env: Optional[dict] = None) -> Cmd:
        """One command in the repo root, bounded by ``timeout``, the stage's budget and the run's deadline
        (common.processes.run: SIGTERM to its whole process group, SIGKILL 10 s later); its output goes to the
        log afterwards, in one piece, so stages running side by side do not interleave."""
        limit = min(timeout or 1e9, st.deadline - time.time(), self.deadline - time.time())
        log = self.work / "logs" / f"{st.name}-{name}.log"
        argv = [str(a) for a in argv]
        shown = " ".join(argv).replace(str(self.work), "$WORK")
        if limit < 1:
            cmd = Cmd(name, shown, None, 0.0, True, str(log))
            st.commands.append(asdict(cmd))
            st.errors.append(f"{name}: not started, no time left")
            return cmd
        ended = processes.run(argv, log, limit, env={**self.env(), **(env or {})}, cwd=REPO)
        cmd = Cmd(name, shown, ended.returncode, round(ended.wall_s, 1), ended.timed_out, str(log))
        st.commands.append(asdict(cmd))
        text = cmd.text
        cut = f"[... first {len(text) - LOG_TAIL} characters cut ...]\n" if len(text) > LOG_TAIL else ""
        with self._lock, open(self.log_path, "a") as f:
            f.write(f"\n===== {st.name}/{name}: {shown}\n{cut}{text[-LOG_TAIL:]}\n===== {st.name}/{name}: exit "
                    f"{cmd.rc}{' (TIMED OUT after %.0f s)' % limit if cmd.timed_out else ''}, {cmd.wall_s} s\n")
        st.check(f"{name} exits {expect}", cmd.rc == expect and not cmd.timed_out,
                 f"exit {cmd.rc}" + (f", killed at its limit of {limit:.0f} s" if cmd.timed_out else "")
                 + ("" if cmd.rc == expect else f"; last lines: {tail_lines(text)}"))
        return cmd

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
        if self.dry:
            env["OMP_NUM_THREADS"] = "1"  # stages side by side on a 2-core CI machine
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)  # every launcher run is its own world of one
        return env

    def stage(self, name: str, fn: Callable[["Check", Stage], None], write: bool = True) -> Stage:
        st = self.stages[name]
        st.deadline = min(time.time() + st.budget_s, self.deadline)
        if st.deadline - time.time() < 5:
            st.status, st.errors = "skipped", ["out of time: the run's deadline passed before this stage"]
            self.say(f"{name}: skipped (out of time)")
            return st
        self.say(f"{name}: start (budget {st.deadline - time.time():.0f} s)")
        t0 = time.time()
        try:
            fn(self, st)
        except Exception as e:  # noqa: BLE001 - a bug in one stage must not lose the others' results
            st.errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        st.wall_s = round(time.time() - t0, 1)
        st.finish()
        failed = [k for k, c in st.checks.items() if c["ok"] is False] + [e.splitlines()[0] for e in st.errors]
        notes = "; not ok: " + "; ".join(failed)[:600] if failed else ""
        self.say(f"{name}: {st.status} in {st.wall_s:.0f} s{notes}")
        if write:
            self.write_json()
        return st

    def side_by_side(self, *stages: tuple[str, Callable]) -> None:
        """Stages at the same time, each in a thread; the JSON is written once all have ended."""
        threads = [threading.Thread(target=self.stage, args=(*s, False)) for s in stages]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.write_json()


def tail_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-1500:]


def metric_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl."""
    from trainer.metrics import read_records

    path = run_dir / "metrics.jsonl"
    recs = read_records(path) if path.exists() else []
    return [r for r in recs if "loss" in r], [r for r in recs if "val/mlm_loss" in r]


def write_run_yaml(path: Path, preset: str, shards: Path, out: Path, steps: int, num_workers: int, **train) -> Path:
    import yaml

    cfg = {"model": {"preset": preset}, "data": {"train": str(shards), "num_workers": num_workers},
           "train": {"output_dir": str(out), "max_steps": steps, "resume": "none", "keep_checkpoints": 2,
                     "seed": 1234, **train}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cpu_lines_in(text: str) -> list[str]:
    return [ln.strip()[:200] for ln in text.splitlines() if any(c in ln for c in CPU_LINES)]


# ---------------------------------------------------------------------------------------------------
# The stages


def stage_data(c: Check, st: Stage) -> None:
    p, py, w = c.plan, sys.executable, c.work
    c.run(st, "corpus", [py, "-m", "data.corpus", w / "corpus.txt", *([p.corpus_docs] if p.corpus_docs else [])])
    c.run(st, "tokenizer", [py, "-m", "data.tokenizer", "--input", w / "corpus.txt", "--out", w / "tokenizer",
                            "--vocab-size", p.vocab])
    shutil.rmtree(c.shards, ignore_errors=True)
    c.run(st, "shards", [py, "-m", "data.build", "--input", w / "corpus.txt", "--tokenizer", w / "tokenizer",
                         "--out", c.shards, "--max-seq-len", p.seq, "--max-predictions", p.max_pred,
                         "--dupe-factor", p.dupe, "--valid-fraction", 0.02, "--shard-size", 5000,
                         "--workers", p.workers, "--no-progress"])
    manifest = c.shards / "manifest.json"
    if st.check("manifest written", manifest.exists(), manifest):
        m = json.loads(manifest.read_text())
        train = m["splits"]["train"]
        st.numbers.update(train_samples=train["samples"], valid_samples=m["splits"]["valid"]["samples"],
                          train_tokens=train["tokens"], seq=p.seq,
                          padding_fraction=round(1 - train["tokens"] / max(1, train["samples"] * p.seq), 3))


def stage_ops(c: Check, st: Stage) -> None:
    code = ("import time; from trainer.dist import pin_extensions_dir; print('TORCH_EXTENSIONS_DIR', "
            "pin_extensions_dir()); from deepspeed.accelerator import get_accelerator; t = time.time(); "
            "b = get_accelerator().create_op_builder('FusedAdamBuilder'); b.load(verbose=True); "
            "print('BUILT', type(b).__module__, round(time.time() - t, 1))")
    cmd = c.run(st, "fused_adam", [sys.executable, "-c", code])
    built = [ln.split() for ln in cmd.text.splitlines() if ln.startswith("BUILT ")]
    want = "deepspeed.ops.op_builder.fused_adam" if c.device == "cuda" else "deepspeed.ops.op_builder.cpu.fused_adam"
    if st.check(f"FusedAdam built by {want}", bool(built) and built[-1][1] == want, built[-1][1] if built else "no"):
        st.numbers["build_or_load_s"] = float(built[-1][2])
    if cmd.timed_out:  # a build killed mid-way leaves a lock file that every later load would wait on forever
        ext = os.environ.get("TORCH_EXTENSIONS_DIR")
        for lock in Path(ext).glob("*/lock") if ext else []:
            lock.unlink(missing_ok=True)


def stage_tests(c: Check, st: Stage) -> None:
    xml = c.work / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    c.run(st, "pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA",
                         "-p", "no:cacheprovider", f"--junitxml={xml}", "-o", "junit_family=xunit1",
                         f"--basetemp={c.work / 'pytest'}"])  # xunit1: per-test properties (record_property)
    cases = parse_junit(xml) if xml.exists() else []
    st.numbers["tests"] = cases
    outcomes = [t["outcome"] for t in cases]
    st.numbers["outcomes"] = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    st.check("junit report", bool(cases), f"{len(cases)} test cases in {xml.name}")
    if c.dry:  # on CPU every GPU test is collected and skipped, saying why
        st.check("all skipped for want of CUDA", cases and all(t["outcome"] == "skipped" and "CUDA" in t["message"]
                                                               for t in cases), st.numbers["outcomes"])
    else:
        bad = {t["name"]: f"{t['outcome']}: {t['message']}" for t in cases if t["outcome"] != "passed"}
        st.check("every GPU test passed (none skipped)", cases and not bad, bad or st.numbers["outcomes"])


def parse_junit(path: Path) -> list[dict]:
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or el.text or "")[:1500]
                break
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        for k, v in props.items():
            try:
                props[k] = json.loads(v)
            except (TypeError, json.JSONDecodeError):
                pass
        cases.append({"name": tc.get("name"), "outcome": outcome, "time_s": float(tc.get("time") or 0),
                      "message": message, "properties": props})
    return cases


def pretrain_cmd(c: Check, ds_name: str, run_yaml: Path, overrides: list) -> list:
    return [sys.executable, "launcher/pretrain.py", "--deepspeed", f"ds_configs/{ds_name}", "--config", run_yaml,
            *overrides]


def stage_pretrain(c: Check, st: Stage) -> None:
    p = c.plan.pretrain
    out = c.work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    cfg = write_run_yaml(c.work / "pretrain.yaml", p["preset"], c.shards, out, p["steps"], p["num_workers"],
                         **p["train"])
    cmd = c.run(st, "zero2", pretrain_cmd(c, "zero2.json", cfg, p["overrides"]))
    text = cmd.text
    recs, vals = metric_records(out)
    fp16 = c.decision.precision == "fp16"
    st.check("precision as decided", c.decision.line in text, c.decision.line)
    start = next((ln for ln in text.splitlines() if "[pretrain] model " in ln), "")
    st.check("FusedAdam, ZeRO-2", "ZeRO-2, FusedAdam" in start, start)
    if not st.check("metrics logged", len(recs) >= 3, f"{len(recs)} training records"):
        return
    first, last = recs[0]["loss"], recs[-1]["loss"]
    st.check("loss falls", last < c.plan.loss_drop * first, f"{first:.3f} (step {recs[0]['step']}) -> {last:.3f} "
             f"(step {recs[-1]['step']}), must end below {c.plan.loss_drop:g} x the first")
    st.check("skipped_steps logged", all("skipped_steps" in r for r in recs))
    scales = [r.get("loss_scale") for r in recs]
    st.check("fp16 loss scale logged", all(s is not None for s in scales) if fp16 else None,
             f"{scales[0]} -> {scales[-1]}" if fp16 else f"n/a: {c.decision.precision} has no loss scale")
    lines = cpu_lines_in(text)
    st.check("no CPU workaround line" if c.device == "cuda" else "CPU workaround lines seen (the detector works)",
             not lines if c.device == "cuda" else bool(lines), lines or "none")
    body = recs[1:] or recs  # the first window holds the start-up
    st.numbers.update(
        steps=recs[-1]["step"], loss_first=first, loss_last=last, mlm_acc_last=recs[-1]["mlm_acc"],
        val_mlm_acc=[(v["step"], round(v["val/mlm_acc"], 4)) for v in vals],
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in body),
        samples_per_s=statistics.median(r["samples_per_s"] for r in body),
        mfu=statistics.median(r["mfu"] for r in body), skipped_steps=recs[-1]["skipped_steps"],
        loss_scale=[(r["step"], r.get("loss_scale")) for r in recs] if fp16 else None, start_line=start)


def stage_zero(c: Check, st: Stage) -> None:
    threads = [threading.Thread(target=zero_chain, args=(c, st, stage)) for stage in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def zero_chain(c: Check, st: Stage, stage: int) -> None:
    """ZeRO-`stage` for N steps saving at N/2; then a fresh process resumes from N/2 into another folder: the
    losses (and fp16 loss scales) of steps N/2+1..N must be those of the uninterrupted run."""
    p, n = c.plan.zero, c.plan.zero["steps"]
    root = c.work / f"zero{stage}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    runs = {}
    tag = root / "ref" / "checkpoints" / f"step_{n // 2:07d}"
    for name, extra in (("ref", []), ("resumed", [f"train.resume={tag}"])):
        cfg = write_run_yaml(root / f"{name}.yaml", p["preset"], c.shards, root / name, n, p["num_workers"],
                             log_every=1, save_every=n // 2, eval_every=0, eval_batches=2, warmup_steps=1,
                             peak_tflops=1.0)  # no peak measurement: MFU does not matter here
        cmd = c.run(st, f"zero{stage}-{name}", pretrain_cmd(c, f"zero{stage}.json", cfg, [*p["overrides"], *extra]))
        runs[name] = ({r["step"]: r for r in metric_records(root / name)[0]}, cmd.text)
        if cmd.rc != 0:
            return
    (ref, ref_log), (res, res_log) = runs["ref"], runs["resumed"]
    st.check(f"zero{stage}: ZeRO-{stage} ran", f"ZeRO-{stage}, " in ref_log)
    st.check(f"zero{stage}: resumed at step {n // 2}", f"at step {n // 2} (" in res_log)
    steps = list(range(n // 2 + 1, n + 1))
    if not st.check(f"zero{stage}: steps {steps[0]}-{steps[-1]} logged by both",
                    all(s in ref and s in res for s in steps)):
        return
    diffs = [abs(res[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in steps]
    st.check(f"zero{stage}: resumed losses reproduce the run's", max(diffs) <= 1e-3,
             f"max relative difference {max(diffs):.2e} (<= 1e-3; GPU atomics may differ in the last bits)")
    scales = [(ref[s].get("loss_scale"), res[s].get("loss_scale")) for s in steps]
    st.check(f"zero{stage}: loss scale restored", all(a == b for a, b in scales), scales)
    st.numbers[f"zero{stage}"] = {"steps": steps, "ref_loss": [ref[s]["loss"] for s in steps],
                                  "resumed_loss": [res[s]["loss"] for s in steps], "max_rel_diff": max(diffs),
                                  "bitwise_equal": [ref[s]["loss"] == res[s]["loss"] for s in steps],
                                  "loss_scale": scales, "cpu_lines": cpu_lines_in(ref_log + res_log)}


def stage_bench(c: Check, st: Stage) -> None:
    bench, d = [sys.executable, "launcher/bench.py"], c.work / "bench"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    c.run(st, "peak", [*bench, "peak", *c.plan.bench_peak, "--json", d / "peak.json"], timeout=60)
    peak = json.loads((d / "peak.json").read_text())["peak_tflops"] if (d / "peak.json").exists() else {}
    st.numbers.update(peak_tflops=peak, runs={})
    done = []
    for name, args in c.plan.bench:
        args = [str(a).replace("{shards}", str(c.shards)) for a in args]
        dtype = args[args.index("--dtype") + 1]
        extra = ["--peak-tflops", peak[dtype]] if dtype in peak else []
        c.run(st, name, [*bench, "train", *args, *extra, "--json", d / f"{name}.json"], timeout=90)
        if (d / f"{name}.json").exists():
            res = json.loads((d / f"{name}.json").read_text())
            done.append(d / f"{name}.json")
            keep = ("impl", "step_s", "tokens_per_s", "samples_per_s", "tflops", "mfu", "peak_mem_gb", "step_mem_gb",
                    "syncs_per_step", "malloc")
            st.numbers["runs"][name] = {"dtype": res["dtype"], "seq": res["seq"], "micro_batch": res["micro_batch"],
                                        "data": res["data"], "peak_tflops": res["peak_tflops"],
                                        "results": [{k: r.get(k) for k in keep} for r in res["results"]],
                                        "ratios": res["ratios"], "projection": res["projection"]}
    c.run(st, "project", [*bench, "project", *done, "--json", d / "project.json"], timeout=60)
    if (d / "project.json").exists():
        proj = json.loads((d / "project.json").read_text())
        st.numbers["project"] = {"paper_run": proj["paper_run"], "anchors": proj["anchors"]}
        st.check("projection printed", bool(proj["anchors"]) and (c.dry or bool(proj["paper_run"])),
                 proj["paper_run"] or "anchors only")
    bench_targets(st)


def bench_targets(st: Stage) -> None:
    """The speed goals on one H200 (measured, reported, never a failure)."""
    runs = st.numbers.get("runs", {})

    def row(run, prefix):
        return next((r for r in runs.get(run, {}).get("results", []) if r["impl"].startswith(prefix)), None)

    def target(name, goal, value, met):
        st.targets[name] = {"goal": goal, "measured": value, "met": None if value is None else bool(met)}

    for run, goal in (("large-128-fp16", 1.5), ("large-512-fp16", 1.3)):
        ratio = runs.get(run, {}).get("ratios", {}).get("a/c")
        target(f"{run}: (a) / transformers tokens/s", f">= {goal}", ratio, ratio is not None and ratio >= goal)
    a = row("large-128-fp16", "a:")
    target("large-128-fp16: MFU of (a)", ">= 0.50 of the measured fp16 peak", a and a["mfu"], a and a["mfu"] >= 0.5)
    for run in runs:  # every run with both unpadding rows (GPU: large-128-fp16-real)
        un, pad = row(run, "a: ours+DeepSpeed (unpadded)"), row(run, "a: ours+DeepSpeed (padded)")
        if un and pad:
            ratio = un["tokens_per_s"] / pad["tokens_per_s"]
            target(f"{run}: unpadded / padded tokens/s of (a)", ">= 1.0 (never slower)", ratio, ratio >= 1.0)
    for run in runs.values():  # dry runs: the same arithmetic on whatever ran
        for r in run["results"]:
            st.check(f"{r['impl']} @ {run['seq']}/{run['dtype']}: tokens/s measured", r["tokens_per_s"] > 0)


def stage_cpu_workarounds(c: Check, st: Stage) -> None:
    """CUDA: none of trainer/cpu.py ran (the tests' fresh-process probe, the launcher test, every launcher
    log, the bench's allocator field). Dry run on CPU: the same detectors find them (so they are not blind)."""
    cuda = c.device == "cuda"
    tests = {t["name"]: t for t in c.stages["tests"].numbers.get("tests", [])}
    for name in ("test_no_cpu_workaround_runs_on_cuda", "test_launcher_stops_when_the_fp16_scale_collapses"):
        t = tests.get(name)
        st.check(f"tests: {name}", (t is not None and t["outcome"] == "passed") if cuda else None,
                 t["outcome"] if t else "not reported")
    logs = {cmd["name"]: Path(cmd["log"]).read_text(errors="replace") for s in ("pretrain", "zero")
            for cmd in c.stages[s].commands if Path(cmd["log"]).exists()}
    seen = {name: cpu_lines_in(text) for name, text in logs.items()}
    if cuda:
        st.check("no CPU workaround line in any launcher log", logs and not any(seen.values()),
                 {k: v for k, v in seen.items() if v} or f"{len(logs)} logs clean")
    else:
        st.check("the detector sees CPU workaround lines in every launcher log", logs and all(seen.values()),
                 {k: len(v) for k, v in seen.items()})
    mallocs = {r["malloc"] for run in c.stages["bench"].numbers.get("runs", {}).values() for r in run["results"]}
    st.check("bench: host allocator untouched" if cuda else "bench: host allocator reported",
             mallocs == {"device"} if cuda else bool(mallocs) and "device" not in mallocs, sorted(mallocs))
    st.numbers.update(launcher_logs=sorted(logs), cpu_lines=seen, bench_malloc=sorted(mallocs))


STAGES = [("data", stage_data), ("ops", stage_ops), ("tests", stage_tests), ("pretrain", stage_pretrain),
          ("zero", stage_zero), ("bench", stage_bench), ("cpu_workarounds", stage_cpu_workarounds)]


def summary_table(c: Check) -> str:
    rows = [f"{'stage':16s} {'status':8s} {'wall s':>7s}  notes"]
    for st in c.stages.values():
        bad = [k for k, v in st.checks.items() if v["ok"] is False] + [e.splitlines()[0][:80] for e in st.errors]
        rows.append(f"{st.name:16s} {st.status:8s} {st.wall_s:7.0f}  {'; '.join(bad)[:150]}")
    b = c.stages["bench"]
    for name, run in b.numbers.get("runs", {}).items():
        for r in run["results"]:
            mem = f", step mem {r['step_mem_gb']:.1f} GB" if r.get("step_mem_gb") is not None else ""
            rows.append(f"  bench {name:22s} {r['impl']:34s} {r['tokens_per_s']:12,.0f} tok/s  "
                        f"MFU {r['mfu']:6.1%}{mem}")
    for name, t in b.targets.items():
        verdict = {True: "met", False: "NOT met", None: "not measured here"}[t["met"]]
        shown = "" if t["measured"] is None else f"{t['measured']:.3f} "
        rows.append(f"  target {name}: {shown}(goal {t['goal']}): {verdict}")
    for r in b.numbers.get("project", {}).get("paper_run", []):
        rows.append(f"  paper run on {r['device']} ({r['dtype']}): {r['total_h']:,.0f} device-hours "
                    f"({r['phase1_h']:,.0f} + {r['phase2_h']:,.0f})")
    return "\n".join(rows)


def describe(plan: Plan) -> str:
    """The plan in words (scripts/gpu_check.sh --dry-run prints the GPU one)."""
    p, z = plan.pretrain, plan.zero
    lines = [f"  data      corpus ({plan.corpus_docs or 'all'} docstring documents) -> WordPiece {plan.vocab} "
             f"-> seq-{plan.seq} shards (dupe {plan.dupe}, {plan.workers} workers)",
             "  ops       FusedAdam JIT build (TORCH_CUDA_ARCH_LIST, MAX_JOBS)",
             "  tests     pytest -m gpu tests/test_gpu.py",
             f"  pretrain  launcher/pretrain.py --deepspeed ds_configs/zero2.json "
             f"{' '.join(p['overrides']) or '(as shipped)'}: "
             f"BERT-{p['preset']}, {p['steps']} steps",
             f"  zero      ZeRO-1, ZeRO-3 side by side: BERT-{z['preset']} {z['steps']} steps, save at "
             f"{z['steps'] // 2}, resume, compare",
             f"  bench     peak {' '.join(plan.bench_peak)}; train: {', '.join(n for n, _ in plan.bench)}; project",
             "  cpu_workarounds  nothing of trainer/cpu.py on CUDA (tests' probe, launcher logs, bench allocator)",
             "  budgets   " + ", ".join(f"{k} {v} s" for k, v in plan.budgets.items())
             + " (data, ops and tests side by side; 480 s in all, wheel install included)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the GPU plan and exit")
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/../gpu_check_work)")
    ap.add_argument("--dry-run", action="store_true", help="the same stages on a tiny CPU configuration")
    ap.add_argument("--deadline", type=float, default=None, help="absolute time (epoch s) by which to end")
    ap.add_argument("--setup", choices=["pass", "fail"], default=None, help="the wheel step's result (gpu_check.sh)")
    ap.add_argument("--setup-detail", default="")
    ap.add_argument("--setup-wall", type=float, default=0.0)
    a = ap.parse_args(argv)
    if a.plan:
        print(f"the GPU plan (scripts/gpu_check.sh on a GPU machine):\n{describe(gpu_plan())}")
        return 0
    if a.out is None:
        ap.error("--out is required")
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_work_{os.getpid()}"
    c = Check(a.out, work, a.dry_run, a.deadline or time.time() + 470)
    if a.setup:
        c.stages["setup"] = setup = Stage("setup", 0, wall_s=a.setup_wall)
        setup.check("wheels (scripts/gpu_check.sh)", a.setup == "pass", a.setup_detail)
        setup.finish()
    for name, _ in STAGES:
        c.stages[name] = Stage(name, c.plan.budgets.get(name, 60))
    c.say(f"{'dry run on ' + c.device if c.dry else 'GPU run'}: {c.machine.get('gpu') or c.machine['cpu']}; "
          f"torch {c.machine['torch']}, deepspeed {c.machine['deepspeed']}, transformers {c.machine['transformers']};"
          f" {c.decision.line}; {c.deadline - time.time():.0f} s to the deadline; work {work}")
    c.write_json()
    fns = dict(STAGES)
    c.side_by_side(*((n, fns[n]) for n in ("data", "ops", "tests")))  # CPU work; the tests wait on the op's lock
    for name in ("pretrain", "zero", "bench", "cpu_workarounds"):
        c.stage(name, fns[name])
    c.write_json()
    print(summary_table(c), flush=True)
    with open(c.log_path, "a") as f:
        f.write("\n" + summary_table(c) + "\n")
    ok = all(s.status == "pass" for s in c.stages.values())
    passed = sum(s.status == "pass" for s in c.stages.values())
    c.say(f"{'PASS' if ok else 'FAIL'}: {passed}/{len(c.stages)} stages passed in {time.time() - c.t0:.0f} s "
          f"({'dry run, ' if c.dry else ''}{c.machine.get('gpu') or c.machine['cpu']}); {c.json_path}, {c.log_path}")
    return 0 if ok else 1


if __name__ == "__main__":  # through scripts/gpu_check.sh, which puts the project on PYTHONPATH
    sys.exit(main())
