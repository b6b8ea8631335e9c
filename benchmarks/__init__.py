"""The benchmark scripts (README.md, "Benchmarks"): run them as files, ``python
benchmarks/throughput.py``, or as modules, ``python -m benchmarks.throughput``. Their modules
import each other as ``benchmarks.*``."""
