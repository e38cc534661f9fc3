"""Small hand-written stage files (discovery, metadata, failures, downloads, blur) for the tests of
staging, the GeoPackage and the charts."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from mapillary_assets.pipeline.staging import connect_staging, load_staging
from mapillary_assets.storage import DataLayout, write_parquet_atomic

T0_MS = 1_600_000_000_000  # 2020-09-13T12:26:40Z
METRES_PER_DEGREE_LAT = 111_195.08


def timestamp_ms(value_ms: int) -> datetime:
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
                    "captured_at": timestamp_ms(T0_MS + 500),
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
                    "captured_at": timestamp_ms(T0_MS + 2000),
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
        metadata_table([{"image_id": "7", "captured_at": timestamp_ms(T0_MS + 2000), "lon": 8.7, "lat": 47.2,
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


def built_staging(layout: DataLayout, with_data: bool = True):
    if with_data:
        write_sample_stages(layout)
    load_staging(layout)
    return connect_staging(layout.staging_db_path, read_only=True)
