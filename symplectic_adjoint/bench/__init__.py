"""Measured comparisons (benchmarks report; tests assert behaviour). See DESIGN.md section 5."""
