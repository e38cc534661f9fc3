"""Clients for tests: the real client pointed at an emulator, and a tile client that serves the
emulator world's tiles in-process (no HTTP) and counts requests."""

from __future__ import annotations

import asyncio

from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets.emulator.tiles import render_tile


class TileClient:
    """Serves the emulator's tiles in-process (no HTTP) and counts requests."""

    def __init__(self, world: World):
        self.world = world
        self.tile_requests: list[tuple[int, int, int]] = []

    async def get_tile(self, z, x, y, tileset="mly1_public"):
        self.tile_requests.append((z, x, y))
        await asyncio.sleep(0)
        return render_tile(self.world, tileset, z, x, y)


def emulator_client(server: EmulatorServer, tmp_path, **overrides) -> MapillaryClient:
    return MapillaryClient(
        ClientConfig(
            token=Secret(server.token),
            graph_url=server.graph_url,
            tiles_url=server.tiles_url,
            rate_limit_store=tmp_path / "rate_limits.sqlite",
            backoff_base_s=0.01,
            **overrides,
        )
    )
