"""Benchmarks behind scripts/benchmark.py (train, generate, data). Imported only by benchmarks."""
