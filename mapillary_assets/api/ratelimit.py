"""A token-bucket rate limiter whose state can be shared by every process on a machine.

Guarantee: with capacity B (`burst`) and refill rate r = (per_minute - B) / window_s, a bucket
admits at most B + r * window_s = per_minute acquisitions in any window of `window_s` seconds.
With a `store` the bucket lives in one SQLite row per family (`ratelimit_sqlite`), updated in
`BEGIN IMMEDIATE` transactions, so the guarantee holds for the sum over all processes (concurrent
Dagster runs) that share the file. Time is `time.time()` so that every process reads the same clock.

With a `redis_url` (MAPILLARY_RATE_LIMIT_BACKEND=redis, for workers on several machines) the bucket is
one Redis hash per family, read and updated by one Lua script (`ratelimit_redis`) that Redis runs
atomically on its own clock (`TIME`): the guarantee holds for the sum over every process on every
machine, and a skewed client clock changes nothing. A crashed process holds no lease, so it leaks no
budget. While Redis is unreachable the limiter fails closed: `acquire` waits for it (up to
MAPILLARY_REDIS_WAIT_S, then a transient `RateLimitStoreUnavailable`), never lets a request through
unlimited; a Redis restarted empty starts the bucket empty, so the guarantee holds across the restart
(`ratelimit_redis`).

A daily quota (`per_day`, the tile server's 50,000 requests a day) lives in the same backend: a count
per family of the current quota day, the window [k * day_seconds, (k + 1) * day_seconds) of unix
time (86,400 s: UTC days; Redis's clock with Redis), checked and counted in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

from mapillary_assets.api.ratelimit_redis import (
    DEFAULT_WAIT_S,
    RedisBucket,
    RedisUnreachable,
    redacted,
)
from mapillary_assets.api.ratelimit_sqlite import (
    LOCK_TIMEOUT_S,
    BucketState,
    SqliteBucketStore,
    is_locked,
    retry_locked,
)

__all__ = [
    "RATE_LIMIT_BACKENDS",
    "SharedRateLimiter",
    "redis_url_from_env",
    "redis_wait_s_from_env",
    "usage_factor",
]

logger = logging.getLogger(__name__)

# Longest single sleep while waiting: a pause or a usage change made by another process is noticed
# at least this often.
_MAX_SLEEP_S = 1.0
# The bucket itself keeps this client within its configured budget, so a client pacing at that budget
# always reports usage near 100 %. Usage reports matter when the API's real budget is tighter (the app's
# token shared with other clients): react only close to the edge, or we would throttle ourselves.
_USAGE_SLOWDOWN_FROM = 95.0
_USAGE_MIN_FACTOR = 0.1

RATE_LIMIT_BACKENDS = ("sqlite", "redis")


def redis_url_from_env(environ=None) -> str | None:
    """The Redis URL when MAPILLARY_RATE_LIMIT_BACKEND=redis (MAPILLARY_REDIS_URL), None for SQLite."""
    env = os.environ if environ is None else environ
    backend = (env.get("MAPILLARY_RATE_LIMIT_BACKEND") or "sqlite").strip().lower()
    if backend not in RATE_LIMIT_BACKENDS:
        raise ValueError(
            f"MAPILLARY_RATE_LIMIT_BACKEND={backend!r} is not supported: use sqlite or redis"
        )
    if backend == "sqlite":
        return None
    url = (env.get("MAPILLARY_REDIS_URL") or "").strip()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            "MAPILLARY_RATE_LIMIT_BACKEND=redis needs MAPILLARY_REDIS_URL, e.g. redis://127.0.0.1:6390/1"
        )
    return url


def redis_wait_s_from_env(environ=None) -> float:
    """How long the Redis limiter waits for an unreachable Redis (MAPILLARY_REDIS_WAIT_S, default 300 s)."""
    env = os.environ if environ is None else environ
    raw = (env.get("MAPILLARY_REDIS_WAIT_S") or "").strip()
    try:
        wait_s = float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise ValueError(f"MAPILLARY_REDIS_WAIT_S={raw!r} is not a number of seconds") from None
    if wait_s < 0:
        raise ValueError(f"MAPILLARY_REDIS_WAIT_S must be >= 0, got {raw}")
    return wait_s


def usage_factor(percent: float) -> float:
    """Share of the nominal refill rate to use at an x-app-usage of `percent` (1 up to 95 %, 0.1 at 100 %)."""
    if percent <= _USAGE_SLOWDOWN_FROM:
        return 1.0
    over = min(1.0, (percent - _USAGE_SLOWDOWN_FROM) / (100.0 - _USAGE_SLOWDOWN_FROM))
    return 1.0 - (1.0 - _USAGE_MIN_FACTOR) * over


class SharedRateLimiter:
    """Token bucket for one endpoint family ("tiles", "entity", "search").

    Processes sharing a store should configure the same per_minute and burst for a family: each
    refills the shared bucket at its own configured rate.
    """

    def __init__(
        self,
        family: str,
        per_minute: int,
        store: Path | None = None,
        burst: int | None = None,
        window_s: float = 60.0,
        redis_url: str | None = None,
        per_day: int | None = None,
        day_seconds: float = 86_400.0,
        redis_wait_s: float | None = None,
    ) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be >= 1, got {per_minute}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if per_day is not None and per_day < 1:
            raise ValueError(f"per_day must be >= 1, got {per_day}")
        if day_seconds <= 0:
            raise ValueError(f"day_seconds must be > 0, got {day_seconds}")
        self.per_day = per_day
        self.day_seconds = float(day_seconds)
        self._local_day: tuple[int, int] = (0, 0)  # (quota day, count) without a store
        if burst is None:
            burst = max(1, round(per_minute / window_s))  # about one second's worth
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        # The refill must stay positive: keep at least one token of the budget for it.
        self.burst = min(burst, per_minute - 1) if per_minute > 1 else 1
        self.family = family
        self.per_minute = per_minute
        self.window_s = float(window_s)
        # per_minute == 1 cannot be split into burst + refill; fall back to one token per window
        # (so a closed window can hold 2 acquisitions exactly window_s apart).
        self.rate = max(per_minute - self.burst, 1) / self.window_s
        self.store = Path(store) if store is not None else None
        self.redis_url = redis_url or None

        self._thread_lock = threading.Lock()
        self._local = BucketState(tokens=float(self.burst), updated_at=time.time())
        self._async_lock: asyncio.Lock | None = None
        self._async_lock_loop: asyncio.AbstractEventLoop | None = None
        self._last_usage: tuple[float, float] = (-1.0, 0.0)
        # Pauses are also kept here: a Redis that restarts empty forgets them, this process does not.
        self._local_paused_until = 0.0
        # Where the bucket lives: Redis (the arithmetic runs there), a SQLite file, or this process.
        # Each fails at construction, with the URL or path in the message, if unusable.
        self._redis: RedisBucket | None = None
        self._sqlite: SqliteBucketStore | None = None
        if self.redis_url is not None:
            self._redis = RedisBucket(
                self.redis_url,
                family,
                self.burst,
                self.rate,
                self.window_s,
                _USAGE_SLOWDOWN_FROM,
                _USAGE_MIN_FACTOR,
                redis_wait_s_from_env() if redis_wait_s is None else redis_wait_s,
            )
        elif self.store is not None:
            self._sqlite = SqliteBucketStore(self.store, family, self.burst)

    def __repr__(self) -> str:
        return (
            f"SharedRateLimiter(family={self.family!r}, per_minute={self.per_minute}, burst={self.burst}, "
            f"window_s={self.window_s}, store={str(self.store) if self.store else None!r}, "
            f"redis={redacted(self.redis_url) if self.redis_url else None!r})"
        )

    # ------------------------------------------------------------------ public API

    async def acquire(self, n: int = 1) -> None:
        """Wait (without blocking the event loop) until `n` tokens are available, then take them."""
        if n < 1:
            return
        if n > self.burst:
            raise ValueError(f"cannot acquire {n} tokens at once: burst is {self.burst}")
        async with self._lock():
            while True:
                paused = self._local_paused_until - time.time()
                if paused > 0:
                    await asyncio.sleep(min(paused, _MAX_SLEEP_S))
                    continue
                try:
                    if self._redis is not None:  # waits for an unreachable Redis without blocking
                        wait = float(await self._redis.call_async("take", float(n)))
                    else:
                        wait = self._try_take(n)
                except sqlite3.OperationalError as exc:
                    if not is_locked(exc):
                        raise
                    wait = LOCK_TIMEOUT_S * random.uniform(0.2, 1.0)
                if wait <= 0:
                    return
                await asyncio.sleep(min(wait, _MAX_SLEEP_S))

    def pause_until(self, unix_time: float) -> None:
        """No acquisition (in any process sharing the store) succeeds before `unix_time`."""
        if self._redis is not None:
            self._local_paused_until = max(self._local_paused_until, float(unix_time))
            try:
                # Sent as a duration so that the pause ends by Redis's clock, whatever this machine's says.
                self._redis.call("pause", max(0.0, float(unix_time) - time.time()), wait=False)
            except RedisUnreachable:
                pass  # this process keeps the pause; acquire() waits for Redis anyway
            return

        def apply(bucket: BucketState) -> None:
            bucket.paused_until = max(bucket.paused_until, float(unix_time))

        retry_locked(lambda: self._update(apply))
        logger.debug("rate limiter %s paused until %.3f", self.family, unix_time)

    def note_usage(self, percent: float) -> None:
        """Record the API-reported quota usage (percent); above 80 % the refill rate shrinks."""
        now = time.time()
        percent = float(percent)
        last_percent, last_at = self._last_usage
        # Every Graph response reports usage; an unchanged value need not be written again at once.
        if abs(percent - last_percent) < 1.0 and now - last_at < min(1.0, self.window_s / 10):
            return
        self._last_usage = (percent, now)
        if self._redis is not None:
            try:
                self._redis.call("usage", percent, wait=False)
            except RedisUnreachable:
                pass  # advisory: the next response reports usage again
            return

        def apply(bucket: BucketState) -> None:
            bucket.usage = percent
            bucket.usage_at = now

        retry_locked(lambda: self._update(apply))

    def take_daily(self) -> float | None:
        """Count one request against the day's quota (shared like the bucket): None when counted, else
        the unix time the next quota day starts (nothing was counted; no request may go before it)."""
        if self.per_day is None:
            return None
        limit = self.per_day
        if self._redis is not None:
            taken, _, day_end = self._redis.take_daily(self.day_seconds, limit)
            return None if taken else day_end
        day = math.floor(time.time() / self.day_seconds)
        if self._sqlite is not None:
            taken, _ = retry_locked(lambda: self._sqlite.take_daily(day, limit))
        else:
            with self._thread_lock:
                used = self._local_day[1] if self._local_day[0] == day else 0
                taken = used < limit
                self._local_day = (day, used + taken)
        return None if taken else (day + 1) * self.day_seconds

    def used_today(self) -> int:
        """Requests counted against the current quota day."""
        if self.per_day is None:
            return 0
        if self._redis is not None:
            return self._redis.take_daily(self.day_seconds, self.per_day, take=False)[1]
        day = math.floor(time.time() / self.day_seconds)
        if self._sqlite is not None:
            return retry_locked(lambda: self._sqlite.take_daily(day, self.per_day, take=False))[1]
        return self._local_day[1] if self._local_day[0] == day else 0

    def paused_for(self) -> float:
        """Seconds left of the current shared pause (0 when not paused). While Redis is unreachable: the
        pause this process knows of (acquire() is the gate, and it waits for Redis)."""
        if self._redis is not None:
            local = max(0.0, self._local_paused_until - time.time())
            try:
                return max(local, float(self._redis.call("read", 0.0, wait=False)[1]))
            except RedisUnreachable:
                return local
        bucket = retry_locked(self._read)
        return max(0.0, bucket.paused_until - time.time())

    def effective_rate(self) -> float:
        """Tokens per second right now (the nominal rate scaled by the recent usage report)."""
        if self._redis is not None:
            return float(self._redis.call("read", 0.0)[2])
        return self._rate(retry_locked(self._read), time.time())

    # ------------------------------------------------------------------ bucket arithmetic

    def _rate(self, bucket: BucketState, now: float) -> float:
        # A usage report is only trusted for one window: the API sends a fresh one with every response.
        if bucket.usage_at and now - bucket.usage_at <= self.window_s:
            return self.rate * usage_factor(bucket.usage)
        return self.rate

    def _refill(self, bucket: BucketState, now: float) -> None:
        elapsed = now - bucket.updated_at
        if elapsed > 0:  # a clock stepping back never creates tokens
            bucket.tokens = min(
                float(self.burst), bucket.tokens + elapsed * self._rate(bucket, now)
            )
            bucket.updated_at = now
        bucket.tokens = min(bucket.tokens, float(self.burst))

    def _take(self, bucket: BucketState, n: int) -> float:
        """Take n tokens if possible (0 returned), else the seconds to wait before trying again."""
        now = time.time()
        self._refill(bucket, now)
        if now < bucket.paused_until:
            return bucket.paused_until - now
        if bucket.tokens >= n:
            bucket.tokens -= n
            return 0.0
        return (n - bucket.tokens) / self._rate(bucket, now)

    # ------------------------------------------------------------------ state (local, SQLite or Redis)

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._async_lock is None or self._async_lock_loop is not loop:
            self._async_lock, self._async_lock_loop = asyncio.Lock(), loop
        return self._async_lock

    def _try_take(self, n: int) -> float:
        result: list[float] = []
        self._update(lambda bucket: result.append(self._take(bucket, n)))
        return result[0]

    def _read(self) -> BucketState:
        snapshot: list[BucketState] = []
        self._update(lambda bucket: snapshot.append(BucketState(**vars(bucket))), write=False)
        return snapshot[0]

    def _update(self, change, write: bool = True) -> None:
        if self._sqlite is not None:
            self._sqlite.update(change, write)
            return
        with self._thread_lock:
            change(self._local)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._sqlite is not None:
            self._sqlite.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_async_lock=None, _async_lock_loop=None, _thread_lock=None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
