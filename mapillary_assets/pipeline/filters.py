"""Polygon tagging and the spacing filter along sequences (Dagster-free, pure).

`tag_in_polygons` marks images inside user-supplied filter polygons; `spacing_filter` thins every
sequence so that consecutive kept images are at least `inside_m` apart inside those polygons and
`outside_m` apart elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

EARTH_RADIUS_M = 6_371_008.8
_POLYGON_TYPES = {"Polygon", "MultiPolygon"}


class FilterPolygonError(ValueError):
    """The filter polygon file cannot be used; the message names the file and the fix."""


def load_filter_polygons(path: str | Path, layer: str | int | None = None) -> BaseGeometry:
    """Read polygons from a GeoJSON or GeoPackage file as one (Multi)Polygon in EPSG:4326.

    Files without a CRS are taken to be EPSG:4326 (the GeoJSON default).
    """
    import geopandas  # heavy import, only needed here

    path = Path(path)
    if not path.is_file():
        raise FilterPolygonError(
            f"filter polygon file {path} does not exist: pass a GeoJSON or GPKG path"
        )
    try:
        frame = geopandas.read_file(path, layer=layer, engine="pyogrio")
    except Exception as exc:  # pyogrio raises several unrelated types for unreadable files
        raise FilterPolygonError(
            f"filter polygon file {path} is not a readable GeoJSON/GeoPackage ({type(exc).__name__}: {exc})"
        ) from None
    geometries = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty]
    if geometries.empty:
        raise FilterPolygonError(
            f"filter polygon file {path} holds no geometries: add at least one polygon"
        )
    bad_types = sorted(set(geometries.geom_type) - _POLYGON_TYPES)
    if bad_types:
        raise FilterPolygonError(
            f"filter polygon file {path} holds {', '.join(bad_types)} geometries: only Polygon and "
            "MultiPolygon can define a filter area"
        )
    if geometries.crs is None:
        geometries = geometries.set_crs("EPSG:4326")
    elif not geometries.crs.equals("EPSG:4326"):
        geometries = geometries.to_crs("EPSG:4326")
    merged = shapely.union_all(shapely.make_valid(geometries.to_numpy()))
    # make_valid can leave lines/points from degenerate rings; only the areal part filters.
    if merged.geom_type == "GeometryCollection":
        merged = shapely.union_all([g for g in merged.geoms if g.geom_type in _POLYGON_TYPES])
    if merged.is_empty:
        raise FilterPolygonError(
            f"filter polygon file {path} holds only empty or degenerate polygons"
        )
    return merged


def tag_in_polygons(lon, lat, polygons: BaseGeometry | None) -> np.ndarray:
    """True where (lon, lat) lies strictly inside `polygons`; all False when polygons is None."""
    lon = np.asarray(lon, dtype="float64")
    lat = np.asarray(lat, dtype="float64")
    if lon.shape != lat.shape:
        raise ValueError(f"lon and lat differ in shape: {lon.shape} vs {lat.shape}")
    if polygons is None or polygons.is_empty:
        return np.zeros(lon.shape, dtype=bool)
    shapely.prepare(polygons)
    return np.asarray(shapely.contains_xy(polygons, lon, lat), dtype=bool)


def _capture_times_ms(frame: pd.DataFrame) -> np.ndarray:
    """Capture times as int64 ms; missing times sort after every real one."""
    if "captured_at" in frame.columns:
        times = pd.to_datetime(frame["captured_at"], utc=True)
        missing = times.isna().to_numpy()
        values = times.to_numpy(dtype="datetime64[ms]", na_value=np.datetime64("NaT")).astype(
            "int64"
        )
    elif "captured_at_ms" in frame.columns:
        numbers = pd.to_numeric(frame["captured_at_ms"])
        missing = numbers.isna().to_numpy()
        values = numbers.fillna(0).to_numpy(dtype="int64")
    else:
        raise ValueError("spacing_filter needs a captured_at or captured_at_ms column")
    return np.where(missing, np.iinfo("int64").max, values)


def spacing_filter(
    frame: pd.DataFrame, inside_m: float = 100.0, outside_m: float = 1000.0
) -> np.ndarray:
    """Keep flags (aligned with `frame`'s rows) thinning each sequence by distance.

    Per sequence, ordered by capture time (ties by image_id), the first image is kept; each later
    image is kept when its great-circle distance to the last kept image is >= its threshold:
    `inside_m` when its `in_filter_area` is True, else `outside_m`. Images without a sequence id
    are each their own sequence (always kept); images without finite lon/lat are never kept. A
    missing `in_filter_area` column means every image is outside.
    """
    if inside_m < 0 or outside_m < 0:
        raise ValueError("spacing thresholds must be >= 0 metres")
    count = len(frame)
    if count == 0:
        return np.zeros(0, dtype=bool)

    sequence_codes, _ = pd.factorize(frame["sequence_id"], use_na_sentinel=True)
    lonely = sequence_codes < 0
    # Missing sequence ids each become a sequence of their own.
    sequence_codes = np.where(lonely, sequence_codes.max() + 1 + np.cumsum(lonely), sequence_codes)
    id_rank, _ = pd.factorize(frame["image_id"].astype("string"), sort=True)
    times = _capture_times_ms(frame)
    order = np.lexsort((id_rank, times, sequence_codes))
    all_lat = frame["lat"].to_numpy(dtype="float64", na_value=np.nan)
    all_lon = frame["lon"].to_numpy(dtype="float64", na_value=np.nan)
    # Images without coordinates are never kept and never become the anchor of a walk.
    order = order[np.isfinite(all_lat[order]) & np.isfinite(all_lon[order])]
    keep = np.zeros(count, dtype=bool)
    if order.size == 0:
        return keep

    lat = np.radians(all_lat[order])
    lon = np.radians(all_lon[order])
    if "in_filter_area" in frame.columns:
        inside = frame["in_filter_area"].fillna(False).to_numpy(dtype=bool)[order]
    else:
        inside = np.zeros(order.size, dtype=bool)
    threshold_m = np.where(inside, float(inside_m), float(outside_m))
    # Compare in haversine space: distance >= d  <=>  hav(d / R) <= hav(central angle).
    half_angle = np.minimum(threshold_m / (2 * EARTH_RADIUS_M), math.pi / 2)
    threshold_hav = np.sin(half_angle) ** 2
    sorted_codes = sequence_codes[order]
    starts = np.empty(order.size, dtype=bool)
    starts[0] = True
    starts[1:] = sorted_codes[1:] != sorted_codes[:-1]

    kept_sorted = _greedy_walk(
        lat.tolist(), lon.tolist(), np.cos(lat).tolist(), threshold_hav.tolist(), starts.tolist()
    )
    keep[order[np.asarray(kept_sorted, dtype=bool)]] = True
    return keep


def _greedy_walk(
    lat: list, lon: list, cos_lat: list, threshold_hav: list, starts: list
) -> list[bool]:
    """The inherently sequential part, on plain lists (several times faster than numpy scalars)."""
    sin = math.sin
    kept = [False] * len(lat)
    anchor_lat = anchor_lon = anchor_cos = 0.0
    for i, start in enumerate(starts):
        if not start:
            dlat = sin((lat[i] - anchor_lat) * 0.5)
            dlon = sin((lon[i] - anchor_lon) * 0.5)
            if dlat * dlat + anchor_cos * cos_lat[i] * dlon * dlon < threshold_hav[i]:
                continue
        kept[i] = True
        anchor_lat, anchor_lon, anchor_cos = lat[i], lon[i], cos_lat[i]
    return kept
