"""GeoPackage output: layers, CRS, typed columns, spatial index, atomic replacement."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import geopandas
import numpy as np
import pandas as pd
import pyogrio
import pytest

from mapillary_assets.pipeline.geopackage import layer_points, write_geopackage
from mapillary_assets.pipeline.staging import connect_staging, image_points
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.staging_samples import built_staging

LAYERS = {"images": "Point", "images_filtered": "Point", "sequences": "LineString"}
# Debian 12's GDAL 3.6 validator (package python3-gdal; scripts/test.sh installs it), run by the system
# Python that has its osgeo bindings: the reader an LTR-distribution user opens the file with.
SYSTEM_PYTHON = Path("/usr/bin/python3")
DEBIAN_VALIDATORS = (
    Path("/usr/share/doc/python3-gdal/examples/validate_gpkg.py"),
    Path("/usr/lib/python3/dist-packages/osgeo_utils/samples/validate_gpkg.py"),
)


@pytest.fixture
def layout(tmp_path) -> DataLayout:
    return DataLayout(tmp_path / "data")


def test_layers_crs_counts_and_spatial_index(layout):
    con = built_staging(layout)
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
        assert db.execute("SELECT DISTINCT srs_id FROM gpkg_geometry_columns").fetchall() == [
            (4326,)
        ]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _ogrinfo(*args: str) -> str:
    result = subprocess.run(["ogrinfo", "-ro", *args], capture_output=True, text=True)
    assert result.returncode == 0 and "ERROR" not in result.stderr, result.stderr
    return result.stdout


def _feature_counts(ogrinfo_summary: str) -> dict[str, int]:
    names = [
        line.split(": ", 1)[1]
        for line in ogrinfo_summary.splitlines()
        if line.startswith("Layer name: ")
    ]
    counts = [
        int(line.split(": ")[1])
        for line in ogrinfo_summary.splitlines()
        if line.startswith("Feature Count: ")
    ]
    return dict(zip(names, counts, strict=True))


@pytest.mark.skipif(
    not shutil.which("ogrinfo"),
    reason="needs GDAL's ogrinfo (gdal-bin; scripts/test.sh installs it)",
)
def test_gdal_ogrinfo_reads_the_counts_and_uses_the_rtree(layout):
    con = built_staging(layout)
    try:
        counts = write_geopackage(con, layout.geopackage_path)
    finally:
        con.close()
    path = str(layout.geopackage_path)
    assert _feature_counts(_ogrinfo("-so", "-al", path)) == counts
    index_query = "SELECT " + ", ".join(
        f"HasSpatialIndex('{name}', 'geom') AS {name}" for name in sorted(LAYERS)
    )
    has_index = _ogrinfo("-q", path, "-sql", index_query)
    assert [line.split("= ")[1] for line in has_index.splitlines() if "(Integer) =" in line] == [
        "1"
    ] * 3
    # A map view's read: the points in a window, through the R-tree, against the points counted apart.
    images = geopandas.read_file(path, layer="images", engine="pyogrio")
    west, south = images.geometry.x.median(), images.geometry.y.min() - 1
    inside = int(((images.geometry.x >= west) & (images.geometry.y >= south)).sum())
    assert 0 < inside < len(images)
    window = _ogrinfo("-so", "-spat", str(west), str(south), "180", "90", path, "images")
    assert _feature_counts(window) == {"images": inside}


def test_image_columns_are_typed_and_never_urls(layout):
    con = built_staging(layout)
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
        name: (kind, subtype)
        for name, kind, subtype in zip(info["fields"], info["ogr_types"], info["ogr_subtypes"])
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
    filtered = geopandas.read_file(
        layout.geopackage_path, layer="images_filtered", engine="pyogrio"
    )
    assert list(filtered.columns) == list(images.columns)
    assert sorted(filtered["image_id"]) == sorted(images.loc[images["keep_spacing"], "image_id"])


def test_sequences_follow_capture_time(layout):
    con = built_staging(layout)
    try:
        write_geopackage(con, layout.geopackage_path)
    finally:
        con.close()
    sequences = geopandas.read_file(layout.geopackage_path, layer="sequences", engine="pyogrio")
    images = geopandas.read_file(layout.geopackage_path, layer="images", engine="pyogrio")
    assert sorted(sequences["sequence_id"]) == ["sA", "sC"]
    assert isinstance(sequences["first_captured_at"].dtype, pd.DatetimeTZDtype)
    for row in sequences.itertuples():
        members = images[images["sequence_id"] == row.sequence_id].sort_values(
            ["captured_at", "image_id"]
        )
        assert row.image_count == len(members)
        assert list(row.geometry.coords) == [(p.x, p.y) for p in members.geometry]


def test_empty_staging_gives_empty_layers(layout):
    con = built_staging(layout, with_data=False)
    try:
        assert write_geopackage(con, layout.geopackage_path) == dict.fromkeys(LAYERS, 0)
    finally:
        con.close()
    assert {name: kind for name, kind in pyogrio.list_layers(layout.geopackage_path)} == LAYERS


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(layout, tmp_path):
    con = built_staging(layout)
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
    assert sorted(p.name for p in layout.geopackage_path.parent.iterdir()) == [
        layout.geopackage_path.name
    ]


def _debian_validator() -> Path:
    found = next((path for path in DEBIAN_VALIDATORS if path.is_file()), None)
    if found is None or not SYSTEM_PYTHON.exists():
        pytest.skip(
            "Debian's validate_gpkg.py is missing: apt-get install python3-gdal (scripts/test.sh does)"
        )
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "from osgeo import gdal"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(
            f"the system Python lacks GDAL's bindings (python3-gdal): {probe.stderr.strip()[-200:]}"
        )
    return found


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SYSTEM_PYTHON), str(_debian_validator()), "-k", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write(layout: DataLayout, path: Path, **options) -> dict[str, int]:
    con = (
        built_staging(layout)
        if not layout.staging_db_path.exists()
        else connect_staging(layout.staging_db_path, read_only=True)
    )
    try:
        return write_geopackage(con, path, **options)
    finally:
        con.close()


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


@pytest.mark.parametrize("version", [None, "1.2", "1.3"])
def test_debian_gdal36_validator_passes_the_default_and_older_versions(layout, version):
    path = layout.geopackage_path
    _write(layout, path, **({"version": version} if version else {}))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _user_version(path) == {"1.2": 10200, "1.3": 10300, None: 10300}[version]
    with sqlite3.connect(path) as db:
        triggers = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        }
    assert {f"rtree_{layer}_geom_update{n}" for layer in LAYERS for n in (1, 3)} <= triggers


def test_version_14_is_an_option_the_old_validator_rejects(layout):
    path = layout.geopackage_path
    assert _write(layout, path, version="1.4") == {
        "images": 8,
        "images_filtered": 4,
        "sequences": 2,
    }
    assert _user_version(path) == 10400
    result = _validate(path)
    assert result.returncode == 1
    assert "Req 75: rtree_images_geom_update1 trigger missing" in result.stdout


def test_unknown_version_is_refused_before_anything_is_written(layout):
    with pytest.raises(ValueError, match="1.2, 1.3, 1.4"):
        _write(layout, layout.geopackage_path, version="2.0")
    assert not layout.geopackage_path.exists()


def test_small_batches_write_the_same_layers(layout, tmp_path):
    whole, batched = tmp_path / "whole.gpkg", tmp_path / "batched.gpkg"
    assert _write(layout, whole) == _write(layout, batched, batch_rows=3)
    for layer in LAYERS:
        expected = geopandas.read_file(whole, layer=layer, engine="pyogrio")
        got = geopandas.read_file(batched, layer=layer, engine="pyogrio")
        pd.testing.assert_frame_equal(got, expected)
    with sqlite3.connect(batched) as db:
        assert db.execute("SELECT count(*) FROM rtree_images_geom").fetchone() == (8,)


def test_a_layer_written_in_parts_is_the_same_with_every_feature_indexed(layout, tmp_path):
    whole, parts = tmp_path / "whole.gpkg", tmp_path / "parts.gpkg"
    assert _write(layout, whole) == _write(layout, parts, batch_rows=2, index_rows=3)
    for layer in LAYERS:
        expected = geopandas.read_file(whole, layer=layer, engine="pyogrio")
        got = geopandas.read_file(parts, layer=layer, engine="pyogrio")
        pd.testing.assert_frame_equal(got, expected)
    with sqlite3.connect(parts) as db:  # each feature's box is in its layer's R-tree
        for layer, kind in LAYERS.items():
            inside = (
                " WHERE r.minx <= lon AND lon <= r.maxx AND r.miny <= lat AND lat <= r.maxy"
                if kind == "Point"
                else ""
            )
            indexed = db.execute(
                f"SELECT count(*) FROM {layer} JOIN rtree_{layer}_geom r ON r.id = {layer}.fid{inside}"
            ).fetchone()[0]
            assert indexed == db.execute(f"SELECT count(*) FROM {layer}").fetchone()[0] > 0
    assert _validate(parts).returncode == 0


def test_layer_points_and_staging_points_stream_the_same_points_in_batches(layout, tmp_path):
    con = built_staging(layout)
    try:
        write_geopackage(con, layout.geopackage_path)
        staged = list(image_points(con, batch_rows=3))
        expected = con.execute("SELECT lon, lat FROM images ORDER BY lon, lat").fetchall()
    finally:
        con.close()
    published = list(layer_points(layout.geopackage_path, batch_rows=3))
    for batches in (staged, published):
        assert [len(lon) for lon, _ in batches] == [3, 3, 2]
        points = sorted(
            zip(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
        )
        assert points == sorted(expected)
