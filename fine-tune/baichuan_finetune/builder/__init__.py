"""The embedded tiny model (tests, quickstart, benchmarks)."""
