"""Benchmarks: print measured numbers and ratios, never assert on timings."""
