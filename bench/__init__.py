"""Benchmarks: standalone programs, each printing its result beside the physical bound it is measured against."""
