"""Measured comparisons (benchmarks report; tests assert behaviour).

The measurement protocol is in the README ("How it works").
"""
