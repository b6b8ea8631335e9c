"""The parts of benchmarks/throughput.py, one concept a module (docs/benchmarks.md lists them)."""
