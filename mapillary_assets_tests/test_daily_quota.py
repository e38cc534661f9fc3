"""The daily tile quota (MAPILLARY_TILES_PER_DAY): counted by the limiter's backends, refused by the
emulator, and a discovery that outgrows a "day" (seconds long here) stops cleanly, resumes in the next
window and ends equal to an unthrottled run without fetching any tile twice."""

from __future__ import annotations

import asyncio
import pickle
import time

import mercantile
import pandas as pd
import pytest
import requests

from mapillary_assets.api import ClientConfig, DailyQuotaSpent
from mapillary_assets.api.ratelimit import SharedRateLimiter
from mapillary_assets.defs.assets.discovery import _daily_quota_failure
from mapillary_assets.defs.resources import ConfigError, MapillaryApiResource
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles
from mapillary_assets.pipeline.discovery.tiles import discover_partition
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.clients import emulator_client


def wait_for_a_fresh_day(day_seconds: float, at_least: float) -> None:
    """Sleep into a quota day with at least `at_least` seconds left."""
    while day_seconds - time.time() % day_seconds < at_least:
        time.sleep(0.05)


def test_the_sqlite_store_shares_the_days_count_and_a_new_day_starts_afresh(tmp_path):
    store = tmp_path / "limits.sqlite"
    first = SharedRateLimiter("tiles", 600, store=store, per_day=3, day_seconds=2.0)
    second = SharedRateLimiter("tiles", 600, store=store, per_day=3, day_seconds=2.0)
    wait_for_a_fresh_day(2.0, 1.0)
    assert [first.take_daily(), second.take_daily(), first.take_daily()] == [None] * 3
    resume_at = second.take_daily()
    assert resume_at is not None and 0 < resume_at - time.time() <= 2.0
    assert resume_at % 2.0 == 0 and first.used_today() == 3
    time.sleep(resume_at - time.time() + 0.01)
    assert first.take_daily() is None and second.used_today() == 1
    local = SharedRateLimiter("tiles", 600, per_day=1, day_seconds=60.0)
    assert local.take_daily() is None and local.take_daily() is not None
    assert SharedRateLimiter("entity", 600).take_daily() is None  # no daily quota: never refused


def test_quota_spent_is_transient_says_when_it_resumes_and_pickles():
    resume_at = time.time() + 3600
    error = DailyQuotaSpent.for_quota(50_000, resume_at).with_context("GET tiles/14/1/2")
    assert error.transient and error.resume_at == resume_at and 3590 < error.retry_after <= 3600
    assert "the daily tile quota is spent (50,000 tile requests per day" in error.message
    assert "resume at" in error.message and "UTC" in error.message
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DailyQuotaSpent and again.resume_at == resume_at


def test_settings_and_resource_read_the_quota_from_the_environment(monkeypatch):
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "MLY|x")
    assert ClientConfig.from_env().tiles_per_day == 50_000
    monkeypatch.setenv("MAPILLARY_TILES_PER_DAY", "10000")
    monkeypatch.setenv("MAPILLARY_QUOTA_DAY_SECONDS", "30")
    settings = ClientConfig.from_env()
    assert (settings.tiles_per_day, settings.quota_day_seconds) == (10_000, 30.0)
    resource = MapillaryApiResource.from_env(default_rate_limit_store="/tmp/x.sqlite")
    assert (resource.tiles_per_day, resource.quota_day_seconds) == (10_000, 30.0)
    monkeypatch.setenv("MAPILLARY_TILES_PER_DAY", "0")
    with pytest.raises(ConfigError, match="MAPILLARY_TILES_PER_DAY"):
        MapillaryApiResource.from_env(default_rate_limit_store="/tmp/x.sqlite")


def test_the_emulator_refuses_and_counts_tiles_beyond_its_daily_quota():
    with EmulatorServer(World(seed=3, scale=0.005)) as server:
        server.set_faults(tiles_per_day=2, day_seconds=600.0)
        url = f"{server.tiles_url}/maps/vtp/mly1_public/2/14/8580/5737"
        params = {"access_token": server.token}
        codes = [requests.get(url, params=params, timeout=10).status_code for _ in range(3)]
        refused = requests.get(url, params=params, timeout=10)
        stats = server.stats()
    assert codes[:2] == [200, 200] and codes[2] == 429 == refused.status_code
    assert refused.json()["error"]["code"] == 4
    assert 0 < int(refused.headers["Retry-After"]) <= 600
    assert stats["daily_quota_refused"] == 2 and stats["tile"] == 4
    assert server.tile_fetches() == {"mly1_public/14/8580/5737": 2}


def test_the_client_stops_at_its_quota_before_the_emulator_refuses(tmp_path):
    with EmulatorServer(World(seed=3, scale=0.005)) as server:
        server.set_faults(tiles_per_day=5, day_seconds=600.0)

        async def fetch_many():
            async with emulator_client(
                server, tmp_path, tiles_per_day=5, quota_day_seconds=600.0
            ) as c:
                await asyncio.gather(*(c.get_tile(14, 8580 + i, 5737) for i in range(8)))

        with pytest.raises(DailyQuotaSpent, match="daily tile quota is spent"):
            asyncio.run(fetch_many())
        assert server.stats()["daily_quota_refused"] == 0
        assert server.stats()["tile"] == 5


def discover_all(server, tmp_path, aoi, partitions, layout, **quota):
    """Discovery of every partition the way the schedule resumes it: a partition the quota stops
    fails (transient) with the rest of the day's, and the next window re-runs the failed ones."""
    frames, days, pending = {}, 0, list(partitions)

    async def one_day(keys):
        async with emulator_client(server, tmp_path, **quota) as client:
            for partition in keys:
                frames[partition], _ = await discover_partition(client, aoi, partition, layout)

    while pending:
        days += 1
        try:
            asyncio.run(one_day(pending))
        except DailyQuotaSpent as spent:
            assert "daily tile quota is spent" in spent.message
            time.sleep(max(0.0, spent.resume_at - time.time()) + 0.01)
        pending = [p for p in partitions if p not in frames]
        assert days < 30
    return frames, days


def test_discovery_outgrowing_the_daily_quota_resumes_and_equals_an_unthrottled_run(tmp_path):
    world, aoi = World(seed=11, scale=0.01), load_aoi()
    partitions = [mercantile.Tile(*t) for t in partition_tiles(aoi, 13)][:10]
    with EmulatorServer(world) as server:
        free, _ = discover_all(
            server, tmp_path / "free", aoi, partitions, DataLayout(tmp_path / "a")
        )
        needed = server.stats()["tile"]
        assert needed > 20 and max(server.tile_fetches().values()) == 1

        server.reset_stats()
        per_day, day_seconds = max(5, needed // 4), 3.0
        server.set_faults(tiles_per_day=per_day, day_seconds=day_seconds)
        wait_for_a_fresh_day(day_seconds, 2.0)
        quota = {"tiles_per_day": per_day, "quota_day_seconds": day_seconds}
        layout = DataLayout(tmp_path / "b")
        throttled, days = discover_all(server, tmp_path / "q", aoi, partitions, layout, **quota)
        stats, fetches = server.stats(), server.tile_fetches()

    assert days >= 3
    assert stats["daily_quota_refused"] == 0 and stats["rate_limited"] == 0
    assert stats["tile"] == needed == sum(fetches.values())
    assert max(fetches.values()) == 1  # the tile cache served every tile fetched before a stop
    for partition in partitions:
        pd.testing.assert_frame_equal(throttled[partition], free[partition])


def test_the_discovery_asset_fails_the_partitions_not_reached_as_transient():
    resume_at = time.time() + 7200
    failure = _daily_quota_failure(
        DailyQuotaSpent.for_quota(9, resume_at),
        50_000,
        ["12-1-1", "12-1-2", "12-1-3"],
        {"12-1-1": 0},
    )
    assert "daily tile quota is spent (50,000 tile requests per day" in failure.description
    assert "resume at" in failure.description and "12-1-2, 12-1-3" in failure.description
    assert failure.metadata["transient"].value is True
    assert failure.metadata["partitions_not_reached"].value == 2
    assert failure.metadata["resumes_at"].value.startswith(
        time.strftime("%Y", time.gmtime(resume_at))
    )


def test_a_discovery_run_that_meets_a_spent_quota_fails_transiently_with_the_resume_time(
    tmp_path,
):
    import dagster as dg

    from mapillary_assets.definitions import build_definitions
    from mapillary_assets.defs.partitions import partition_tags, tile_partitions
    from mapillary_assets_tests.support.emulated_runs import emulator_resources
    from mapillary_assets_tests.support.world import TEST_TOKEN

    keys = tile_partitions().get_partition_keys()
    with (
        EmulatorServer(World(seed=7, scale=0.01), token=TEST_TOKEN) as server,
        dg.instance_for_test(temp_dir=str(tmp_path)) as instance,
    ):
        resources = emulator_resources(server, tmp_path / "data")
        resources["mapillary_api"] = MapillaryApiResource(
            **{**resources["mapillary_api"].model_dump(), "tiles_per_day": 2}
        )
        job = build_definitions(resources).get_job_def("discovery_job")
        result = job.execute_in_process(
            instance=instance, tags=partition_tags(keys), raise_on_error=False
        )
        stats = server.stats()
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.user_failure_data
    assert "the daily tile quota is spent (2 tile requests per day" in error.description
    assert "resume at" in error.description and "not reached" in error.description
    assert error.metadata["transient"].value is True
    assert stats["tile"] == 2 and stats["daily_quota_refused"] == 0
