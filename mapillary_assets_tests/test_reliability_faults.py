"""Faults the API throws at the pipeline: each test runs the real pipeline through Dagster against the
emulator with one fault switched on, re-runs failed partitions the way a backfill does when the
platform gives up on something transient, and checks the final GeoPackage against a fault-free run's.
Each records what the fault cost (requests against the fault-free run's, re-runs, wall time) with
`record_figure`; RELIABILITY.md quotes them.

The rate-limit test runs three partitions in separate processes that share the SQLite token bucket,
and measures every 60-second window of the requests the emulator accepted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.emulator import Faults
from mapillary_assets.emulator.thumbnails import jpeg_fault
from mapillary_assets.errors import PipelineFailed
from mapillary_assets.pipeline.jpeg_verification import is_complete_jpeg
from mapillary_assets.runners.instance import configure_pools
from mapillary_assets.storage import read_parquet
from mapillary_assets_tests.support.assertions import assert_same_images, temporary_leftovers
from mapillary_assets_tests.support.emulated_runs import emulated_run, run_discovery_and_chunking
from mapillary_assets_tests.support.measurements import record_figure
from mapillary_assets_tests.support.partition_process import PartitionProcess
from mapillary_assets_tests.support.reference import fault_free_reference, shared_temp_root
from mapillary_assets_tests.support.world import TEST_TOKEN

pytestmark = pytest.mark.slow

OPTIONAL_COLUMNS = {"computed_lon", "computed_lat", "creator_username", "creator_id"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fault_free_reference(shared_temp_root(tmp_path_factory))


def _survives(
    tmp_path,
    reference,
    scenario: str,
    faults: Faults,
    attempts: int = 1,
    api: dict | None = None,
    **changes_after_start,
):
    """Run the whole pipeline under `faults` until it completes (at most `attempts` runs: one by
    default, as RELIABILITY.md states for the faults the client's retries absorb) and check the result
    equals the fault-free run's; returns the emulator's request counts. `api` overrides client settings."""
    with emulated_run(tmp_path, faults=faults, api=api) as run:
        started = time.monotonic()
        if changes_after_start:
            run.server.set_faults(**changes_after_start)
        runs = run.run_until_complete(attempts)
        seconds = time.monotonic() - started
        stats = run.server.stats()
        images = run.images()
    assert_same_images(images, reference.load_images())
    assert temporary_leftovers(run.data_dir) == []
    record_figure(
        scenario,
        runs=runs,
        seconds=round(seconds, 1),
        seconds_fault_free=round(reference.seconds, 1),
        requests=stats["requests"],
        requests_fault_free=reference.requests["requests"],
        faulted=stats["faulted"],
        rate_limited=stats["rate_limited"],
        by_kind={kind: stats[kind] for kind in ("tile", "batch", "thumbnail")},
        by_kind_fault_free={
            kind: reference.requests[kind] for kind in ("tile", "batch", "thumbnail")
        },
    )
    return stats


def test_a_fifth_of_requests_failing_with_5xx(tmp_path, reference):
    stats = _survives(tmp_path, reference, "5xx on 20% of requests", Faults(error_5xx_rate=0.2))
    assert stats["faulted"] > 0.1 * reference.requests["requests"]


def test_latency_spikes_past_the_client_timeout(tmp_path, reference):
    # With a 1.4 s timeout about one request in ten outlives it: each is abandoned and sent again.
    stats = _survives(
        tmp_path,
        reference,
        "latency 0.05-1.55 s per request, client timeout 1.4 s",
        Faults(latency_s=0.05, latency_jitter_s=1.5),
        api={"timeout_s": 1.4},
    )
    # The emulator counts a request when it arrives, so every timed-out attempt adds one.
    assert stats["requests"] > reference.requests["requests"], (
        "no request reached the client's timeout: the scenario tests nothing"
    )


def test_thumbnail_urls_that_expire_almost_at_once(tmp_path, reference):
    # A URL stays valid until the whole second after `now + ttl`: with ttl 1 s and 0.1-0.4 s per request,
    # a good share has expired by the time its download reaches the CDN, which then answers 403.
    stats = _survives(
        tmp_path,
        reference,
        "thumbnail URLs valid for at most 1 s",
        Faults(thumbnail_ttl_s=1.0, latency_s=0.1, latency_jitter_s=0.3),
        # On a loaded machine some ids see all their refreshed URLs expire: recorded transient, re-run.
        attempts=3,
    )
    assert stats["thumbnail"] > reference.requests["thumbnail"], (
        "no URL expired: the scenario tests nothing"
    )
    assert stats["batch"] > reference.requests["batch"], "expired URLs were not resolved again"


def test_optional_fields_left_out_become_nulls(tmp_path, reference):
    with emulated_run(tmp_path, faults=Faults(omit_optional_fields=True)) as run:
        run.run_pipeline()
        stats = run.server.stats()
        images = run.images()
    expected = reference.load_images()
    changed = [
        c for c in expected.columns if c != "geometry" and not _same_column(images, expected, c)
    ]
    assert changed and set(changed) <= OPTIONAL_COLUMNS, changed
    for column in changed:
        assert images[column].isna().all(), f"{column}: left out by the API, yet not null"
    assert_same_images(images, expected, ignore=changed)
    record_figure(
        "optional fields omitted",
        runs=1,
        nulled_columns=changed,
        requests=stats["requests"],
        requests_fault_free=reference.requests["requests"],
    )


def test_truncated_jpegs_fail_the_partition_then_a_rerun_completes(tmp_path, reference):
    rate = 0.05
    with emulated_run(tmp_path, faults=Faults(truncated_jpeg_rate=rate)) as run:
        with pytest.raises(PipelineFailed, match="process_chunks_job"):
            run.run_pipeline()
        assignment = read_parquet(run.layout.chunk_assignment_path)
        damaged = {i for i in assignment["image_id"] if jpeg_fault(i, 0.0, rate) == "truncated"}
        assert damaged, "the fault rate damages no image of this world"
        downloads = pd.concat(
            read_parquet(run.layout.downloads_path(chunk))
            for chunk in sorted(assignment["chunk"].unique())
        )
        failed = downloads[downloads["status"] != "ok"]
        assert set(failed["image_id"]) == damaged
        assert failed["transient"].all() and failed["reason"].str.contains("truncated").all()
        for image_id in damaged:  # a damaged body is never written, not even as a partial file
            assert not run.layout.thumbnail_path(image_id, 1024).exists()
        for path in downloads.loc[downloads["status"] == "ok", "path"]:
            assert is_complete_jpeg((run.data_dir / path).read_bytes())
        first = run.server.stats()

        run.server.set_faults(truncated_jpeg_rate=0.0)
        run.run_pipeline()
        stats = run.server.stats()
        images = run.images()
    assert stats["thumbnail"] - first["thumbnail"] == len(damaged), (
        "the re-run fetched more than what failed"
    )
    assert_same_images(images, reference.load_images())
    record_figure(
        "truncated JPEGs (5% of images)",
        runs=2,
        damaged=len(damaged),
        thumbnail_requests=stats["thumbnail"],
        thumbnail_requests_fault_free=reference.requests["thumbnail"],
        requests=stats["requests"],
        requests_fault_free=reference.requests["requests"],
    )


def _outage_at_first_entity_request(server, seconds: float, timeout_s: float = 300.0) -> None:
    """Start the outage when the chunk runs make their first Graph request, however long their worker
    processes take to start on a loaded machine (a fixed start time could pass before any request)."""
    deadline = time.monotonic() + timeout_s
    while not server.request_times("entity") and time.monotonic() < deadline:
        time.sleep(0.02)
    now = time.time()
    server.set_faults(outage_start=now, outage_end=now + seconds)


def test_an_outage_is_ridden_out_or_resumed(tmp_path, reference):
    """Every request answers 503 for 8 s, starting as the chunk job begins its metadata requests."""
    with emulated_run(tmp_path) as run:
        run_discovery_and_chunking(run.defs, run.instance)
        run.server.reset_stats()
        armed = threading.Thread(
            target=_outage_at_first_entity_request, args=(run.server, 8.0), daemon=True
        )
        armed.start()
        started = time.monotonic()
        runs = run.run_until_complete(attempts=4)
        armed.join(1)
        seconds = time.monotonic() - started
        stats = run.server.stats()
        images = run.images()
    assert stats["faulted"] > 0, "the outage missed the run"
    assert_same_images(images, reference.load_images())
    record_figure(
        "8 s outage (all requests 503)",
        runs=runs,
        seconds=round(seconds, 1),
        faulted=stats["faulted"],
        requests=stats["requests"],
        requests_fault_free=reference.requests["requests"],
    )


# ---------------------------------------------------------------------------------------------
# rate limits under load


# Requests a minute. The chunks need 12 entity requests (metadata; their thumbnail URLs come with it),
# so the budget binds.
ENTITY_BUDGET = 8


def test_concurrent_partition_processes_keep_the_shared_budget(tmp_path, reference):
    assert reference.busiest_minute["entity"] > ENTITY_BUDGET, (
        "unpaced, the load would not press the budget"
    )
    faults = Faults(rate_limit_per_minute={"entity": ENTITY_BUDGET})
    with emulated_run(tmp_path, faults=faults) as run:
        configure_pools(run.instance)
        chunks = run_discovery_and_chunking(run.defs, run.instance)
        assert len(chunks) >= 3
        run.server.reset_stats()
        started = time.monotonic()
        processes = [
            PartitionProcess.start(
                home=run.home,
                data_dir=run.data_dir,
                server=run.server,
                token=TEST_TOKEN,
                partitions=[chunk],
                entity_per_minute=ENTITY_BUDGET,
                log_path=tmp_path / "logs" / f"{chunk}.log",
            )
            for chunk in chunks
        ]
        codes = [process.wait(240) for process in processes]
        seconds = time.monotonic() - started
        stats = run.server.stats()
        times = run.server.request_times("entity")
        layout = run.layout
    assert codes == [0] * len(chunks), [p.log_tail() for p, c in zip(processes, codes) if c]
    busiest = busiest_window(times)
    assert len(times) > ENTITY_BUDGET, "the load never needed more than one minute's budget"
    assert busiest <= ENTITY_BUDGET, (
        f"{busiest} entity requests within 60 s, budget {ENTITY_BUDGET}"
    )
    assert stats["rate_limited"] <= 1, (
        f"{stats['rate_limited']} requests were throttled: the client did not pace"
    )
    reference_layout = type(layout)(reference.data_dir)
    for chunk in chunks:
        _assert_same_rows(
            read_parquet(layout.metadata_path(chunk)),
            read_parquet(reference_layout.metadata_path(chunk)),
        )
        _assert_same_rows(
            read_parquet(layout.blur_path(chunk)), read_parquet(reference_layout.blur_path(chunk))
        )
        assert (read_parquet(layout.downloads_path(chunk))["status"] == "ok").all()
    record_figure(
        f"rate limit: {len(chunks)} processes, entity budget {ENTITY_BUDGET}/min",
        processes=len(chunks),
        entity_requests=len(times),
        busiest_60s=busiest,
        budget=ENTITY_BUDGET,
        busiest_60s_fault_free=reference.busiest_minute["entity"],
        throttled_429=stats["rate_limited"],
        seconds=round(seconds, 1),
        span_s=round(max(times) - min(times), 1),
    )


def _same_column(left, right, column: str) -> bool:
    a = left.sort_values("image_id")[column].reset_index(drop=True)
    b = right.sort_values("image_id")[column].reset_index(drop=True)
    try:
        pd.testing.assert_series_equal(a, b, check_names=False)
    except AssertionError:
        return False
    return True


def _assert_same_rows(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        actual.sort_values("image_id").reset_index(drop=True),
        expected.sort_values("image_id").reset_index(drop=True),
    )
    assert np.all(actual["image_id"].value_counts() == 1)
