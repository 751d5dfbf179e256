"""Every launcher's entry point: the CPU host's allocator first, then the command with the one error exit.

    if __name__ == "__main__":
        sys.exit(launch.main(run, argv))

On a CPU host the process first re-executes itself on tcmalloc (trainer/cpu.py: the only CPU workaround
that must act before the interpreter does anything else); on a GPU host trainer/cpu.py is not imported.

A command that stops on signals (pretraining: ``launch.main(run, stop_signals=True)``) holds them from its first
line (trainer.guards.block_stop_signals), before torch is imported and across the re-exec, so that a Ctrl-C
during start-up waits for the trainer's signal reader instead of killing the rank with a traceback.
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


def main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None, *,
         stop_signals: bool = False) -> int:
    if stop_signals:
        from trainer.guards import block_stop_signals

        block_stop_signals()
    if cpu_host():
        from trainer import cpu

        cpu.preload_tcmalloc()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(fn, argv)
