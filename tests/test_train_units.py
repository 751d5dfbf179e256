"""Trainer pieces without a training run: schedule, DeepSpeed config resolution (batch arithmetic), SLURM
env, weight-decay groups, FLOP counts, non-finite policy, stop signals, shard/model checks, metrics sinks."""

import json
import os
import stat

import pytest
import torch

from bert import BertConfig, BertForPreTraining
from trainer import dist, schedule
from trainer.engine import apply_ds_overrides, load_ds_config, param_groups, resolve, resolve_batch
from common.errors import UserError
from trainer.errors import ConfigError
from trainer.guards import NonFiniteGuard
from trainer.metrics import flop_counts
from trainer.precision import DeviceFacts
from trainer.pretrain import check_shards

CPU_BF16 = DeviceFacts("cpu", fast_fp16=False, native_bf16=True, detail="AVX512_BF16")
CPU_AVX2 = DeviceFacts("cpu", fast_fp16=False, native_bf16=False, detail="AVX2")
GPU = DeviceFacts("cuda", fast_fp16=True, native_bf16=True, detail="compute capability 9.0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# Schedule


def test_schedule_values_match_the_closed_form():
    peak, W, T = 1e-4, 10, 100
    lrs = [schedule.lr_at(s, peak, W, T) for s in range(T + 1)]
    assert lrs[0] == pytest.approx(peak / W)  # first update already moves
    assert lrs[W - 1] == pytest.approx(peak) and lrs[W] == pytest.approx(peak)
    assert lrs[55] == pytest.approx(peak * 45 / 90)
    assert lrs[T - 1] == pytest.approx(peak / (T - W)) and lrs[T] == 0.0
    # Linear pieces: constant increments while warming up, constant decrements while decaying.
    up = [b - a for a, b in zip(lrs[:W], lrs[1:W])]
    down = [b - a for a, b in zip(lrs[W:T], lrs[W + 1:T + 1])]
    assert max(up) - min(up) < 1e-15 and min(up) > 0
    assert max(down) - min(down) < 1e-15 and max(down) < 0
    assert max(lrs) == pytest.approx(peak)


def test_schedule_without_warmup_and_bad_args():
    assert schedule.lr_at(0, 1.0, 0, 4) == 1.0
    assert schedule.lr_at(3, 1.0, 0, 4) == 0.25
    with pytest.raises(ValueError):
        schedule.lr_at(0, 1.0, 5, 4)


def test_set_lr_writes_every_group():
    model = BertForPreTraining(BertConfig.preset("tiny", vocab_size=100))
    opt = torch.optim.AdamW(param_groups(model), lr=1.0)
    schedule.set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json", "zero2_seq512.json"])
def test_shipped_ds_configs(name):
    ds = load_ds_config(os.path.join(REPO, "ds_configs", name))
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    assert ds["optimizer"]["type"] in ("Adam", "AdamW")
    p = ds["optimizer"]["params"]
    assert p["betas"] == [0.9, 0.999] and p["weight_decay"] == 0.01 and p["eps"] == 1e-6
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == int(name[4])
    if name.startswith("zero2"):
        assert ds["zero_optimization"]["overlap_comm"] and ds["zero_optimization"]["contiguous_gradients"]
    # The recipe states BERT's global batch once; accumulation is derived for the world size.
    assert ds["train_batch_size"] == 256 and "gradient_accumulation_steps" not in ds
    r = resolve(ds, name, GPU, world=8)
    assert r.batch.global_batch == 256 and r.ds["gradient_accumulation_steps"] == 256 // 8 // ds[
        "train_micro_batch_size_per_gpu"]
    # On a GPU the JSON's fp16 stays; on a CPU with native bf16 exactly fp16 -> bf16, nothing else changes.
    assert r.ds["fp16"] == ds["fp16"] and "bf16" not in r.ds and r.precision == "fp16"
    cpu = resolve(ds, name, CPU_BF16, world=8)
    assert "fp16" not in cpu.ds and cpu.ds["bf16"] == {"enabled": True} and "fp16 -> bf16" in cpu.decision.line
    assert {k: v for k, v in cpu.ds.items() if k != "bf16"} == {k: v for k, v in r.ds.items() if k != "fp16"}
    # ... and fp32 where bf16 would only be emulated.
    avx2 = resolve(ds, name, CPU_AVX2, world=8)
    assert "fp16" not in avx2.ds and "bf16" not in avx2.ds and avx2.precision == "fp32"
    assert avx2.decision.line == "cpu: no native bf16 (AVX2): fp16 -> fp32"


def test_finetune_json_is_the_papers_batch_32():
    ds = load_ds_config(os.path.join(REPO, "ds_configs", "finetune.json"))
    assert resolve(ds, "finetune.json", GPU, world=1).batch.global_batch == 32


@pytest.mark.parametrize("keys, world, expect", [
    ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32}, 8, (32, 1, 8)),
    ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32}, 2, (32, 4, 2)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1}, 2, (32, 1, 2)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 3, (4, 2, 3)),
    ({"train_micro_batch_size_per_gpu": 4}, 1, (4, 1, 1)),
])
def test_batch_arithmetic_derives_accumulation(keys, world, expect):
    b = resolve_batch(keys, "x.json", world)
    assert (b.micro, b.accum, b.world) == expect and b.global_batch == expect[0] * expect[1] * expect[2]
    assert str(b) == f"micro {b.micro} x accum {b.accum} x {b.world} rank(s) = {b.global_batch} sequences/step"


@pytest.mark.parametrize("keys, world, fragment", [
    ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32}, 32, "not a multiple of micro batch 32 x 32"),
    ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2}, 8,
     "disagrees with train_batch_size 256 / (micro 32 x 8 rank(s)) = 1"),
    ({"train_batch_size": 0, "train_micro_batch_size_per_gpu": 32}, 1, "'train_batch_size' must be a positive"),
])
def test_batch_arithmetic_that_cannot_work_is_refused(keys, world, fragment):
    with pytest.raises(ConfigError) as e:
        resolve_batch(keys, "x.json", world)
    assert fragment in str(e.value) and "x.json" in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(bf16={"enabled": True}), "both enabled"),
    (lambda d: d["optimizer"].update(type="Lamb"), "only CUDA kernels"),
    (lambda d: d.update(train_micro_batch_size_per_gpu="auto"), "'auto'"),
    (lambda d: d.pop("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu"),
    (lambda d: d.update(scheduler={"type": "WarmupDecayLR"}), "remove 'scheduler'"),
    (lambda d: d.pop("optimizer"), "params.lr"),
])
def test_ds_configs_the_device_cannot_run_are_refused(change, fragment):
    ds = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    change(ds)
    with pytest.raises(ConfigError) as e:
        resolve(ds, "x.json", CPU_BF16, world=8)
    assert fragment in str(e.value) and "x.json" in str(e.value)


def test_bad_json_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match=r"bad.json: the DeepSpeed JSON is not valid JSON \(line 1, column 2"):
        load_ds_config(str(p))


# ---------------------------------------------------------------------------------------------------
# Process-group environment


def test_slurm_env_is_derived(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho gpu-node-07\necho gpu-node-08\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_ID": "123456"}
    old = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(env)
        got = dist.setup_env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert got == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-node-07",
                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert log.read_text().split() == ["show", "hostnames", "gpu-node-[07-08]"]


def test_launcher_env_wins_and_plain_process_is_world_of_one():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert dist.setup_env(dict(env)) == {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    plain = dist.setup_env({})
    assert (plain["RANK"], plain["WORLD_SIZE"], plain["LOCAL_RANK"], plain["MASTER_ADDR"]) == ("0", "1", "0",
                                                                                              "127.0.0.1")
    assert 0 < int(plain["MASTER_PORT"]) < 65536
    with pytest.raises(dist.DistError, match="MASTER_ADDR"):
        dist.setup_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


# ---------------------------------------------------------------------------------------------------
# Model-side pieces


def test_weight_decay_groups_follow_berts_rule():
    model = BertForPreTraining(BertConfig.preset("tiny", vocab_size=100))
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay  # decay value: the DS JSON's
    assert all(n.endswith("bias") or "LayerNorm" in n for n in nn_)
    assert all(not n.endswith("bias") and "LayerNorm" not in n for n in dn)
    assert "bert.embeddings.word_embeddings.weight" in dn and "bert.embeddings.LayerNorm.weight" in nn_
    assert len(dn) + len(nn_) == len(list(model.parameters()))  # every parameter exactly once


def test_flop_counts_match_the_layer_arithmetic():
    c = BertConfig.preset("mini", vocab_size=1000)
    fc = flop_counts(BertForPreTraining(c))
    H, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    # Per layer: QKV + attention output 4H^2+4H, two LayerNorms 4H, FFN 8H^2+5H -> 12H^2 + 13H.
    assert fc["per_token"] == L * (12 * H * H + 13 * H)
    # MLM head: transform dense H^2+H + LayerNorm 2H, decoder V*H, bias V.
    assert fc["per_prediction"] == H * H + 3 * H + V * H + V


def test_nonfinite_policy():
    g = NonFiniteGuard("bf16", max_consecutive=2)
    assert g.update(True, False, None) is None
    assert "non-finite loss in bf16" in g.update(False, False, None)
    g = NonFiniteGuard("fp16", max_consecutive=2, min_loss_scale=1.0)
    # Overflows at a healthy scale are normal dynamic loss scaling, never fatal.
    assert all(g.update(False, True, 1024.0) is None for _ in range(10))
    assert g.update(False, True, 1.0) is None and g.update(False, True, 1.0) is None
    assert g.update(True, False, 1.0) is None  # a good step resets the count
    assert g.update(False, True, 1.0) is None and g.update(False, True, 1.0) is None
    assert "3 consecutive overflow steps" in g.update(False, True, 1.0)


def test_shard_check_shows_both_sides():
    manifest = {"format_version": 1, "tokenizer": {"vocab_size": 1000, "fingerprint": "abc"},
                "settings": {"max_seq_len": 128}}
    check_shards(manifest, "data.train=x", BertConfig.preset("tiny", vocab_size=1000), 1)
    with pytest.raises(ConfigError, match=r"vocab_size 1000 \(fingerprint abc\) but the model has vocab_size 999"):
        check_shards(manifest, "data.train=x", BertConfig.preset("tiny", vocab_size=999), 1)
    with pytest.raises(ConfigError, match="max_seq_len is 128 but the model's max_position_embeddings is 64"):
        check_shards(manifest, "x", BertConfig.preset("tiny", vocab_size=1000, max_position_embeddings=64), 1)
    with pytest.raises(ConfigError, match="format_version 1 but this code reads format_version 2"):
        check_shards(manifest, "x", BertConfig.preset("tiny", vocab_size=1000), 2)


def test_metrics_writer_sets_lines_after_the_resume_step_aside(tmp_path):
    from trainer.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path), enabled=True)
    for s in range(1, 6):
        w.record({"step": s, "loss": float(s)})
    w.record({"step": 6, "loss": float("nan")})
    w.close()
    assert json.loads(open(tmp_path / "metrics.jsonl").readlines()[5])["loss"] == "nan"  # valid JSON, visible
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut by kill -9
    w = MetricsWriter(str(tmp_path), enabled=True, resume_step=3)
    w.record({"step": 4, "loss": 40.0})
    w.close()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    (aside,) = (tmp_path / "earlier").glob("*/metrics.jsonl")  # nothing deleted: steps 4-6 and the cut line
    moved = aside.read_text().splitlines()
    assert [json.loads(line)["step"] for line in moved[:3]] == [4, 5, 6] and moved[3] == '{"step": 7, "lo'
    assert os.path.isdir(tmp_path / "tensorboard")


def test_ds_overrides_replace_existing_keys_only():
    from trainer.config import parse_overrides

    ds = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    got = apply_ds_overrides(ds, "zero2.json", parse_overrides(["ds.optimizer.params.lr=1e-3",
                                                                 "ds.train_micro_batch_size_per_gpu=8"]))
    assert got["optimizer"]["params"]["lr"] == 1e-3 and got["train_micro_batch_size_per_gpu"] == 8
    assert ds["optimizer"]["params"]["lr"] == 1e-4  # the loaded JSON itself is untouched
    with pytest.raises(ConfigError, match="zero2.json has no key 'optimizer.params.learning_rate'"):
        apply_ds_overrides(ds, "zero2.json", parse_overrides(["ds.optimizer.params.learning_rate=1"]))


def test_cli_flags_are_pinned():
    from launcher.pretrain import build_parser

    p = build_parser()
    flags = sorted(s for a in p._actions for s in a.option_strings)
    assert flags == sorted(["--config", "--deepspeed", "--local-rank", "--local_rank", "-h", "--help"])
    # The deepspeed launcher puts --local_rank=N first; overrides may sit anywhere.
    a = p.parse_intermixed_args(["--local_rank=1", "--deepspeed", "z.json", "train.max_steps=3", "--config", "r.yaml",
                                 "ds.optimizer.params.lr=1e-3"])
    assert (a.local_rank, a.deepspeed, a.config) == (1, "z.json", "r.yaml")
    assert a.overrides == ["train.max_steps=3", "ds.optimizer.params.lr=1e-3"]


# ---------------------------------------------------------------------------------------------------
# CPU Adam kernel state across a resume

_ADAM_SCRIPT = r"""
import sys, torch
from deepspeed.ops.adam import FusedAdam
from trainer import cpu
mode, d = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
grads = [torch.randn(300, generator=g) for _ in range(9)]
p, q = torch.nn.Parameter(torch.linspace(-1, 1, 300)), torch.nn.Parameter(torch.ones(20))
opt = FusedAdam([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                weight_decay=0.01)
def steps(a, b):
    for k in range(a, b):
        p.grad, q.grad = grads[k].clone(), grads[k][:20].clone()
        opt.step()
if mode == "full":
    steps(0, 9)
elif mode == "first":
    steps(0, 5)
    torch.save(opt.state_dict(), d + "/opt.pt")
else:  # a new process = a fresh C++ kernel object, as after a requeue
    p.data.copy_(torch.load(d + "/first_p.pt")); q.data.copy_(torch.load(d + "/first_q.pt"))
    opt.load_state_dict(torch.load(d + "/opt.pt"))
    replayed = cpu.replay_adam_bias_correction(opt) if mode == "replay" else 0
    print("replayed", replayed)
    steps(5, 9)
torch.save(p.data, d + "/" + mode + "_p.pt"); torch.save(q.data, d + "/" + mode + "_q.pt")
"""


@pytest.mark.integration
def test_resumed_cpu_adam_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    """DeepSpeed's CPU Adam keeps beta^t as a running float32 product in a C++ object that a new process does
    not have; replay_adam_bias_correction rebuilds it. Resume after step 5: 0.999f^6 by std::pow differs from
    the product by one ulp, so without the replay the first resumed update is already off (the control)."""
    import subprocess
    import sys

    script = tmp_path / "adam.py"
    script.write_text(_ADAM_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {}
    for mode in ("full", "first", "plain", "replay"):
        r = subprocess.run([sys.executable, str(script), mode, str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mode] = r.stdout
    assert "replayed 5" in out["replay"]
    full = [torch.load(tmp_path / f"full_{n}.pt") for n in "pq"]
    replay = [torch.load(tmp_path / f"replay_{n}.pt") for n in "pq"]
    plain = [torch.load(tmp_path / f"plain_{n}.pt") for n in "pq"]
    assert all(torch.equal(a, b) for a, b in zip(full, replay))
    assert not all(torch.equal(a, b) for a, b in zip(full, plain))  # the bug this guards against is real


def test_jit_ops_are_built_per_virtualenv_unless_the_user_chose_a_folder():
    import sys

    from trainer.dist import pin_extensions_dir
    env = {"PATH": "/usr/bin:/bin"}
    assert pin_extensions_dir(env) == os.path.join(sys.prefix, "torch_extensions") == env["TORCH_EXTENSIONS_DIR"]
    bindir = os.path.dirname(sys.executable)  # this venv's ninja first: another one rebuilds the ops
    assert env["PATH"].split(os.pathsep)[0] == bindir and os.path.exists(os.path.join(bindir, "ninja"))
    env = {"TORCH_EXTENSIONS_DIR": "/scratch/ext", "PATH": f"/usr/bin:{bindir}"}
    assert pin_extensions_dir(env) == "/scratch/ext" and env["PATH"] == f"{bindir}:/usr/bin"


def test_resume_accepts_one_tag_folder_of_any_zero_stage(tmp_path):
    """train.resume / train.init_from may name one tag folder; ZeRO-3 writes zero_pp_rank_0_mp_rank_00_model_states.pt
    there instead of mp_rank_00_model_states.pt (found by scripts/gpu_check.sh's ZeRO-3 resume)."""
    from trainer.checkpoint import resolve_resume
    from trainer.checkpoint_files import MODEL_STATES, ZERO3_MODEL_STATES
    from trainer.errors import ConfigError

    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        tag = tmp_path / name / "checkpoints" / "step_0000003"
        tag.mkdir(parents=True)
        (tag / name).write_bytes(b"")
        assert resolve_resume(str(tag), "unused") == (str(tag.parent), "step_0000003")
    with pytest.raises(ConfigError, match="ZeRO-3: zero_pp_rank_0_mp_rank_00_model_states.pt"):
        resolve_resume(str(tmp_path), "unused")
