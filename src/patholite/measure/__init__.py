"""Measurement: quality metrics, cost, artifact files and the run record."""
