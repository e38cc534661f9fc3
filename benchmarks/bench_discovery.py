"""Discovery of a whole AOI against the emulator: tile requests and wall time, three routes.

Three ways to enumerate the same images, each from a cold tile cache, over HTTP to an in-process
emulator (World seed 42; scale 0.05 quick, 0.2 full, i.e. ~60,000 / ~240,000 images in the AOI):

* the pipeline's tile route: one coarse `sequence` tile per partition, then only the z14 tiles it
  shows to hold imagery (clipped to the AOI polygon); the Zurich polygon in z12 partitions, a
  2,600 km2 region holding the whole synthetic world (mostly empty countryside) in z10 partitions;
* baseline "every z14 tile": fetch every z14 tile overlapping the AOI polygon, empty or not;
* baseline "bbox search": the Graph API `images?bbox=` route, boxes split on the 2,000 cap.

The emulator answers after 50 ms, like a remote API; partitions run one after another, as within
one run of the discovery asset. The goal for the tile route is at most 1.05 requests per non-empty
z14 tile of the AOI, plus the coverage tiles. A refresh within the cache age makes no request.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import mercantile
import pandas as pd
import shapely
from shapely.geometry import box

from benchmarks.harness import Figure, Stopwatch
from mapillary_assets.api import ClientConfig, MapillaryClient, Secret, decode_image_layer
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles
from mapillary_assets.pipeline.discovery.search import discover_by_bbox_search
from mapillary_assets.pipeline.discovery.tiles import discover_partition
from mapillary_assets.storage import DataLayout

NAME = "discovery"


def _client(server: EmulatorServer, store: Path) -> MapillaryClient:
    # Limits far above what the emulator serves here: the benchmark measures requests, not pacing.
    return MapillaryClient(
        ClientConfig(
            token=Secret(server.token),
            graph_url=server.graph_url,
            tiles_url=server.tiles_url,
            tiles_per_minute=1_000_000,
            search_per_minute=1_000_000,
            rate_limit_store=store,
        )
    )


async def _tile_route(server, aoi, partitions, layout: DataLayout) -> pd.DataFrame:
    async with _client(server, layout.rate_limit_store_path) as client:
        frames = [(await discover_partition(client, aoi, tile, layout))[0] for tile in partitions]
    return pd.concat(frames, ignore_index=True)


async def _search_route(server, aoi, partitions, store: Path) -> pd.DataFrame:
    async with _client(server, store) as client:
        frames = [
            (await discover_by_bbox_search(client, aoi, bbox=tuple(mercantile.bounds(tile))))[0]
            for tile in partitions
        ]
    return pd.concat(frames, ignore_index=True)


async def _every_z14_tile(server, aoi, store: Path) -> int:
    """The naive enumeration: every z14 tile of the AOI, decoded and clipped; returns images found."""
    geometry = aoi.geometry
    tiles = _aoi_z14_tiles(aoi)
    found = 0
    limit = asyncio.Semaphore(16)
    async with _client(server, store) as client:

        async def one(tile):
            nonlocal found
            async with limit:
                data = await client.get_tile(14, tile.x, tile.y)
            points = (
                await asyncio.to_thread(decode_image_layer, data, 14, tile.x, tile.y)
                if data
                else []
            )
            if points:
                found += int(
                    shapely.intersects_xy(
                        geometry, [p.lon for p in points], [p.lat for p in points]
                    ).sum()
                )

        await asyncio.gather(*(one(t) for t in tiles))
    return found


def _aoi_z14_tiles(aoi) -> list[mercantile.Tile]:
    return [
        t
        for t in mercantile.tiles(*aoi.geometry.bounds, zooms=14)
        if aoi.geometry.intersection(box(*mercantile.bounds(t))).area > 0
    ]


def _measure(world: World, action) -> tuple[float, dict]:
    """Seconds and emulator request counts of one run of `action(server)`. Each run gets a fresh
    emulator so that none profits from tiles another run made it render (its world is shared and
    already generated)."""
    with EmulatorServer(world, faults=Faults(latency_s=LATENCY_S)) as server:
        with Stopwatch() as watch:
            result = asyncio.run(action(server))
        return watch.seconds, {"stats": server.stats(), "result": result}


LATENCY_S = 0.05  # per request, so wall times weigh round trips as a remote API does
REGION = [
    [8.20, 47.15],
    [8.88, 47.15],
    [8.88, 47.61],
    [8.20, 47.61],
]  # the whole synthetic world, 2,600 km2


def _scenario(world: World, aoi, label: str, root: Path, zoom: int, refresh: bool) -> list[Figure]:
    partitions = partition_tiles(aoi, zoom)
    aoi_tiles = _aoi_z14_tiles(aoi)
    nonempty = len(
        [
            xy
            for xy in world.nonempty_z14_tiles(aoi.geometry)
            if aoi.geometry.intersection(box(*mercantile.bounds(*xy, 14))).area > 0
        ]
    )
    truth = world.count_in_polygon(aoi.geometry)
    root.mkdir(parents=True)
    layout = DataLayout(root / "tiles")
    tile_s, tile = _measure(world, lambda server: _tile_route(server, aoi, partitions, layout))
    if refresh:
        refresh_s, again = _measure(
            world, lambda server: _tile_route(server, aoi, partitions, layout)
        )
    naive_s, naive = _measure(
        world, lambda server: _every_z14_tile(server, aoi, root / "naive.sqlite")
    )
    search_s, search = _measure(
        world, lambda server: _search_route(server, aoi, partitions, root / "search.sqlite")
    )

    tile_frame, search_frame = tile["result"], search["result"]
    tile_requests = tile["stats"]["tile"]
    coverage = len(partitions)
    allowed = 1.05 * nonempty + coverage
    differing = set(tile_frame["image_id"]) ^ set(search_frame["image_id"])
    edge = aoi.geometry.boundary
    edge_m = max(
        (edge.distance(shapely.Point(world.image(i).geometry)) * 111_000 for i in differing),
        default=0.0,
    )
    context = (
        f"{label}, World(seed=42, scale={world.scale}): {truth:,} images, {coverage} z{zoom} partitions, "
        f"{nonempty} non-empty of {len(aoi_tiles)} z14 tiles overlapping the AOI"
    )
    figures = [
        Figure(
            NAME,
            f"tile requests, {label} (cold cache)",
            tile_requests,
            "requests",
            baseline=naive["stats"]["tile"],
            baseline_name="every z14 tile of the AOI",
            goal=f"<= 1.05 x {nonempty} non-empty z14 + {coverage} coverage = {allowed:.0f}",
            met=tile_requests <= allowed,
            notes=f"{context}; found {len(tile_frame):,} images (every-tile baseline: {naive['result']:,})",
        ),
        Figure(
            NAME,
            f"requests, tile route vs bbox search, {label}",
            tile_requests,
            "requests",
            baseline=search["stats"]["search"],
            baseline_name="recursive bbox search",
            goal="fewer than bbox search",
            met=tile_requests < search["stats"]["search"],
            notes=f"bbox route found {len(search_frame):,} images; {len(differing)} ids differ, all within "
            f"{edge_m:.2f} m of the AOI edge (tile points are quantised to the z14 grid)",
        ),
        Figure(
            NAME,
            f"wall time, {label} (cold cache)",
            tile_s,
            "s",
            baseline=search_s,
            baseline_name="recursive bbox search",
            goal="faster than bbox search",
            met=tile_s < search_s,
            notes=f"every-z14-tile baseline: {naive_s:.2f} s; emulator latency {LATENCY_S * 1000:.0f} ms per "
            "request, in-process (it shares the CPU)",
        ),
    ]
    if refresh:
        figures.append(
            Figure(
                NAME,
                f"requests on a refresh within the cache age, {label}",
                again["stats"]["requests"],
                "requests",
                baseline=tile_requests,
                baseline_name="cold cache",
                goal="0",
                met=again["stats"]["requests"] == 0,
                notes=f"{refresh_s:.2f} s, all tiles from the on-disk cache",
            )
        )
    return figures


def run(quick: bool) -> list[Figure]:
    world = World(seed=42, scale=0.05 if quick else 0.2)
    with tempfile.TemporaryDirectory() as tmp:
        # a sparse region is partitioned coarser (MAPILLARY_PARTITION_ZOOM=10): at z12 its 81 partitions
        # would cost 81 coverage requests for ~160 non-empty z14 tiles
        return _scenario(
            world, load_aoi(), "Zurich AOI", Path(tmp) / "zurich", zoom=12, refresh=True
        ) + _scenario(
            world,
            load_aoi(coordinates=REGION),
            "region around Zurich",
            Path(tmp) / "region",
            zoom=10,
            refresh=False,
        )
