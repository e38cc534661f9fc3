"""GeoPackage output: layers, CRS, typed columns, spatial index, atomic replacement."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess

import geopandas
import pandas as pd
import pyogrio
import pytest

from mapillary_assets.pipeline.geopackage import write_geopackage
from mapillary_assets.pipeline.staging import connect_staging, load_staging
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.test_staging import write_sample_stages

LAYERS = {"images": "Point", "images_filtered": "Point", "sequences": "LineString"}


def _staging(layout: DataLayout, with_data: bool = True):
    if with_data:
        write_sample_stages(layout)
    load_staging(layout)
    return connect_staging(layout.staging_db_path, read_only=True)


@pytest.fixture
def layout(tmp_path) -> DataLayout:
    return DataLayout(tmp_path / "data")


def test_layers_crs_counts_and_spatial_index(layout):
    con = _staging(layout)
    try:
        counts = write_geopackage(con, layout.geopackage_path)
    finally:
        con.close()
    path = layout.geopackage_path
    assert counts == {"images": 8, "images_filtered": 4, "sequences": 2}
    assert {name: kind for name, kind in pyogrio.list_layers(path)} == LAYERS
    for layer, expected in counts.items():
        info = pyogrio.read_info(path, layer=layer)
        assert info["crs"] == "EPSG:4326"
        assert info["features"] == expected
        assert info["geometry_name"] == "geom"
    with sqlite3.connect(path) as db:
        indexed = db.execute(
            "SELECT table_name FROM gpkg_extensions WHERE extension_name = 'gpkg_rtree_index' ORDER BY 1"
        ).fetchall()
        assert indexed == [(layer,) for layer in sorted(LAYERS)]
        assert db.execute("SELECT count(*) FROM rtree_images_geom").fetchone() == (8,)
        assert db.execute("SELECT DISTINCT srs_id FROM gpkg_geometry_columns").fetchall() == [(4326,)]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    if shutil.which("ogrinfo"):
        result = subprocess.run(["ogrinfo", "-ro", "-so", "-al", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_image_columns_are_typed_and_never_urls(layout):
    con = _staging(layout)
    try:
        write_geopackage(con, layout.geopackage_path)
    finally:
        con.close()
    images = geopandas.read_file(layout.geopackage_path, layer="images", engine="pyogrio")
    assert images.crs.to_epsg() == 4326
    assert isinstance(images["captured_at"].dtype, pd.DatetimeTZDtype)
    assert str(images["captured_at"].dt.tz) == "UTC"
    info = pyogrio.read_info(layout.geopackage_path, layer="images")
    field_types = {
        name: (kind, subtype) for name, kind, subtype in zip(info["fields"], info["ogr_types"], info["ogr_subtypes"])
    }
    expected = {
        "image_id": ("OFTString", "OFSTNone"),
        "sequence_id": ("OFTString", "OFSTNone"),
        "creator_id": ("OFTString", "OFSTNone"),
        "organization_id": ("OFTString", "OFSTNone"),  # all NULL here, still a string field
        "captured_at": ("OFTDateTime", "OFSTNone"),
        "lon": ("OFTReal", "OFSTNone"),
        "blur_value": ("OFTReal", "OFSTNone"),
        "width": ("OFTInteger64", "OFSTNone"),
        "in_filter_area": ("OFTInteger", "OFSTBoolean"),
        "keep_spacing": ("OFTInteger", "OFSTBoolean"),
        "is_blurry": ("OFTInteger", "OFSTBoolean"),
    }
    assert {name: field_types[name] for name in expected} == expected
    assert pd.api.types.is_string_dtype(images["image_id"])
    assert pd.api.types.is_bool_dtype(images["keep_spacing"])
    assert not [column for column in images.columns if "url" in column.lower()]
    first = images.set_index("image_id").loc["1"]
    assert first["captured_at"] == pd.Timestamp(1_600_000_000_500, unit="ms", tz="UTC")
    assert first["creator_id"] == "999" and first.geometry.x == pytest.approx(8.50001)
    filtered = geopandas.read_file(layout.geopackage_path, layer="images_filtered", engine="pyogrio")
    assert list(filtered.columns) == list(images.columns)
    assert sorted(filtered["image_id"]) == sorted(images.loc[images["keep_spacing"], "image_id"])


def test_sequences_follow_capture_time(layout):
    con = _staging(layout)
    try:
        write_geopackage(con, layout.geopackage_path)
    finally:
        con.close()
    sequences = geopandas.read_file(layout.geopackage_path, layer="sequences", engine="pyogrio")
    images = geopandas.read_file(layout.geopackage_path, layer="images", engine="pyogrio")
    assert sorted(sequences["sequence_id"]) == ["sA", "sC"]
    assert isinstance(sequences["first_captured_at"].dtype, pd.DatetimeTZDtype)
    for row in sequences.itertuples():
        members = images[images["sequence_id"] == row.sequence_id].sort_values(["captured_at", "image_id"])
        assert row.image_count == len(members)
        assert list(row.geometry.coords) == [(p.x, p.y) for p in members.geometry]


def test_empty_staging_gives_empty_layers(layout):
    con = _staging(layout, with_data=False)
    try:
        assert write_geopackage(con, layout.geopackage_path) == dict.fromkeys(LAYERS, 0)
    finally:
        con.close()
    assert {name: kind for name, kind in pyogrio.list_layers(layout.geopackage_path)} == LAYERS


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(layout, tmp_path):
    con = _staging(layout)
    try:
        write_geopackage(con, layout.geopackage_path)
    finally:
        con.close()
    before = layout.geopackage_path.read_bytes()
    broken = connect_staging(tmp_path / "no_tables.duckdb")  # no staging tables -> the write fails
    try:
        with pytest.raises(Exception, match="images"):
            write_geopackage(broken, layout.geopackage_path)
    finally:
        broken.close()
    assert layout.geopackage_path.read_bytes() == before
    assert sorted(p.name for p in layout.geopackage_path.parent.iterdir()) == [layout.geopackage_path.name]
