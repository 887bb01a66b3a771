"""Benchmark harness shared by `emovec demo` (and, as it grows, `emovec bench` and benchmarks/)."""
