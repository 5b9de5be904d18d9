"""Benchmarks (`make bench`); each writes its results to build/bench/<name>.json."""
