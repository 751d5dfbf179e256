"""trainer.malloc: freed big blocks are reused, so a steady training step page-faults no new memory."""

import subprocess
import sys

import pytest

from trainer import malloc

# A training step's shape: big blocks (64 MiB, 32 MiB: above glibc's mmap threshold) allocated, used and
# freed, small ones in between. Prints the page faults per step once the pattern is steady.
PROGRAM = """
import resource, sys, torch
from trainer import malloc
mode = sys.argv[1]
if mode == "keep":
    assert malloc.keep_freed_memory()
def step():
    a = torch.ones(16 << 20); b = torch.ones(8 << 20); c = [torch.ones(10) for _ in range(100)]
    d = a[: 8 << 20] + b
    del a, b, c, d
for _ in range(6):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(malloc._glibc() is None, reason="mallopt is glibc's")


@needs_glibc
def test_kept_memory_is_reused_without_page_faults():
    # Untuned, every step maps the 96 MiB afresh: 24,576 pages faulted in (+ the sum's 8,192).
    assert faults_per_step("default") >= 24_576
    assert faults_per_step("keep") < 100

