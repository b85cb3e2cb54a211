"""payfleet's benchmark suite: `python -m bench.run --help` (or `make bench`)."""
