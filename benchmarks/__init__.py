"""Benchmarks of issue 5: `python -m benchmarks.run_all` runs them all (`make bench`)."""
