"""The pretraining loop end to end (subprocesses, tiny model, CPU, gloo).

Launch styles: the ``deepspeed`` launcher; srun-like (ranks started directly with SLURM_* variables and a
stub ``scontrol``, the pattern for Slurm preemption); plain ``python launcher/pretrain.py`` (one process).
"""

import glob
import json
import os
import shutil
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer import audit, checkpoint, checkpoint_files, precision, schedule
from trainer.metrics import read_records

from helpers import CPU_PRECISION, REPO, base_env, train_records, write_ds, write_run

BIN = Path(sys.executable).parent
PRETRAIN = str(REPO / "launcher" / "pretrain.py")
TIMEOUT = 500  # generous: a first FusedAdam JIT build (~1-2 min, then cached) may land inside any run

# A 2-rank run with gradient accumulation, dropout on, validation mid-run and frequent checkpoints: the
# reference for the exact-resume tests.
RESUME_TRAIN = dict(max_steps=9, warmup_steps=3, log_every=1, eval_every=4, eval_batches=2, save_every=3,
                    keep_checkpoints=2, log_batch_keys=True, peak_tflops=1.0)


def run_plain(procs, tmp, ds, cfg, *overrides, expect=0):
    return procs.run([sys.executable, PRETRAIN, "--deepspeed", ds, "--config", cfg, *overrides],
                     Path(tmp) / f"plain_{Path(cfg).stem}", env=base_env(), timeout=TIMEOUT, expect=expect)


def free_job_id():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return str(port - 20000 if port >= 20000 else port + 20000)  # so that 20000 + id % 20000 == port


def scontrol_stub(tmp):
    bin_dir = Path(tmp) / "stub_bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "scontrol"
    stub.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\necho localhost\necho other-node\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def spawn_srun_like(procs, tmp, ds, cfg, *overrides, world=2, log_name="ranks", env=None):
    """Start ``world`` ranks the way srun does: only SLURM_* set, trainer.dist derives the rest."""
    env = env or base_env()
    env["PATH"] = scontrol_stub(tmp) + os.pathsep + env["PATH"]
    job = free_job_id()
    ranks = []
    for r in range(world):
        e = dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS=str(world), SLURM_JOB_ID=job,
                 SLURM_JOB_NODELIST="localhost")
        ranks.append(procs.start([sys.executable, PRETRAIN, "--deepspeed", ds, "--config", cfg, *overrides],
                                 Path(tmp) / f"{log_name}_{r}", env=e))
    return ranks


def wait_all(procs, ranks):
    """Exit codes and each rank's output (stdout then stderr), bounded by TIMEOUT."""
    codes = procs.wait(ranks, TIMEOUT)
    return codes, ["".join(procs.output(p)) for p in ranks]


def val_records(out):
    return {r["step"]: r for r in read_records(Path(out) / "metrics.jsonl") if "val/mlm_loss" in r}


def wait_for_checkpoint(out, ranks, tag):
    latest = Path(out) / "checkpoints" / "latest"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() >= tag:
            return
        if any(p.poll() is not None for p in ranks):
            raise AssertionError("run ended before the checkpoint appeared")
        time.sleep(0.02)
    raise AssertionError("checkpoint never appeared")


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(train_shards, tmp_path_factory, session_procs):
    """Uninterrupted srun-like 2-rank ZeRO-2 run: micro 4 x accum 2 x 2 ranks."""
    tmp = tmp_path_factory.mktemp("reference")
    ds = write_ds(tmp, micro=4, accum=2)
    out = tmp / "run"
    cfg = write_run(tmp, train_shards, out, **RESUME_TRAIN)
    codes, logs = wait_all(session_procs, spawn_srun_like(session_procs, tmp, ds, cfg))
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    return {"tmp": tmp, "ds": ds, "cfg": cfg, "out": out, "logs": logs}


def assert_same_as_reference(out, ref_out, from_step=1):
    ref, got = train_records(ref_out), train_records(out)
    assert sorted(got) == sorted(ref) == list(range(1, RESUME_TRAIN["max_steps"] + 1))
    for s in range(from_step, RESUME_TRAIN["max_steps"] + 1):
        for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "keys", "samples_seen", "tokens_seen"):
            assert got[s][k] == ref[s][k], f"step {s}: {k} {got[s][k]!r} != reference {ref[s][k]!r}"
    rv, gv = val_records(ref_out), val_records(out)
    assert sorted(gv) == sorted(rv) and all(gv[s]["val/mlm_loss"] == rv[s]["val/mlm_loss"] for s in rv)


def test_reference_run_layout_metrics_and_client_state(reference_run, train_shards):
    out = reference_run["out"]
    recs = train_records(out)
    W, T = RESUME_TRAIN["warmup_steps"], RESUME_TRAIN["max_steps"]
    for s, r in recs.items():
        assert r["lr"] == pytest.approx(schedule.lr_at(s - 1, 1e-3, W, T))  # peak from the DS JSON
        assert all(len(k) == 2 * 4 for k in r["keys"])  # 2 ranks x (accum 2 x micro 4) keys
        assert not set(r["keys"][0]) & set(r["keys"][1])  # ranks see disjoint samples
        assert r["samples_seen"] == s * 16 and 0 <= r["mlm_acc"] <= 1 and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 2.0)
    # A step's keys never repeat within the run's first epoch.
    all_keys = [k for r in recs.values() for rk in r["keys"] for k in rk]
    assert len(all_keys) == len(set(all_keys))
    assert sorted(val_records(out)) == [0, 4, 8, 9]
    # Run folder.
    ds = json.loads((out / "ds_config.json").read_text())
    decision = precision.decide("fp16", precision.device_facts("cpu"))  # what this machine trains the JSON in
    assert "fp16" not in ds and ds.get("bf16") == ({"enabled": True} if decision.precision == "bf16" else None)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 2)  # resolved batch triple
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == T
    assert json.loads((out / "model_config.json").read_text())["vocab_size"] == 1000
    assert (out / "tokenizer" / "tokenizer.json").exists()
    # Checkpoints: saved at 3, 6, 9; kept the last 2.
    assert checkpoint_files.list_tags(str(out / "checkpoints")) == ["step_0000006", "step_0000009"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000009"
    cs = checkpoint_files.read_client_state(str(out / "checkpoints"), None)
    st = cs["state"]  # trainer.checkpoint's schema: every registered component's part
    assert cs["state_version"] == 2 and sorted(cs["per_rank"]) == ["loader", "rng"]
    assert sorted(st) == ["audit", "data_health", "guard", "loader", "rng", "rollback", "schedule", "spike",
                          "trainer"]
    assert cs["step"] == st["trainer"]["step"] == 9 and st["trainer"]["samples_seen"] == 9 * 16
    assert st["trainer"]["tokens_seen"] == recs[9]["tokens_seen"] and st["guard"] == {"consecutive": 0}
    assert len(st["loader"]) == 2 and len(st["rng"]) == 2 and cs["world_size"] == 2
    assert st["loader"][0]["samples_seen"] == 9 * 16 and st["rollback"] == {"history": []}
    manifest = json.loads((Path(train_shards) / "manifest.json").read_text())
    assert cs["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"] and cs["max_seq_len"] == 64
    assert cs["run_config"]["train"]["max_steps"] == T and cs["model_config"]["vocab_size"] == 1000
    # The optimizer really ran with our schedule and BERT's weight-decay groups (decay from the DS JSON).
    for r in range(2):
        prefix = "bf16_" if CPU_PRECISION == "bf16" else ""  # DeepSpeed's file name says the precision
        name = f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        optim = torch.load(out / "checkpoints" / "step_0000009" / name, map_location="cpu", weights_only=False)
        groups = optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(schedule.lr_at(T - 1, 1e-3, W, T), 0.01),
                                                                  (schedule.lr_at(T - 1, 1e-3, W, T), 0.0)]
    # The precision decision is said once (rank 0), and the summary line is printed.
    assert reference_run["logs"][0].count(decision.line) == 1 and decision.line not in reference_run["logs"][1]
    assert "done: 9 steps" in reference_run["logs"][0] and "tensorboard --logdir" in reference_run["logs"][0]


def test_tensorboard_scalars_and_text_panel(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(reference_run["out"] / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "train/mlm_loss", "train/nsp_loss", "train/mlm_acc", "train/nsp_acc", "train/lr",
                "train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "train/tflops", "train/mfu",
                "train/skipped_steps", "train/data/corrupt_samples", "train/data/missing_fraction", "val/mlm_loss",
                "val/perplexity", "val/mlm_acc", "val/nsp_loss", "val/nsp_acc"):
        assert tag in scalars, tag
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 10))
    recs = train_records(reference_run["out"])
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([recs[s]["loss"] for s in range(1, 10)])
    texts = ea.Tensors("validation/examples/text_summary")
    assert [e.step for e in texts] == [0, 4, 8, 9]
    text = texts[-1].tensor_proto.string_val[0].decode()
    assert text.count("**Input:**") == 3 and "**Target:**" in text and "**Predicted:**" in text and "[CLS]" in text


def test_resume_after_kill_9_is_exact(reference_run, train_shards, tmp_path, procs):
    ds = reference_run["ds"]
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, **RESUME_TRAIN)
    ranks = spawn_srun_like(procs, tmp_path, ds, cfg, log_name="first")
    wait_for_checkpoint(out, ranks, "step_0000003")
    assert all(p.poll() is None for p in ranks)  # really interrupted mid-run
    for p in ranks:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    codes, logs = wait_all(procs, spawn_srun_like(procs, tmp_path, ds, cfg, log_name="second"))
    assert codes == [0, 0], logs[0][-4000:]
    assert "resumed from" in logs[0] and "resumed from" in "".join(logs)
    assert_same_as_reference(out, reference_run["out"])
    for run in (out, reference_run["out"]):  # every sample of the epoch so far trained once, across the kill
        ok, line = audit.audit_run(str(run))
        assert ok and line.startswith("accounted: steps 1-9 trained 144 samples"), line


def test_deepspeed_launcher_two_ranks_zero2_bf16(train_shards, tmp_path, procs):
    ds = write_ds(tmp_path, micro=4)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=3, eval_every=3, eval_batches=1)
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    p = procs.run([BIN / "deepspeed", "--num_gpus", "2", PRETRAIN, "--deepspeed", ds, "--config", cfg,
                   "train.log_batch_keys=true"], tmp_path / "launcher", env=base_env(), timeout=TIMEOUT)
    recs = train_records(out)
    assert sorted(recs) == [1, 2, 3] and all(len(r["keys"]) == 2 for r in recs.values())
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert checkpoint_files.list_tags(str(out / "checkpoints")) == ["step_0000003"]
    assert "2 rank(s)" in p.stdout + p.stderr
    # DeepSpeed's CPU shared-memory allreduce buffers (69 MB of RAM each) are not left in /dev/shm.
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_smoke(train_shards, tmp_path, stage, procs):
    ds = write_ds(tmp_path, name=f"zero{stage}.json", micro=4)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=3, eval_every=2, eval_batches=2, save_every=2)
    codes, logs = wait_all(procs, spawn_srun_like(procs, tmp_path, ds, cfg))
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    recs = train_records(out)
    assert sorted(recs) == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs.values())
    assert sorted(val_records(out)) == [0, 2, 3]
    assert checkpoint_files.list_tags(str(out / "checkpoints")) == ["step_0000002", "step_0000003"]
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == stage


def test_gradient_accumulation_matches_a_bigger_micro_batch(train_shards, tmp_path, procs):
    """micro 4 x accum 2 and micro 8 x accum 1 see the same 8 samples per step (the loader's order is a
    function of global positions) and, in fp32 without dropout, follow the same trajectory."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    recs = {}
    for micro, accum in ((4, 2), (8, 1)):
        ds = write_ds(tmp_path, micro=micro, accum=accum, fp16=False)
        out = tmp_path / f"run_{micro}x{accum}"
        cfg = write_run(tmp_path, train_shards, out, model=no_dropout, max_steps=4, warmup_steps=0,
                        log_batch_keys=True, save_every=1000)
        run_plain(procs, tmp_path, ds, cfg)
        recs[micro] = train_records(out)
    a, b = recs[4], recs[8]
    for s in range(1, 5):
        assert sorted(a[s]["keys"][0]) == sorted(b[s]["keys"][0])
        assert a[s]["samples_seen"] == b[s]["samples_seen"] == 8 * s
    # Step 1: identical weights and samples: the exactly aggregated MLM loss agrees to float precision.
    assert a[1]["mlm_loss"] == pytest.approx(b[1]["mlm_loss"], rel=1e-5)
    # Later steps: 4x2 averages two micro-batch means, 8x1 one mean over the 8 sequences, so gradients
    # differ slightly; the trajectories must stay close.
    for s in range(2, 5):
        assert a[s]["mlm_loss"] == pytest.approx(b[s]["mlm_loss"], rel=2e-3)


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(train_shards, tmp_path, procs):
    # lr 1e30 (clipping off): the first update multiplies the weights into overflow, the next loss is NaN.
    ds = write_ds(tmp_path, micro=4, lr=1e30, clip=0.0)
    out = tmp_path / "run"
    cfg = write_run(tmp_path, train_shards, out, max_steps=6, warmup_steps=0, save_every=1)
    p = run_plain(procs, tmp_path, ds, cfg, expect=3)
    tags = checkpoint_files.list_tags(str(out / "checkpoints"))
    assert tags and f"non-finite loss in {CPU_PRECISION}" in p.stderr
    assert f"last good checkpoint: {out / 'checkpoints' / tags[-1]}" in p.stderr
    stopped = int(p.stderr.split("stopping at step ")[1].split(":")[0])
    assert tags[-1] == checkpoint_files.tag_for(stopped - 1)  # the bad step itself was not saved


def test_phase2_init_from_loads_weights_only(reference_run, train_shards_128, tmp_path, procs):
    ds = write_ds(tmp_path, micro=4)
    out = tmp_path / "phase2"
    ref_ckpt = str(reference_run["out"] / "checkpoints")
    cfg = write_run(tmp_path, train_shards_128, out, max_steps=2, eval_every=2, eval_batches=4,
                    init_from=ref_ckpt)
    p = run_plain(procs, tmp_path, ds, cfg)
    assert "initialised weights from" in p.stdout and "(step 9)" in p.stdout
    recs = train_records(out)
    assert sorted(recs) == [1, 2] and recs[1]["lr"] == pytest.approx(schedule.lr_at(0, 1e-3, 0, 2))
    # The same run without init_from starts from random weights: its held-out loss at step 0 is worse.
    out0 = tmp_path / "fresh"
    run_plain(procs, tmp_path, ds, write_run(tmp_path, train_shards_128, out0, max_steps=1, eval_every=2,
                                              eval_batches=4))
    assert val_records(out)[0]["val/mlm_loss"] < val_records(out0)[0]["val/mlm_loss"] - 0.05


def test_resume_refuses_a_checkpoint_of_another_tokenizer(reference_run, train_shards_other_tok):
    from trainer.errors import ConfigError

    out = reference_run["out"]
    client = checkpoint_files.read_client_state(str(out / "checkpoints"), None)
    other = json.loads((Path(train_shards_other_tok) / "manifest.json").read_text())["tokenizer"]
    assert other["vocab_size"] == 1000 and other["fingerprint"] != client["tokenizer_fingerprint"]

    def checker(fingerprint):
        return checkpoint.Checkpointer("x", 1, {"tokenizer_fingerprint": fingerprint, "max_seq_len": 64,
                                                "model_config": client["model_config"]})
    with pytest.raises(ConfigError) as e:
        checker(other["fingerprint"]).check(client, "ckpt")
    assert client["tokenizer_fingerprint"] in str(e.value) and other["fingerprint"] in str(e.value)
    checker(client["tokenizer_fingerprint"]).check(client, "ckpt")  # its own tokenizer, another world: fine


@pytest.mark.parametrize("overrides, fragment", [
    (["model.vocab_size=999"], "but the model has vocab_size 999"),
    (["model.max_position_embeddings=32"], "max_seq_len is 64 but the model's max_position_embeddings is 32"),
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
])
def test_refusals_before_training(train_shards, tmp_path, capsys, overrides, fragment):
    from common.errors import run_main
    from launcher.pretrain import main

    ds = write_ds(tmp_path)
    cfg = write_run(tmp_path, train_shards, tmp_path / "run")
    assert run_main(main, ["--deepspeed", ds, "--config", cfg, *overrides]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_format_version_mismatch_is_refused(train_shards, tmp_path, capsys):
    from common.errors import run_main
    from launcher.pretrain import main

    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    m = json.loads((shards / "manifest.json").read_text())
    m["format_version"] = 99
    (shards / "manifest.json").write_text(json.dumps(m))
    ds = write_ds(tmp_path)
    assert run_main(main, ["--deepspeed", ds, "--config", write_run(tmp_path, str(shards), tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "format_version" in err and "99" in err and "Traceback" not in err
