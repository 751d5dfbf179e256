"""The benchmarks run end to end and its arithmetic is right (speed itself is never asserted)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import report, steps
from benchmarks.report import ZERO2
from bert import BertConfig
from trainer import cpu_start, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "launcher", "bench.py"), *args, "--json", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"results in {out}" in p.stdout
    return json.loads(out.read_text()), p.stdout


def test_synthetic_batch_follows_googles_prediction_count():
    cfg = BertConfig.preset("tiny")
    for seq, max_pred, expect in [(128, 20, 19), (512, 80, 77), (32, 5, 5)]:
        b = steps.synthetic_batch(cfg, 3, seq, max_pred)
        assert b["input_ids"].shape == (3, seq) and b["masked_lm_positions"].shape == (3, max_pred)
        assert b["masked_lm_weights"].sum(1).tolist() == [expect] * 3
        pos = b["masked_lm_positions"][:, :expect]
        assert (pos >= 1).all() and (pos <= seq - 2).all()  # never [CLS] (0) or the final [SEP]


def test_machine_facts_describe_this_machine_for_benchmarks_and_the_gpu_kit():
    import torch

    from trainer import precision

    facts = report.machine_facts(torch.device("cpu"))
    assert facts["kind"] == "cpu" and facts["torch"] == torch.__version__ and facts["cores"] == os.cpu_count()
    assert facts["cpu_isa"] == precision.cpu_facts().detail and f"({facts['cpu_isa']})" in facts["device"]
    assert facts["deepspeed"] and facts["cpu"] and "gpu" not in facts  # GPU properties only for a GPU
    assert facts["git_commit"] is None or len(facts["git_commit"]) == 40
    json.dumps(facts)  # it goes into every result file as it is


def test_table_and_json_of_a_result(tmp_path, capsys):
    report.print_table([{"k": 1.5, "name": "a"}, {"k": None, "name": "long name"}], [("name", "{}"), ("k", "{:.2f}")])
    assert capsys.readouterr().out.splitlines() == ["     name     k", "        a  1.50", "long name     -"]
    res = {"cmd": "peak", "x": [1]}
    assert report.write_result(res, str(tmp_path / "d" / "r.json")) == str(tmp_path / "d" / "r.json")
    assert json.loads((tmp_path / "d" / "r.json").read_text()) == res
    assert report.write_result(res, "-") == "-" and json.loads(capsys.readouterr().out) == res


def test_a_times_the_trainers_own_step(monkeypatch):
    """(a) is ``Trainer.train_step``, the step pretraining and fine-tuning run, not a copy of it (the engine is
    the hooks test's stand-in here: what is checked is who steps it)."""
    from test_trainer_hooks import Engine
    from trainer import dist, engine as eng, trainer as tr

    monkeypatch.setattr(dist, "init", lambda *a, **k: (0, 0, 1))
    monkeypatch.setattr(eng, "build_engine", lambda model, ds: Engine(model, gas=1))
    calls, real = [], tr.Trainer.train_step
    monkeypatch.setattr(tr.Trainer, "train_step", lambda self, b: (calls.append(len(b)), real(self, b))[1])
    cfg = BertConfig.preset("tiny")
    step = steps.ds_step(cfg, steps.synthetic_batch(cfg, 2, 32, 5), ZERO2, "fp32", True, torch.device("cpu"))
    assert step() == 0.0 and step() == 0.0  # no non-finite loss: the read the loop makes per step
    assert calls == [1, 1]


@pytest.mark.integration  # runs launcher/bench.py
def test_train_compares_the_implementations(tmp_path):
    res, stdout = run_bench(["train", "--preset", "tiny", "--seq", "32", "--micro-batch", "2", "--max-pred", "5",
                             "--warmup", "1", "--repeats", "2", "--peak-tflops", "1.0"],
                            tmp_path, "train")
    names = [r["impl"] for r in res["results"]]
    assert names == ["a: ours+DeepSpeed", "b: ours plain", "c: transformers",
                     "c0: transformers, own process, glibc malloc"]
    # CPU: (a)-(c) run as our launchers run (tcmalloc when installed, else glibc keeping freed memory),
    # (c0) as an untuned process.
    ours = "tcmalloc" if cpu_start.find_tcmalloc() else "glibc-keep"
    assert res["malloc"] == ours
    assert [r["malloc"] for r in res["results"]] == [ours, ours, ours, "glibc-default"]
    assert all(r["faults_per_step"] >= 0 for r in res["results"])
    counts = res["counts"]
    assert counts == {"tokens": 64.0, "predictions": 10.0, "sequences": 2.0, "seq_len": 32}
    cfg = BertConfig.preset("tiny")
    fc = metrics.flop_counts(steps.meta_model(cfg))
    assert res["flops_per_step"] == pytest.approx(metrics.step_flops(fc, 64, 10, 2, 32))
    for r in res["results"]:
        assert len(r["times"]) == 2 and r["step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_s"])
        assert r["mfu"] == pytest.approx(res["flops_per_step"] / r["step_s"] / 1e12 / 1.0)
    by = {r["impl"].split(":")[0]: r for r in res["results"]}
    assert res["ratios"]["a/c"] == pytest.approx(by["a"]["tokens_per_s"] / by["c"]["tokens_per_s"])
    assert res["ratios"]["a/c0"] == pytest.approx(by["a"]["tokens_per_s"] / by["c0"]["tokens_per_s"])
    assert res["ratios"]["a/b"] == pytest.approx(by["a"]["tokens_per_s"] / by["b"]["tokens_per_s"])
    assert "a/c:" in stdout and "a/c0:" in stdout and "mfu" in stdout  # the table is printed


@pytest.mark.integration  # runs launcher/bench.py
def test_peak_loader_and_build(tmp_path, train_shards):
    res, out = run_bench(["peak", "--dtypes", "fp32,bf16,fp16", "--seconds", "0.2"], tmp_path, "peak")
    assert set(res["peak_tflops"]) == {"fp32", "bf16"} and all(v > 0 for v in res["peak_tflops"].values())
    assert "fp16 skipped (cpu has no fast fp16" in out
    res, _ = run_bench(["loader", "--data", train_shards, "--micro-batch", "8", "--workers", "0,1", "--batches", "5"],
                       tmp_path, "loader")
    assert [r["workers"] for r in res["results"]] == ["decode only", 0, 1]
    manifest = json.loads(open(os.path.join(train_shards, "manifest.json")).read())
    assert res["results"][0]["samples"] == sum(s["samples"] for s in manifest["splits"]["train"]["shards"])
    assert all(r["samples_per_s"] > 0 for r in res["results"])
    corpus = os.path.join(os.path.dirname(train_shards), "corpus.txt")
    res, _ = run_bench(["build", "--input", corpus, "--tokenizer", os.path.join(train_shards, "tokenizer"),
                        "--seq", "64", "--max-pred", "9"], tmp_path, "build")
    row = res["results"][0]
    assert row["tokens"] > 0 and row["tokens_per_s"] == pytest.approx(row["tokens"] / row["wall_s"])


@pytest.mark.integration  # runs launcher/bench.py
def test_project_sums_both_phases_beside_the_published_anchors(tmp_path):
    """`project`: the paper's run (0.9 x 1M x 256 sequences at 128, 0.1 x 1M x 256 at 512) in device-hours from
    `train --preset large` results (synthetic full-length only), and the published anchors, labelled."""
    def result(seq, rate, data="synthetic"):
        path = tmp_path / f"large_{seq}_{data.replace('/', '_')}.json"
        path.write_text(json.dumps({"preset": "large", "seq": seq, "dtype": "fp16", "data": data,
                                    "machine": {"device": "GPU X"},
                                    "results": [{"impl": "a: ours+DeepSpeed", "samples_per_s": rate}]}))
        return str(path)

    res, out = run_bench(["project", result(128, 1000.0), result(512, 100.0), result(128, 5000.0, "shards/x")],
                         tmp_path, "project")
    assert "derived from published numbers, NOT measured here" in out
    a100 = next(r for r in res["anchors"] if r["device"] == "A100-80GB")
    assert a100["phase1_h"] == pytest.approx(0.9e6 * 256 / 580 / 3600)  # ~110 h
    assert a100["phase2_h"] == pytest.approx(0.1e6 * 256 / 78 / 3600)  # ~91 h
    v100 = next(r for r in res["anchors"] if r["device"] == "V100")  # 64 TFLOPS / our FLOPs per sequence
    fc = metrics.flop_counts(steps.meta_model(BertConfig.preset("large")))
    assert v100["samples_per_s_128"] == pytest.approx(64e12 / metrics.step_flops(fc, 128, 19, 1, 128))
    assert [r["seq"] for r in res["phases"]] == [128, 512]  # the real-batch result is not projected
    (run,) = res["paper_run"]
    assert run["device"] == "GPU X" and run["total_h"] == pytest.approx(0.9e6 * 256 / 1000 / 3600
                                                                        + 0.1e6 * 256 / 100 / 3600)
