"""trainer.malloc: the setting applies, and it does not let the heap's address space grow without bound."""

import subprocess
import sys

import pytest

from trainer import malloc

# DeepSpeed's pattern that broke the demo under an earlier setting (mmap off): a big, barely touched block per
# step, a little slightly bigger each time, with a small long-lived allocation landing after it. Prints the
# growth of the process's data segment (VmData, MB) over 60 steps.
PROGRAM = """
import sys, torch
from trainer import malloc
if sys.argv[1] == "keep":
    assert malloc.keep_freed_memory()
elif sys.argv[1] == "mmap-off":  # the earlier setting, kept here as the failing control
    import ctypes
    libc = ctypes.CDLL(None)
    assert libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, -1) == 1
def vmdata_mb():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmData"))
keep, v0 = [], vmdata_mb()
for i in range(60):
    big = torch.empty((100 << 20) + i * 4096, dtype=torch.uint8)
    big[:10] = 1
    keep.append(torch.ones(1000 + i))
    del big
print(vmdata_mb() - v0)
"""


def vmdata_growth_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(malloc._glibc() is None, reason="mallopt is glibc's")
def test_heap_address_space_stays_bounded():
    assert vmdata_growth_mb("mmap-off") > 3000  # the control: ~100 MB of address space per step
    assert vmdata_growth_mb("keep") < 500
