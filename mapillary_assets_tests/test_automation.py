"""The scheduled refresh and the new-images sensor, evaluated the way the daemon evaluates them, each request
executed: a week after a complete run, new sequences appear; the refresh rediscovers every tile, and the
sensor carries the new ids into new chunks, runs only those chunks, and republishes the GeoPackage."""

from __future__ import annotations

import datetime as dt
import os

import dagster as dg
import pandas as pd
import pytest

from mapillary_assets.defs.automation import (
    CHUNKS_PER_RUN,
    TILES_PER_RUN,
    build_refresh_schedule,
    new_images_sensor,
    ranged_requests,
    refresh_tile_cache_max_age_hours,
)
from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions
from mapillary_assets.defs.resources import PipelineSettings
from mapillary_assets.emulator import World
from mapillary_assets.storage import read_parquet
from mapillary_assets_tests.support.emulated_runs import pipeline_run
from mapillary_assets_tests.support.world import TEST_SCALE

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
TICK = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)  # a Monday 03:00, as the default cron
WEEK = dt.timedelta(days=7)
# Seed 11 gains ~200 images inside the test area with the first advance; its first run leaves a last,
# partial chunk, so the test also shows that new ids never top up an old chunk.
WORLD_SEED = 11


def range_keys(request: dg.RunRequest, ordered_keys: list[str]) -> list[str]:
    start, end = (
        ordered_keys.index(request.tags[RANGE_START]),
        ordered_keys.index(request.tags[RANGE_END]),
    )
    return ordered_keys[start : end + 1]


# -- the pieces -------------------------------------------------------------------------------------------


def test_ranged_requests_cover_the_keys_in_batches_and_never_span_a_gap():
    ordered = [f"chunk-{i:06d}" for i in range(12)]
    wanted = [ordered[i] for i in (1, 2, 3, 4, 5, 7, 9, 10)]
    requests = ranged_requests(wanted, CHUNKS_PER_RUN, "chunk", ordered_keys=ordered)
    assert [range_keys(r, ordered) for r in requests] == [
        ordered[1:5],
        ordered[5:6],
        ordered[7:8],
        ordered[9:11],
    ]
    assert len({r.run_key for r in requests}) == len(requests)

    tiles = [f"13-{x}-0" for x in range(130)]
    batches = [range_keys(r, tiles) for r in ranged_requests(tiles, TILES_PER_RUN, "refresh")]
    assert [len(b) for b in batches] == [64, 64, 2] and sum(batches, []) == tiles


def test_refresh_runs_refetch_tiles_of_the_previous_refresh():
    assert refresh_tile_cache_max_age_hours(168.0, "0 3 * * 1") == 84.0  # weekly: half a week
    assert refresh_tile_cache_max_age_hours(168.0, "0 3 * * *") == 12.0  # daily: half a day
    assert refresh_tile_cache_max_age_hours(2.0, "0 3 * * 1") == 2.0  # a lower setting wins


def test_refresh_schedule_requests_ranged_discovery_runs_over_every_tile():
    # a week-long cache age configured: the weekly refresh caps it at half a week
    settings = PipelineSettings(tile_cache_max_age_hours=168.0)
    context = dg.build_schedule_context(
        scheduled_execution_time=TICK, resources={"settings": settings}
    )
    data = build_refresh_schedule().evaluate_tick(context)
    keys = tile_partitions().get_partition_keys()
    assert data.run_requests and data.skip_message is None
    covered = [key for request in data.run_requests for key in range_keys(request, keys)]
    assert covered == keys, "every tile partition exactly once, in order"
    for request in data.run_requests:
        assert len(range_keys(request, keys)) <= TILES_PER_RUN
        assert request.run_key.startswith("refresh-20261123T0300:")
        assert (
            request.run_config["resources"]["settings"]["config"]["tile_cache_max_age_hours"]
            == 84.0
        )


# -- a week later -----------------------------------------------------------------------------------------


def evaluate_sensor(run) -> dg.SensorResult:
    return new_images_sensor.evaluate_tick(
        dg.build_sensor_context(instance=run.instance, definitions=run.defs)
    )


def execute(
    run, request: dg.RunRequest, default_job: str | None = None
) -> dg.ExecuteInProcessResult:
    job = run.defs.resolve_job_def(request.job_name or default_job)
    result = job.execute_in_process(
        instance=run.instance,
        tags=request.tags,
        run_config=request.run_config,
        raise_on_error=False,
    )
    assert result.success, f"{job.name} {request.tags} failed"
    return result


def age_tile_cache(run, age: dt.timedelta) -> int:
    """Make every cached raw tile look `age` old (as if fetched by the previous refresh)."""
    cache = run.layout.tile_cache_path(PipelineSettings().tileset, 0, 0, 0).parents[2]
    stamp = (dt.datetime.now(dt.UTC) - age).timestamp()
    files = [path for path in cache.rglob("*") if path.is_file()]
    for path in files:
        os.utime(path, (stamp, stamp))
    return len(files)


def materialisations(run, asset: str, partition: str) -> int:
    return len(
        run.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
            limit=100,
        ).records
    )


@pytest.mark.slow
def test_weekly_refresh_carries_new_images_to_the_geopackage_through_new_chunks_only(tmp_path):
    world = World(seed=WORLD_SEED, scale=TEST_SCALE)
    with pipeline_run(tmp_path, world) as run:
        run.run()
        old_assignment = read_parquet(run.layout.chunk_assignment_path)
        old_chunks = list(run.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))
        old_images = run.images().set_index("image_id").sort_index()
        assert evaluate_sensor(run).skip_message, (
            "a complete, published run leaves the sensor nothing to do"
        )

        # The weekly tick. The previous refresh fetched the cached tiles a little less than a week ago.
        schedule_context = dg.build_schedule_context(
            instance=run.instance,
            scheduled_execution_time=TICK,
            resources={"settings": run.defs.resources["settings"]},
        )
        refresh = build_refresh_schedule().evaluate_tick(schedule_context).run_requests
        assert age_tile_cache(run, WEEK - dt.timedelta(minutes=10)) > 0
        world.advance()  # meanwhile, new sequences were uploaded
        truth = {record.id for record in run.truth()}
        new_ids = truth - set(old_images.index)
        assert len(new_ids) > 100 and set(old_images.index) <= truth
        run.server.reset_stats()
        for request in refresh:
            execute(run, request, "discovery_job")

        # The sensor, tick by tick: re-chunk, then the new chunks only, then publish, then nothing.
        chunking = evaluate_sensor(run).run_requests
        assert [r.job_name for r in chunking] == ["assign_chunks_job"]
        execute(run, chunking[0])
        chunks = list(run.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))
        added = chunks[len(old_chunks) :]
        assert chunks[: len(old_chunks)] == old_chunks and added

        chunk_runs = evaluate_sensor(run).run_requests
        assert {r.job_name for r in chunk_runs} == {"process_chunks_job"}
        assert [key for r in chunk_runs for key in range_keys(r, chunks)] == added, (
            "new chunks only"
        )
        for request in chunk_runs:
            execute(run, request)

        publish = evaluate_sensor(run).run_requests
        assert [r.job_name for r in publish] == ["publish_job"]
        execute(run, publish[0])
        assert evaluate_sensor(run).skip_message

        # Old chunks keep their members and were not run again; new ids are only in new chunks.
        assignment = read_parquet(run.layout.chunk_assignment_path)
        kept = assignment.merge(old_assignment, on="image_id", suffixes=("", "_before"))
        assert len(kept) == len(old_assignment)
        assert (kept["chunk"] == kept["chunk_before"]).all() and (
            kept["position"] == kept["position_before"]
        ).all()
        assert set(assignment.loc[assignment["chunk"].isin(added), "image_id"]) == new_ids
        for chunk in old_chunks:
            assert materialisations(run, "blur_scores", chunk) == 1, chunk

        # Only the new images were fetched: metadata and thumbnails of the new ids, nothing of the old.
        stats = run.server.stats()
        assert stats["thumbnail"] == len(new_ids), stats
        assert stats["tile"] > 0, (
            "the refresh fetched tiles again instead of trusting last week's cache"
        )

        # The GeoPackage holds the new images, and the old ones exactly as they were.
        images = run.images().set_index("image_id").sort_index()
        assert set(images.index) == truth
        unchanged = images.loc[old_images.index]
        pd.testing.assert_frame_equal(
            pd.DataFrame(unchanged.drop(columns="geometry")),
            pd.DataFrame(old_images.drop(columns="geometry")),
        )
        assert unchanged.geometry.geom_equals_exact(old_images.geometry, tolerance=1e-12).all()
