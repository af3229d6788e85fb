"""Benchmarks: plain scripts that print ratios measured in one process (`python -m benchmarks.overhead`)."""
