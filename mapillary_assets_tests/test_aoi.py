"""AOI loading and validation: every bad input is an AoiError saying what is wrong; partition tiles."""

from __future__ import annotations

import json

import mercantile
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from mapillary_assets.pipeline.aoi import (
    DEFAULT_AOI_PATH,
    MAX_PARTITIONS,
    AoiError,
    count_outside,
    load_aoi,
    parse_tile_key,
    partition_tiles,
    tile_key,
)

SQUARE = [[8.50, 47.36], [8.56, 47.36], [8.56, 47.40], [8.50, 47.40]]


def write_json(tmp_path, document, name="aoi.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def polygon_geometry(ring):
    return {"type": "Polygon", "coordinates": [ring + [ring[0]]]}


def test_default_is_shipped_zurich_polygon():
    aoi = load_aoi()
    assert aoi.source == str(DEFAULT_AOI_PATH)
    assert DEFAULT_AOI_PATH.is_file()
    assert aoi.geometry.is_valid and aoi.geometry.geom_type == "Polygon"
    assert aoi.geometry.contains(shapely.Point(8.5417, 47.3769))  # Zurich Hauptbahnhof
    assert 50 < aoi.area_km2 < 150


@pytest.mark.parametrize("wrap", ["geometry", "feature", "collection"])
def test_geojson_forms_are_accepted(tmp_path, wrap):
    geometry = polygon_geometry(SQUARE)
    feature = {"type": "Feature", "properties": {}, "geometry": geometry}
    document = {
        "geometry": geometry,
        "feature": feature,
        "collection": {"type": "FeatureCollection", "features": [feature]},
    }[wrap]
    aoi = load_aoi(write_json(tmp_path, document))
    assert aoi.geometry.equals(Polygon(SQUARE))


def test_multipolygon_and_multi_feature_collection_union(tmp_path):
    west, east = box(8.50, 47.36, 8.52, 47.38), box(8.54, 47.36, 8.56, 47.38)
    multi = {
        "type": "MultiPolygon",
        "coordinates": [shapely.geometry.mapping(p)["coordinates"] for p in (west, east)],
    }
    assert load_aoi(write_json(tmp_path, multi, "multi.geojson")).geometry.area == pytest.approx(
        2 * west.area
    )
    collection = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(p)}
            for p in (west, east)
        ],
    }
    assert load_aoi(write_json(tmp_path, collection, "fc.geojson")).geometry.area == pytest.approx(
        2 * west.area
    )


def test_coordinate_list_open_or_closed():
    assert load_aoi(coordinates=SQUARE).geometry.equals(Polygon(SQUARE))
    assert load_aoi(coordinates=SQUARE + [SQUARE[0]]).source == "coordinate list"


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "not GeoJSON"),
        (json.dumps({"type": "Point", "coordinates": [8.5, 47.3]}), "is a Point, not a polygon"),
        (
            json.dumps({"type": "LineString", "coordinates": [[8.5, 47.3], [8.6, 47.4]]}),
            "not a polygon",
        ),
        (json.dumps({"type": "FeatureCollection", "features": []}), "without features"),
        (json.dumps({"type": "Feature", "properties": {}, "geometry": None}), "has no geometry"),
        (json.dumps({"type": "Polygon", "coordinates": []}), "empty"),
        (
            json.dumps(
                {"type": "Polygon", "coordinates": [[["a", "b"], [1, 2], [3, 4], ["a", "b"]]]}
            ),
            "number pairs",
        ),
        (
            json.dumps(
                {"type": "Polygon", "coordinates": [[[8.5, 47.3], [8.6, 47.3], [8.5, 47.3]]]}
            ),
            "zero area",
        ),
        # a hole outside its shell
        (
            json.dumps(
                {
                    "type": "Polygon",
                    "coordinates": [
                        [[8.5, 47.3], [8.6, 47.3], [8.6, 47.4], [8.5, 47.3]],
                        [[9.5, 47.3], [9.6, 47.3], [9.6, 47.4], [9.5, 47.3]],
                    ],
                }
            ),
            "invalid .*Hole lies outside shell",
        ),
        # bow tie: self-intersecting ring
        (
            json.dumps(
                polygon_geometry([[8.50, 47.36], [8.56, 47.40], [8.56, 47.36], [8.50, 47.40]])
            ),
            "Self-intersection",
        ),
        (
            json.dumps(
                {
                    **polygon_geometry(SQUARE),
                    "crs": {"type": "name", "properties": {"name": "EPSG:2056"}},
                }
            ),
            "reproject it to EPSG:4326",
        ),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, content, expected):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AoiError, match=expected) as info:
        load_aoi(path)
    assert str(path) in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(AoiError, match="does not exist: set MAPILLARY_AOI"):
        load_aoi(tmp_path / "nope.geojson")
    with pytest.raises(AoiError, match="is a folder"):
        load_aoi(tmp_path)


def test_swapped_lat_lon_is_named():
    # an area around lon 100, lat 10 written [lat, lon]: "latitude" 100 is impossible
    swapped = [
        [lat, lon] for lon, lat in [[100.0, 10.0], [101.0, 10.0], [101.0, 11.0], [100.0, 11.0]]
    ]
    with pytest.raises(AoiError, match="out of range.*longitude and latitude are swapped"):
        load_aoi(coordinates=swapped)


def test_out_of_range_without_swap_hint():
    with pytest.raises(AoiError, match="out of range") as info:
        load_aoi(coordinates=[[200, 10], [201, 10], [201, 100], [200, 100]])
    assert "swapped" not in str(info.value)


def test_polar_latitude_is_rejected():
    with pytest.raises(AoiError, match="85.05"):
        load_aoi(coordinates=[[0, 80], [10, 80], [10, 89], [0, 89]])


@pytest.mark.parametrize(
    "coordinates, expected",
    [
        ([[8.5, 47.3], [8.6, 47.4]], "at least 3 distinct"),
        ([[8.5, 47.3], [8.6, 47.4], [8.7, 47.5]], "zero area"),
        ([[8.5, float("nan")], [8.6, 47.4], [8.7, 47.5]], "NaN"),
        ([[8.5, 47.3, 1.0], [8.6, 47.4, 1.0], [8.7, 47.5, 1.0]], "number pairs"),
        ([["x", 47.3], [8.6, 47.4], [8.7, 47.5]], "number pairs"),
        ([[-179, -80], [179, -80], [179, 80], [-179, 80]], "implausibly large"),
    ],
)
def test_bad_coordinate_lists(coordinates, expected):
    with pytest.raises(AoiError, match=expected):
        load_aoi(coordinates=coordinates)


def test_source_and_coordinates_together_rejected(tmp_path):
    with pytest.raises(AoiError, match="not both"):
        load_aoi(tmp_path / "a.geojson", coordinates=SQUARE)


def test_zurich_partition_tiles_at_zoom_12_follow_the_polygon():
    aoi = load_aoi()
    tiles = partition_tiles(aoi, 12)
    assert tiles == sorted(tiles, key=lambda t: (t.x, t.y))
    assert all(t.z == 12 for t in tiles)
    in_bbox = list(mercantile.tiles(*aoi.geometry.bounds, zooms=12))
    expected = [
        t for t in in_bbox if aoi.geometry.intersection(box(*mercantile.bounds(t))).area > 0
    ]
    assert sorted(tiles) == sorted(expected)
    assert len(tiles) < len(in_bbox)  # the polygon, not its bounding box


def test_partition_tile_that_only_touches_the_edge_is_excluded():
    west, south, east, north = mercantile.bounds(mercantile.Tile(2145, 1434, 12))
    aoi = load_aoi(coordinates=[[west, south], [east, south], [east, north], [west, north]])
    assert partition_tiles(aoi, 12) == [mercantile.Tile(2145, 1434, 12)]


def test_partition_count_above_ceiling_suggests_coarser_zoom():
    aoi = load_aoi(coordinates=[[5, 45], [25, 45], [25, 55], [5, 55]])
    with pytest.raises(AoiError, match=r"above the 100,000.*MAPILLARY_PARTITION_ZOOM=12 or lower"):
        partition_tiles(aoi, 13)
    assert len(partition_tiles(aoi, 12)) <= MAX_PARTITIONS


@pytest.mark.parametrize("zoom", [-1, 14, 15, 12.0, "12", True])
def test_partition_zoom_must_be_below_14(zoom):
    with pytest.raises(AoiError, match="partition zoom"):
        partition_tiles(load_aoi(), zoom)


def test_tile_keys_round_trip():
    tile = mercantile.Tile(2145, 1434, 12)
    assert tile_key(tile) == "12-2145-1434"
    assert parse_tile_key("12-2145-1434") == tile
    for bad in ("12/2145/1434", "12-2145", "x-1-2", "3-8-0", "14-1-1", ""):
        with pytest.raises(AoiError):
            parse_tile_key(bad)


def test_count_outside_sums_batches_with_the_boundary_inside_and_nan_outside():
    batches = [
        (np.array([0.5, 2.0]), np.array([0.5, 0.5])),  # inside, outside
        (np.array([1.0, np.nan]), np.array([1.0, 0.5])),  # a corner (inside), a missing point
        (np.array([]), np.array([])),
    ]
    assert count_outside(box(0, 0, 1, 1), batches) == (2, 4)
    assert count_outside(box(0, 0, 1, 1), []) == (0, 0)
