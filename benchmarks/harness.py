"""Benchmark harness: every `benchmarks/bench_*.py` exposes `run(quick: bool) -> list[Figure]`.

`python -m benchmarks.run [--quick] [--only NAME]` runs them and rewrites `benchmarks/RESULTS.md`,
each figure beside its baseline: measured in the same run, unless the figure marks it a reference
(`reference=True`: a number not measured here, such as the notebook's figures from other hardware or
a configured budget), which RESULTS.md labels as such. Machines are noisy: benchmarks repeat their
measurement and report the median (`median_of`).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figure:
    benchmark: str  # e.g. "metadata"
    metric: str  # e.g. "images/s at 600 req/min entity limit"
    value: float
    unit: str
    baseline: float | None = None  # same metric for the baseline, same run (unless `reference`)
    baseline_name: str | None = None  # what the baseline is
    goal: str | None = None  # e.g. ">= 0.95 of limit"
    met: bool | None = None  # whether the goal holds for this run
    notes: str = ""
    extra: dict = field(default_factory=dict)
    reference: bool = (
        False  # the baseline was not measured in this run (other hardware, a configured value)
    )

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def machine_description() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def previous_row(benchmark: str, metric_prefix: str) -> dict | None:
    """The row of benchmarks/RESULTS.json that a new run of `benchmark` replaces (measured before, in its
    own run), so a figure can name what it was before a change."""
    store = Path(__file__).parent / "RESULTS.json"
    if not store.exists():
        return None
    for row in json.loads(store.read_text()).get("figures", []):
        if row["benchmark"] == benchmark and row["metric"].startswith(metric_prefix):
            return row
    return None
