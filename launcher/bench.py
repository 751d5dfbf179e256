"""Benchmarks (print a table, write JSON): python launcher/bench.py {train,peak,loader,build,memory,project} --help"""

import sys

from trainer import launch

if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(launch.main(main))
