"""The Redis backend of the shared rate limiter: one budget over several processes (as on several
machines), one of them SIGKILLed mid-way, one with a skewed clock; pauses shared; selected by one variable."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mapillary_assets.api.errors import TransientError
from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.api.ratelimit import SharedRateLimiter, redis_url_from_env
from mapillary_assets.net import free_port

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (scripts/install_services.sh installs it)",
)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from mapillary_assets.scaleout.services import start_redis, stop_redis

    folder, port = tmp_path_factory.mktemp("redis"), free_port()
    start_redis(folder, port, folder / "redis.log")
    try:
        yield f"redis://127.0.0.1:{port}/1"
    finally:
        stop_redis(folder)


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from mapillary_assets.api.ratelimit import SharedRateLimiter

    url, family, count, skew = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if skew:  # this machine's clock is off: the budget must not care
        real = time.time
        time.time = lambda: real() + skew
    limiter = SharedRateLimiter(family, per_minute=30, burst=6, window_s=2.0, redis_url=url)
    print("ready", flush=True)
    sys.stdin.readline()

    async def main():
        async def one():
            await limiter.acquire()
            print(json.dumps({"t": time.time() - skew}), flush=True)
        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(main())
    """
)


def start_worker(url: str, family: str, count: int, skew: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, family, str(count), str(skew)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


def acquisition_times(worker: subprocess.Popen) -> list[float]:
    out, _ = worker.communicate(timeout=60)
    return [json.loads(line)["t"] for line in out.splitlines() if line.startswith("{")]


def test_four_processes_one_killed_one_skewed_share_one_budget(redis_url):
    # 4 processes want 60 acquisitions of a 30-per-2-s budget; one clock runs 30 s ahead, one process is killed.
    workers = [
        start_worker(redis_url, "entity-4", 15, skew=30.0 if i == 3 else 0.0) for i in range(4)
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    started = time.time()
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    victim = workers[0]
    victim_times = [json.loads(victim.stdout.readline())["t"] for _ in range(3)]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    survivors = [acquisition_times(w) for w in workers[1:]]
    assert all(len(times) == 15 for times in survivors)
    merged = victim_times + [t for times in survivors for t in times]
    assert busiest_window(merged, 2.0) <= 30
    # 6 burst + 42 more at 12/s: ~3.5 s; the killed process leaked nothing (no lease to wait out).
    assert 3.0 < max(merged) - started < 8.0


def test_pause_is_shared_and_measured_on_the_redis_clock(redis_url):
    worker = start_worker(redis_url, "search-pause", 1, skew=-50.0)  # its clock is 50 s behind
    assert worker.stdout.readline().strip() == "ready"
    pauser = SharedRateLimiter(
        "search-pause", per_minute=30, burst=6, window_s=2.0, redis_url=redis_url
    )
    pauser.pause_until(time.time() + 1.0)
    assert 0.5 < pauser.paused_for() <= 1.0
    began = time.time()
    worker.stdin.write("go\n")
    worker.stdin.flush()
    (acquired,) = acquisition_times(worker)
    assert acquired >= began + 0.8
    pauser.close()


def test_usage_report_slows_every_process(redis_url):
    first = SharedRateLimiter("tiles-usage", per_minute=600, redis_url=redis_url)
    second = SharedRateLimiter("tiles-usage", per_minute=600, redis_url=redis_url)
    nominal = second.effective_rate()
    first.note_usage(100.0)
    assert second.effective_rate() == pytest.approx(nominal * 0.1)


def test_daily_quota_is_shared_and_its_day_follows_the_redis_clock(redis_url):
    limiters = [
        SharedRateLimiter("tiles-day", 600, redis_url=redis_url, per_day=3, day_seconds=2.0)
        for _ in range(2)
    ]
    while 2.0 - time.time() % 2.0 < 1.0:  # a day with time left for the takes below
        time.sleep(0.05)
    assert [limiters[i % 2].take_daily() for i in range(3)] == [None] * 3
    resume_at = limiters[1].take_daily()
    assert resume_at is not None and resume_at % 2.0 == 0 and 0 < resume_at - time.time() <= 2.0
    assert limiters[0].used_today() == 3
    time.sleep(resume_at - time.time() + 0.05)
    assert limiters[0].take_daily() is None and limiters[1].used_today() == 1


def test_backend_is_chosen_by_one_variable(redis_url):
    assert redis_url_from_env({}) is None
    assert (
        redis_url_from_env(
            {"MAPILLARY_RATE_LIMIT_BACKEND": "sqlite", "MAPILLARY_REDIS_URL": redis_url}
        )
        is None
    )
    assert (
        redis_url_from_env(
            {"MAPILLARY_RATE_LIMIT_BACKEND": "redis", "MAPILLARY_REDIS_URL": redis_url}
        )
        == redis_url
    )
    with pytest.raises(ValueError, match="needs MAPILLARY_REDIS_URL"):
        redis_url_from_env({"MAPILLARY_RATE_LIMIT_BACKEND": "redis"})
    with pytest.raises(ValueError, match="sqlite or redis"):
        redis_url_from_env({"MAPILLARY_RATE_LIMIT_BACKEND": "memcached"})


def test_unreachable_redis_is_a_clear_transient_error_without_the_password(caplog):
    # The limiter waits for an unreachable Redis (MAPILLARY_REDIS_WAIT_S) before it gives up, transiently.
    with pytest.raises(
        TransientError, match=r"redis://:\*\*\*@127.0.0.1:1/0 is not usable"
    ) as caught:
        SharedRateLimiter(
            "tiles", per_minute=60, redis_url="redis://:hunter2@127.0.0.1:1/0", redis_wait_s=1.0
        )
    assert caught.value.transient
    # it gave up once the wait was spent: the connection attempts and backoff may overshoot it a little
    waited = re.search(r"after waiting (\d+\.\d) s \(MAPILLARY_REDIS_WAIT_S=1\)", str(caught.value))
    assert waited and 1.0 <= float(waited.group(1)) < 30
    assert "hunter2" not in str(caught.value) and "hunter2" not in caplog.text
    assert "waiting for Redis at redis://:***@127.0.0.1:1/0" in caplog.text


def test_the_resource_passes_the_redis_backend_to_the_client(redis_url, monkeypatch, tmp_path):
    from mapillary_assets.defs.resources import ConfigError, MapillaryApiResource

    monkeypatch.setenv("MAPILLARY_RATE_LIMIT_BACKEND", "redis")
    monkeypatch.setenv("MAPILLARY_REDIS_URL", redis_url)
    resource = MapillaryApiResource.from_env(default_rate_limit_store=tmp_path / "limits.sqlite")
    assert (resource.rate_limit_backend, resource.redis_url) == ("redis", redis_url)
    configured = MapillaryApiResource(
        access_token="MLY|test", rate_limit_backend="redis", redis_url=redis_url
    )
    assert configured.client_settings().rate_limit_redis_url == redis_url
    assert (
        MapillaryApiResource(access_token="MLY|test", redis_url=redis_url)
        .client_settings()
        .rate_limit_redis_url
        is None
    )
    monkeypatch.delenv("MAPILLARY_REDIS_URL")
    with pytest.raises(ConfigError, match="needs MAPILLARY_REDIS_URL"):
        MapillaryApiResource.from_env(default_rate_limit_store=tmp_path / "limits.sqlite")
