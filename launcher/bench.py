"""Benchmarks (print a table, write JSON): python launcher/bench.py {train,peak,loader,build,memory} --help"""

import sys

from trainer.bench import main

if __name__ == "__main__":
    sys.exit(main())
