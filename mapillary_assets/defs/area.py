"""The configured area of interest (MAPILLARY_AOI) and partition zoom (MAPILLARY_PARTITION_ZOOM):
they shape the tile partitions, so they are read when the definitions are built."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import shapely

from mapillary_assets.pipeline.aoi import AoiError, AreaOfInterest, load_aoi

DEFAULT_PARTITION_ZOOM = 12


def partition_zoom() -> int:
    raw = os.environ.get("MAPILLARY_PARTITION_ZOOM", str(DEFAULT_PARTITION_ZOOM))
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
def _load(source: str | None) -> AreaOfInterest:
    return load_aoi(source)


def current_aoi() -> AreaOfInterest:
    return _load(os.environ.get("MAPILLARY_AOI") or None)


def area_fingerprint(aoi: AreaOfInterest | None = None) -> str:
    """A short hash of the area's geometry (normalised: vertex order and ring start do not count); the
    GeoPackage's materialisation records it, so a changed area is told apart from a current one."""
    geometry = shapely.normalize((aoi or current_aoi()).geometry)
    return hashlib.sha256(shapely.to_wkb(geometry, output_dimension=2)).hexdigest()[:16]
