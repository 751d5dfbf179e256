"""Every launcher's entry point: the CPU host's allocator first, then the command with the one error exit.

    if __name__ == "__main__":
        sys.exit(launch.main(run, argv))

On a CPU host the process first re-executes itself on tcmalloc (trainer/cpu.py: the only CPU workaround
that must act before the interpreter does anything else); on a GPU host trainer/cpu.py is not imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from common.errors import run_main


def cpu_host() -> bool:
    """No CUDA device and no other DeepSpeed accelerator asked for."""
    import torch  # here, not at the top: an entry point imports this module before anything heavy

    return not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cpu") == "cpu"


def main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    if cpu_host():
        from trainer import cpu

        cpu.preload_tcmalloc()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(fn, argv)
