"""Every launcher's entry point: the CPU host's allocator first, then the command with the one error exit.

    if __name__ == "__main__":
        sys.exit(launch.main(run, argv))

On a CPU host the process first re-executes itself on tcmalloc and starts asking py-cpuinfo in the background
(trainer/cpu_start.py: the CPU workarounds that must act before torch is imported; on a host without a GPU
driver torch is not imported to decide); on a GPU host neither trainer/cpu.py nor a re-execution happens.

At exit the interpreter's last garbage collection walks every object torch, DeepSpeed and the run made: ~1.7 s
of every process's end here (2-core AMD EPYC Zen 3), which a launcher spends after its summary line and before
a job step, a test or the next command can go on. Those objects are frozen out of that collection instead
(``gc.freeze`` at exit): everything a run must leave is written and closed explicitly before it returns, and
Python never promised finalisers of objects alive at exit anyway.

A command that stops on signals (pretraining: ``launch.main(run, stop_signals=True)``) holds them from its first
line (trainer.guards.block_stop_signals), before torch is imported and across the re-exec, so that a Ctrl-C
during start-up waits for the trainer's signal reader instead of killing the rank with a traceback.
"""

from __future__ import annotations

import atexit
import gc
import logging
from collections.abc import Callable

from common.errors import run_main


def main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None, *,
         stop_signals: bool = False) -> int:
    atexit.register(gc.freeze)  # registered first, so it runs last of the exit handlers
    if stop_signals:
        from trainer.guards import block_stop_signals

        block_stop_signals()
    from trainer import cpu_start  # imports nothing heavy

    if cpu_start.cpu_host():
        cpu_start.preload_tcmalloc()  # returns where it does not re-execute
        cpu_start.ask_cpuinfo_once()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(fn, argv)
