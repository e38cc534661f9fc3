"""The bbox-search route: the images of the area of interest found with `images?bbox=` searches.

The area is cut into start boxes the API accepts; a box is split in four whenever its answer holds
the 2,000-result cap or the API asks for less data (code 1), down to a minimal box size.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from mapillary_assets.api.coercion import int_or_none
from mapillary_assets.api.errors import RequestTooLargeError
from mapillary_assets.pipeline.aoi import AreaOfInterest
from mapillary_assets.pipeline.concurrency import run_all
from mapillary_assets.pipeline.discovery.results import (
    DEFAULT_TILESET,
    DISCOVERY_FIELDS,
    DISCOVERY_SCHEMA,
    DiscoveryStats,
    empty_discovery_frame,
    finish_frame,
    keep_valid_ids,
    z14_key,
)

log = logging.getLogger(__name__)

SEARCH_LIMIT = 2000
MAX_SEARCH_BOX_DEG2 = 0.01  # the API rejects boxes this large
_SEARCH_CELL_DEG = 0.09  # start cells of at most 0.09 x 0.09 = 0.0081 deg2
_MIN_SEARCH_BOX_DEG = 1e-6  # ~10 cm: below this a full box cannot be split further


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
                rows = await client.search_images(box, DISCOVERY_FIELDS, limit=SEARCH_LIMIT)
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
        await run_all(search(child) for child in children if _box_overlaps(geometry, child))

    await run_all(
        search(box)
        for box in _start_boxes(west, south, east, north)
        if _box_overlaps(geometry, box)
    )

    table = keep_valid_ids(_search_table(found, tileset_label), "bbox search", stats)
    stats.images_in_tiles = table.num_rows
    lon, lat = (
        table["lon"].to_numpy(zero_copy_only=False),
        table["lat"].to_numpy(zero_copy_only=False),
    )
    keep = shapely.intersects_xy(geometry, lon, lat)
    if bbox is not None:
        keep &= (lon >= bbox[0]) & (lon < bbox[2]) & (lat > bbox[1]) & (lat <= bbox[3])
    frame, dropped = finish_frame([table.filter(pa.array(keep))])
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
            pa.array([z14_key(a, b) for a, b in zip(lon, lat)], pa.string()),
            pa.array([tileset] * len(rows), pa.string()),
        ],
        schema=DISCOVERY_SCHEMA,
    )
