"""Benchmarks (python launcher/bench.py ...): they time and print, write JSON, and assert nothing."""
