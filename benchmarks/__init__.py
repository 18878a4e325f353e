"""micro's benchmarks: ``python -m benchmarks [NAME ...]`` (``make bench``).

Each ``benchmarks/bench_NAME.py`` exposes ``async def run() -> list[tuple[str, float, str]]``
(a figure's name, its value, one human-readable line). Figures are ratios against a
baseline measured in the same process and run, never absolute times. The runner is
``benchmarks/__main__.py``; docs/benchmarks.md says how to read the results.
"""
