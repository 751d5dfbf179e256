"""Benchmarks (python launcher/bench.py ...), one module per benchmark (train, peak, loader, build, wikidump,
memory, project) and what they share (report.py): they time and print, write JSON, and assert nothing."""
