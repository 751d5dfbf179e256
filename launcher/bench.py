"""Benchmarks (print a table, write JSON):
python launcher/bench.py {train,peak,loader,build,wikidump,memory,project} --help"""

import sys

from trainer import launch

if __name__ == "__main__":
    from benchmarks.cli import main

    sys.exit(launch.main(main))
