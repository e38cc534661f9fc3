"""Token bucket shared by every process on every machine through Redis.

The bucket of a family is one Redis hash, read and updated by one Lua script (`_REDIS_SCRIPT`) that
Redis runs atomically on its own clock (`TIME`): the guarantee holds for the sum over every process
on every machine, and a skewed client clock changes nothing. A crashed process holds no lease, so
it leaks no budget. The bucket arithmetic mirrors `SharedRateLimiter`'s (refill, usage slowdown).
The daily quota is a second script on the same connection: the family's count of the current quota
day, the day taken from Redis's clock too.

Redis restarting (issue 20). While Redis cannot be reached the bucket fails closed: every call waits and
retries with backoff (logging that it waits for Redis at the URL, password redacted) and nothing is
sent; after `wait_s` (MAPILLARY_REDIS_WAIT_S, 300 s) of outage it raises `RateLimitStoreUnavailable`, a
transient error, so the stage records its failures as transient and a retry of the run resumes. A
Redis that comes back empty must not hand out budget already spent: a bucket without state starts
empty (0 tokens, not a full burst), and the daily count is raised back to the highest count this process
saw earlier the same day (with a warning: counts other processes took since are lost with Redis; the
stack runs Redis with appendonly persistence so a restart keeps them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

from mapillary_assets.api.errors import TransientError

__all__ = ["RateLimitStoreUnavailable", "RedisBucket", "RedisUnreachable", "redacted"]

logger = logging.getLogger(__name__)

DEFAULT_WAIT_S = 300.0  # MAPILLARY_REDIS_WAIT_S
_FIRST_RETRY_S = 0.2
_MAX_RETRY_S = 5.0
_LOG_EVERY_S = 30.0


class RedisUnreachable(Exception):
    """Redis did not answer a call made with wait=False (the caller falls back on what it knows)."""


class RateLimitStoreUnavailable(TransientError):
    """Redis stayed unreachable for longer than the limiter waits: no request was sent meanwhile;
    transient, so a retry of the run resumes once Redis is back."""


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
-- No state (a new bucket, or Redis restarted empty): start empty, never with a fresh full burst on top
-- of what the window before may already have spent.
local tokens, updated = tonumber(s[1]) or 0, tonumber(s[2]) or now
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
-- An idle bucket is full: let Redis drop it once that and any pause have passed (it restarts empty,
-- which costs its first request at most burst / rate seconds).
redis.call('EXPIRE', KEYS[1], math.ceil(math.max(burst / r, window) + math.max(0, paused - now)) + 1)
return string.format('%.6f', wait)
"""
_REDIS_KEY_PREFIX = "mapillary:ratelimit:"
# KEYS[1]: the family's daily hash (day index, count); ARGV: day length (s), limit, 1 to take one, then
# the day and count this client saw last (a floor: a count below it means Redis lost its data).
# Returns {taken 0/1, the day's count, the unix time the day ends, 1 when the floor was applied}; the hash
# expires with its day.
_DAILY_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local day_s, limit, take = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local floor_day, floor_used = tonumber(ARGV[4]), tonumber(ARGV[5])
local day = math.floor(now / day_s)
local s = redis.call('HMGET', KEYS[1], 'day', 'used')
local used = 0
if tonumber(s[1]) == day then used = tonumber(s[2]) or 0 end
local restored = 0
if floor_day == day and used < floor_used then
  used = floor_used
  restored = 1
end
local taken = 0
if take > 0 and used < limit then
  used = used + 1
  taken = 1
end
if taken == 1 or restored == 1 then
  redis.call('HSET', KEYS[1], 'day', string.format('%d', day), 'used', string.format('%d', used))
  redis.call('EXPIRE', KEYS[1], math.ceil((day + 1) * day_s - now) + 1)
end
return {taken, used, string.format('%.6f', (day + 1) * day_s), restored}
"""
_DAILY_KEY_PREFIX = "mapillary:dailyquota:"


class RedisBucket:
    """The bucket of `family` in the Redis at `url`, with the limiter's parameters (sent with every
    call, so the script holds no configuration of its own). Calls wait for an unreachable Redis up to
    `wait_s` seconds of outage (see the module docstring)."""

    def __init__(
        self,
        url: str,
        family: str,
        burst: int,
        rate: float,
        window_s: float,
        usage_slowdown_from: float,
        usage_min_factor: float,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self.url, self.family = url, family
        self.burst, self.rate, self.window_s = burst, rate, window_s
        self.usage_slowdown_from, self.usage_min_factor = usage_slowdown_from, usage_min_factor
        self.wait_s = float(wait_s)
        self._thread_lock = threading.Lock()
        self._redis = None
        self._redis_script = None
        self._daily_script = None
        self._down_since: float | None = None  # monotonic time the current outage was first seen
        self._next_retry_s = _FIRST_RETRY_S
        self._logged_at = 0.0
        self._daily_seen: tuple[int, int] = (-1, 0)  # (quota day, count) this process saw last
        self.call(
            "read", 0.0
        )  # reach Redis now (waiting as above): a wrong URL shows before any run

    def call(self, op: str, argument: float, wait: bool = True):
        """Run the script: "take" (n) -> seconds to wait, "pause" (seconds), "usage" (percent),
        "read" -> [tokens, seconds of pause left, effective rate]. With wait=False an unreachable
        Redis raises RedisUnreachable at once."""
        key, args = _REDIS_KEY_PREFIX + self.family, self._bucket_args(op, argument)
        while True:
            try:
                return self._run("_redis_script", key, args)
            except RedisUnreachable:
                if not wait:
                    raise
                time.sleep(self._retry_delay())

    async def call_async(self, op: str, argument: float):
        """`call`, waiting for an unreachable Redis without blocking the event loop."""
        key, args = _REDIS_KEY_PREFIX + self.family, self._bucket_args(op, argument)
        while True:
            try:
                return self._run("_redis_script", key, args)
            except RedisUnreachable:
                await asyncio.sleep(self._retry_delay())

    def take_daily(self, day_seconds: float, limit: int, take: bool = True):
        """Count one request of the current quota day when `take` and fewer than `limit` are counted:
        (whether it was counted, the day's count, the unix time the day ends by Redis's clock)."""
        seen_day, seen_used = self._daily_seen
        args = [repr(float(day_seconds)), int(limit), 1 if take else 0, seen_day, seen_used]
        while True:
            try:
                taken, used, day_end, restored = self._run(
                    "_daily_script", _DAILY_KEY_PREFIX + self.family, args
                )
                break
            except RedisUnreachable:
                time.sleep(self._retry_delay())
        day_end, used = float(day_end), int(used)
        if restored:
            logger.warning(
                "the daily quota count of %s in Redis at %s was below the %d this process counted earlier "
                "today (Redis lost its data): counting on from there; requests other processes counted "
                "since are not known",
                self.family,
                redacted(self.url),
                seen_used,
            )
        self._daily_seen = (round(day_end / day_seconds) - 1, used)
        return bool(taken), used, day_end

    def _bucket_args(self, op: str, argument: float) -> list:
        return [
            op,
            self.burst,
            repr(self.rate),
            self.window_s,
            self.usage_slowdown_from,
            self.usage_min_factor,
            repr(float(argument)),
        ]

    def _run(self, script: str, key: str, args: list):
        import redis

        with self._thread_lock:
            try:
                if self._redis is None:
                    self._redis = redis.Redis.from_url(
                        self.url,
                        socket_timeout=5,
                        socket_connect_timeout=5,
                        retry_on_timeout=True,
                    )
                    self._redis_script = self._redis.register_script(_REDIS_SCRIPT)
                    self._daily_script = self._redis.register_script(_DAILY_SCRIPT)
                result = getattr(self, script)(keys=[key], args=args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._note_outage(exc)
                raise RedisUnreachable(str(exc)) from None
            except redis.RedisError as exc:
                raise RuntimeError(
                    f"rate limit store {redacted(self.url)} is not usable ({type(exc).__name__}: {exc}): "
                    "check MAPILLARY_REDIS_URL and that redis-server runs (scripts/stack.sh status)"
                ) from None
            if self._down_since is not None:
                logger.warning(
                    "Redis at %s answers again after %.0f s",
                    redacted(self.url),
                    time.monotonic() - self._down_since,
                )
                self._down_since, self._next_retry_s = None, _FIRST_RETRY_S
            return result

    def _note_outage(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        waited = now - self._down_since
        if waited >= self.wait_s:
            raise RateLimitStoreUnavailable(
                f"rate limit store {redacted(self.url)} is not usable ({type(exc).__name__}: {exc}) after "
                f"waiting {waited:.1f} s (MAPILLARY_REDIS_WAIT_S={self.wait_s:g}); no request was sent "
                "meanwhile: check MAPILLARY_REDIS_URL and that redis-server runs (scripts/stack.sh status), "
                "then retry the run"
            ) from None
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            logger.warning(
                "waiting for Redis at %s (%s, down for %.0f s, giving up after %g s): no request is sent "
                "until it answers",
                redacted(self.url),
                type(exc).__name__,
                waited,
                self.wait_s,
            )

    def _retry_delay(self) -> float:
        """The next backoff while Redis is unreachable (doubling up to _MAX_RETRY_S, with jitter)."""
        delay = self._next_retry_s * random.uniform(0.5, 1.0)
        self._next_retry_s = min(self._next_retry_s * 2, _MAX_RETRY_S)
        return delay

    def close(self) -> None:
        with self._thread_lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = self._redis_script = self._daily_script = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_thread_lock=None, _redis=None, _redis_script=None, _daily_script=None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def redacted(url: str) -> str:
    """A Redis URL without its password (redis://:secret@host -> redis://:***@host)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
