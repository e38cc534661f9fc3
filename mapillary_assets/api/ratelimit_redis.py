"""Token bucket shared by every process on every machine through Redis.

The bucket of a family is one Redis hash, read and updated by one Lua script (`_REDIS_SCRIPT`) that
Redis runs atomically on its own clock (`TIME`): the guarantee holds for the sum over every process
on every machine, and a skewed client clock changes nothing. A crashed process holds no lease, so
it leaks no budget. The bucket arithmetic mirrors `SharedRateLimiter`'s (refill, usage slowdown).
The daily quota (`DailyQuota`) is a second script on the same connection: the family's count of the
current quota day, the day taken from Redis's clock too.
"""

from __future__ import annotations

import threading

__all__ = ["RedisBucket", "redacted"]

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
# KEYS[1]: the family's daily hash (day index, count); ARGV: day length (s), limit, 1 to take one.
# Returns {taken 0/1, the day's count, the unix time the day ends}; the hash expires with its day.
_DAILY_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local day_s, limit, take = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local day = math.floor(now / day_s)
local s = redis.call('HMGET', KEYS[1], 'day', 'used')
local used = 0
if tonumber(s[1]) == day then used = tonumber(s[2]) or 0 end
local taken = 0
if take > 0 and used < limit then
  used = used + 1
  taken = 1
  redis.call('HSET', KEYS[1], 'day', string.format('%d', day), 'used', string.format('%d', used))
  redis.call('EXPIRE', KEYS[1], math.ceil((day + 1) * day_s - now) + 1)
end
return {taken, used, string.format('%.6f', (day + 1) * day_s)}
"""
_DAILY_KEY_PREFIX = "mapillary:dailyquota:"


class RedisBucket:
    """The bucket of `family` in the Redis at `url`, with the limiter's parameters (sent with every
    call, so the script holds no configuration of its own)."""

    def __init__(
        self,
        url: str,
        family: str,
        burst: int,
        rate: float,
        window_s: float,
        usage_slowdown_from: float,
        usage_min_factor: float,
    ) -> None:
        self.url, self.family = url, family
        self.burst, self.rate, self.window_s = burst, rate, window_s
        self.usage_slowdown_from, self.usage_min_factor = usage_slowdown_from, usage_min_factor
        self._thread_lock = threading.Lock()
        self._redis = None
        self._redis_script = None
        self._daily_script = None
        self.call("read", 0.0)  # fail at construction, with the URL in the message, if unreachable

    def call(self, op: str, argument: float):
        """Run the script: "take" (n) -> seconds to wait, "pause" (seconds), "usage" (percent),
        "read" -> [tokens, seconds of pause left, effective rate]."""
        args = [
            op,
            self.burst,
            repr(self.rate),
            self.window_s,
            self.usage_slowdown_from,
            self.usage_min_factor,
            repr(float(argument)),
        ]
        return self._run("_redis_script", _REDIS_KEY_PREFIX + self.family, args)

    def take_daily(self, day_seconds: float, limit: int, take: bool = True):
        """Count one request of the current quota day when `take` and fewer than `limit` are counted:
        (whether it was counted, the day's count, the unix time the day ends by Redis's clock)."""
        taken, used, day_end = self._run(
            "_daily_script",
            _DAILY_KEY_PREFIX + self.family,
            [repr(float(day_seconds)), int(limit), 1 if take else 0],
        )
        return bool(taken), int(used), float(day_end)

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
                return getattr(self, script)(keys=[key], args=args)
            except redis.RedisError as exc:
                raise RuntimeError(
                    f"rate limit store {redacted(self.url)} is not usable ({type(exc).__name__}: {exc}): "
                    "check MAPILLARY_REDIS_URL and that redis-server runs (scripts/stack.sh status)"
                ) from None

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
