"""Thumbnail downloads against an emulator through the real client, for the download tests."""

from __future__ import annotations

import asyncio

from mapillary_assets.pipeline.download import download_thumbnails

EMULATOR_TOKEN = "MLY|download-tests"
ZURICH_BOX = (8.45, 47.32, 8.62, 47.43)


def world_ids(world, count: int) -> list[str]:
    from shapely.geometry import box

    ids: list[str] = []
    for x, y in world.nonempty_z14_tiles(box(*ZURICH_BOX)):
        ids.extend(record.id for record in world.images_in_z14_tile(x, y))
        if len(ids) >= count:
            break
    assert len(ids) >= count
    return ids[:count]


def emulator_client(server):
    from mapillary_assets.api.client import MapillaryClient
    from mapillary_assets.api.client_config import ClientConfig

    settings = ClientConfig(
        token=EMULATOR_TOKEN,
        graph_url=server.graph_url,
        tiles_url=server.tiles_url,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    return MapillaryClient(settings)


def download_via(server, layout, ids, client_wrapper=None, **kwargs):
    async def go():
        async with emulator_client(server) as client:
            wrapped = client_wrapper(client) if client_wrapper else client
            return await download_thumbnails(wrapped, layout, ids, **kwargs)

    return asyncio.run(go())
