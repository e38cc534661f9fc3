"""Filter polygons, polygon tagging and the spacing filter along sequences."""

from __future__ import annotations

import math
import time

import geopandas
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import LineString, MultiPolygon, Point, box

from mapillary_assets.pipeline.filters import (
    FilterPolygonError,
    load_filter_polygons,
    spacing_filter,
    tag_in_polygons,
)

METRES_PER_DEGREE_LAT = 111_195.08  # on the 6,371,008.8 m sphere


def test_tag_in_polygons_is_exact():
    square = box(0.0, 0.0, 1.0, 1.0)
    lon = [0.5, 1.5, 0.999999, 1.0, np.nan, 5.5]
    lat = [0.5, 0.5, 0.999999, 0.5, 0.5, 5.5]
    assert tag_in_polygons(lon, lat, square).tolist() == [True, False, True, False, False, False]
    both = MultiPolygon([square, box(5.0, 5.0, 6.0, 6.0)])
    assert tag_in_polygons(lon, lat, both).tolist() == [True, False, True, False, False, True]
    assert tag_in_polygons(lon, lat, None).tolist() == [False] * 6
    assert tag_in_polygons([], [], square).shape == (0,)


def test_load_filter_polygons_geojson_and_reprojected_gpkg(tmp_path):
    features = geopandas.GeoDataFrame(
        {"name": ["a", "b"]},
        geometry=[box(8.5, 47.3, 8.6, 47.4), box(8.6, 47.3, 8.7, 47.4)],
        crs="EPSG:4326",
    )
    features.to_file(tmp_path / "filter.geojson", driver="GeoJSON", engine="pyogrio")
    merged = load_filter_polygons(tmp_path / "filter.geojson")
    assert merged.geom_type == "Polygon"
    assert merged.bounds == pytest.approx((8.5, 47.3, 8.7, 47.4))

    features.to_crs("EPSG:2056").to_file(tmp_path / "filter.gpkg", driver="GPKG", engine="pyogrio")
    reprojected = load_filter_polygons(tmp_path / "filter.gpkg")
    assert reprojected.bounds == pytest.approx((8.5, 47.3, 8.7, 47.4), abs=1e-3)
    assert tag_in_polygons([8.55, 8.8], [47.35, 47.35], reprojected).tolist() == [True, False]


def test_load_filter_polygons_rejects_bad_input(tmp_path):
    with pytest.raises(FilterPolygonError, match="does not exist"):
        load_filter_polygons(tmp_path / "missing.geojson")
    garbage = tmp_path / "garbage.geojson"
    garbage.write_text("{ not json")
    with pytest.raises(FilterPolygonError, match="not a readable"):
        load_filter_polygons(garbage)
    lines = tmp_path / "lines.geojson"
    geopandas.GeoDataFrame(
        geometry=[LineString([(0, 0), (1, 1)]), Point(0, 0)], crs="EPSG:4326"
    ).to_file(lines, driver="GeoJSON", engine="pyogrio")
    with pytest.raises(FilterPolygonError, match="LineString, Point geometries"):
        load_filter_polygons(lines)


def _walk(
    sequence_id: str, metres: list[float], inside: list[bool] | bool = False, start_ms: int = 0
) -> list[dict]:
    """Images walking north from (8.5, 47.0), `metres` along the meridian, one second apart."""
    flags = inside if isinstance(inside, list) else [inside] * len(metres)
    return [
        {
            "image_id": f"{sequence_id}{index:02d}",
            "sequence_id": sequence_id,
            "captured_at_ms": start_ms + index * 1000,
            "lon": 8.5,
            "lat": 47.0 + distance / METRES_PER_DEGREE_LAT,
            "in_filter_area": flag,
        }
        for index, (distance, flag) in enumerate(zip(metres, flags))
    ]


def _kept(frame: pd.DataFrame, **thresholds) -> list[str]:
    return sorted(frame.loc[spacing_filter(frame, **thresholds), "image_id"])


def test_spacing_uses_the_last_kept_image_and_the_applicable_threshold():
    frame = pd.DataFrame(
        _walk("out", [0, 400, 900, 1100, 1500, 2200])  # outside: 1000 m
        + _walk("in", [0, 50, 99, 101, 150, 202], inside=True)  # inside: 100 m
        # mixed: the threshold of the candidate image applies, measured from the last kept one
        + _walk("mix", [0, 150, 600, 1200], inside=[False, True, False, False])
    )
    # Shuffled rows: the filter orders by capture time itself and answers in row order.
    frame = frame.sample(frac=1.0, random_state=7).reset_index(drop=True)
    assert _kept(frame) == [
        "in00",
        "in03",
        "in05",
        "mix00",
        "mix01",
        "mix03",
        "out00",
        "out03",
        "out05",
    ]
    assert _kept(frame, inside_m=10.0, outside_m=500.0) == [
        "in00", "in01", "in02", "in04", "in05", "mix00", "mix01", "mix03", "out00", "out02", "out04", "out05",
    ]  # fmt: skip


def test_spacing_ties_break_by_image_id_and_singletons_are_kept():
    frame = pd.DataFrame(
        [
            # "12" and "11" share a capture time; "11" sorts first, so it is the anchor
            {"image_id": "12", "sequence_id": "t", "captured_at_ms": 0, "lon": 8.5, "lat": 47.0},
            {"image_id": "11", "sequence_id": "t", "captured_at_ms": 0, "lon": 8.5,
             "lat": 47.0 + 500 / METRES_PER_DEGREE_LAT},
            {"image_id": "13", "sequence_id": "t", "captured_at_ms": 1, "lon": 8.5,
             "lat": 47.0 + 1200 / METRES_PER_DEGREE_LAT},
            {"image_id": "21", "sequence_id": "single", "captured_at_ms": 0, "lon": 8.5, "lat": 47.0},
            {"image_id": "31", "sequence_id": None, "captured_at_ms": 0, "lon": 8.5, "lat": 47.0},
            {"image_id": "32", "sequence_id": None, "captured_at_ms": 0, "lon": 8.5, "lat": 47.0},
        ]
    )  # fmt: skip
    frame["in_filter_area"] = False
    assert _kept(frame) == ["11", "21", "31", "32"]


def test_spacing_accepts_datetimes_and_skips_missing_coordinates():
    frame = pd.DataFrame(_walk("d", [0, 300, 600, 1300, 2400]))
    frame["captured_at"] = pd.to_datetime(frame.pop("captured_at_ms"), unit="ms", utc=True)
    frame.loc[1, "captured_at"] = pd.NaT  # unknown time: walked last
    frame.loc[3, "lon"] = np.nan  # no position: never kept
    # order d00 d02 d03(nan) d04 d01 -> d00 kept, d04 (2400 m) kept, d01 (2100 m back) kept
    assert _kept(frame) == ["d00", "d01", "d04"]
    assert spacing_filter(frame.iloc[0:0]).shape == (0,)


def test_spacing_filter_is_fast_enough():
    rows = 200_000
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "image_id": np.arange(rows).astype(str),
            "sequence_id": (np.arange(rows) // 500).astype(str),
            "captured_at_ms": np.arange(rows, dtype="int64"),
            "lon": 8.5 + np.cumsum(rng.normal(0, 5e-5, rows)),
            "lat": 47.0 + np.cumsum(rng.normal(0, 5e-5, rows)),
            "in_filter_area": rng.random(rows) < 0.5,
        }
    )
    started = time.perf_counter()
    keep = spacing_filter(frame)
    assert time.perf_counter() - started < 10.0
    assert 400 <= keep.sum() < rows
    # The first 20 sequences (rows in capture order) against a plain walk written from the docstring.
    checked = 20 * 500
    assert keep[:checked].tolist() == _reference_walk(frame.iloc[:checked])


def _reference_walk(frame: pd.DataFrame) -> list[bool]:
    """Keep flags of rows already in capture order per sequence: the first of a sequence, then each
    image at least its threshold (100 m inside the filter area, 1000 m outside) from the last kept."""
    keep, anchor, sequence = [], None, None
    for row in frame.itertuples():
        if row.sequence_id != sequence:
            sequence, anchor = row.sequence_id, None
        threshold = 100.0 if row.in_filter_area else 1000.0
        lon1, lat1, lon2, lat2 = (
            map(math.radians, (anchor.lon, anchor.lat, row.lon, row.lat))
            if anchor
            else (0, 0, 0, 0)
        )
        a = (
            math.sin((lat2 - lat1) / 2) ** 2
            + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
        )
        kept = anchor is None or 2 * 6_371_008.8 * math.asin(math.sqrt(a)) >= threshold
        keep.append(kept)
        if kept:
            anchor = row
    return keep
