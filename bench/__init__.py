"""Benchmarks run on the GPU machine: `python -m bench all --out bench/results.json`."""
