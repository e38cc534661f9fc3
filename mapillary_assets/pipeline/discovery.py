"""Discovery: which images lie in one partition tile of the area of interest.

Tile route (`discover_partition`): one coarse `sequence`-layer tile of the partition says which z14
tiles hold imagery; only those z14 tiles (clipped to the AOI) are fetched for their `image` layer,
concurrently, each decoded as it arrives so that dense tiles never pile up in memory. Raw tiles
are cached on disk, so a refresh within the cache age makes no request.

Search route (`discover_by_bbox_search`): recursive bbox search of the Graph API, splitting a box
in four whenever it returns the 2,000-result cap or the API asks for less data.

Sequence route (`discover_by_sequences`): the image ids of given sequences (`image_ids?sequence_id=`),
then their positions by batch lookup, clipped to the AOI like the other routes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import mercantile
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from mapillary_assets.api.decoders import decode_image_layer, decode_sequence_lines, int_or_none
from mapillary_assets.api.errors import RequestTooLargeError
from mapillary_assets.pipeline.aoi import AreaOfInterest, tile_bounds_arrays
from mapillary_assets.pipeline.metadata import (
    conform_failures,
    fetch_metadata,
    fetch_sequence_image_ids,
)
from mapillary_assets.storage import IMAGE_ID_PATTERN, DataLayout, atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_ZOOM = 14
# Below z6 Mapillary serves the sampled `overview` points, not every sequence: coverage is read at z6.
MIN_COVERAGE_ZOOM = 6
MVT_EXTENT = 4096
DEFAULT_TILESET = "mly1_public"
_TILESET_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
DEFAULT_CACHE_MAX_AGE_S = 86400

SEARCH_LIMIT = 2000
MAX_SEARCH_BOX_DEG2 = 0.01  # the API rejects boxes this large
_SEARCH_CELL_DEG = 0.09  # start cells of at most 0.09 x 0.09 = 0.0081 deg2
_MIN_SEARCH_BOX_DEG = 1e-6  # ~10 cm: below this a full box cannot be split further
SEARCH_FIELDS = ("id", "geometry", "captured_at", "compass_angle", "sequence", "is_pano", "creator")

DISCOVERY_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("sequence_id", pa.string()),
        ("lon", pa.float64()),
        ("lat", pa.float64()),
        ("captured_at_ms", pa.int64()),
        ("compass_angle", pa.float64()),
        ("is_pano", pa.bool_()),
        ("organization_id", pa.int64()),
        ("creator_id", pa.int64()),
        ("tile_z14", pa.string()),
        ("tileset", pa.string()),
    ]
)
# the pandas dtypes of a discovery frame (nullable ints and bools keep the Parquet types stable)
DISCOVERY_COLUMNS = {
    "image_id": "str",
    "sequence_id": "str",
    "lon": "float64",
    "lat": "float64",
    "captured_at_ms": "Int64",
    "compass_angle": "float64",
    "is_pano": "boolean",
    "organization_id": "Int64",
    "creator_id": "Int64",
    "tile_z14": "str",
    "tileset": "str",
}


@dataclass
class DiscoveryStats:
    coverage_requests: int = 0
    image_tile_requests: int = 0
    cache_hits: int = 0
    corrupt_cache_tiles: int = 0
    empty_z14_tiles: int = 0  # fetched (or cached) z14 tiles without any image
    nonempty_z14_tiles: int = 0
    skipped_z14_tiles: int = 0  # z14 tiles of the AOI the coverage showed to be empty
    images_in_tiles: int = 0  # image points decoded, before clipping to the AOI
    images_in_aoi: int = 0  # rows returned
    duplicates_dropped: int = 0
    invalid_ids_dropped: int = 0  # ids that are not decimal digits: never a path, never a row
    search_requests: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return self.coverage_requests + self.image_tile_requests + self.search_requests

    def __str__(self) -> str:
        shown = [
            f"{f.name}={getattr(self, f.name):,}"
            for f in fields(self)
            if f.name != "seconds" and getattr(self, f.name)
        ]
        return ", ".join(shown + [f"seconds={self.seconds:.1f}"])


def empty_discovery_frame() -> pd.DataFrame:
    return _to_frame(DISCOVERY_SCHEMA.empty_table())


def _pandas_dtype(arrow_type: pa.DataType):
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None


def _to_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=_pandas_dtype)


# ---------------------------------------------------------------------------------------------
# tile route


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
    cache = _TileCache(client, layout, tileset, cache_max_age_s, stats)
    geometry = aoi.geometry
    shapely.prepare(geometry)

    z14_tiles = await _covered_z14_tiles(cache, geometry, partition, concurrency)
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
        table = _valid_ids(
            _points_table(points, f"{IMAGE_ZOOM}/{x}/{y}", tileset),
            f"tile {IMAGE_ZOOM}/{x}/{y}",
            stats,
        )
        inside = shapely.intersects_xy(geometry, table["lon"].to_numpy(), table["lat"].to_numpy())
        parts.append(table.filter(pa.array(inside)))

    await _run_all(collect(x, y) for x, y in z14_tiles)

    frame, dropped = _finish(parts)
    stats.duplicates_dropped = dropped
    stats.images_in_aoi = len(frame)
    stats.seconds = time.perf_counter() - started
    return frame, stats


async def _covered_z14_tiles(
    cache: _TileCache, geometry, partition: mercantile.Tile, concurrency: int
) -> list[tuple[int, int]]:
    """z14 tiles of the partition that overlap the AOI and that some sequence passes through."""
    if partition.z >= MIN_COVERAGE_ZOOM:
        coverage_tiles = [partition]
    else:
        coverage_tiles = _overlapping_descendants(geometry, partition, MIN_COVERAGE_ZOOM)
    limit = asyncio.Semaphore(max(1, concurrency))

    async def touched(tile: mercantile.Tile) -> set[tuple[int, int]]:
        async with limit:
            lines = await cache.decoded(
                tile.z, tile.x, tile.y, decode_sequence_lines, counter="coverage_requests"
            )
        # one MVT unit of slack: line vertices are quantised to the coverage tile's 4096 grid
        slack = 2.0 ** (IMAGE_ZOOM - tile.z) / MVT_EXTENT
        return touched_z14_tiles(lines, slack)

    candidates: set[tuple[int, int]] = set()

    async def add_touched(tile: mercantile.Tile) -> None:
        candidates.update(await touched(tile))

    await _run_all(add_touched(t) for t in coverage_tiles)
    span = 2 ** (IMAGE_ZOOM - partition.z)
    x0, y0 = partition.x * span, partition.y * span
    inside = sorted((x, y) for x, y in candidates if x0 <= x < x0 + span and y0 <= y < y0 + span)
    if not inside:
        return []
    xs, ys = (np.array(v, dtype=np.int64) for v in zip(*inside))
    keep = _overlaps(geometry, xs, ys, IMAGE_ZOOM)
    return list(zip(xs[keep].tolist(), ys[keep].tolist()))


def touched_z14_tiles(
    lines: Sequence[Sequence[tuple[float, float]]], slack: float = 0.0
) -> set[tuple[int, int]]:
    """z14 tiles (x, y) that any line (lon/lat vertices; a single vertex is a point) passes within
    `slack` z14-tile units of."""
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
    start = _z14_units(lonlat[:, 0], lonlat[:, 1])
    end = _z14_units(lonlat[:, 2], lonlat[:, 3])
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


def _z14_units(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """lon/lat -> fractional z14 tile coordinates (x right, y down), as mercantile computes tiles."""
    n = 2.0**IMAGE_ZOOM
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


class _TileCache:
    """Raw tile bytes on disk (an empty tile is a zero-length file); fetched when absent or older
    than `max_age_s`. A cached tile that fails to decode is deleted and fetched again."""

    def __init__(
        self, client, layout: DataLayout, tileset: str, max_age_s: float, stats: DiscoveryStats
    ):
        self.client, self.layout, self.tileset = client, layout, tileset
        self.max_age_s, self.stats = max_age_s, stats
        self._decoding = asyncio.Semaphore(1)  # one decode at a time bounds decoded-tile memory

    async def decoded(self, z: int, x: int, y: int, decode, counter: str):
        path = self.layout.tile_cache_path(self.tileset, z, x, y)
        data = self._read_fresh(path)
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
                path.unlink(missing_ok=True)
        data = await self.client.get_tile(z, x, y, tileset=self.tileset)
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        atomic_write_bytes(path, data)
        return await self._decode(decode, data, z, x, y)

    def _read_fresh(self, path: Path) -> bytes | None:
        try:
            if time.time() - path.stat().st_mtime >= self.max_age_s:
                return None
            return path.read_bytes()
        except FileNotFoundError:
            return None

    async def _decode(self, decode, data: bytes, z: int, x: int, y: int):
        if not data:
            return []
        async with self._decoding:
            return await asyncio.to_thread(decode, data, z, x, y)


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


def _valid_ids(table: pa.Table, source: str, stats: DiscoveryStats) -> pa.Table:
    """Rows whose image id is decimal digits; the others are dropped with a warning naming `source`
    (an id becomes a file name and a number downstream, so a malformed one must stop here)."""
    valid = pc.fill_null(
        pc.match_substring_regex(table["image_id"], IMAGE_ID_PATTERN.pattern), False
    )
    dropped = table.num_rows - pc.sum(valid).as_py() if table.num_rows else 0
    if dropped:
        example = table.filter(pc.invert(valid))["image_id"][0].as_py()
        log.warning(
            "%s: dropped %d image id(s) that are not decimal digits (e.g. %r)",
            source,
            dropped,
            example,
        )
        stats.invalid_ids_dropped += dropped
        return table.filter(valid)
    return table


def _finish(parts: list[pa.Table]) -> tuple[pd.DataFrame, int]:
    """Concatenate, drop repeated image ids (first kept), order by numeric id; (frame, dropped)."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return empty_discovery_frame(), 0
    frame = _to_frame(pa.concat_tables(parts))
    duplicated = frame["image_id"].duplicated()
    frame = frame[~duplicated]
    # numeric order of digit strings without int64 (20-digit ids overflow it): by length, then text
    order = np.lexsort(
        (frame["image_id"].to_numpy(dtype=str), frame["image_id"].str.len().to_numpy())
    )
    return frame.iloc[order].reset_index(drop=True), int(duplicated.sum())


async def _run_all(coroutines) -> None:
    """Run concurrently; on the first error cancel the rest and raise that error itself (not an
    ExceptionGroup), so callers see e.g. an AuthError as such."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as errors:
        error: BaseException = errors
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None


# ---------------------------------------------------------------------------------------------
# bbox-search route


async def discover_by_bbox_search(
    client,
    aoi: AreaOfInterest,
    bbox: tuple[float, float, float, float] | None = None,
    concurrency: int = 8,
    tileset_label: str = DEFAULT_TILESET,
) -> tuple[pd.DataFrame, DiscoveryStats]:
    """Images inside the AOI (and inside `bbox`, west/south inclusive like tile membership, when
    given) found with `images?bbox=` searches. `tileset` of the rows is `tileset_label`: the search
    answers original (`geometry`) positions, as the mly1_public tiles do."""
    started = time.perf_counter()
    stats = DiscoveryStats()
    geometry = aoi.geometry
    shapely.prepare(geometry)
    west, south, east, north = geometry.bounds
    if bbox is not None:
        west, south = max(west, bbox[0]), max(south, bbox[1])
        east, north = min(east, bbox[2]), min(north, bbox[3])
    if west >= east or south >= north:
        return empty_discovery_frame(), stats

    limit = asyncio.Semaphore(max(1, concurrency))
    found: list[dict] = []

    async def search(box: tuple[float, float, float, float]) -> None:
        async with limit:
            stats.search_requests += 1
            try:
                rows = await client.search_images(box, SEARCH_FIELDS, limit=SEARCH_LIMIT)
            except RequestTooLargeError:
                rows = None
        if rows is not None and len(rows) < SEARCH_LIMIT:
            found.extend(rows)
            return
        children = _quarters(box)
        if box[2] - box[0] < _MIN_SEARCH_BOX_DEG:
            # cannot split further: keep what the capped answer holds rather than loop forever
            log.warning(
                "bbox %s still returns the %d cap at minimal size; some images may be missing",
                box,
                SEARCH_LIMIT,
            )
            found.extend(rows or [])
            return
        await _run_all(search(child) for child in children if _box_overlaps(geometry, child))

    await _run_all(
        search(box)
        for box in _start_boxes(west, south, east, north)
        if _box_overlaps(geometry, box)
    )

    table = _valid_ids(_search_table(found, tileset_label), "bbox search", stats)
    stats.images_in_tiles = table.num_rows
    lon, lat = (
        table["lon"].to_numpy(zero_copy_only=False),
        table["lat"].to_numpy(zero_copy_only=False),
    )
    keep = shapely.intersects_xy(geometry, lon, lat)
    if bbox is not None:
        keep &= (lon >= bbox[0]) & (lon < bbox[2]) & (lat > bbox[1]) & (lat <= bbox[3])
    frame, dropped = _finish([table.filter(pa.array(keep))])
    stats.duplicates_dropped = dropped
    stats.images_in_aoi = len(frame)
    stats.seconds = time.perf_counter() - started
    return frame, stats


def _start_boxes(
    west: float, south: float, east: float, north: float
) -> list[tuple[float, float, float, float]]:
    nx = max(1, math.ceil((east - west) / _SEARCH_CELL_DEG))
    ny = max(1, math.ceil((north - south) / _SEARCH_CELL_DEG))
    xs = np.linspace(west, east, nx + 1)
    ys = np.linspace(south, north, ny + 1)
    return [
        (float(xs[i]), float(ys[j]), float(xs[i + 1]), float(ys[j + 1]))
        for i in range(nx)
        for j in range(ny)
    ]


def _quarters(box: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    west, south, east, north = box
    mid_x, mid_y = (west + east) / 2, (south + north) / 2
    return [
        (west, south, mid_x, mid_y),
        (mid_x, south, east, mid_y),
        (west, mid_y, mid_x, north),
        (mid_x, mid_y, east, north),
    ]


def _box_overlaps(geometry, box: tuple[float, float, float, float]) -> bool:
    return bool(shapely.intersects(geometry, shapely.box(*box)))


def _search_table(rows: list[dict], tileset: str) -> pa.Table:
    coords = [
        (row.get("geometry") or {}).get("coordinates") or (math.nan, math.nan) for row in rows
    ]
    lon = np.array([c[0] for c in coords], dtype=float)
    lat = np.array([c[1] for c in coords], dtype=float)
    return pa.Table.from_arrays(
        [
            pa.array([str(row["id"]) for row in rows], pa.string()),
            pa.array([row.get("sequence") for row in rows], pa.string()),
            pa.array(lon),
            pa.array(lat),
            pa.array([int_or_none(row.get("captured_at")) for row in rows], pa.int64()),
            pa.array([row.get("compass_angle") for row in rows], pa.float64()),
            pa.array([row.get("is_pano") for row in rows], pa.bool_()),
            pa.array([int_or_none(row.get("organization_id")) for row in rows], pa.int64()),
            pa.array(
                [int_or_none((row.get("creator") or {}).get("id")) for row in rows], pa.int64()
            ),
            pa.array([_z14_key(a, b) for a, b in zip(lon, lat)], pa.string()),
            pa.array([tileset] * len(rows), pa.string()),
        ],
        schema=DISCOVERY_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------
# sequence route


async def discover_by_sequences(
    client,
    aoi: AreaOfInterest,
    sequence_ids: Sequence[str],
    existing: pd.DataFrame | None = None,
    tileset_label: str = DEFAULT_TILESET,
) -> tuple[pd.DataFrame, pd.DataFrame, DiscoveryStats]:
    """Images of `sequence_ids` inside the AOI: (frame, failures, stats).

    Each sequence's image ids are listed afresh (a sequence may have grown); positions are looked up
    only for ids `existing` (an earlier result) does not hold. `failures` are the ids whose lookup
    failed (pipeline.metadata's failure columns); unknown sequences are empty, with a warning."""
    started = time.perf_counter()
    stats = DiscoveryStats()
    by_sequence = await fetch_sequence_image_ids(client, sequence_ids)
    stats.search_requests += len(by_sequence)
    wanted = list(dict.fromkeys(image_id for ids in by_sequence.values() for image_id in ids))
    kept = (
        existing[existing["image_id"].isin(wanted)]
        if existing is not None and len(existing)
        else None
    )
    known = set(kept["image_id"]) if kept is not None else set()
    result = await fetch_metadata(
        client, [i for i in wanted if i not in known], fields=SEARCH_FIELDS
    )
    stats.search_requests += result.requests
    rows = result.rows
    table = _valid_ids(
        pa.Table.from_arrays(
            [
                pa.array(rows["image_id"], pa.string()),
                pa.array(rows["sequence_id"], pa.string()),
                pa.array(rows["lon"], pa.float64()),
                pa.array(rows["lat"], pa.float64()),
                pa.array(rows["captured_at"], pa.timestamp("ms", tz="UTC")).cast(pa.int64()),
                pa.array(rows["compass_angle"], pa.float64()),
                pa.array(rows["is_pano"], pa.bool_()),
                pa.nulls(len(rows), pa.int64()),
                pa.array([int_or_none(c) for c in rows["creator_id"]], pa.int64()),
                pa.array(
                    [_z14_key(lon, lat) for lon, lat in zip(rows["lon"], rows["lat"])], pa.string()
                ),
                pa.array([tileset_label] * len(rows), pa.string()),
            ],
            schema=DISCOVERY_SCHEMA,
        ),
        "sequence route",
        stats,
    )
    stats.images_in_tiles = table.num_rows + len(known)
    lon, lat = (
        table["lon"].to_numpy(zero_copy_only=False),
        table["lat"].to_numpy(zero_copy_only=False),
    )
    inside = shapely.intersects_xy(aoi.geometry, lon, lat)
    parts = (
        [pa.Table.from_pandas(kept, schema=DISCOVERY_SCHEMA, preserve_index=False)]
        if kept is not None
        else []
    )
    frame, dropped = _finish(parts + [table.filter(pa.array(inside))])
    stats.duplicates_dropped = dropped
    stats.images_in_aoi = len(frame)
    stats.seconds = time.perf_counter() - started
    return frame, conform_failures(result.failures), stats


def _z14_key(lon: float, lat: float) -> str | None:
    if math.isnan(lon) or math.isnan(lat):
        return None
    tile = mercantile.tile(lon, lat, IMAGE_ZOOM)
    return f"{IMAGE_ZOOM}/{tile.x}/{tile.y}"
