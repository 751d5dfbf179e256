"""Benchmarks (print a table, write JSON): python launcher/bench.py {train,peak,loader,build,memory} --help"""

import sys

from trainer import malloc

if __name__ == "__main__":
    malloc.preload_tcmalloc()  # CPU hosts: as the training launchers run, see trainer/malloc.py
    from trainer.bench import main

    sys.exit(main())
