"""DuckDB-spatial staging tables built from the per-partition Parquet files (Dagster-free).

DuckDB allows one writer process per database file while partitioned assets run concurrently, so
every partition writes its own Parquet file and this single staging step (a Dagster concurrency pool
of 1) rebuilds all tables from the files present. The new database is built under a temporary name
and renamed onto `DataLayout.staging_db_path`: readers never see a half-built database, and a
failure (a corrupt input, a crash) leaves the previous one in place.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from shapely.geometry.base import BaseGeometry

from mapillary_assets.duckdb_extensions import offline_extension_path
from mapillary_assets.pipeline.aoi import POINT_BATCH_ROWS
from mapillary_assets.pipeline.filters import load_filter_polygons
from mapillary_assets.pipeline.staging_images import build_images, build_sequences
from mapillary_assets.storage import TEMP_MARKER, DataLayout, StorageError

# DuckDB spills to disk beyond this instead of growing with the image count (its default is 80 % of RAM).
# Some of its allocations bypass the limit (DuckDB's OOM guide: each thread's table-write buffers, about
# 150 MB more here), so it sits well under the 2 GB budget of the publish process. Every intermediate is a
# table of the database file, never a TEMP table: temporary tables stayed in memory and ran out of a
# 128 MB limit at 216 k images where file tables spilled. 256 MB publishes 1.08 M images with a peak
# 1.13x that of 216 k (128 MB ran out at 1.08 M in the images join). No query here needs insertion order
# kept (every ordered read says ORDER BY), and dropping it lets large CREATE TABLE AS stream with less memory.
DUCKDB_MEMORY_LIMIT = "256MB"
# Each DuckDB thread keeps its own buffers beside the limit (sort runs, the Parquet writer's row group):
# with one thread the 537 k-image Switzerland world's staging peaked at 409 MB instead of 430, the
# GeoPackage's images layer at 417 instead of 459, the GeoParquet copy at 441 instead of 525 (process PSS).
DUCKDB_THREADS = 1


class SpatialExtensionError(RuntimeError):
    """The offline DuckDB spatial extension is missing or does not load."""


# Column contracts of the stage files (ARCHITECTURE.md "Data contracts"), as DuckDB types. Columns
# missing from every file become typed NULLs, so empty or partial stages keep the same schema.
DISCOVERY_COLUMNS: dict[str, str] = {
    "image_id": "VARCHAR",
    "sequence_id": "VARCHAR",
    "lon": "DOUBLE",
    "lat": "DOUBLE",
    "captured_at_ms": "BIGINT",
    "compass_angle": "DOUBLE",
    "is_pano": "BOOLEAN",
    "organization_id": "BIGINT",
    "creator_id": "BIGINT",
    "tile_z14": "VARCHAR",
}
# api/entity_decoders.IMAGE_SCHEMA column names; typed here so staging does not depend on the client.
METADATA_COLUMNS: dict[str, str] = {
    "image_id": "VARCHAR",
    "captured_at": "TIMESTAMPTZ",
    "lon": "DOUBLE",
    "lat": "DOUBLE",
    "computed_lon": "DOUBLE",
    "computed_lat": "DOUBLE",
    "altitude": "DOUBLE",
    "computed_altitude": "DOUBLE",
    "compass_angle": "DOUBLE",
    "computed_compass_angle": "DOUBLE",
    "sequence_id": "VARCHAR",
    "creator_id": "VARCHAR",
    "creator_username": "VARCHAR",
    "camera_type": "VARCHAR",
    "make": "VARCHAR",
    "model": "VARCHAR",
    "width": "BIGINT",
    "height": "BIGINT",
    "is_pano": "BOOLEAN",
    "quality_score": "DOUBLE",
    "exif_orientation": "BIGINT",
    "atomic_scale": "DOUBLE",
    "merge_cc": "VARCHAR",
    "has_mesh": "BOOLEAN",
    "has_sfm_cluster": "BOOLEAN",
}
FAILURE_COLUMNS: dict[str, str] = {
    "image_id": "VARCHAR",
    "reason": "VARCHAR",
    "transient": "BOOLEAN",
    "code": "BIGINT",
}
DOWNLOAD_COLUMNS: dict[str, str] = {
    "image_id": "VARCHAR",
    "path": "VARCHAR",
    "bytes": "BIGINT",
    "status": "VARCHAR",
    "reason": "VARCHAR",
    "transient": "BOOLEAN",
}
# A bucket's downloads rows also say where each image lies in its chunk's tar shard (pipeline/thumbnail_shards.py).
SHARD_DOWNLOAD_COLUMNS: dict[str, str] = {"offset": "BIGINT", "length": "BIGINT"}
BLUR_COLUMNS: dict[str, str] = {
    "image_id": "VARCHAR",
    "blur_value": "DOUBLE",
    "sobel_value": "DOUBLE",
    "is_blurry": "BOOLEAN",
    "backend": "VARCHAR",
    "reason": "VARCHAR",  # written by pipeline/blur.py for unreadable images (not in the documented contract)
}


@dataclass(frozen=True)
class _Stage:
    table: str
    folder: str  # a DataLayout folder key
    columns: dict[str, str]
    source_column: str  # partition or chunk key, taken from the file name
    accepts: Callable[[str], bool]
    derived: str = ""  # extra select expressions over the typed columns


def _is_failures(name: str) -> bool:
    return name.endswith(".failures.parquet")


_STAGES = (
    _Stage("discovered_images", DataLayout.discovery_folder, DISCOVERY_COLUMNS, "partition", lambda n: True,
           derived=", ST_Point(lon, lat) AS geom"),
    _Stage("image_metadata", DataLayout.metadata_folder, METADATA_COLUMNS, "chunk",
           lambda n: not _is_failures(n)),
    _Stage("metadata_failures", DataLayout.metadata_folder, FAILURE_COLUMNS, "chunk", _is_failures),
    _Stage("downloads", DataLayout.downloads_folder, DOWNLOAD_COLUMNS, "chunk", lambda n: True),
    _Stage("blur_scores", DataLayout.blur_folder, BLUR_COLUMNS, "chunk", lambda n: True),
)  # fmt: skip

TABLES = tuple(stage.table for stage in _STAGES) + ("images", "sequences")


def spatial_extension_path() -> Path:
    """The spatial extension shipped by the `duckdb-extension-spatial` wheel for this DuckDB version."""
    return offline_extension_path("spatial", SpatialExtensionError)


def connect_staging(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open a staging database with the spatial extension loaded offline and the session in UTC."""
    extension = spatial_extension_path()
    if read_only and str(path) != ":memory:" and not Path(path).exists():
        raise StorageError(f"{path} does not exist: materialise the staging asset first")
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        con.execute(f"LOAD '{_sql_string(str(extension))}'")
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        con.execute(f"SET threads = {DUCKDB_THREADS}")
        con.execute("SET preserve_insertion_order = false")
    except duckdb.Error as exc:
        con.close()
        raise SpatialExtensionError(
            f"could not load the DuckDB spatial extension from {extension}: {exc}; reinstall "
            f"duckdb-extension-spatial=={duckdb.__version__}"
        ) from None
    return con


def load_staging(
    layout: DataLayout,
    filter_polygons: BaseGeometry | str | Path | None = None,
    inside_spacing_m: float = 100.0,
    outside_spacing_m: float = 1000.0,
    area: BaseGeometry | None = None,
    discovery_keys: Collection[str] | None = None,
) -> dict[str, int]:
    """Rebuild every staging table from the stage files present; returns table -> row count.

    `filter_polygons` (a geometry in EPSG:4326 or a GeoJSON/GPKG path) sets `in_filter_area` and with
    it which spacing threshold applies to an image. `area` and `discovery_keys` hold `images` to the
    current area of interest: only the discovery files of these keys (the area's tile partitions, the
    sequence route) are read, and only points in `area` are kept; files of an earlier area stay on
    disk, unpublished.
    """
    if isinstance(filter_polygons, (str, Path)):
        filter_polygons = load_filter_polygons(filter_polygons)
    target = layout.staging_db_path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=target.name + TEMP_MARKER, dir=target.parent)
    os.close(fd)
    temporary = Path(name)
    temporary.unlink()  # DuckDB refuses to open an existing empty file as a database
    try:
        con = connect_staging(temporary)
        try:
            layout.store.prepare_duckdb(con)  # a bucket's files are read over S3 (httpfs)
            # Each statement commits on its own: one transaction around them all held every table's
            # rows in transaction-local memory until the end. The database is a temporary file renamed
            # into place only when complete, so readers still never see a partial rebuild.
            # a bucket's thumbnails are shards: the published rows carry each one's byte range too
            sharded = not layout.is_local
            for stage in _STAGES:
                if sharded and stage.table == "downloads":
                    stage = dataclasses.replace(
                        stage, columns=DOWNLOAD_COLUMNS | SHARD_DOWNLOAD_COLUMNS
                    )
                _load_stage(con, layout, stage, discovery_keys)
            assigned = _load_chunk_assignment(con, layout)
            build_images(
                con,
                filter_polygons,
                inside_spacing_m,
                outside_spacing_m,
                only_assigned=assigned,
                area=area,
                thumbnail_ranges=sharded,
            )
            if assigned:
                con.execute("DROP TABLE chunk_assignment")
            build_sequences(con)
            counts = {
                table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in TABLES
            }
            con.execute("CHECKPOINT")
        finally:
            con.close()
        # A WAL left by a crashed writer of the old database must never be replayed onto the new one.
        target.with_name(target.name + ".wal").unlink(missing_ok=True)
        os.replace(temporary, target)
    finally:
        for leftover in (temporary, temporary.with_name(temporary.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return counts


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def _stage_files(
    layout: DataLayout, stage: _Stage, discovery_keys: Collection[str] | None = None
) -> list[str]:
    """Keys of the stage's Parquet files (the store lists no write leftovers)."""
    wanted = (
        {layout.discovery_key(key) for key in discovery_keys}
        if discovery_keys is not None and stage.table == "discovered_images"
        else None
    )
    return [
        key
        for key in layout.store.list(stage.folder)
        if key.endswith(".parquet")
        and stage.accepts(key.rpartition("/")[2])
        and (wanted is None or key in wanted)
    ]


def _typed_nulls(columns: dict[str, str]) -> str:
    return ", ".join(f'CAST(NULL AS {kind}) AS "{name}"' for name, kind in columns.items())


def _load_stage(
    con: duckdb.DuckDBPyConnection,
    layout: DataLayout,
    stage: _Stage,
    discovery_keys: Collection[str] | None = None,
) -> None:
    files = _stage_files(layout, stage, discovery_keys)
    create = f"CREATE TABLE {stage.table} AS SELECT *{stage.derived} FROM"
    if not files:
        con.execute(
            f"{create} (SELECT {_typed_nulls(stage.columns)}, "
            f"CAST(NULL AS VARCHAR) AS {stage.source_column} WHERE false)"
        )
        return
    source = "read_parquet($files, union_by_name = true, filename = 'source_file')"
    parameters = {"files": [layout.store.duckdb_source(key) for key in files]}
    try:
        present = {
            row[0]: row[1]
            for row in con.execute(f"DESCRIBE SELECT * FROM {source}", parameters).fetchall()
        }
        selected = [
            f'CAST("{name}" AS {kind}) AS "{name}"'
            if name in present
            else f'CAST(NULL AS {kind}) AS "{name}"'
            for name, kind in stage.columns.items()
        ]
        reserved = {*stage.columns, "source_file", stage.source_column, "geom"}
        extras = [f'"{name}"' for name in present if name not in reserved]
        key = "regexp_extract(source_file, '([^/\\\\]+?)(\\.failures)?\\.parquet$', 1)"
        con.execute(
            f"{create} (SELECT {', '.join(selected + extras)}, {key} AS {stage.source_column} FROM {source})",
            parameters,
        )
    except duckdb.Error as exc:
        raise _diagnose(layout, files, exc) from None


def _diagnose(layout: DataLayout, files: list[str], exc: duckdb.Error) -> StorageError:
    """Name the file DuckDB choked on (its messages do not always name it)."""
    for key in files:
        try:
            layout.store.read_parquet(key)
        except StorageError as error:
            return error
    folder = layout.store.describe(files[0].rpartition("/")[0])
    return StorageError(
        f"the Parquet files in {folder} do not match their data contract ({exc}); re-materialise the "
        "partitions that wrote them"
    )


def _load_chunk_assignment(con: duckdb.DuckDBPyConnection, layout: DataLayout) -> bool:
    """Once ids are chunked, `images` holds the chunked ids only: the same set in a full run, and just the
    first N ids in a sample run (MAPILLARY_SAMPLE_LIMIT)."""
    key = layout.chunk_assignment_key
    if not layout.store.exists(key):
        return False
    try:
        con.execute(
            "CREATE TABLE chunk_assignment AS SELECT CAST(image_id AS VARCHAR) AS image_id "
            "FROM read_parquet($path)",
            {"path": layout.store.duckdb_source(key)},
        )
    except duckdb.Error as exc:
        raise _diagnose(layout, [key], exc) from None
    return True


def image_points(
    con: duckdb.DuckDBPyConnection, batch_rows: int = POINT_BATCH_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The `images` table's (lon, lat) arrays, a batch at a time."""
    for batch in con.execute("SELECT lon, lat FROM images").to_arrow_reader(batch_rows):
        lon, lat = (column.to_numpy(zero_copy_only=False) for column in batch.columns)
        yield lon, lat


def read_table(con: duckdb.DuckDBPyConnection, table: str) -> pd.DataFrame:
    """A staging table as a DataFrame, geometry as WKB bytes (for checks and tests)."""
    if table not in TABLES:
        raise ValueError(f"unknown staging table {table!r}; expected one of {', '.join(TABLES)}")
    columns = [row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()]
    select = ", ".join(
        f"ST_AsWKB({name}) AS {name}" if name == "geom" else name for name in columns
    )
    return con.execute(f"SELECT {select} FROM {table}").to_arrow_table().to_pandas()
