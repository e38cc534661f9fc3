"""Services restarting under a running pipeline (issue 20): Redis stopped ~20 s and restarted empty or
with its data; PostgreSQL (the scaled-out instance's storage) and then the object store (SeaweedFS, the
data dir and the compute logs) each stopped ~20 s in one scaled-out run. The rate limiter fails closed
while Redis is down (it waits, no API request is sent), a Redis restarted empty hands out no budget
already spent (the busiest 60-s window stays within it), an unreachable object store is waited out
(storage/object_store.py's retries), and the runs or their retries complete with the single-machine
run's GeoPackage: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from mapillary_assets.api.errors import TransientError
from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.api.ratelimit import SharedRateLimiter
from mapillary_assets.emulator import EmulatorServer, Faults
from mapillary_assets.net import free_port
from mapillary_assets_tests.support.assertions import (
    assert_same_images,
    assert_same_images_from_a_bucket,
)
from mapillary_assets_tests.support.emulated_runs import pipeline_run
from mapillary_assets_tests.support.reference import fault_free_reference, shared_temp_root
from mapillary_assets_tests.support.stack_services import (
    needs_stack_services,
    run_pipeline_on_stack,
    running_stack,
)
from mapillary_assets_tests.support.world import TEST_TOKEN, reference_world

ENTITY_BUDGET = 8  # per minute; the pipeline sends ~12 entity requests, so the budget binds
LIMITED_FAMILIES = ("tiles", "entity", "search")  # the CDN (thumbnails) has no limiter
DOWN_S = 20.0

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (scripts/install_services.sh installs it)",
)


class RedisService:
    """A redis-server of this test alone, restartable on the same port and folder."""

    def __init__(self, folder: Path):
        from mapillary_assets.scaleout.services import start_redis

        self.folder, self.port = folder, free_port()
        self.log = folder / "redis.log"
        start_redis(folder, self.port, self.log)
        self.url = f"redis://127.0.0.1:{self.port}/1"

    def restart(self, down_s: float, keep_data: bool) -> tuple[float, float]:
        """(unix time the restart began, unix time Redis answered again)."""
        from mapillary_assets.scaleout.services import restart_redis

        began = time.time()
        restart_redis(self.folder, self.port, self.log, down_s, keep_data)
        return began, time.time()

    def stop(self) -> None:
        from mapillary_assets.scaleout.services import stop_redis

        stop_redis(self.folder)


@pytest.fixture
def redis_service(tmp_path):
    service = RedisService(tmp_path / "redis")
    try:
        yield service
    finally:
        service.stop()


def restart_when(condition, restart, outcome: dict, stop: threading.Event) -> threading.Thread:
    """A thread that calls `restart()` once `condition()` holds, storing its (began, up) in `outcome`."""

    def watch():
        while not stop.is_set():
            if condition():
                outcome["began"], outcome["up"] = restart()
                return
            stop.wait(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def requests_between(server: EmulatorServer, start: float, end: float) -> int:
    return sum(start < t < end for family in LIMITED_FAMILIES for t in server.request_times(family))


@needs_redis
def test_acquire_waits_for_redis_and_an_empty_restart_spends_no_budget_twice(redis_service, caplog):
    caplog.set_level(logging.WARNING, logger="mapillary_assets.api.ratelimit_redis")
    limiter = SharedRateLimiter(
        "entity-restart", per_minute=30, burst=6, window_s=2.0, redis_url=redis_service.url
    )
    outcome, stop = {}, threading.Event()
    times: list[float] = []

    async def take(count: int):
        async def one():
            await limiter.acquire()
            times.append(time.time())

        await asyncio.gather(*(one() for _ in range(count)))

    watcher = restart_when(
        lambda: len(times) >= 20,
        lambda: redis_service.restart(2.0, keep_data=False),
        outcome,
        stop,
    )
    asyncio.run(take(60))
    watcher.join(30)
    limiter.close()
    assert len(times) == 60 and outcome, "Redis was not restarted mid-way"
    gaps = [b - a for a, b in zip(sorted(times), sorted(times)[1:], strict=False)]
    assert max(gaps) >= 1.8  # nothing acquired while Redis was down ...
    assert busiest_window(times, 2.0) <= 30  # ... nor a fresh burst on top of the window's after it
    assert f"waiting for Redis at {redis_service.url}" in caplog.text
    assert "answers again" in caplog.text


@needs_redis
def test_daily_count_is_restored_after_redis_comes_back_empty(redis_service, caplog):
    caplog.set_level(logging.WARNING, logger="mapillary_assets.api.ratelimit_redis")
    limiter = SharedRateLimiter("tiles-day-restart", 600, redis_url=redis_service.url, per_day=100)
    for _ in range(5):
        assert limiter.take_daily() is None
    redis_service.restart(0.0, keep_data=False)
    assert limiter.take_daily() is None
    assert limiter.used_today() == 6  # not 1: the count did not restart at 0 within the day ...
    assert "Redis lost its data" in caplog.text  # ... and it said so
    limiter.close()


@needs_redis
def test_a_long_outage_fails_transiently_without_sending(redis_service):
    limiter = SharedRateLimiter(
        "search-outage", per_minute=60, redis_url=redis_service.url, redis_wait_s=1.5
    )
    redis_service.stop()
    began = time.monotonic()
    with pytest.raises(TransientError, match="after waiting"):
        asyncio.run(limiter.acquire())
    assert 1.4 < time.monotonic() - began < 10


@pytest.mark.slow
@needs_redis
@pytest.mark.parametrize("keep_data", [False, True], ids=["empty", "kept"])
def test_pipeline_survives_redis_restarting_mid_run(
    keep_data, redis_service, tmp_path, tmp_path_factory
):
    reference = fault_free_reference(shared_temp_root(tmp_path_factory))
    faults = Faults(rate_limit_per_minute={"entity": ENTITY_BUDGET})
    api = {
        "rate_limit_backend": "redis",
        "redis_url": redis_service.url,
        "entity_per_minute": ENTITY_BUDGET,
    }
    with pipeline_run(tmp_path, reference_world(), faults=faults, api=api) as run:
        outcome, stop = {}, threading.Event()
        watcher = restart_when(
            lambda: len(run.server.request_times("entity")) >= 2,  # mid metadata, budget binding
            lambda: redis_service.restart(DOWN_S, keep_data=keep_data),
            outcome,
            stop,
        )
        try:
            run.run()
        finally:
            stop.set()
            watcher.join(DOWN_S + 30)
        entity_times = run.server.request_times("entity")
        rate_limited = run.server.stats().get("rate_limited", 0)
        sent_while_down = requests_between(run.server, outcome["began"] + 1, outcome["up"] - 1)
        images = run.images()

    assert outcome["up"] - outcome["began"] >= DOWN_S
    assert sent_while_down == 0  # failed closed: waited for Redis
    assert max(entity_times) > outcome["up"]  # the run went on after Redis was back
    assert len(entity_times) > ENTITY_BUDGET
    assert busiest_window(entity_times, 60.0) <= ENTITY_BUDGET
    assert rate_limited == 0
    assert_same_images(images, reference.load_images())


@pytest.mark.slow
@needs_stack_services
def test_scaled_out_pipeline_survives_postgres_then_the_object_store_restarting_mid_run(
    tmp_path, tmp_path_factory, monkeypatch
):
    import dagster as dg
    import geopandas as gpd

    from mapillary_assets.scaleout import stack
    from mapillary_assets.storage import DataLayout

    reference = fault_free_reference(shared_temp_root(tmp_path_factory))
    faults = Faults(rate_limit_per_minute={"entity": ENTITY_BUDGET})
    with EmulatorServer(world=reference_world(), faults=faults, token=TEST_TOKEN) as server:
        outcome, store_outage, stop = {}, {}, threading.Event()
        with running_stack(monkeypatch, server, "mapillary-restarts-", ENTITY_BUDGET) as (
            config,
            env,
        ):

            def restart_postgres_then_the_object_store():
                began = time.time()
                stack.restart_service(config, "postgres", DOWN_S)
                up = time.time()
                store_outage["began"] = up
                stack.restart_service(config, "object_store", DOWN_S)
                store_outage["up"] = time.time()
                return began, up

            watcher = restart_when(
                lambda: len(server.request_times("entity")) >= 2,
                restart_postgres_then_the_object_store,
                outcome,
                stop,
            )
            with dg.DagsterInstance.get() as instance:
                try:
                    summary = run_pipeline_on_stack(instance, env)
                finally:
                    stop.set()
                    watcher.join(2 * DOWN_S + 60)
            layout = DataLayout(env["MAPILLARY_DATA_DIR"])
            published = tmp_path / "published.gpkg"
            published.write_bytes(layout.store.get(layout.geopackage_key))
        entity_times = server.request_times("entity")
        thumbnail_times = server.request_times("cdn")
    images = gpd.read_file(published, layer="images", engine="pyogrio")

    assert outcome, "PostgreSQL was not restarted mid-run"
    assert "up" in store_outage, "the object store was not restarted mid-run"
    assert store_outage["up"] - store_outage["began"] >= DOWN_S
    assert summary["chunks"] == 3
    assert max(entity_times) > outcome["up"]  # chunks were still being fetched after the restart
    assert max(thumbnail_times) > store_outage["up"]  # ... and thumbnails stored after the store's
    assert busiest_window(entity_times, 60.0) <= ENTITY_BUDGET
    assert_same_images_from_a_bucket(images, reference.load_images())


class _StorageDownFor:
    """An instance whose database refuses `polls` reads (as dagster-postgres raises it), then reports
    the run successful."""

    def __init__(self, polls: int):
        self.polls = polls

    def get_run_by_id(self, run_id):
        from types import SimpleNamespace

        import dagster as dg
        import sqlalchemy.exc

        if self.polls > 0:
            self.polls -= 1
            try:
                raise sqlalchemy.exc.OperationalError(
                    "SELECT 1", {}, Exception("Connection refused")
                )
            except sqlalchemy.exc.OperationalError as cause:
                raise RuntimeError("too many retries for DB connection") from cause
        return SimpleNamespace(status=dg.DagsterRunStatus.SUCCESS, tags={}, job_name="fetch_job")


def test_cluster_runner_waits_for_the_instance_storage():
    from mapillary_assets.runners.cluster import ClusterRunner

    lines: list[str] = []
    runner = ClusterRunner(_StorageDownFor(3), poll_s=0, log=lines.append)
    assert runner.wait("a") == ("a", True)
    assert any("instance storage unreachable" in line for line in lines)
    assert any("answers again" in line for line in lines)
    gone = ClusterRunner(_StorageDownFor(10**6), poll_s=0.01, storage_wait_s=0.2, log=lines.append)
    with pytest.raises(RuntimeError, match="too many retries"):
        gone.wait("a")
