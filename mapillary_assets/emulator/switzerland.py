"""Where the Switzerland world's images are: dense around the cities (Gaussian blobs), thin along the
roads between them and over the countryside, none over the lakes, the high mountains and outside the
national outline (``data/switzerland.geojson``, the AOI file shipped beside Zurich's).

Everything here is hand-made and crude on purpose ("roughly right"): the settlements, the roads as
straight segments between them, the lakes and the high-mountain zones as polygons of a dozen vertices.
The density of a tile is sampled on the same ``DENSITY_GRID`` cells as the Zurich world's, and the
table of expected images per tile is computed once per process (no image is generated for it).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import mercantile
import numpy as np
import shapely
from shapely.geometry import Polygon, box, shape
from shapely.ops import unary_union

from .geography import (
    KM_PER_DEG_LAT,
    ZOOM,
    cell_centres,
    per_thread_prepared,
    tile_area_km2,
    tile_bounds,
    tile_lat,
    tile_lon,
)

_MIDDLE = (8.2, 46.8)
_KM_PER_DEG_LON = 111.32 * math.cos(math.radians(_MIDDLE[1]))

# (name, lon, lat, peak images per km2 at scale 1, sigma km): one blob per town, two for the big cities
# (a dense core and the wider agglomeration).
SETTLEMENTS = (
    ("Zurich", 8.540, 47.378, 30_000.0, 0.85),
    ("Zurich", 8.540, 47.385, 16_000.0, 4.5),
    ("Geneva", 6.143, 46.204, 25_500.0, 0.8),
    ("Geneva", 6.130, 46.200, 12_500.0, 3.8),
    ("Basel", 7.589, 47.557, 23_000.0, 0.8),
    ("Basel", 7.600, 47.545, 11_500.0, 3.5),
    ("Lausanne", 6.633, 46.520, 20_500.0, 0.8),
    ("Lausanne", 6.600, 46.530, 9_000.0, 3.5),
    ("Bern", 7.447, 46.948, 20_500.0, 0.8),
    ("Bern", 7.440, 46.945, 9_000.0, 3.5),
    ("Winterthur", 8.724, 47.499, 14_000.0, 2.2),
    ("Lucerne", 8.309, 47.050, 14_000.0, 2.2),
    ("St. Gallen", 9.377, 47.424, 12_500.0, 2.0),
    ("Lugano", 8.952, 46.004, 12_500.0, 2.0),
    ("Biel", 7.247, 47.137, 10_500.0, 1.8),
    ("Thun", 7.628, 46.758, 9_000.0, 1.6),
    ("Fribourg", 7.161, 46.806, 9_000.0, 1.6),
    ("La Chaux-de-Fonds", 6.826, 47.099, 8_000.0, 1.5),
    ("Schaffhausen", 8.635, 47.697, 8_000.0, 1.5),
    ("Chur", 9.532, 46.850, 8_000.0, 1.5),
    ("Neuchatel", 6.931, 46.992, 8_000.0, 1.5),
    ("Sion", 7.359, 46.233, 7_000.0, 1.5),
    ("Zug", 8.515, 47.166, 8_000.0, 1.5),
    ("Aarau", 8.044, 47.392, 7_000.0, 1.5),
    ("Baden", 8.306, 47.473, 7_000.0, 1.5),
    ("Olten", 7.903, 47.350, 7_000.0, 1.4),
    ("Solothurn", 7.537, 47.208, 7_000.0, 1.4),
    ("Bellinzona", 9.023, 46.195, 7_000.0, 1.4),
    ("Locarno", 8.795, 46.170, 7_000.0, 1.4),
    ("Montreux-Vevey", 6.880, 46.455, 8_000.0, 1.6),
    ("Yverdon", 6.641, 46.778, 7_000.0, 1.4),
    ("Nyon", 6.239, 46.383, 6_000.0, 1.3),
    ("Frauenfeld", 8.898, 47.557, 6_000.0, 1.3),
    ("Kreuzlingen", 9.175, 47.650, 6_000.0, 1.3),
    ("Rapperswil", 8.817, 47.226, 6_000.0, 1.3),
    ("Wil", 9.045, 47.462, 6_000.0, 1.3),
    ("Uster", 8.718, 47.348, 6_000.0, 1.3),
    ("Martigny", 7.073, 46.100, 4_500.0, 1.2),
    ("Brig", 7.988, 46.316, 4_500.0, 1.2),
    ("Davos", 9.836, 46.802, 4_500.0, 1.2),
    ("St. Moritz", 9.838, 46.498, 4_000.0, 1.0),
    ("Interlaken", 7.863, 46.686, 4_500.0, 1.2),
    ("Burgdorf", 7.627, 47.059, 4_500.0, 1.2),
    ("Delemont", 7.344, 47.365, 4_000.0, 1.1),
    ("Glarus", 9.066, 47.040, 3_500.0, 1.0),
    ("Schwyz", 8.654, 47.021, 4_000.0, 1.1),
)
_TOWNS = {name: (lon, lat) for name, lon, lat, *_ in SETTLEMENTS}
# The road network, as straight segments between towns.
# fmt: off
ROADS = (
    ("Geneva", "Nyon"), ("Nyon", "Lausanne"), ("Lausanne", "Montreux-Vevey"),
    ("Montreux-Vevey", "Martigny"), ("Martigny", "Sion"), ("Sion", "Brig"),
    ("Lausanne", "Yverdon"), ("Yverdon", "Neuchatel"), ("Neuchatel", "Biel"),
    ("Neuchatel", "La Chaux-de-Fonds"), ("La Chaux-de-Fonds", "Delemont"), ("Delemont", "Basel"),
    ("Lausanne", "Fribourg"), ("Fribourg", "Bern"), ("Biel", "Bern"), ("Biel", "Solothurn"),
    ("Bern", "Thun"), ("Thun", "Interlaken"), ("Bern", "Burgdorf"), ("Burgdorf", "Olten"),
    ("Solothurn", "Olten"), ("Olten", "Aarau"), ("Aarau", "Baden"), ("Baden", "Zurich"),
    ("Basel", "Olten"), ("Olten", "Lucerne"), ("Lucerne", "Zug"), ("Zug", "Zurich"),
    ("Lucerne", "Interlaken"), ("Lucerne", "Schwyz"), ("Schwyz", "Bellinzona"),
    ("Bellinzona", "Locarno"), ("Bellinzona", "Lugano"), ("Zurich", "Winterthur"),
    ("Winterthur", "Schaffhausen"), ("Winterthur", "Frauenfeld"), ("Frauenfeld", "Kreuzlingen"),
    ("Winterthur", "Wil"), ("Wil", "St. Gallen"), ("Zurich", "Uster"), ("Uster", "Rapperswil"),
    ("Zurich", "Rapperswil"), ("Rapperswil", "Glarus"), ("Rapperswil", "Chur"),
    ("St. Gallen", "Chur"), ("Chur", "Davos"), ("Chur", "St. Moritz"), ("Bellinzona", "Chur"),
    ("Basel", "Aarau"),
)
# fmt: on
# Images captured per km of road, spread across it with a sigma of _ROAD_SIGMA_KM.
_ROAD_IMAGES_PER_KM = 750.0
_ROAD_SIGMA_KM = 0.25
# The countryside between settlements: images per km2 over the Plateau (between the Jura and the Alps)
# and elsewhere in the outline.
_PLATEAU_PER_KM2 = 65.0
_COUNTRYSIDE_PER_KM2 = 8.0
# fmt: off
PLATEAU = Polygon(
    [(6.10, 46.20), (6.60, 46.45), (7.20, 46.62), (7.80, 46.72), (8.30, 46.95), (8.90, 47.15),
     (9.60, 47.30), (9.50, 47.55), (8.60, 47.70), (7.90, 47.45), (7.10, 47.15), (6.30, 46.60),
     (5.96, 46.20)]
)
# The larger lakes, crude polygons (none of them holds images).
LAKES = (
    Polygon(
        [(6.155, 46.212), (6.240, 46.370), (6.330, 46.455), (6.500, 46.500), (6.630, 46.503),
         (6.840, 46.455), (6.920, 46.395), (6.800, 46.390), (6.590, 46.400), (6.480, 46.375),
         (6.330, 46.365), (6.240, 46.300), (6.160, 46.205)]
    ),  # Geneva
    Polygon(
        [(6.640, 46.790), (6.860, 46.960), (6.940, 46.985), (7.050, 46.985), (6.900, 46.870),
         (6.700, 46.770)]
    ),  # Neuchatel
    Polygon(
        [(7.100, 47.050), (7.230, 47.130), (7.245, 47.125), (7.125, 47.035)]
    ),  # Biel
    Polygon(
        [(7.660, 46.740), (7.760, 46.690), (7.850, 46.680), (7.840, 46.665), (7.700, 46.680),
         (7.640, 46.735)]
    ),  # Thun
    Polygon(
        [(7.880, 46.690), (8.000, 46.760), (8.050, 46.755), (7.930, 46.675)]
    ),  # Brienz
    Polygon(
        [(8.305, 47.047), (8.380, 47.000), (8.480, 47.000), (8.600, 46.990), (8.610, 46.960),
         (8.450, 46.975), (8.350, 46.975), (8.290, 47.030)]
    ),  # Lucerne
    Polygon(
        [(8.480, 47.150), (8.530, 47.150), (8.510, 47.050), (8.470, 47.070)]
    ),  # Zug
    Polygon(
        [(8.541, 47.366), (8.555, 47.354), (8.600, 47.310), (8.700, 47.240), (8.850, 47.210),
         (8.900, 47.180), (8.830, 47.200), (8.690, 47.225), (8.580, 47.290), (8.536, 47.350)]
    ),  # Zurich
    Polygon(
        [(9.080, 47.130), (9.300, 47.140), (9.300, 47.110), (9.080, 47.115)]
    ),  # Walensee
    Polygon(
        [(8.870, 46.000), (8.960, 45.995), (9.080, 46.010), (9.050, 45.930), (8.940, 45.950),
         (8.880, 45.970)]
    ),  # Lugano
    Polygon(
        [(8.795, 46.160), (8.860, 46.150), (8.750, 46.060), (8.700, 46.080)]
    ),  # Maggiore
    Polygon(
        [(9.050, 47.680), (9.600, 47.480), (9.650, 47.540), (9.180, 47.700)]
    ),  # Constance
)
# High-mountain zones (roughly above 2,000 m, valleys left out): no images at all.
MOUNTAINS = (
    Polygon(
        [(7.050, 46.330), (7.500, 46.380), (7.800, 46.400), (8.100, 46.450), (8.400, 46.580),
         (8.300, 46.620), (8.000, 46.560), (7.850, 46.520), (7.600, 46.450), (7.300, 46.410),
         (7.100, 46.400)]
    ),  # Bernese Alps
    Polygon(
        [(7.100, 45.950), (7.400, 45.980), (7.650, 45.960), (7.850, 45.950), (8.000, 46.080),
         (7.950, 46.200), (7.750, 46.220), (7.500, 46.180), (7.300, 46.150), (7.150, 46.050)]
    ),  # Valais Alps
    Polygon(
        [(8.450, 46.550), (8.750, 46.560), (9.050, 46.700), (9.100, 46.850), (8.950, 46.900),
         (8.700, 46.780), (8.500, 46.650)]
    ),  # Gotthard, Uri and Glarus Alps
    Polygon(
        [(8.450, 46.350), (8.750, 46.350), (8.950, 46.450), (8.700, 46.500), (8.500, 46.450)]
    ),  # Lepontine
    Polygon(
        [(9.000, 46.450), (9.250, 46.450), (9.200, 46.600), (9.050, 46.600)]
    ),  # Adula
    Polygon(
        [(9.750, 46.320), (10.000, 46.320), (10.050, 46.420), (9.900, 46.450), (9.780, 46.420)]
    ),  # Bernina
    Polygon(
        [(9.950, 46.700), (10.150, 46.780), (10.200, 46.880), (10.050, 46.900), (9.950, 46.820)]
    ),  # Silvretta
)


def outline_path() -> Path:
    """The AOI file of the national outline, shipped beside Zurich's."""
    return Path(__file__).resolve().parent.parent / "data" / "switzerland.geojson"
# fmt: on


@functools.cache
def outline() -> Polygon:
    """The national outline of ``outline_path()``."""
    return shape(json.loads(outline_path().read_text())["features"][0]["geometry"])


# Where no image lies: the lakes and the high mountains (one geometry, prepared per thread).
_void = per_thread_prepared(lambda: unary_union([*LAKES, *MOUNTAINS]))


def in_void(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    return shapely.contains_xy(_void(), lon, lat)


def point_in_void(lon: float, lat: float) -> bool:
    return bool(shapely.contains_xy(_void(), lon, lat))


def tile_geometry(x: int, y: int) -> tuple[tuple[float, float, float, float], bool]:
    """The z14 tile's bounds and whether it touches a lake or a mountain zone."""
    bounds = tile_bounds(x, y)
    return bounds, bool(shapely.intersects(_void(), box(*bounds)))


def density_per_km2(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Images per km2 at scale 1.0: settlements, roads, countryside; 0 in the void or abroad."""
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    east_km, north_km = _km(lon, lat)
    total = np.where(shapely.contains_xy(PLATEAU, lon, lat), _PLATEAU_PER_KM2, _COUNTRYSIDE_PER_KM2)
    for _, c_lon, c_lat, peak, sigma in SETTLEMENTS:
        cx, cy = _km(c_lon, c_lat)
        near = _within(east_km, north_km, (cx, cy), (cx, cy), 5 * sigma)
        d2 = (east_km[near] - cx) ** 2 + (north_km[near] - cy) ** 2
        total[near] += peak * np.exp(-d2 / (2 * sigma * sigma))
    road_peak = _ROAD_IMAGES_PER_KM / (math.sqrt(2 * math.pi) * _ROAD_SIGMA_KM)
    for a, b in ROADS:
        start, end = _km(*_TOWNS[a]), _km(*_TOWNS[b])
        near = _within(east_km, north_km, start, end, 5 * _ROAD_SIGMA_KM)
        d2 = _squared_distance_to_segment(east_km[near], north_km[near], start, end)
        total[near] += road_peak * np.exp(-d2 / (2 * _ROAD_SIGMA_KM**2))
    total[~shapely.contains_xy(outline(), lon, lat)] = 0.0
    total[in_void(lon, lat)] = 0.0
    return total


@functools.cache
def expected_images_by_tile() -> tuple[
    dict[tuple[int, int], float], dict[tuple[int, int], np.ndarray]
]:
    """For every z14 tile that can hold images: its mean number of images at scale 1.0, and the
    weights of its density cells (``DENSITY_GRID**2`` values, row-major from the north-west, sum 1)."""
    west, south, east, north = outline().bounds
    nw, se = mercantile.tile(west, north, ZOOM), mercantile.tile(east, south, ZOOM)
    gx, gy = np.meshgrid(np.arange(nw.x, se.x + 1), np.arange(nw.y, se.y + 1), indexing="ij")
    gx, gy = gx.ravel(), gy.ravel()
    boxes = shapely.box(tile_lon(gx), tile_lat(gy + 1), tile_lon(gx + 1), tile_lat(gy))
    inside = shapely.intersects(outline(), boxes)
    gx, gy = gx[inside], gy[inside]
    lon, lat = cell_centres(gx, gy)
    dens = density_per_km2(lon.ravel(), lat.ravel()).reshape(lon.shape)
    expected = dens.mean(axis=(1, 2)) * tile_area_km2(gx, gy)
    table: dict[tuple[int, int], float] = {}
    weights: dict[tuple[int, int], np.ndarray] = {}
    for i in np.flatnonzero(expected > 0).tolist():
        key = (int(gx[i]), int(gy[i]))
        table[key] = float(expected[i])
        weights[key] = dens[i].ravel() / dens[i].sum()
    return table, weights


def _km(lon, lat):
    """Kilometres east and north of the country's middle (an equirectangular plane)."""
    return (lon - _MIDDLE[0]) * _KM_PER_DEG_LON, (lat - _MIDDLE[1]) * KM_PER_DEG_LAT


def _within(east_km, north_km, a, b, margin_km: float) -> np.ndarray:
    """Points inside the box around segment a-b grown by margin_km (beyond it a term is ~0)."""
    return (
        (east_km >= min(a[0], b[0]) - margin_km)
        & (east_km <= max(a[0], b[0]) + margin_km)
        & (north_km >= min(a[1], b[1]) - margin_km)
        & (north_km <= max(a[1], b[1]) + margin_km)
    )


def _squared_distance_to_segment(px, py, a, b) -> np.ndarray:
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2
