"""What the emulator's handlers share and change: the world, the faults, request counters, the
rate-limit windows, the fault dice, trace ids, signed thumbnail URLs and the caches of rendered
tiles and entity JSON.

Stats keys: endpoint kinds (``tile``, ``entity``, ``batch``, ``images_by_ids``, ``search``,
``sequence``, ``thumbnail``), families as ``family:tiles``, ``family:entity``, ``family:search``,
``family:cdn`` (kind and family names overlap, hence the prefix), and ``rate_limited``,
``daily_quota_refused`` (tile requests refused because the day's tile quota was spent),
``faulted``, ``auth_failed``, ``requests`` (all API requests). ``tile_fetches()`` counts the
answered tile requests per tile.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import random
import threading
from array import array

from . import entities
from .faults import Faults
from .tiles import render_tile
from .world import World

WINDOW_S = 60.0  # the rate limit's sliding window
KINDS = ("tile", "entity", "batch", "images_by_ids", "search", "sequence", "thumbnail")
FAMILIES = ("tiles", "entity", "search", "cdn")
_THUMBNAIL_STP = {
    "256": "s256x192",
    "1024": "s1024x768",
    "2048": "s2048x1536",
    "original": "original",
}


class EmulatorState:
    """Everything the handlers share: world, faults, counters, rate windows, caches."""

    def __init__(
        self,
        world: World,
        faults: Faults,
        token: str,
        *,
        rate_limit_status: int = 429,
        search_max_matches: int = 10_000,  # five full pages of images?bbox=
        fault_seed: int = 0,
        signing_key: bytes | None = None,
        max_cached_tile_bytes: int = 512 * 2**20,
    ):
        self.world = world
        self.faults = faults
        self.token = token
        self.rate_limit_status = rate_limit_status
        self.search_max_matches = search_max_matches
        self.base_url = ""
        self.tiles = TileCache(world, max_cached_tile_bytes)
        self.fault_rng = random.Random(fault_seed)
        self._signing_key = (
            signing_key or hashlib.sha256(f"emulator:{world.seed}".encode()).digest()
        )
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._accepted: dict[str, array] = {f: array("d") for f in FAMILIES}
        self._windows: dict[str, collections.deque] = {f: collections.deque() for f in FAMILIES}
        self._tiles_today: tuple[int, int] = (0, 0)  # (quota day, tile requests accepted in it)
        self._tile_fetches: collections.Counter = collections.Counter()
        self._fields_cache: dict[str, tuple] = {}
        self._fragments: dict[tuple, dict[str, bytes]] = {}
        self._fragment_count = 0
        self.max_cached_fragments = 100_000
        self._trace = 0

    # -- counters ---------------------------------------------------------------------------------

    def count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._counts[key] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {k: 0 for k in KINDS}
            out.update({f"family:{f}": 0 for f in FAMILIES})
            out.update(
                {
                    "rate_limited": 0,
                    "daily_quota_refused": 0,
                    "faulted": 0,
                    "auth_failed": 0,
                    "batch:url_lookup": 0,
                    "requests": 0,
                }
            )
            out.update(self._counts)
            return out

    def request_times(self, family: str) -> list[float]:
        with self._lock:
            return list(self._accepted.get(family, ()))

    def tile_fetches(self) -> dict[str, int]:
        """Answered tile requests per tile, keyed ``tileset/z/x/y``."""
        with self._lock:
            return dict(self._tile_fetches)

    def count_tile_fetch(self, tileset: str, z: int, x: int, y: int) -> None:
        with self._lock:
            self._tile_fetches[f"{tileset}/{z}/{x}/{y}"] += 1

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tile_fetches.clear()
            self._tiles_today = (0, 0)
            for times in self._accepted.values():
                del times[:]
            for window in self._windows.values():
                window.clear()

    # -- rate limiting ------------------------------------------------------------------------------

    def daily_quota_wait(self, family: str, now: float) -> float | None:
        """Seconds until the next quota day when today's tile quota is spent, else None."""
        quota = self.faults.tiles_per_day
        if family != "tiles" or quota is None:
            return None
        day, day_end = self.faults.day_window(now)
        with self._lock:
            used = self._tiles_today[1] if self._tiles_today[0] == day else 0
        return max(0.0, day_end - now) if used >= quota else None

    def admit(self, family: str, now: float) -> float | None:
        """Records an accepted request and returns None, or returns seconds until a slot frees."""
        budget = self.faults.rate_limit_per_minute.get(family)
        with self._lock:
            window = self._windows[family]
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            if budget is None:
                window.clear()  # unlimited: nothing to remember; a budget set later starts afresh
            elif len(window) >= budget:
                return max(0.0, window[0] + WINDOW_S - now) if window else WINDOW_S
            else:
                window.append(now)
            if family == "tiles":  # the day's quota counts accepted requests only
                day = self.faults.day_window(now)[0]
                today = self._tiles_today
                self._tiles_today = (day, (today[1] if today[0] == day else 0) + 1)
            self._accepted[family].append(now)
            return None

    def usage_percent(self, family: str, now: float) -> int:
        budget = self.faults.rate_limit_per_minute.get(family)
        if not budget:
            return 0
        with self._lock:
            window = self._windows[family]
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            used = len(window)
        return min(100, int(round(100.0 * used / budget)))

    def trace_id(self) -> str:
        self._trace += 1
        digest = hashlib.blake2b(f"{self._trace}".encode(), digest_size=12).hexdigest()
        return "A" + digest[:22]

    # -- entities ---------------------------------------------------------------------------------

    def parse_fields(self, raw: str | None) -> tuple[tuple[str, ...], bool]:
        """``entities.parse_fields``, remembered per distinct ``fields=`` text."""
        key = raw or ""
        cached = self._fields_cache.get(key)
        if cached is None:
            cached = entities.parse_fields(key)
            if len(self._fields_cache) < 1000:
                self._fields_cache[key] = cached
        return cached

    def entity_json(
        self, image_id: str, fields: tuple[str, ...], has_urls: bool, now: float
    ) -> bytes | None:
        """The JSON object of one image (bytes), or None when the id is unknown."""
        omit = self.faults.omit_optional_fields
        cache = None
        if not has_urls:
            cache = self._fragments.get((fields, omit))
            if cache is None:
                cache = self._fragments.setdefault((fields, omit), {})
            hit = cache.get(image_id)
            if hit is not None:
                return hit
        record = self.world.image(image_id)
        if record is None:
            return None
        data = entities.render_entity(
            record, fields, omit, lambda record_id, size: self.thumbnail_url(record_id, size, now)
        )
        if cache is not None:
            if self._fragment_count >= self.max_cached_fragments:
                self._fragments.clear()
                self._fragment_count = 0
                cache = self._fragments.setdefault((fields, omit), {})
            cache[image_id] = data
            self._fragment_count += 1
        return data

    # -- signed URLs --------------------------------------------------------------------------------

    def thumbnail_url(self, image_id: str, size: str, now: float) -> str:
        expiry = f"{int(now + self.faults.thumbnail_ttl_s):08x}"
        stp = _THUMBNAIL_STP[size]
        return (
            f"{self.base_url}/cdn/thumb/{size}/{image_id}.jpg?stp={stp}&oe={expiry}"
            f"&oh={self._sign(size, image_id, stp, expiry)}"
        )

    def _sign(self, size: str, image_id: str, stp: str, expiry: str) -> str:
        message = f"{size}/{image_id}/{stp}/{expiry}".encode()
        return "00_" + hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()[:40]

    def check_signature(
        self, size: str, image_id: str, stp: str, expiry: str, signature: str, now: float
    ) -> bool:
        if not hmac.compare_digest(self._sign(size, image_id, stp, expiry), signature):
            return False
        try:
            return int(expiry, 16) >= now
        except ValueError:
            return False


class TileCache:
    """Rendered tiles by (tileset, z, x, y, world epoch); the least recently used are dropped
    beyond ``max_bytes``."""

    def __init__(self, world: World, max_bytes: int):
        self.world = world
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._tiles: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._rendering: dict[tuple, asyncio.Future] = {}

    async def get(self, tileset: str, z: int, x: int, y: int) -> bytes:
        """Cached bytes, or rendered in a worker thread (one render per tile however many ask) so
        a dense tile does not stall the event loop."""
        key = (tileset, z, x, y, self.world.epoch)
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                return data
        pending = self._rendering.get(key)
        if pending is None:
            pending = self._rendering[key] = asyncio.ensure_future(
                asyncio.to_thread(self._get_or_render, tileset, z, x, y)
            )
            pending.add_done_callback(lambda _: self._rendering.pop(key, None))
        return await asyncio.shield(pending)

    def _get_or_render(self, tileset: str, z: int, x: int, y: int) -> bytes:
        key = (tileset, z, x, y, self.world.epoch)
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                return data
        data = render_tile(self.world, tileset, z, x, y)
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes and len(self._tiles) > 1:
                    _, dropped = self._tiles.popitem(last=False)
                    self._bytes -= len(dropped)
        return data
