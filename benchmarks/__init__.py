"""conduit's benchmark suite: ``python -m benchmarks [--quick] [--scenario NAME]``.

Every contender runs in its own processes; figures are medians of repeated,
alternating runs with min and max; comparisons are ratios against a reference
measured in the same run. See ``benchmarks/README.md``.
"""
