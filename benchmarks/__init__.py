"""Benchmarks: scripts a user runs by hand (``python -m benchmarks.<name>``); each prints a table and writes JSON."""
