"""A token-bucket rate limiter whose state can be shared by every process on a machine.

Guarantee: with capacity B (`burst`) and refill rate r = (per_minute - B) / window_s, a bucket
admits at most B + r * window_s = per_minute acquisitions in any window of `window_s` seconds.
With a `store` the bucket lives in one SQLite row per family, updated in `BEGIN IMMEDIATE`
transactions, so the guarantee holds for the sum over all processes (concurrent Dagster runs)
that share the file. Time is `time.time()` so that every process reads the same clock.

With a `redis_url` (MAPILLARY_RATE_LIMIT_BACKEND=redis, for workers on several machines) the bucket is
one Redis hash per family, read and updated by one Lua script (`_REDIS_SCRIPT`) that Redis runs
atomically on its own clock (`TIME`): the guarantee holds for the sum over every process on every
machine, and a skewed client clock changes nothing. A crashed process holds no lease, so it leaks no
budget.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RATE_LIMIT_BACKENDS", "SharedRateLimiter", "redis_url_from_env", "usage_factor"]

logger = logging.getLogger(__name__)

# Longest single sleep while waiting: a pause or a usage change made by another process is noticed
# at least this often.
_MAX_SLEEP_S = 1.0
# Bound on how long a SQLite call may block the event loop waiting for another process's write lock;
# beyond it we give the loop back (asyncio.sleep) and try again.
_LOCK_TIMEOUT_S = 0.05
# The bucket itself keeps this client within its configured budget, so a client pacing at that budget
# always reports usage near 100 %. Usage reports matter when the API's real budget is tighter (the app's
# token shared with other clients): react only close to the edge, or we would throttle ourselves.
_USAGE_SLOWDOWN_FROM = 95.0
_USAGE_MIN_FACTOR = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_buckets (
    family TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated_at REAL NOT NULL,
    paused_until REAL NOT NULL DEFAULT 0,
    usage REAL NOT NULL DEFAULT 0,
    usage_at REAL NOT NULL DEFAULT 0
)
"""


RATE_LIMIT_BACKENDS = ("sqlite", "redis")

# One script for every operation, so the arithmetic and the clock live in one place (Redis). KEYS[1] is
# the family's hash; ARGV: op ("take" | "pause" | "usage" | "read"), burst, rate (tokens/s), window_s,
# the usage slowdown start and minimum factor, then the op's argument (n, pause seconds, percent).
# Numbers go back as strings: Redis truncates Lua numbers to integers.
_REDIS_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, burst, rate, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local slow_from, min_factor, arg = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'updated_at', 'paused_until', 'usage', 'usage_at')
local tokens, updated = tonumber(s[1]) or burst, tonumber(s[2]) or now
local paused, usage, usage_at = tonumber(s[3]) or 0, tonumber(s[4]) or 0, tonumber(s[5]) or 0
local r = rate
if usage_at > 0 and now - usage_at <= window and usage > slow_from then
  local over = math.min(1, (usage - slow_from) / (100 - slow_from))
  r = rate * (1 - (1 - min_factor) * over)
end
if now > updated then
  tokens = math.min(burst, tokens + (now - updated) * r)
  updated = now
end
tokens = math.min(tokens, burst)
local wait = 0
if op == 'take' then
  if now < paused then wait = paused - now
  elseif tokens >= arg then tokens = tokens - arg
  else wait = (arg - tokens) / r end
elseif op == 'pause' then paused = math.max(paused, now + arg)
elseif op == 'usage' then usage, usage_at = arg, now
elseif op == 'read' then
  return {string.format('%.6f', tokens), string.format('%.6f', math.max(0, paused - now)), string.format('%.9f', r)}
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'updated_at', string.format('%.6f', updated),
           'paused_until', string.format('%.6f', paused), 'usage', tostring(usage),
           'usage_at', string.format('%.6f', usage_at))
-- An idle bucket refills to full anyway: let Redis drop it once that and any pause have passed.
redis.call('EXPIRE', KEYS[1], math.ceil(math.max(burst / r, window) + math.max(0, paused - now)) + 1)
return string.format('%.6f', wait)
"""
_REDIS_KEY_PREFIX = "mapillary:ratelimit:"


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


def usage_factor(percent: float) -> float:
    """Share of the nominal refill rate to use at an x-app-usage of `percent` (1 up to 95 %, 0.1 at 100 %)."""
    if percent <= _USAGE_SLOWDOWN_FROM:
        return 1.0
    over = min(1.0, (percent - _USAGE_SLOWDOWN_FROM) / (100.0 - _USAGE_SLOWDOWN_FROM))
    return 1.0 - (1.0 - _USAGE_MIN_FACTOR) * over


@dataclass
class _Bucket:
    tokens: float
    updated_at: float
    paused_until: float = 0.0
    usage: float = 0.0
    usage_at: float = 0.0


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
    ) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be >= 1, got {per_minute}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
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
        self._redis = None
        self._redis_script = None

        self._thread_lock = threading.Lock()
        self._local = _Bucket(tokens=float(self.burst), updated_at=time.time())
        self._conn: sqlite3.Connection | None = None
        self._conn_pid: int | None = None
        self._async_lock: asyncio.Lock | None = None
        self._async_lock_loop: asyncio.AbstractEventLoop | None = None
        self._last_usage: tuple[float, float] = (-1.0, 0.0)
        if self.redis_url is not None:
            self._redis_call(
                "read", 0.0
            )  # fail at construction, with the URL in the message, if unreachable
        elif self.store is not None:
            self._connection()  # fail at construction, with the path in the message, if unusable

    def __repr__(self) -> str:
        return (
            f"SharedRateLimiter(family={self.family!r}, per_minute={self.per_minute}, burst={self.burst}, "
            f"window_s={self.window_s}, store={str(self.store) if self.store else None!r}, "
            f"redis={_redacted(self.redis_url) if self.redis_url else None!r})"
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
                try:
                    wait = self._try_take(n)
                except sqlite3.OperationalError as exc:
                    if not _is_locked(exc):
                        raise
                    wait = _LOCK_TIMEOUT_S * random.uniform(0.2, 1.0)
                if wait <= 0:
                    return
                await asyncio.sleep(min(wait, _MAX_SLEEP_S))

    def pause_until(self, unix_time: float) -> None:
        """No acquisition (in any process sharing the store) succeeds before `unix_time`."""
        if self.redis_url is not None:
            # Sent as a duration so that the pause ends by Redis's clock, whatever this machine's says.
            self._redis_call("pause", max(0.0, float(unix_time) - time.time()))
            return

        def apply(bucket: _Bucket) -> None:
            bucket.paused_until = max(bucket.paused_until, float(unix_time))

        _retry_locked(lambda: self._update(apply))
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
        if self.redis_url is not None:
            self._redis_call("usage", percent)
            return

        def apply(bucket: _Bucket) -> None:
            bucket.usage = percent
            bucket.usage_at = now

        _retry_locked(lambda: self._update(apply))

    def paused_for(self) -> float:
        """Seconds left of the current shared pause (0 when not paused)."""
        if self.redis_url is not None:
            return float(self._redis_call("read", 0.0)[1])
        bucket = _retry_locked(self._read)
        return max(0.0, bucket.paused_until - time.time())

    def effective_rate(self) -> float:
        """Tokens per second right now (the nominal rate scaled by the recent usage report)."""
        if self.redis_url is not None:
            return float(self._redis_call("read", 0.0)[2])
        return self._rate(_retry_locked(self._read), time.time())

    # ------------------------------------------------------------------ bucket arithmetic

    def _rate(self, bucket: _Bucket, now: float) -> float:
        # A usage report is only trusted for one window: the API sends a fresh one with every response.
        if bucket.usage_at and now - bucket.usage_at <= self.window_s:
            return self.rate * usage_factor(bucket.usage)
        return self.rate

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = now - bucket.updated_at
        if elapsed > 0:  # a clock stepping back never creates tokens
            bucket.tokens = min(
                float(self.burst), bucket.tokens + elapsed * self._rate(bucket, now)
            )
            bucket.updated_at = now
        bucket.tokens = min(bucket.tokens, float(self.burst))

    def _take(self, bucket: _Bucket, n: int) -> float:
        """Take n tokens if possible (0 returned), else the seconds to wait before trying again."""
        now = time.time()
        self._refill(bucket, now)
        if now < bucket.paused_until:
            return bucket.paused_until - now
        if bucket.tokens >= n:
            bucket.tokens -= n
            return 0.0
        return (n - bucket.tokens) / self._rate(bucket, now)

    # ------------------------------------------------------------------ state (local or SQLite)

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._async_lock is None or self._async_lock_loop is not loop:
            self._async_lock, self._async_lock_loop = asyncio.Lock(), loop
        return self._async_lock

    def _try_take(self, n: int) -> float:
        if self.redis_url is not None:
            return float(self._redis_call("take", float(n)))
        result: list[float] = []
        self._update(lambda bucket: result.append(self._take(bucket, n)))
        return result[0]

    def _read(self) -> _Bucket:
        snapshot: list[_Bucket] = []
        self._update(lambda bucket: snapshot.append(_Bucket(**vars(bucket))), write=False)
        return snapshot[0]

    def _update(self, change, write: bool = True) -> None:
        with self._thread_lock:
            if self.store is None:
                change(self._local)
                return
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                bucket = self._load(conn)
                change(bucket)
                if write:
                    conn.execute(
                        "UPDATE rate_buckets SET tokens=?, updated_at=?, paused_until=?, usage=?, usage_at=? "
                        "WHERE family=?",
                        (
                            bucket.tokens,
                            bucket.updated_at,
                            bucket.paused_until,
                            bucket.usage,
                            bucket.usage_at,
                            self.family,
                        ),
                    )
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise

    def _load(self, conn: sqlite3.Connection) -> _Bucket:
        row = conn.execute(
            "SELECT tokens, updated_at, paused_until, usage, usage_at FROM rate_buckets WHERE family=?",
            (self.family,),
        ).fetchone()
        if row is None:
            bucket = _Bucket(tokens=float(self.burst), updated_at=time.time())
            conn.execute(
                "INSERT INTO rate_buckets (family, tokens, updated_at, paused_until, usage, usage_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.family, bucket.tokens, bucket.updated_at, 0.0, 0.0, 0.0),
            )
            return bucket
        return _Bucket(*row)

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: reopen it in a child process.
        if self._conn is not None and self._conn_pid == os.getpid():
            return self._conn
        assert self.store is not None
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.store, timeout=_LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            _retry_locked(lambda: conn.execute(_SCHEMA))
        except sqlite3.Error as exc:
            raise RuntimeError(
                f"rate limit store {self.store} is not usable ({exc}): point MAPILLARY_RATE_LIMIT_STORE "
                "at a writable file on a local disk"
            ) from None
        self._conn, self._conn_pid = conn, os.getpid()
        return conn

    def _redis_call(self, op: str, argument: float):
        import redis

        with self._thread_lock:
            try:
                if self._redis is None:
                    self._redis = redis.Redis.from_url(
                        self.redis_url,
                        socket_timeout=5,
                        socket_connect_timeout=5,
                        retry_on_timeout=True,
                    )
                    self._redis_script = self._redis.register_script(_REDIS_SCRIPT)
                return self._redis_script(
                    keys=[_REDIS_KEY_PREFIX + self.family],
                    args=[
                        op,
                        self.burst,
                        repr(self.rate),
                        self.window_s,
                        _USAGE_SLOWDOWN_FROM,
                        _USAGE_MIN_FACTOR,
                        repr(float(argument)),
                    ],
                )
            except redis.RedisError as exc:
                raise RuntimeError(
                    f"rate limit store {_redacted(self.redis_url)} is not usable ({type(exc).__name__}: {exc}): "
                    "check MAPILLARY_REDIS_URL and that redis-server runs (scripts/stack.sh status)"
                ) from None

    def close(self) -> None:
        with self._thread_lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = self._redis_script = None
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(
            _conn=None,
            _conn_pid=None,
            _async_lock=None,
            _async_lock_loop=None,
            _thread_lock=None,
            _redis=None,
            _redis_script=None,
        )
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def _redacted(url: str) -> str:
    """A Redis URL without its password (redis://:secret@host -> redis://:***@host)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _retry_locked(action, attempts: int = 200):
    for _ in range(attempts - 1):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            time.sleep(_LOCK_TIMEOUT_S * random.uniform(0.2, 1.0))
    return action()
