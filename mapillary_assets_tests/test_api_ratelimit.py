import asyncio
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.api.ratelimit import SharedRateLimiter, usage_factor

REPO = Path(__file__).resolve().parents[1]


async def acquire_all(limiter: SharedRateLimiter, n: int) -> list[float]:
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(time.time())

    await asyncio.gather(*(one() for _ in range(n)))
    return times


def test_single_process_no_window_exceeds_budget(tmp_path):
    # The in-process and the SQLite-backed bucket run side by side (separate families and state).
    local = SharedRateLimiter("tiles", per_minute=30, burst=6, window_s=2.0)
    shared = SharedRateLimiter(
        "tiles", per_minute=30, store=tmp_path / "limits.sqlite", burst=6, window_s=2.0
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main():
        tick_task = asyncio.create_task(ticker())
        try:
            return await asyncio.gather(acquire_all(local, 36), acquire_all(shared, 36))
        finally:
            tick_task.cancel()

    started = time.time()
    results = asyncio.run(main())
    for times in results:
        assert len(times) == 36
        assert busiest_window(times, 2.0) <= 30
        # burst 6 then (36 - 6) / 12 per s = 2.5 s: not much slower than the budget either
        assert 2.3 < max(times) - started < 4.5
    assert ticks > 100  # waiting never blocked the event loop


def test_defaults_and_validation():
    limiter = SharedRateLimiter("entity", per_minute=6000)
    assert limiter.burst == 100  # one second's worth
    assert limiter.rate == pytest.approx((6000 - 100) / 60)
    assert SharedRateLimiter("x", per_minute=5, burst=50).burst == 4  # leaves a refill
    with pytest.raises(ValueError):
        SharedRateLimiter("x", per_minute=0)
    with pytest.raises(ValueError):
        asyncio.run(SharedRateLimiter("x", per_minute=100, burst=2).acquire(3))
    assert "store=None" in repr(limiter)


def test_usage_slows_the_refill():
    assert usage_factor(0) == usage_factor(95) == 1.0
    assert usage_factor(97.5) == pytest.approx(0.55)
    assert usage_factor(100) == usage_factor(150) == pytest.approx(0.1)
    limiter = SharedRateLimiter("entity", per_minute=600, window_s=60)
    nominal = limiter.effective_rate()
    limiter.note_usage(100)
    assert limiter.effective_rate() == pytest.approx(nominal * 0.1)
    limiter.note_usage(50)
    assert limiter.effective_rate() == pytest.approx(nominal)


def test_usage_report_expires_after_a_window(tmp_path):
    limiter = SharedRateLimiter("entity", per_minute=600, store=tmp_path / "s.sqlite", window_s=0.2)
    limiter.note_usage(100)
    assert limiter.effective_rate() == pytest.approx(limiter.rate * 0.1)
    time.sleep(0.25)
    assert limiter.effective_rate() == pytest.approx(limiter.rate)


def test_pause_in_process(tmp_path):
    limiter = SharedRateLimiter("search", per_minute=6000, store=tmp_path / "s.sqlite")
    resume = time.time() + 0.4
    limiter.pause_until(resume)
    limiter.pause_until(resume - 10)  # an earlier pause never shortens a later one
    assert 0.2 < limiter.paused_for() <= 0.4
    asyncio.run(limiter.acquire())
    assert time.time() >= resume
    assert limiter.paused_for() == 0.0


def test_two_instances_in_one_process_share_the_store(tmp_path):
    store = tmp_path / "s.sqlite"
    a = SharedRateLimiter("tiles", per_minute=30, store=store, burst=6, window_s=2.0)
    b = SharedRateLimiter("tiles", per_minute=30, store=store, burst=6, window_s=2.0)
    other_family = SharedRateLimiter("entity", per_minute=30, store=store, burst=6, window_s=2.0)

    async def main():
        return await asyncio.gather(
            acquire_all(a, 12), acquire_all(b, 12), acquire_all(other_family, 6)
        )

    started = time.time()
    times_a, times_b, times_other = asyncio.run(main())
    # Shared: 6 burst + 18 at 12/s = 1.5 s; two separate buckets would finish both in 0.5 s.
    assert max(times_a + times_b) - started > 1.3
    assert max(times_other) - min(times_other) < 0.5  # its own bucket: the burst covers all 6


def test_acquire_overhead_is_small(tmp_path):
    limiter = SharedRateLimiter("tiles", per_minute=10**9, store=tmp_path / "s.sqlite", burst=10**6)

    async def main(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await limiter.acquire()
        return (time.perf_counter() - started) / n

    per_acquire = asyncio.run(main(2000))
    assert per_acquire < 0.002, f"{per_acquire * 1e6:.0f} us per acquire"


def test_pickles_without_its_connection_and_the_copy_shares_the_budget(tmp_path):
    limiter = SharedRateLimiter("tiles", per_minute=60, store=tmp_path / "s.sqlite", burst=2)
    asyncio.run(limiter.acquire())
    copy = pickle.loads(pickle.dumps(limiter))
    asyncio.run(copy.acquire())  # the burst's second token
    started = time.monotonic()
    asyncio.run(copy.acquire())  # the bucket both draw from is empty: the next token comes in 1 s
    assert time.monotonic() - started > 0.7
    copy.close()
    limiter.close()


# ----------------------------------------------------------------------------- across processes

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    from mapillary_assets.api.ratelimit import SharedRateLimiter

    store, count = Path(sys.argv[1]), int(sys.argv[2])
    limiter = SharedRateLimiter("tiles", per_minute=30, store=store, burst=6, window_s=2.0)
    print("ready", flush=True)
    sys.stdin.readline()  # wait for "go"

    async def main():
        times = []
        async def one():
            await limiter.acquire()
            times.append(time.time())
        began = time.time()
        await asyncio.gather(*(one() for _ in range(count)))
        return began, times

    began, times = asyncio.run(main())
    print(json.dumps({"began": began, "times": times}), flush=True)
    """
)


def start_worker(store: Path, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(store), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def wait_ready(*workers: subprocess.Popen) -> None:
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"


def go(*workers: subprocess.Popen) -> None:
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()


def finish(worker: subprocess.Popen) -> dict:
    out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_share_one_budget(tmp_path):
    store = tmp_path / "limits.sqlite"
    workers = [start_worker(store, 18) for _ in range(2)]
    wait_ready(*workers)
    started = time.time()
    go(*workers)
    results = [finish(w) for w in workers]
    merged = [t for r in results for t in r["times"]]
    assert len(merged) == 36 and all(r["times"] for r in results)
    # Alone, each process would spend a whole budget; together they must share one.
    assert busiest_window(merged, 2.0) <= 30
    # 6 burst + 30 at 12/s: 2.5 s for both together (each alone would need 1 s)
    assert max(merged) - started > 2.2


def test_pause_is_honoured_by_another_process(tmp_path):
    store = tmp_path / "limits.sqlite"
    worker = start_worker(store, 1)
    wait_ready(worker)
    resume = time.time() + 1.0
    SharedRateLimiter("tiles", per_minute=30, store=store, burst=6, window_s=2.0).pause_until(
        resume
    )
    go(worker)
    result = finish(worker)
    assert result["began"] < resume - 0.5
    assert result["times"][0] >= resume
