"""Staging: Parquet stage files -> DuckDB-spatial tables, rebuilt atomically."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pytest
from shapely.geometry import box

from mapillary_assets.pipeline import staging, staging_images
from mapillary_assets.pipeline.staging import connect_staging, load_staging, spatial_extension_path
from mapillary_assets.storage import TEMP_MARKER, DataLayout, StorageError, write_parquet_atomic

T0_MS = 1_600_000_000_000  # 2020-09-13T12:26:40Z
METRES_PER_DEGREE_LAT = 111_195.08


def _ms(value_ms: int) -> datetime:
    return datetime.fromtimestamp(value_ms / 1000, tz=UTC)


def discovery_table(rows: list[tuple]) -> pa.Table:
    """rows: (image_id, sequence_id, lon, lat, captured_at_ms)."""
    ids, sequences, lons, lats, times = (
        (list(column) for column in zip(*rows)) if rows else ([],) * 5
    )
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "sequence_id": pa.array(sequences, pa.string()),
            "lon": pa.array(lons, pa.float64()),
            "lat": pa.array(lats, pa.float64()),
            "captured_at_ms": pa.array(times, pa.int64()),
            "compass_angle": pa.array([90.0] * len(ids), pa.float64()),
            "is_pano": pa.array([False] * len(ids), pa.bool_()),
            "organization_id": pa.array([None] * len(ids), pa.int64()),
            "creator_id": pa.array([555] * len(ids), pa.int64()),
            "tile_z14": pa.array(["14/8580/5737"] * len(ids), pa.string()),
        }
    )


def metadata_table(rows: list[dict]) -> pa.Table:
    columns = {
        "image_id": pa.string(),
        "captured_at": pa.timestamp("ms", tz="UTC"),
        "lon": pa.float64(),
        "lat": pa.float64(),
        "sequence_id": pa.string(),
        "creator_id": pa.string(),
        "make": pa.string(),
        "width": pa.int64(),
        "quality_score": pa.float64(),
        "has_mesh": pa.bool_(),
    }
    return pa.table(
        {name: pa.array([row.get(name) for row in rows], kind) for name, kind in columns.items()}
    )


def write_sample_stages(layout: DataLayout) -> None:
    """Two discovery partitions (image 5 in both), two metadata chunks, a failure, downloads, blur.

    Sequence sA: images 1-5 spaced 300 m apart northwards (rows written out of capture order);
    sB: image 6 alone; sC: images 7 and 8.
    """
    step = 300 / METRES_PER_DEGREE_LAT
    seq_a = [(str(i), "sA", 8.5, 47.0 + (i - 1) * step, T0_MS + i * 1000) for i in (3, 1, 5, 2, 4)]
    write_parquet_atomic(
        discovery_table(seq_a + [("6", "sB", 8.6, 47.1, T0_MS)]),
        layout.discovery_path("12-2145-1434"),
    )
    write_parquet_atomic(
        discovery_table(
            [
                ("5", "sA", 8.5, 47.0 + 4 * step, T0_MS + 5000),
                ("7", "sC", 8.7, 47.2, T0_MS + 2000),
                ("8", "sC", 8.71, 47.2, T0_MS + 1000),
            ]
        ),
        layout.discovery_path("12-2145-1435"),
    )
    write_parquet_atomic(
        metadata_table(
            [
                # image 1: the metadata position and time must win over discovery's
                {
                    "image_id": "1",
                    "captured_at": _ms(T0_MS + 500),
                    "lon": 8.50001,
                    "lat": 47.0,
                    "sequence_id": "sA",
                    "creator_id": "999",
                    "make": "Canon",
                    "width": 2048,
                    "quality_score": 0.9,
                    "has_mesh": True,
                },
                {
                    "image_id": "2",
                    "captured_at": _ms(T0_MS + 2000),
                    "lon": None,
                    "lat": None,
                    "sequence_id": "sA",
                    "creator_id": "999",
                    "make": None,
                    "width": 1024,
                    "quality_score": None,
                    "has_mesh": False,
                },
            ]
        ),
        layout.metadata_path("chunk-000000"),
    )
    write_parquet_atomic(
        metadata_table([{"image_id": "7", "captured_at": _ms(T0_MS + 2000), "lon": 8.7, "lat": 47.2,
                         "sequence_id": "sC"}]),
        layout.metadata_path("chunk-000001"),
    )  # fmt: skip
    write_parquet_atomic(
        pa.table(
            {
                "image_id": pa.array(["4", "8"], pa.string()),
                "reason": pa.array(["unknown image (code 100)", "timeout"], pa.string()),
                "transient": pa.array([False, True]),
                "code": pa.array([100, None], pa.int64()),
            }
        ),
        layout.metadata_failures_path("chunk-000000"),
    )
    write_parquet_atomic(
        pa.table(
            {
                "image_id": pa.array(["1", "2"], pa.string()),
                "path": pa.array(["thumbnails/1024/001/000/1.jpg", None], pa.string()),
                "bytes": pa.array([12345, 0], pa.int64()),
                "status": pa.array(["ok", "failed"], pa.string()),
                "reason": pa.array([None, "corrupt jpeg"], pa.string()),
                "transient": pa.array([False, False]),
            }
        ),
        layout.downloads_path("chunk-000000"),
    )
    write_parquet_atomic(
        pa.table(
            {
                "image_id": pa.array(["1"], pa.string()),
                "blur_value": pa.array([42.5]),
                "sobel_value": pa.array([7.25]),
                "is_blurry": pa.array([True]),
                "backend": pa.array(["opencv"], pa.string()),
            }
        ),
        layout.blur_path("chunk-000000"),
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
    monkeypatch.setattr(staging.importlib.util, "find_spec", lambda name: None)
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
            "captured_at": _ms(T0_MS + 500),
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
        ) == [(_ms(T0_MS + 4000), "555", "pending", "failed", "unknown image (code 100)", None)]
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
            ("sA", 5, _ms(T0_MS + 500), _ms(T0_MS + 5000), "LINESTRING", 5),
            ("sC", 2, _ms(T0_MS + 1000), _ms(T0_MS + 2000), "LINESTRING", 2),
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
