"""Benchmarks that print figures (speed, memory, quality) for the bundles; run through tools/benchmark_*.py."""
