"""Reliability scenarios too long for the test suite, each beside a fault-free run of the same world.

* The real two-minute outage (quick: 15 s): every request answers 503 from the moment the chunk job
  starts. The client retries with backoff (about 30 s at most), then the partitions store what they
  have, record the rest as transient failures and fail; the operator's re-run ("backfill failed
  partitions") is repeated until it succeeds. Measured: wall time to a complete result against the
  fault-free run plus the outage, re-runs, requests against the fault-free run's.
* A budget the client does not know: the emulator allows 20 entity requests a minute while the client
  is configured for the default 50,000. Every 429 carries Retry-After; the client pauses the whole
  family for every process sharing the token bucket. Measured: 429s answered, wall time, completeness.

Both run the whole pipeline through Dagster on the tests' small area (the tests' world: seed 7, scale
0.003, ~585 images in 3 chunks) and check the final GeoPackage equals the fault-free run's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks.emulated import assert_same_images, emulated_pipeline
from benchmarks.harness import Figure
from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.emulator import Faults, World

NAME = "reliability"
SEED, SCALE = 7, 0.003  # the tests' world


def _difference(images, expected) -> str | None:
    """Why the final GeoPackage differs from the fault-free run's, or None when it is the same."""
    try:
        assert_same_images(images, expected)
    except AssertionError as exc:
        return str(exc).splitlines()[0] if str(exc) else "GeoPackage differs"
    return None


def _fault_free(folder: Path) -> dict:
    with emulated_pipeline(folder, World(seed=SEED, scale=SCALE)) as run:
        started = time.monotonic()
        run.run_pipeline()
        return {
            "seconds": time.monotonic() - started,
            "requests": run.server.stats()["requests"],
            "images": run.images(),
            "busiest_entity": busiest_window(run.server.request_times("entity")),
        }


def _outage(folder: Path, outage_s: float, baseline: dict) -> Figure:
    with emulated_pipeline(folder, World(seed=SEED, scale=SCALE)) as run:
        started = time.monotonic()
        run.discover_and_chunk()
        run.server.set_faults(outage_start=time.time(), outage_end=time.time() + outage_s)
        runs = run.run_until_complete(attempts=20)
        seconds = time.monotonic() - started
        stats = run.server.stats()
        difference = _difference(run.images(), baseline["images"])
    ideal = baseline["seconds"] + outage_s
    return Figure(
        benchmark=NAME,
        metric=f"wall time to a complete result through a {outage_s:.0f} s outage",
        value=seconds,
        unit="s",
        baseline=ideal,
        baseline_name="fault-free run + the outage",
        goal="the outage was hit (503s answered); complete and equal to the fault-free GeoPackage; <= 1.5 x baseline",
        met=difference is None and stats["faulted"] > 0 and seconds <= 1.5 * ideal,
        notes=f"{'GeoPackage equal to the fault-free one' if difference is None else f'DIFFERS: {difference}'}; "
        f"{runs} pipeline run(s) (the first "
        f"{'rode it out' if runs == 1 else 'failed transiently, re-runs resumed'});"
        f" {stats['requests']:,} requests vs {baseline['requests']:,} fault-free, {stats['faulted']:,} answered 503;"
        f" fault-free run {baseline['seconds']:.0f} s",
    )


def _unknown_budget(folder: Path, budget: int, baseline: dict) -> Figure:
    faults = Faults(rate_limit_per_minute={"entity": budget})
    with emulated_pipeline(folder, World(seed=SEED, scale=SCALE), faults) as run:
        started = time.monotonic()
        runs = run.run_until_complete(attempts=3)
        seconds = time.monotonic() - started
        stats = run.server.stats()
        busiest = busiest_window(run.server.request_times("entity"))
        difference = _difference(run.images(), baseline["images"])
    return Figure(
        benchmark=NAME,
        metric=f"429s answered when the API allows {budget} entity req/min and the client assumes 50,000",
        value=stats["rate_limited"],
        unit="429s",
        baseline=None,
        goal="the budget was hit (429s answered); complete and equal to the fault-free GeoPackage",
        met=stats["rate_limited"] > 0 and difference is None,
        notes=f"{'GeoPackage equal to the fault-free one' if difference is None else f'DIFFERS: {difference}'}; "
        f"{runs} run(s), {seconds:.0f} s (fault-free {baseline['seconds']:.0f} s); "
        "busiest 60-s window of accepted "
        f"entity requests {busiest} (unpaced: {baseline['busiest_entity']}); Retry-After pauses every task "
        "sharing the token bucket",
    )


def run(quick: bool) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as scratch:
        root = Path(scratch)
        baseline = _fault_free(root / "fault-free")
        return [
            _outage(root / "outage", 15.0 if quick else 120.0, baseline),
            _unknown_budget(root / "budget", 20, baseline),
        ]


if __name__ == "__main__":
    for figure in run(quick="--quick" in sys.argv):
        print(figure)
