"""Measured comparisons (benchmarks report; tests assert behaviour). See README, measurement protocol."""
