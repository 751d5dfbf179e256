"""The benchmarks' command line (python launcher/bench.py {train,peak,loader,build,wikidump,memory,project}):
one subcommand per benchmark module, each printing a table and writing JSON with the machine's facts.

Nothing here asserts a speed (speed is measured, not tested).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Optional

from benchmarks import build, loader, memory, peak, project, train, wikidump
from benchmarks.report import bench_device, machine_facts, write_result

BENCHMARKS = (train, peak, loader, build, wikidump, memory, project)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launcher/bench.py", description="Benchmarks: print a table, write JSON.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for bench in BENCHMARKS:
        bench.add_parser(sub)
    for sp in sub.choices.values():
        sp.add_argument("--json", default=None, help="where the JSON goes (default: bench_results/CMD.json; "
                                                     "-: one line on stdout, the rest on stderr)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr) if a.json == "-" else contextlib.nullcontext():
        res = {"cmd": a.cmd, "machine": machine_facts(bench_device()), **a.run(a)}
    path = write_result(res, a.json)
    if path != "-":
        print(f"bench {a.cmd}: done in {time.perf_counter() - t0:.0f}s on {res['machine']['device']}; "
              f"results in {path}")
    return 0
