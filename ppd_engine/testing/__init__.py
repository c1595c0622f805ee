"""Helpers shared by tests and benchmarks: tiny random models built from configs (no downloads)."""
