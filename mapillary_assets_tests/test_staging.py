"""Staging: Parquet stage files -> DuckDB-spatial tables, rebuilt atomically."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pyarrow as pa
import pytest
from shapely.geometry import box

from mapillary_assets.pipeline import staging, staging_images
from mapillary_assets.pipeline.staging import connect_staging, load_staging, spatial_extension_path
from mapillary_assets.storage import TEMP_MARKER, DataLayout, StorageError, write_parquet_atomic
from mapillary_assets_tests.support.staging_samples import (
    T0_MS,
    discovery_table,
    timestamp_ms,
    write_sample_stages,
)


@pytest.fixture
def layout(tmp_path) -> DataLayout:
    return DataLayout(tmp_path / "data")


def _rows(con, sql: str) -> list[tuple]:
    return con.execute(sql).fetchall()


def _column_types(con, table: str) -> dict[str, str]:
    return {
        name: kind
        for name, kind in _rows(con, f"SELECT column_name, column_type FROM (DESCRIBE {table})")
    }


def test_extension_path_and_connection_load_spatial_offline(tmp_path):
    assert spatial_extension_path().is_file()
    con = connect_staging(tmp_path / "x.duckdb")
    assert _rows(con, "SELECT ST_AsText(ST_Point(1, 2))") == [("POINT (1 2)",)]
    con.close()
    with pytest.raises(StorageError, match="materialise the staging asset"):
        connect_staging(tmp_path / "missing.duckdb", read_only=True)


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(staging.SpatialExtensionError, match="pip install duckdb-extension-spatial"):
        spatial_extension_path()


def test_load_staging_builds_joined_tables(layout):
    write_sample_stages(layout)
    counts = load_staging(layout, filter_polygons=box(8.49, 46.99, 8.51, 47.02))
    assert counts == {
        "discovered_images": 9,  # raw rows, image 5 is in both partitions
        "image_metadata": 3,
        "metadata_failures": 2,
        "downloads": 2,
        "blur_scores": 1,
        "images": 8,
        "sequences": 2,
    }
    con = connect_staging(layout.staging_db_path, read_only=True)
    try:
        assert _rows(con, "SELECT count(DISTINCT image_id), count(*) FROM images") == [(8, 8)]
        assert _rows(con, "SELECT DISTINCT ST_GeometryType(geom)::VARCHAR FROM images") == [
            ("POINT",)
        ]
        assert _rows(
            con, "SELECT DISTINCT ST_GeometryType(geom)::VARCHAR FROM discovered_images"
        ) == [("POINT",)]
        image = dict(
            zip(
                ["lon", "captured_at", "creator_id", "make", "download_status", "thumbnail_path", "blur_value",
                 "is_blurry", "blur_backend", "metadata_status"],
                _rows(con, "SELECT lon, captured_at, creator_id, make, download_status, thumbnail_path, blur_value, "
                           "is_blurry, blur_backend, metadata_status FROM images WHERE image_id = '1'")[0],
            )
        )  # fmt: skip
        assert image == {
            "lon": 8.50001,
            "captured_at": timestamp_ms(T0_MS + 500),
            "creator_id": "999",
            "make": "Canon",
            "download_status": "ok",
            "thumbnail_path": "thumbnails/1024/001/000/1.jpg",
            "blur_value": 42.5,
            "is_blurry": True,
            "blur_backend": "opencv",
            "metadata_status": "ok",
        }
        # metadata without a position falls back to discovery's; no metadata at all -> discovery values
        assert _rows(
            con, "SELECT lon, download_status, creator_id FROM images WHERE image_id = '2'"
        ) == [(8.5, "failed", "999")]
        assert _rows(
            con,
            "SELECT captured_at, creator_id, download_status, metadata_status, metadata_failure_reason, blur_value "
            "FROM images WHERE image_id = '4'",
        ) == [
            (
                timestamp_ms(T0_MS + 4000),
                "555",
                "pending",
                "failed",
                "unknown image (code 100)",
                None,
            )
        ]
        assert _rows(
            con, "SELECT image_id, reason, transient, code, chunk FROM metadata_failures ORDER BY 1"
        ) == [
            ("4", "unknown image (code 100)", False, 100, "chunk-000000"),
            ("8", "timeout", True, None, "chunk-000000"),
        ]
        assert _rows(con, "SELECT DISTINCT chunk FROM image_metadata ORDER BY 1") == [
            ("chunk-000000",), ("chunk-000001",)
        ]  # fmt: skip
        # filter flags: sA lies in the polygon (100 m threshold, images 300 m apart -> all kept)
        assert _rows(con, "SELECT image_id FROM images WHERE in_filter_area ORDER BY 1") == [
            (i,) for i in "12345"
        ]  # fmt: skip
        assert _rows(con, "SELECT image_id FROM images WHERE keep_spacing ORDER BY 1") == [
            ("1",), ("2",), ("3",), ("4",), ("5",), ("6",), ("8",)
        ]  # fmt: skip
        types = _column_types(con, "images")
        assert types["captured_at"] == "TIMESTAMP WITH TIME ZONE"
        assert types["creator_id"] == types["organization_id"] == types["image_id"] == "VARCHAR"
        assert types["in_filter_area"] == types["keep_spacing"] == "BOOLEAN"
        assert types["geom"] == "GEOMETRY"
    finally:
        con.close()


def test_sequences_are_lines_in_capture_order(layout):
    write_sample_stages(layout)
    load_staging(layout)
    con = connect_staging(layout.staging_db_path, read_only=True)
    try:
        rows = _rows(
            con,
            "SELECT sequence_id, image_count, first_captured_at, last_captured_at, ST_GeometryType(geom)::VARCHAR, "
            "ST_NPoints(geom) FROM sequences ORDER BY sequence_id",
        )
        assert rows == [
            ("sA", 5, timestamp_ms(T0_MS + 500), timestamp_ms(T0_MS + 5000), "LINESTRING", 5),
            ("sC", 2, timestamp_ms(T0_MS + 1000), timestamp_ms(T0_MS + 2000), "LINESTRING", 2),
        ]
        line_lats = [
            lat
            for (lat,) in _rows(
                con,
                "SELECT ST_Y(ST_PointN(geom, i::INTEGER)) FROM sequences, range(1, 6) AS r(i) "
                "WHERE sequence_id = 'sA' ORDER BY i",
            )
        ]
        assert line_lats == sorted(line_lats) and len(line_lats) == 5
        assert _rows(
            con, "SELECT ST_X(ST_StartPoint(geom)) FROM sequences WHERE sequence_id = 'sC'"
        ) == [(8.71,)]
    finally:
        con.close()


def test_reload_is_idempotent_and_ignores_temporary_leftovers(layout):
    write_sample_stages(layout)
    first = load_staging(layout)
    (layout.discovery_dir / f"12-1-1.parquet{TEMP_MARKER}abc123").write_bytes(b"half written")
    assert load_staging(layout) == first
    assert not [p for p in layout.staging_db_path.parent.iterdir() if p != layout.staging_db_path]


def test_empty_and_partial_stages_keep_typed_schemas(layout):
    counts = load_staging(layout)
    assert counts == dict.fromkeys(staging.TABLES, 0)
    write_parquet_atomic(discovery_table([("1", "s", 8.5, 47.0, T0_MS), ("2", "s", 8.6, 47.0, T0_MS + 1)]),
                         layout.discovery_path("12-0-0"))  # fmt: skip
    counts = load_staging(layout)
    assert counts["images"] == 2 and counts["image_metadata"] == 0 and counts["sequences"] == 1
    con = connect_staging(layout.staging_db_path, read_only=True)
    try:
        metadata_types = _column_types(con, "image_metadata")
        assert metadata_types["captured_at"] == "TIMESTAMP WITH TIME ZONE"
        assert metadata_types["has_sfm_cluster"] == "BOOLEAN"
        assert metadata_types["width"] == "BIGINT"
        assert _column_types(con, "blur_scores")["blur_value"] == "DOUBLE"
        assert _rows(
            con,
            "SELECT download_status, metadata_status, keep_spacing FROM images ORDER BY image_id",
        ) == [
            ("pending", "pending", True),
            ("pending", "pending", True),  # ~7.6 km apart, more than the 1000 m outside threshold
        ]
    finally:
        con.close()


def test_empty_discovery_file_is_fine(layout):
    write_parquet_atomic(discovery_table([]), layout.discovery_path("12-0-0"))
    assert load_staging(layout)["images"] == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet_names_the_file_and_keeps_previous_db(layout, damage):
    write_sample_stages(layout)
    before = load_staging(layout)
    bad = layout.metadata_path("chunk-000007")
    good = layout.metadata_path("chunk-000000").read_bytes()
    bad.write_bytes(b"not parquet at all" if damage == "garbage" else good[: len(good) // 2])
    with pytest.raises(StorageError, match=r"chunk-000007\.parquet.*delete it and re-materialise"):
        load_staging(layout)
    con = connect_staging(layout.staging_db_path, read_only=True)
    try:
        assert {
            table: _rows(con, f"SELECT count(*) FROM {table}")[0][0] for table in staging.TABLES
        } == before
    finally:
        con.close()
    assert sorted(p.name for p in layout.staging_db_path.parent.iterdir()) == [
        layout.staging_db_path.name
    ]


def test_filter_polygons_from_file(layout, tmp_path):
    write_sample_stages(layout)
    polygon_file = tmp_path / "filter.geojson"
    polygon_file.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": '
        '{"type": "Polygon", "coordinates": [[[8.69, 47.19], [8.72, 47.19], [8.72, 47.21], [8.69, 47.21], '
        "[8.69, 47.19]]]}}]}"
    )
    load_staging(
        layout, filter_polygons=polygon_file, inside_spacing_m=100.0, outside_spacing_m=5000.0
    )
    con = connect_staging(layout.staging_db_path, read_only=True)
    try:
        assert _rows(con, "SELECT image_id FROM images WHERE in_filter_area ORDER BY 1") == [
            ("7",),
            ("8",),
        ]
        # sA (outside, 300 m steps, 1200 m long) keeps only its first image at 5000 m spacing
        assert _rows(con, "SELECT image_id FROM images WHERE keep_spacing ORDER BY 1") == [
            ("1",), ("6",), ("7",), ("8",)
        ]  # fmt: skip
    finally:
        con.close()


def test_metadata_columns_cover_the_decoder_schema():
    decoders = pytest.importorskip("mapillary_assets.api.entity_decoders")
    schema = getattr(decoders, "IMAGE_SCHEMA", None)
    if schema is None:
        pytest.skip("api.entity_decoders.IMAGE_SCHEMA not written yet")
    assert set(schema.names) <= set(staging.METADATA_COLUMNS)


def test_contract_mismatch_is_a_storage_error(layout):
    bad = discovery_table([("1", "s", 8.5, 47.0, T0_MS)]).set_column(
        2, "lon", pa.array(["east"], pa.string())
    )
    write_parquet_atomic(bad, layout.discovery_path("12-0-0"))
    with pytest.raises(StorageError, match="do not match their data contract"):
        load_staging(layout)
    assert not layout.staging_db_path.parent.exists() or not any(
        layout.staging_db_path.parent.iterdir()
    )


def test_open_readers_keep_their_snapshot_while_staging_is_replaced(layout):
    write_parquet_atomic(
        discovery_table([("1", "s", 8.5, 47.0, T0_MS)]), layout.discovery_path("12-0-0")
    )
    load_staging(layout)
    reader = connect_staging(layout.staging_db_path, read_only=True)
    try:
        write_sample_stages(layout)
        load_staging(layout)
        assert _rows(reader, "SELECT count(*) FROM images") == [(1,)]
    finally:
        reader.close()
    fresh = connect_staging(layout.staging_db_path, read_only=True)
    try:
        frame = staging.read_table(fresh, "images")
        assert len(frame) == 8 and isinstance(frame.loc[0, "geom"], bytes)
    finally:
        fresh.close()


def test_all_null_object_columns_from_pandas_are_unified(layout):
    """pandas writes all-None object columns as Parquet `null`; they must merge with typed files."""
    write_parquet_atomic(discovery_table([("1", "s", 8.5, 47.0, T0_MS), ("2", "s", 8.6, 47.0, T0_MS + 1)]),
                         layout.discovery_path("12-0-0"))  # fmt: skip
    nothing = pd.Series([None], dtype=object)
    write_parquet_atomic(
        pd.DataFrame({"image_id": ["1"], "path": nothing, "bytes": [0], "status": ["failed"], "reason": nothing,
                      "transient": [True]}),
        layout.downloads_path("chunk-000000"),
    )  # fmt: skip
    write_parquet_atomic(
        pd.DataFrame({"image_id": ["1", "2"], "path": [None, "thumbnails/2.jpg"], "bytes": [0, 5],
                      "status": ["failed", "ok"], "reason": ["retry", None], "transient": [False, False]}),
        layout.downloads_path("chunk-000001"),
    )  # fmt: skip
    write_parquet_atomic(
        pd.DataFrame({"image_id": ["2"], "blur_value": [float("nan")], "sobel_value": [float("nan")],
                      "is_blurry": [False], "backend": ["opencv"], "reason": ["unreadable jpeg"]}),
        layout.blur_path("chunk-000001"),
    )  # fmt: skip
    assert load_staging(layout)["downloads"] == 3
    con = connect_staging(layout.staging_db_path, read_only=True)
    try:
        assert _column_types(con, "downloads")["path"] == "VARCHAR"
        rows = _rows(con, "SELECT image_id, download_status, thumbnail_path, blur_failure_reason FROM images "
                          "ORDER BY image_id")  # fmt: skip
        assert rows == [
            ("1", "failed", None, None),
            ("2", "ok", "thumbnails/2.jpg", "unreadable jpeg"),
        ]
    finally:
        con.close()


def test_sequences_built_in_batches_equal_one_batch():
    """At 1.2 M images one list() aggregate over every point ran out of DuckDB's 1 GB limit: batches of
    sequence-id ranges must give exactly the table one batch gives (null sequences and singletons too)."""
    con = connect_staging(":memory:")
    con.execute(
        """CREATE TABLE images AS SELECT 'img' || i AS image_id,
               CASE WHEN i % 97 = 0 THEN NULL WHEN i = 4999 THEN 'single' ELSE 'seq' || (i % 53) END AS sequence_id,
               (i % 7 = 0) AS keep_spacing, TIMESTAMP '2020-01-01' + to_seconds((5000 - i) * 3) AS captured_at,
               ST_Point(8 + i / 1e5, 47 + (i % 53) / 1e3) AS geom
           FROM range(5000) t(i)"""
    )
    query = (
        "SELECT sequence_id, image_count, kept_count, first_captured_at, last_captured_at, ST_AsText(geom) "
        "FROM sequences"
    )
    staging_images.build_sequences(con, batch_images=10**9)
    one_batch = con.execute(query).fetchall()
    con.execute("DROP TABLE sequences")
    batches = []
    real_execute = con.execute
    staging_images.build_sequences(_CountingInserts(con, batches), batch_images=300)
    many_batches = real_execute(query).fetchall()
    assert len(batches) >= 10
    assert many_batches == one_batch and len(one_batch) == 53  # 'single' has one image: no line
    assert [row[0] for row in one_batch] == sorted(row[0] for row in one_batch)


class _CountingInserts:
    def __init__(self, con, inserts):
        self.con, self.inserts = con, inserts

    def execute(self, sql, *args):
        if sql.lstrip().startswith("INSERT"):
            self.inserts.append(args)
        return self.con.execute(sql, *args)
