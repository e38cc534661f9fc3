"""The configured area of interest (MAPILLARY_AOI) and partition zoom (MAPILLARY_PARTITION_ZOOM, else
chosen from the area's size): they shape the tile partitions, so they are read when the definitions
are built."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import shapely

from mapillary_assets.pipeline.aoi import (
    AoiError,
    AreaOfInterest,
    load_aoi,
    partition_tiles,
    tile_area_lower_bound,
)

DEFAULT_PARTITION_ZOOM = 12  # the finest chosen zoom: a city keeps its z12 partitions
# The most partitions a chosen zoom may give: Dagster's UI pages and dynamic-key loads stay quick.
TARGET_MAX_PARTITIONS = 2_000


def partition_zoom(aoi: AreaOfInterest | None = None) -> int:
    """MAPILLARY_PARTITION_ZOOM when set, else the zoom chosen for `aoi` (default: the configured
    area)."""
    raw = os.environ.get("MAPILLARY_PARTITION_ZOOM")
    if not raw:
        if aoi is not None:
            return choose_partition_zoom(aoi)
        return _chosen_zoom(os.environ.get("MAPILLARY_AOI") or None)
    try:
        zoom = int(raw)
    except ValueError:
        raise AoiError(
            f"MAPILLARY_PARTITION_ZOOM={raw!r} is not an integer: use a zoom from 0 to 13"
        ) from None
    if not 0 <= zoom <= 13:
        raise AoiError(f"MAPILLARY_PARTITION_ZOOM={zoom} is out of range: use a zoom from 0 to 13")
    return zoom


@lru_cache(maxsize=4)
def area_from(source: str | None) -> AreaOfInterest:
    """The area in the GeoJSON file `source` (None: the shipped default), loaded once per process."""
    return load_aoi(source)


def current_aoi() -> AreaOfInterest:
    return area_from(os.environ.get("MAPILLARY_AOI") or None)


def area_fingerprint(aoi: AreaOfInterest | None = None) -> str:
    """A short hash of the area's geometry (normalised: vertex order and ring start do not count); the
    GeoPackage's materialisation records it, so a changed area is told apart from a current one."""
    geometry = shapely.normalize((aoi or current_aoi()).geometry)
    return hashlib.sha256(shapely.to_wkb(geometry, output_dimension=2)).hexdigest()[:16]


def choose_partition_zoom(aoi: AreaOfInterest, max_partitions: int = TARGET_MAX_PARTITIONS) -> int:
    """The finest zoom, at most DEFAULT_PARTITION_ZOOM, whose partition tiles over the AOI number at
    most `max_partitions` (a country gets z8-z10, a continent z5-z6)."""
    for zoom in range(DEFAULT_PARTITION_ZOOM, 0, -1):
        if tile_area_lower_bound(aoi.geometry, zoom) > max_partitions:
            continue  # no fewer tiles than the area holds can cover it: skip the enumeration
        if len(partition_tiles(aoi, zoom)) <= max_partitions:
            return zoom
    return 0


@lru_cache(maxsize=4)
def _chosen_zoom(source: str | None) -> int:
    return choose_partition_zoom(area_from(source))
