"""The tuneloop benchmark harness: `python benchmarks/bench.py` (see benchmarks/README.md)."""
