"""Helpers for tests and benchmarks only; nothing in the runtime imports this package."""
