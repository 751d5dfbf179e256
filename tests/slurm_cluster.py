"""A real two-node Slurm cluster for the tests (scripts/local_slurm.sh), and helpers to drive it.

``slurm_cluster`` (session scope) starts slurmctld and two slurmd (node1 -> 127.0.1.1, node2 -> 127.0.2.1) once
per test session and stops them afterwards, also when a test fails or the session is interrupted; a cluster
left by a killed earlier session is cleaned by the next ``up``. Without root, or without Slurm installed,
the tests that use it are skipped with the reason; ``BERT_REQUIRE_SLURM=1`` (set by .ci/run) turns that skip
into a failure, so CI can never pass by skipping them.

Every wait here has a bound; when one fires the test fails with the job's state, the tail of its output and
of the slurmctld/slurmd logs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
REQUIRE_ENV = "BERT_REQUIRE_SLURM"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


def unavailable() -> Optional[str]:
    """Why the local cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it starts slurmd and edits /etc/hosts)"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo") if not shutil.which(b)]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found): `apt-get install slurm-wlm` "
                "(scripts/setup.sh does it when run as root)")
    return None


def tail(path, n: int = 40) -> str:
    p = Path(path)
    if not p.exists():
        return f"({p} does not exist)"
    lines = p.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


class LocalSlurm:
    def __init__(self, conf: Path):
        self.conf = conf
        self.dir = conf.parent
        self.logs = self.dir / "log"
        self.jobs: list[str] = []  # every job id submitted through this object (cancelled after each test)

    # -- lifecycle -------------------------------------------------------------------------------------
    @classmethod
    def up(cls) -> "LocalSlurm":
        r = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=180)
        m = re.search(r"^export SLURM_CONF=(\S+)$", r.stdout, re.M)
        if r.returncode != 0 or not m:
            raise RuntimeError(f"scripts/local_slurm.sh up failed (status {r.returncode}):\n{r.stdout}\n{r.stderr}")
        return cls(Path(m.group(1)))

    @staticmethod
    def down(conf: Optional[Path] = None) -> None:
        r = subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/local_slurm.sh down failed:\n{r.stdout}\n{r.stderr}")
        if conf is None:
            return
        # nothing of it may be left: no process, no tagged /etc/hosts line, no folder
        left = []
        want = f"SLURM_CONF={conf}".encode()
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                if want in env.read_bytes().split(b"\0") and int(env.parent.name) != os.getpid():
                    left.append(f"process {env.parent.name}: {(env.parent / 'cmdline').read_bytes()[:120]!r}")
            except OSError:  # gone meanwhile, or not ours to read
                pass
        if any(line.rstrip().endswith("# bert-local-slurm") for line in Path("/etc/hosts").read_text().splitlines()):
            left.append("tagged lines in /etc/hosts")
        if conf.parent.exists():
            left.append(f"folder {conf.parent}")
        if left:
            raise RuntimeError("scripts/local_slurm.sh down left: " + "; ".join(left))

    # -- commands --------------------------------------------------------------------------------------
    def env(self, base: Optional[dict] = None, **extra) -> dict:
        """An environment for clients and jobs of this cluster: SLURM_* of the caller dropped, SLURM_CONF set."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def cmd(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                                 + self.diagnostics())
        return r

    def sbatch(self, args: list[str], env: dict, cwd: Path = REPO, timeout: float = 60) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"sbatch {' '.join(args)}: {r.stdout}{r.stderr}"
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def track(self, *jobs: str) -> None:
        self.jobs.extend(jobs)

    def job(self, job: str) -> dict:
        """`scontrol show job -o JOB` as a dict (JobState, Restarts, StartTime, EndTime, ExitCode, ...).
        An array job gives the first task's record; use `tasks()` for all of them."""
        recs = self.job_records(job)
        if not recs:
            raise AssertionError(f"scontrol knows no job {job}\n" + self.diagnostics())
        return recs[0]

    def job_records(self, job: str) -> list[dict]:
        r = self.cmd("scontrol", "show", "job", "-o", job, check=False)
        recs = []
        for line in r.stdout.splitlines():
            if "JobId=" not in line:
                continue
            rec = {}
            for m in re.finditer(r"(\w+)=(.*?)(?= \w+=|$)", line):
                rec[m.group(1)] = m.group(2)
            recs.append(rec)
        return recs

    def state(self, job: str) -> str:
        return self.job(job)["JobState"]

    def listpids(self, job: str, node: str) -> dict[int, int]:
        """{global task id (= RANK): pid} of step 0 of JOB on NODE (real `scontrol listpids`)."""
        out = self.cmd("scontrol", "listpids", f"{job}.0", node).stdout
        pids = {}
        for line in out.splitlines()[1:]:
            f = line.split()
            if len(f) >= 5 and f[4].isdigit():
                pids[int(f[4])] = int(f[0])
        return pids

    # -- waiting ---------------------------------------------------------------------------------------
    def diagnostics(self, *files, n: int = 30) -> str:
        parts = []
        for f in files:
            parts.append(f"--- {f} (last {n} lines)\n{tail(f, n)}")
        r = subprocess.run(["squeue", "-a"], env=self.env(), capture_output=True, text=True, timeout=30)
        parts.append(f"--- squeue\n{r.stdout}{r.stderr}")
        for job in self.jobs[-4:]:
            for rec in self.job_records(job):
                parts.append(f"--- job {rec.get('JobId')}: " + " ".join(
                    f"{k}={rec.get(k)}" for k in ("JobState", "Reason", "Restarts", "ExitCode", "StartTime",
                                                  "EndTime", "NodeList")))
        for f in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {f.name} (last 15 lines)\n{tail(f, 15)}")
        return "\n".join(parts)

    def wait_for(self, what: str, pred: Callable[[], object], timeout: float, files=(), every: float = 0.2):
        t0 = time.monotonic()
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.diagnostics(*files))
            time.sleep(every)

    def wait_done(self, job: str, timeout: float, files=()) -> dict:
        """Wait until JOB (every task of an array) is in a final state; return its record."""
        def done():
            recs = self.job_records(job)
            return recs if recs and all(r["JobState"] in FINAL_STATES for r in recs) else None
        return self.wait_for(f"job {job} to end", done, timeout, files)[0]

    def wait_state(self, job: str, states: set, timeout: float, files=()) -> dict:
        def ok():
            rec = self.job(job)
            return rec if rec["JobState"] in states else None
        return self.wait_for(f"job {job} to reach {sorted(states)}", ok, timeout, files)

    def cancel_all(self, timeout: float = 60) -> None:
        """scancel every job this object submitted and wait until none of them runs any more."""
        active = [j for j in self.jobs if any(r["JobState"] not in FINAL_STATES for r in self.job_records(j))]
        if not active:
            return
        subprocess.run(["scancel", *active], env=self.env(), capture_output=True, text=True, timeout=30)
        for j in active:
            self.wait_done(j, timeout)

    @contextlib.contextmanager
    def cancel_on_error(self):
        """For fixtures wider than a test: if the block fails, their jobs must not run on into the next test."""
        try:
            yield
        except BaseException:
            self.cancel_all()
            raise

    def ctld_log(self) -> str:
        return (self.logs / "slurmctld.log").read_text(errors="replace")

    def timelimit_checks(self) -> list[float]:
        """Epoch times of slurmctld's periodic time-limit checks so far (its debug2 log line "Testing job time
        limits"). They run every 30 s, and --signal warnings are only ever sent from them."""
        out = []
        for stamp in re.findall(r"^\[(\S+?)\] debug2: Testing job time limits", self.ctld_log(), re.M):
            whole, _, frac = stamp.partition(".")
            out.append(time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0")))
        return out


def _down_at_exit() -> None:  # the session ended without fixture teardown (e.g. an internal error)
    try:
        LocalSlurm.down()
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running local cluster (LocalSlurm); skipped (failed under BERT_REQUIRE_SLURM=1) where it cannot run."""
    reason = unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        cluster = LocalSlurm.up()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    atexit.register(_down_at_exit)
    try:
        yield cluster
    finally:
        atexit.unregister(_down_at_exit)  # torn down here, as a fixture should be
        LocalSlurm.down(cluster.conf)


@pytest.fixture
def slurm(slurm_cluster):
    """The session's cluster for one test: whatever jobs the test leaves behind are cancelled afterwards."""
    start = len(slurm_cluster.jobs)
    yield slurm_cluster
    try:
        slurm_cluster.cancel_all()
    finally:
        del slurm_cluster.jobs[start:]
