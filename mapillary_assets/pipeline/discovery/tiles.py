"""The tile route: which images lie in one partition tile of the area of interest.

The `sequence` coverage layer says where imagery is. Discovery descends it from the partition tile
(or its z6 tiles, below z6 where Mapillary serves only sampled `overview` points) COVERAGE_STEP zooms
at a time, reading a finer coverage tile only where the coarser one's lines pass, down to
SELECTION_ZOOM, whose lines pick the z14 tiles. So tile requests follow the imagery, not the area:
about one per non-empty z14 tile plus a few coverage tiles per partition, however large the AOI. An
empty coverage tile is taken to mean no imagery below it (Mapillary's coverage may lag z14 by a
while). Only the z14 tiles found (clipped to the AOI) are fetched for their `image` layer,
concurrently, each decoded as it arrives so that dense tiles never pile up in memory. Raw tiles are
cached on disk (`tile_cache`), so a refresh within the cache age makes no request.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import mercantile
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from mapillary_assets.api.tile_decoders import decode_image_layer, decode_sequence_lines
from mapillary_assets.pipeline.aoi import AreaOfInterest, tile_bounds_arrays
from mapillary_assets.pipeline.concurrency import run_all
from mapillary_assets.pipeline.discovery.results import (
    DEFAULT_TILESET,
    DISCOVERY_SCHEMA,
    IMAGE_ZOOM,
    DiscoveryStats,
    finish_frame,
    keep_valid_ids,
)
from mapillary_assets.pipeline.discovery.tile_cache import TileCache
from mapillary_assets.storage import DataLayout

# Below z6 Mapillary serves the sampled `overview` points, not every sequence: coverage is read at z6.
MIN_COVERAGE_ZOOM = 6
# Lines of coverage tiles at this zoom or finer pick the z14 tiles (quantised to 1/256 of a z14 tile or
# better); coarser coverage only picks which finer coverage tiles to read, COVERAGE_STEP zooms down.
SELECTION_ZOOM = 10
COVERAGE_STEP = 2
MVT_EXTENT = 4096
_TILESET_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
DEFAULT_CACHE_MAX_AGE_S = 86400


async def discover_partition(
    client,
    aoi: AreaOfInterest,
    partition_tile: mercantile.Tile,
    layout: DataLayout,
    tileset: str = DEFAULT_TILESET,
    cache_max_age_s: float = DEFAULT_CACHE_MAX_AGE_S,
    concurrency: int = 16,
) -> tuple[pd.DataFrame, DiscoveryStats]:
    """Images of `partition_tile` inside the AOI, one row per image id (columns DISCOVERY_COLUMNS)."""
    started = time.perf_counter()
    partition = mercantile.Tile(*partition_tile)
    if not 0 <= partition.z < IMAGE_ZOOM:
        raise ValueError(f"partition tile {partition} must have a zoom below {IMAGE_ZOOM}")
    if not _TILESET_NAME.match(tileset):  # it names a cache folder before any request checks it
        raise ValueError(f"tileset {tileset!r} is not a tileset name such as 'mly1_public'")
    stats = DiscoveryStats()
    cache = TileCache(client, layout, tileset, cache_max_age_s, stats)
    geometry = aoi.geometry
    shapely.prepare(geometry)

    z14_tiles = (await covered_z14_tiles(cache, geometry, partition, concurrency)).z14_tiles
    stats.skipped_z14_tiles = _count_aoi_children(geometry, partition) - len(z14_tiles)

    parts: list[pa.Table] = []
    limit = asyncio.Semaphore(max(1, concurrency))

    async def collect(x: int, y: int) -> None:
        async with limit:
            points = await cache.decoded(
                IMAGE_ZOOM, x, y, decode_image_layer, counter="image_tile_requests"
            )
        stats.images_in_tiles += len(points)
        if not points:
            stats.empty_z14_tiles += 1
            return
        stats.nonempty_z14_tiles += 1
        table = keep_valid_ids(
            _points_table(points, f"{IMAGE_ZOOM}/{x}/{y}", tileset),
            f"tile {IMAGE_ZOOM}/{x}/{y}",
            stats,
        )
        inside = shapely.intersects_xy(geometry, table["lon"].to_numpy(), table["lat"].to_numpy())
        parts.append(table.filter(pa.array(inside)))

    await run_all(collect(x, y) for x, y in z14_tiles)

    frame, dropped = finish_frame(parts)
    stats.duplicates_dropped = dropped
    stats.images_in_aoi = len(frame)
    stats.seconds = time.perf_counter() - started
    return frame, stats


@dataclass(frozen=True)
class PartitionCoverage:
    """What the coverage descent found in one partition: the z14 tiles to fetch (overlapping the
    AOI, sorted) and how many coverage lines of the selection zoom start in them inside the AOI."""

    z14_tiles: list[tuple[int, int]]
    coverage_lines: int


def coverage_zooms(partition_zoom: int) -> list[int]:
    """The coverage zooms the descent reads for a partition at `partition_zoom`, coarsest first."""
    zoom = max(partition_zoom, MIN_COVERAGE_ZOOM)
    zooms = [zoom]
    while zoom < SELECTION_ZOOM:
        zoom = min(zoom + COVERAGE_STEP, SELECTION_ZOOM)
        zooms.append(zoom)
    return zooms


async def covered_z14_tiles(
    cache: TileCache, geometry, partition: mercantile.Tile, concurrency: int = 16
) -> PartitionCoverage:
    """Descend the `sequence` coverage from the partition (or its z6 tiles overlapping the AOI) to
    the z14 tiles that lines pass through: a coverage tile is fetched only when its parent's lines
    pass through it (within a quantisation unit), so the requests follow the imagery, not the area."""
    zooms = coverage_zooms(partition.z)
    if partition.z >= MIN_COVERAGE_ZOOM:
        level = [partition]
    else:
        level = _overlapping_descendants(geometry, partition, zooms[0])
    limit = asyncio.Semaphore(max(1, concurrency))

    async def read(tile: mercantile.Tile, into: list) -> None:
        async with limit:
            into.extend(
                await cache.decoded(
                    tile.z, tile.x, tile.y, decode_sequence_lines, counter="coverage_requests"
                )
            )

    for zoom, next_zoom in zip(zooms, zooms[1:] + [IMAGE_ZOOM]):
        lines: list = []
        await run_all(read(t, lines) for t in level)
        # one MVT unit of slack: line vertices are quantised to the coverage tile's 4096 grid
        slack = 2.0 ** (next_zoom - zoom) / MVT_EXTENT
        touched = touched_tiles(lines, next_zoom, slack)
        xs, ys = _inside(touched, partition, next_zoom)
        keep = _overlaps(geometry, xs, ys, next_zoom) if len(xs) else np.zeros(0, bool)
        xs, ys = xs[keep], ys[keep]
        if next_zoom == IMAGE_ZOOM:
            tiles = list(zip(xs.tolist(), ys.tolist()))
            return PartitionCoverage(tiles, _lines_in_tiles(lines, set(tiles), geometry))
        level = [mercantile.Tile(int(x), int(y), next_zoom) for x, y in zip(xs, ys)]
    raise AssertionError("the descent always ends at the image zoom")


def _inside(
    tiles: set[tuple[int, int]], partition: mercantile.Tile, zoom: int
) -> tuple[np.ndarray, np.ndarray]:
    """The tiles (at `zoom`) that lie in the partition, as sorted x and y arrays."""
    span = 2 ** (zoom - partition.z)
    x0, y0 = partition.x * span, partition.y * span
    inside = sorted((x, y) for x, y in tiles if x0 <= x < x0 + span and y0 <= y < y0 + span)
    if not inside:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    xs, ys = (np.array(v, dtype=np.int64) for v in zip(*inside))
    return xs, ys


def _lines_in_tiles(
    lines: Sequence[Sequence[tuple[float, float]]], tiles: set[tuple[int, int]], geometry
) -> int:
    """Lines whose first vertex lies in one of the z14 `tiles` and inside the AOI `geometry` (each
    line counted once): a sequence starting outside the AOI mostly holds images outside it."""
    if not lines or not tiles:
        return 0
    first = np.array([line[0] for line in lines], dtype=float)
    cells = np.floor(_tile_units(first[:, 0], first[:, 1], IMAGE_ZOOM)).astype(np.int64)
    in_tiles = np.array([(int(x), int(y)) in tiles for x, y in cells], dtype=bool)
    return int((in_tiles & shapely.intersects_xy(geometry, first[:, 0], first[:, 1])).sum())


def touched_z14_tiles(
    lines: Sequence[Sequence[tuple[float, float]]], slack: float = 0.0
) -> set[tuple[int, int]]:
    """z14 tiles (x, y) that any line (lon/lat vertices; a single vertex is a point) passes within
    `slack` z14-tile units of."""
    return touched_tiles(lines, IMAGE_ZOOM, slack)


def touched_tiles(
    lines: Sequence[Sequence[tuple[float, float]]], zoom: int, slack: float = 0.0
) -> set[tuple[int, int]]:
    """Tiles (x, y) at `zoom` that any line (lon/lat vertices; a single vertex is a point) passes
    within `slack` tile units of."""
    segments = []
    for line in lines:
        coords = np.asarray(line, dtype=float).reshape(-1, 2)
        if len(coords) == 0:
            continue
        if len(coords) == 1:
            coords = np.vstack([coords, coords])
        segments.append(np.hstack([coords[:-1], coords[1:]]))
    if not segments:
        return set()
    lonlat = np.vstack(segments)
    start = _tile_units(lonlat[:, 0], lonlat[:, 1], zoom)
    end = _tile_units(lonlat[:, 2], lonlat[:, 3], zoom)
    low = np.floor(np.minimum(start, end) - slack).astype(np.int64)
    high = np.floor(np.maximum(start, end) + slack).astype(np.int64)
    single = (low == high).all(axis=1)
    tiles = set(map(tuple, np.unique(low[single], axis=0).tolist()))

    # segments spanning several tiles: test each tile of their bounding box against the segment
    multi = np.flatnonzero(~single)
    if len(multi):
        seg_index, tx, ty = [], [], []
        for i in multi:
            gx, gy = np.meshgrid(
                np.arange(low[i, 0], high[i, 0] + 1), np.arange(low[i, 1], high[i, 1] + 1)
            )
            seg_index.append(np.full(gx.size, i))
            tx.append(gx.ravel())
            ty.append(gy.ravel())
        seg_index, tx, ty = np.concatenate(seg_index), np.concatenate(tx), np.concatenate(ty)
        lines_geom = shapely.linestrings(np.stack([start[seg_index], end[seg_index]], axis=1))
        boxes = shapely.box(tx, ty, tx + 1, ty + 1)
        near = (
            shapely.dwithin(lines_geom, boxes, slack)
            if slack > 0
            else shapely.intersects(lines_geom, boxes)
        )
        tiles.update(zip(tx[near].tolist(), ty[near].tolist()))
    return tiles


def _tile_units(lon: np.ndarray, lat: np.ndarray, zoom: int) -> np.ndarray:
    """lon/lat -> fractional tile coordinates at `zoom` (x right, y down), as mercantile computes."""
    n = 2.0**zoom
    x = (lon + 180.0) / 360.0 * n
    lat_rad = np.radians(np.clip(lat, -85.0511287798066, 85.0511287798066))
    y = (1.0 - np.arcsinh(np.tan(lat_rad)) / math.pi) / 2.0 * n
    return np.column_stack([x, y])


def _overlaps(geometry, xs: np.ndarray, ys: np.ndarray, zoom: int) -> np.ndarray:
    boxes = shapely.box(*tile_bounds_arrays(xs, ys, zoom))
    return shapely.intersects(geometry, boxes) & ~shapely.touches(geometry, boxes)


def _overlapping_descendants(geometry, tile: mercantile.Tile, zoom: int) -> list[mercantile.Tile]:
    span = 2 ** (zoom - tile.z)
    gx, gy = np.meshgrid(
        np.arange(tile.x * span, (tile.x + 1) * span), np.arange(tile.y * span, (tile.y + 1) * span)
    )
    xs, ys = gx.ravel(), gy.ravel()
    keep = _overlaps(geometry, xs, ys, zoom)
    return [mercantile.Tile(int(x), int(y), zoom) for x, y in zip(xs[keep], ys[keep])]


def _count_aoi_children(geometry, partition: mercantile.Tile) -> int:
    """How many z14 tiles of the partition overlap the AOI (for the skipped-tiles statistic)."""
    span = 2 ** (IMAGE_ZOOM - partition.z)
    if span * span > 1 << 20:  # too many to test cheaply; the statistic is informational only
        return 0
    return len(_overlapping_descendants(geometry, partition, IMAGE_ZOOM))


def _points_table(points, tile_z14: str, tileset: str) -> pa.Table:
    n = len(points)
    return pa.Table.from_arrays(
        [
            pa.array([p.image_id for p in points], pa.string()),
            pa.array([p.sequence_id for p in points], pa.string()),
            pa.array(np.fromiter((p.lon for p in points), float, n)),
            pa.array(np.fromiter((p.lat for p in points), float, n)),
            pa.array([p.captured_at_ms for p in points], pa.int64()),
            pa.array([p.compass_angle for p in points], pa.float64()),
            pa.array([p.is_pano for p in points], pa.bool_()),
            pa.array([p.organization_id for p in points], pa.int64()),
            pa.array([p.creator_id for p in points], pa.int64()),
            pa.array([tile_z14] * n, pa.string()),
            pa.array([tileset] * n, pa.string()),
        ],
        schema=DISCOVERY_SCHEMA,
    )
