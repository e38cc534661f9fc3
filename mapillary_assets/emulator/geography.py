"""Where the synthetic world's images are: z14 tile maths, the density of images around Zurich
(urban peaks, a sparse countryside, nothing beyond ``WORLD_RADIUS_KM``) and the lake that holds none.

Generation (``generation.py``) asks this module only how many images a tile should receive, how they
spread over its ``DENSITY_GRID`` x ``DENSITY_GRID`` cells, the tile's bounds and whether a point is
in the lake.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import mercantile
import numpy as np
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

ZOOM = 14
CENTRE = (8.540, 47.378)  # Zurich HB
KM_PER_DEG_LAT = 110.57
_KM_PER_DEG_LON = 111.32 * math.cos(math.radians(CENTRE[1]))
WORLD_RADIUS_KM = 25.0
# (lon, lat, peak images per km2 at scale 1, sigma km)
_CENTRES = (
    (8.540, 47.378, 26_000.0, 0.85),  # HB / Altstadt
    (8.545, 47.411, 12_000.0, 0.7),  # Oerlikon
    (8.487, 47.390, 10_000.0, 0.7),  # Altstetten
    (8.540, 47.378, 18_500.0, 4.0),  # the city around them
)
_OUTSKIRTS_PER_KM2 = 70.0
DENSITY_GRID = 8  # density samples per tile side

# The northern end of Lake Zurich (crude), widening to the south so whole z14 tiles lie in it.
LAKE = Polygon(
    [
        (8.5405, 47.3665),
        (8.5445, 47.3670),
        (8.5487, 47.3656),
        (8.5515, 47.3590),
        (8.5545, 47.3540),
        (8.5610, 47.3470),
        (8.5740, 47.3370),
        (8.5930, 47.3230),
        (8.6150, 47.3050),
        (8.6450, 47.2800),
        (8.6200, 47.2600),
        (8.5800, 47.2750),
        (8.5550, 47.2950),
        (8.5430, 47.3150),
        (8.5390, 47.3300),
        (8.5365, 47.3460),
        (8.5368, 47.3560),
        (8.5385, 47.3630),
    ]
)


def per_thread_prepared(build: Callable[[], BaseGeometry]) -> Callable[[], BaseGeometry]:
    """A getter of the geometry `build` makes, prepared once per thread: GEOS prepared geometries
    are not thread-safe (libgeos/geos#825), and the server renders tiles in worker threads, where
    two threads sharing one crashed the country world's emulator with a segfault."""
    local = threading.local()

    def get() -> BaseGeometry:
        geometry = getattr(local, "geometry", None)
        if geometry is None:
            geometry = build()
            shapely.prepare(geometry)
            local.geometry = geometry
        return geometry

    return get


_prepared_lake = per_thread_prepared(lambda: shapely.Polygon(LAKE))


def tile_lon(x: np.ndarray | float, z: int = ZOOM):
    return np.asarray(x, dtype=float) / 2.0**z * 360.0 - 180.0


def tile_lat(y: np.ndarray | float, z: int = ZOOM):
    return np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * np.asarray(y, dtype=float) / 2.0**z))))


def in_lake(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    return shapely.contains_xy(LAKE, lon, lat)


def point_in_lake(lon: float, lat: float) -> bool:
    return bool(shapely.contains_xy(_prepared_lake(), lon, lat))


def tile_bounds(x: int, y: int) -> tuple[float, float, float, float]:
    """The z14 tile's (west, south, east, north)."""
    return float(tile_lon(x)), float(tile_lat(y + 1)), float(tile_lon(x + 1)), float(tile_lat(y))


def tile_geometry(x: int, y: int) -> tuple[tuple[float, float, float, float], bool]:
    """The z14 tile's bounds and whether it touches the lake."""
    bounds = tile_bounds(x, y)
    return bounds, bool(shapely.intersects(_prepared_lake(), box(*bounds)))


def density_per_km2(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Images per km2 at scale 1.0: urban peaks, a sparse countryside, nothing in the lake or
    beyond WORLD_RADIUS_KM of the centre."""
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    total = np.zeros(np.broadcast(lon, lat).shape)
    for c_lon, c_lat, peak, sigma in _CENTRES:
        d2 = ((lon - c_lon) * _KM_PER_DEG_LON) ** 2 + ((lat - c_lat) * KM_PER_DEG_LAT) ** 2
        total += peak * np.exp(-d2 / (2 * sigma * sigma))
    r = np.hypot((lon - CENTRE[0]) * _KM_PER_DEG_LON, (lat - CENTRE[1]) * KM_PER_DEG_LAT)
    total += _OUTSKIRTS_PER_KM2 * np.clip(1.0 - r / WORLD_RADIUS_KM, 0.0, None)
    total[r > WORLD_RADIUS_KM] = 0.0
    total[in_lake(lon, lat)] = 0.0
    return total


def expected_images_by_tile() -> tuple[
    dict[tuple[int, int], float], dict[tuple[int, int], np.ndarray]
]:
    """For every z14 tile that can hold images: its mean number of images at scale 1.0, and the
    weights of its density cells (``DENSITY_GRID**2`` values, row-major from the north-west, sum 1)."""
    xs, ys = _candidate_tile_range()
    gx, gy = np.meshgrid(np.array(xs), np.array(ys), indexing="ij")
    gx, gy = gx.ravel(), gy.ravel()
    lon, lat = cell_centres(gx, gy)
    dens = density_per_km2(lon, lat)
    expected = dens.mean(axis=(1, 2)) * tile_area_km2(gx, gy)
    table: dict[tuple[int, int], float] = {}
    weights: dict[tuple[int, int], np.ndarray] = {}
    for i, (x, y) in enumerate(zip(gx.tolist(), gy.tolist())):
        if expected[i] > 0:
            table[(x, y)] = float(expected[i])
            weights[(x, y)] = dens[i].ravel() / dens[i].sum()
    return table, weights


def _candidate_tile_range() -> tuple[range, range]:
    """z14 columns/rows that can hold images (within WORLD_RADIUS_KM of the centre)."""
    d_lon = (WORLD_RADIUS_KM + 2) / _KM_PER_DEG_LON
    d_lat = (WORLD_RADIUS_KM + 2) / KM_PER_DEG_LAT
    nw = mercantile.tile(CENTRE[0] - d_lon, CENTRE[1] + d_lat, ZOOM)
    se = mercantile.tile(CENTRE[0] + d_lon, CENTRE[1] - d_lat, ZOOM)
    return range(nw.x, se.x + 1), range(nw.y, se.y + 1)


def cell_centres(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lon/lat of the GRIDxGRID cell centres of tiles (x, y): arrays shaped (n, GRID, GRID) [row, col]."""
    frac = (np.arange(DENSITY_GRID) + 0.5) / DENSITY_GRID
    lon = tile_lon(x[:, None, None] + frac[None, None, :]) + np.zeros((1, DENSITY_GRID, 1))
    lat = tile_lat(y[:, None, None] + frac[None, :, None]) + np.zeros((1, 1, DENSITY_GRID))
    return lon, lat


def tile_area_km2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    west, east = tile_lon(x), tile_lon(x + 1)
    north, south = tile_lat(y), tile_lat(y + 1)
    mid = np.radians((north + south) / 2)
    return (east - west) * 111.32 * np.cos(mid) * (north - south) * KM_PER_DEG_LAT
