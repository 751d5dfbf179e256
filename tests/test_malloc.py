"""trainer.malloc: tcmalloc is preloaded by re-executing the command and keeps freed pages; the glibc fallback
applies and does not let the heap's address space grow without bound."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import malloc

# DeepSpeed's pattern that broke the demo under an earlier setting (mmap off, M_MMAP_MAX=0): a big, barely
# touched block per step, a little bigger each time, with a small long-lived allocation landing after it.
# Prints the growth of the process's data segment (VmData, MB) over 60 steps. Under mmap off it grew 5.9 GB
# here, but only while brk could extend the heap (once brk fails glibc falls back to mmap: 201 MB in one CI
# run), so the control that shows the measurement sees growth is the same loop holding on to its blocks.
GROWTH = """
import sys, torch
from trainer import malloc
assert malloc.keep_freed_memory()
def vmdata_mb():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmData"))
keep, v0 = [], vmdata_mb()
for i in range(60):
    big = torch.empty((100 << 20) + i * 4096, dtype=torch.uint8)
    big[:10] = 1
    keep.append(torch.ones(1000 + i))
    if sys.argv[1] == "hold":  # the control
        keep.append(big)
    del big
print(vmdata_mb() - v0)
"""

# A launcher's first line, then DeepSpeed's per-step pattern: blocks over glibc's 32 MiB mmap ceiling
# (200 MB, ~40 MB of a varying size, 20 MB), written and freed every step. Prints PID, allocator, and the
# most minor page faults of a step after the first two. (tcmalloc at its default TCMALLOC_RELEASE_RATE
# hands some of these pages back and re-faults them: up to 61,000 faults in a step of this loop.)
REEXEC = """
import os, resource, torch
from trainer import malloc
malloc.preload_tcmalloc()
print(malloc.configure())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for i in range(30):
    f0 = faults()
    a = torch.ones(50 << 20)
    b = torch.ones((10 << 20) + i * 1000)
    del a
    c = torch.ones(5 << 20)
    del b, c
    per_step.append(faults() - f0)
print(os.getpid(), malloc.tcmalloc_loaded(), max(per_step[2:]))
"""

needs_tcmalloc = pytest.mark.skipif(malloc.find_tcmalloc() is None,
                                    reason="tcmalloc not installed (scripts/setup.sh installs it where it can)")


def vmdata_growth_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", GROWTH, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def run_reexec(**env_overrides) -> tuple[str, bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.CHOICE_ENV, *malloc.TCMALLOC_ENV)}
    env.update(env_overrides)
    p = subprocess.Popen([sys.executable, "-c", REEXEC], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    lines = out.strip().splitlines()
    pid, loaded, faults = lines[-1].split()
    assert int(pid) == p.pid  # exec, not a child: launchers (deepspeed, torchrun, srun) keep tracking the PID
    return lines[-2], loaded == "True", int(faults)


@pytest.mark.skipif(malloc._glibc() is None, reason="mallopt is glibc's")
def test_heap_address_space_stays_bounded():
    assert vmdata_growth_mb("hold") > 5000  # the control: 60 blocks of 100 MB held
    assert vmdata_growth_mb("keep") < 500


@needs_tcmalloc
def test_preload_restarts_the_command_on_tcmalloc_which_keeps_freed_pages():
    line, loaded, faults = run_reexec()
    assert loaded and line.startswith("host allocator: tcmalloc")
    assert faults < 1000  # freed pages are reused: none is faulted in again


@pytest.mark.skipif(malloc._glibc() is None, reason="mallopt is glibc's")
def test_opting_out_keeps_glibc_which_refaults_big_blocks():
    line, loaded, faults = run_reexec(**{malloc.CHOICE_ENV: "glibc"})
    assert not loaded and line.startswith("host allocator: glibc, freed blocks up to 32 MiB reused")
    assert faults > 40000  # the control: 200 MB / 4 KiB = 51,200 pages faulted in every step, and more


def test_glibc_env_takes_tcmalloc_out_and_keeps_the_rest():
    env = malloc.glibc_env({"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4:/y/libother.so", "PATH": "/bin",
                            "TCMALLOC_RELEASE_RATE": "0", malloc.CHOICE_ENV: "tcmalloc"})
    assert env == {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin", malloc.CHOICE_ENV: "glibc"}
    assert "LD_PRELOAD" not in malloc.glibc_env({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})


@needs_tcmalloc
def test_pretrain_launcher_runs_on_tcmalloc(eval_run):
    stdout = (Path(eval_run).parent / "launcher_stdout.txt").read_text()
    assert "[pretrain] host allocator: tcmalloc" in stdout
