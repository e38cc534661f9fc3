"""Fault injection: the ``Faults`` settings (latency, outages, random 5xx, rate budgets, the daily tile
quota, damaged JPEGs, missing optional fields, thumbnail URL lifetime) and the outage / 5xx answers
they inject.

``POST /_emulator/faults`` takes a JSON object of ``Faults`` fields as a partial update."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Faults:
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    error_5xx_rate: float = 0.0
    rate_limit_per_minute: dict[str, int] = field(
        default_factory=dict
    )  # "tiles" / "entity" / "search"
    corrupt_jpeg_rate: float = 0.0
    truncated_jpeg_rate: float = 0.0
    omit_optional_fields: bool = False
    outage_start: float | None = None  # unix seconds: every request answers 503 inside the window
    outage_end: float | None = None
    thumbnail_ttl_s: float = 3600.0
    # Tile requests accepted per day (None: no daily quota). Days are the windows
    # [k * day_seconds, (k + 1) * day_seconds) of unix time, as the client's limiter counts them
    # (86,400 s: UTC days); a test shortens them to live through a "day" in seconds.
    tiles_per_day: int | None = None
    day_seconds: float = 86400.0

    def replace(self, **changes) -> Faults:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        if "rate_limit_per_minute" in changes:
            changes["rate_limit_per_minute"] = {
                str(k): int(v) for k, v in (changes["rate_limit_per_minute"] or {}).items()
            }
        if changes.get("tiles_per_day") is not None and int(changes["tiles_per_day"]) < 0:
            raise ValueError("tiles_per_day must be >= 0 (or None for no daily quota)")
        if "day_seconds" in changes and not float(changes["day_seconds"]) > 0:
            raise ValueError("day_seconds must be > 0")
        return dataclasses.replace(self, **changes)

    def day_window(self, now: float) -> tuple[int, float]:
        """The quota day holding ``now``: its index and the unix time it ends."""
        day = math.floor(now / self.day_seconds)
        return day, (day + 1) * self.day_seconds

    def in_outage(self, now: float) -> bool:
        if self.outage_start is None and self.outage_end is None:
            return False
        start = -math.inf if self.outage_start is None else self.outage_start
        end = math.inf if self.outage_end is None else self.outage_end
        return start <= now <= end


def injected_failure(faults: Faults, now: float, rng: random.Random) -> web.Response | None:
    """The outage or random 5xx answer for a request at ``now``, if any."""
    if faults.in_outage(now):
        return web.Response(
            status=503,
            text="<html><body><h1>503 Service Unavailable</h1></body></html>",
            content_type="text/html",
        )
    if faults.error_5xx_rate and rng.random() < faults.error_5xx_rate:
        status = rng.choice((500, 502, 503))
        if rng.random() < 0.5:
            return web.Response(status=status, body=b"")
        return web.Response(
            status=status,
            text=f"<html><body><h1>{status} Server Error</h1></body></html>",
            content_type="text/html",
        )
    return None
