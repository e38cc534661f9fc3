"""Raw vector tiles cached in the data dir for the tile route, decoded off the event loop one at a time."""

from __future__ import annotations

import asyncio
import logging
import time

from mapillary_assets.pipeline.discovery.results import DiscoveryStats
from mapillary_assets.storage import DataLayout

log = logging.getLogger(__name__)


class TileCache:
    """Raw tile bytes in the data dir's store (an empty tile is a zero-length file); fetched when absent
    or older than `max_age_s`. A cached tile that fails to decode is deleted and fetched again."""

    def __init__(
        self, client, layout: DataLayout, tileset: str, max_age_s: float, stats: DiscoveryStats
    ):
        self.client, self.layout, self.tileset = client, layout, tileset
        self.max_age_s, self.stats = max_age_s, stats
        self._decoding = asyncio.Semaphore(1)  # one decode at a time bounds decoded-tile memory

    async def decoded(self, z: int, x: int, y: int, decode, counter: str):
        key = self.layout.tile_cache_key(self.tileset, z, x, y)
        data = self._read_fresh(key)
        if data is not None:
            self.stats.cache_hits += 1
            try:
                return await self._decode(decode, data, z, x, y)
            except Exception as exc:  # any decoder failure means the cached bytes are unusable
                log.warning(
                    "cached tile %s/%s/%s/%s is corrupt (%s: %s); deleting it and fetching it again",
                    self.tileset,
                    z,
                    x,
                    y,
                    type(exc).__name__,
                    exc,
                )
                self.stats.corrupt_cache_tiles += 1
                self.layout.store.delete(key)
        data = await self.client.get_tile(z, x, y, tileset=self.tileset)
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.layout.store.put(key, data)
        return await self._decode(decode, data, z, x, y)

    def _read_fresh(self, key: str) -> bytes | None:
        modified = self.layout.store.modified(key)
        if modified is None or time.time() - modified >= self.max_age_s:
            return None
        try:
            return self.layout.store.get(key)
        except FileNotFoundError:
            return None

    async def _decode(self, decode, data: bytes, z: int, x: int, y: int):
        if not data:
            return []
        async with self._decoding:
            return await asyncio.to_thread(decode, data, z, x, y)
