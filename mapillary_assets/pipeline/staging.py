"""DuckDB-spatial staging tables built from the per-partition Parquet files (Dagster-free).

DuckDB allows one writer process per database file while partitioned assets run concurrently, so
every partition writes its own Parquet file and this single staging step (a Dagster concurrency pool
of 1) rebuilds all tables from the files present. The new database is built under a temporary name
and renamed onto `DataLayout.staging_db_path`: readers never see a half-built database, and a
failure (a corrupt input, a crash) leaves the previous one in place.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
from shapely.geometry.base import BaseGeometry

from mapillary_assets.pipeline.filters import load_filter_polygons, spacing_filter, tag_in_polygons
from mapillary_assets.storage import TEMP_MARKER, DataLayout, StorageError, read_parquet

# DuckDB spills to disk beyond this instead of growing with the image count (its default is 80 % of RAM).
# Some of its allocations bypass the limit (DuckDB's OOM guide), so it sits well under the 2 GB budget of
# the publish process; no query here needs insertion order kept (every ordered read says ORDER BY),
# and dropping it lets large CREATE TABLE AS stream with less memory.
DUCKDB_MEMORY_LIMIT = "512MB"
WALK_BATCH_ROWS = 200_000  # rows of the spacing walk held in pandas at once


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
# api/decoders.IMAGE_SCHEMA column names; typed here so staging does not depend on the client.
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
BLUR_COLUMNS: dict[str, str] = {
    "image_id": "VARCHAR",
    "blur_value": "DOUBLE",
    "sobel_value": "DOUBLE",
    "is_blurry": "BOOLEAN",
    "backend": "VARCHAR",
    "reason": "VARCHAR",  # written by pipeline/blur.py for unreadable images (not in the documented contract)
}
# Columns the joined `images` table takes from metadata as they are (the shared ones are merged).
_METADATA_ONLY = [
    "computed_lon", "computed_lat", "altitude", "computed_altitude", "computed_compass_angle",
    "creator_username", "camera_type", "make", "model", "width", "height", "quality_score",
    "exif_orientation", "atomic_scale", "merge_cc", "has_mesh", "has_sfm_cluster",
]  # fmt: skip


@dataclass(frozen=True)
class _Stage:
    table: str
    folder: Callable[[DataLayout], Path]
    columns: dict[str, str]
    source_column: str  # partition or chunk key, taken from the file name
    accepts: Callable[[str], bool]
    derived: str = ""  # extra select expressions over the typed columns


def _is_failures(name: str) -> bool:
    return name.endswith(".failures.parquet")


# DataLayout names files, not folders (except discovery); the folder is the parent of any file path.
_STAGES = (
    _Stage("discovered_images", lambda lay: lay.discovery_dir, DISCOVERY_COLUMNS, "partition", lambda n: True,
           derived=", ST_Point(lon, lat) AS geom"),
    _Stage("image_metadata", lambda lay: lay.metadata_path("x").parent, METADATA_COLUMNS, "chunk",
           lambda n: not _is_failures(n)),
    _Stage("metadata_failures", lambda lay: lay.metadata_path("x").parent, FAILURE_COLUMNS, "chunk", _is_failures),
    _Stage("downloads", lambda lay: lay.downloads_path("x").parent, DOWNLOAD_COLUMNS, "chunk", lambda n: True),
    _Stage("blur_scores", lambda lay: lay.blur_path("x").parent, BLUR_COLUMNS, "chunk", lambda n: True),
)  # fmt: skip

TABLES = tuple(stage.table for stage in _STAGES) + ("images", "sequences")


def spatial_extension_path() -> Path:
    """The spatial extension shipped by the `duckdb-extension-spatial` wheel for this DuckDB version."""
    spec = importlib.util.find_spec("duckdb_extension_spatial")
    if spec is None or not spec.submodule_search_locations:
        raise SpatialExtensionError(
            f"the DuckDB spatial extension package is not installed: pip install "
            f"duckdb-extension-spatial=={duckdb.__version__} (never `INSTALL spatial`: it needs internet)"
        )
    version_dir = (
        Path(list(spec.submodule_search_locations)[0]) / "extensions" / f"v{duckdb.__version__}"
    )
    candidates = (
        sorted(version_dir.rglob("spatial.duckdb_extension")) if version_dir.is_dir() else []
    )
    if not candidates:
        raise SpatialExtensionError(
            f"no spatial.duckdb_extension under {version_dir}: install duckdb-extension-spatial=="
            f"{duckdb.__version__} to match duckdb {duckdb.__version__}"
        )
    return candidates[0]


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
    sequence route) are read, and only points in `area` are kept; files of an earlier area stay on disk,
    unpublished.
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
            con.execute("BEGIN TRANSACTION")
            for stage in _STAGES:
                _load_stage(con, layout, stage, discovery_keys)
            assigned = _load_chunk_assignment(con, layout)
            _build_images(
                con,
                filter_polygons,
                inside_spacing_m,
                outside_spacing_m,
                only_assigned=assigned,
                area=area,
            )
            _build_sequences(con)
            con.execute("COMMIT")
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
) -> list[Path]:
    folder = stage.folder(layout)
    if not folder.is_dir():
        return []
    wanted = (
        {f"{key}.parquet" for key in discovery_keys}
        if discovery_keys is not None and stage.table == "discovered_images"
        else None
    )
    return sorted(
        path
        for path in folder.glob("*.parquet")
        if TEMP_MARKER not in path.name
        and path.is_file()
        and stage.accepts(path.name)
        and (wanted is None or path.name in wanted)
    )


def _typed_nulls(columns: dict[str, str]) -> str:
    return ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in columns.items())


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
    parameters = {"files": [str(path) for path in files]}
    try:
        present = {
            row[0]: row[1]
            for row in con.execute(f"DESCRIBE SELECT * FROM {source}", parameters).fetchall()
        }
        selected = [
            f"CAST({name} AS {kind}) AS {name}"
            if name in present
            else f"CAST(NULL AS {kind}) AS {name}"
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
        raise _diagnose(files, exc) from None


def _diagnose(files: list[Path], exc: duckdb.Error) -> StorageError:
    """Name the file DuckDB choked on (its messages do not always name it)."""
    for path in files:
        try:
            read_parquet(path)
        except StorageError as error:
            return error
    folder = files[0].parent
    return StorageError(
        f"the Parquet files in {folder} do not match their data contract ({exc}); re-materialise the "
        "partitions that wrote them"
    )


def _load_chunk_assignment(con: duckdb.DuckDBPyConnection, layout: DataLayout) -> bool:
    """Once ids are chunked, `images` holds the chunked ids only: the same set in a full run, and just the
    first N ids in a sample run (MAPILLARY_SAMPLE_LIMIT)."""
    path = layout.chunk_assignment_path
    if not path.exists():
        return False
    try:
        con.execute(
            "CREATE TEMP TABLE chunk_assignment AS SELECT CAST(image_id AS VARCHAR) AS image_id "
            "FROM read_parquet($path)",
            {"path": str(path)},
        )
    except duckdb.Error as exc:
        raise _diagnose([path], exc) from None
    return True


def _build_images(
    con,
    filter_polygons,
    inside_spacing_m: float,
    outside_spacing_m: float,
    only_assigned: bool = False,
    area: BaseGeometry | None = None,
) -> None:
    metadata_only = ", ".join(f"m.{name}" for name in _METADATA_ONLY)
    assigned_only = (
        "WHERE image_id IN (SELECT image_id FROM chunk_assignment)" if only_assigned else ""
    )
    con.execute(
        f"""
        CREATE TEMP TABLE images_base AS
        WITH d AS (
            SELECT * FROM discovered_images {assigned_only}
            QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY partition) = 1
        ), m AS (
            SELECT * FROM image_metadata
            QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY chunk DESC) = 1
        ), f AS (
            SELECT image_id, reason FROM metadata_failures
            QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY chunk DESC) = 1
        ), dl AS (
            SELECT * FROM downloads
            QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY status = 'ok' DESC, chunk DESC) = 1
        ), b AS (
            SELECT * FROM blur_scores
            QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY chunk DESC) = 1
        )
        SELECT
            row_number() OVER () AS row_id,
            d.image_id,
            coalesce(m.sequence_id, d.sequence_id) AS sequence_id,
            coalesce(m.captured_at, CAST(epoch_ms(d.captured_at_ms) AS TIMESTAMPTZ)) AS captured_at,
            CASE WHEN m.lon IS NOT NULL AND m.lat IS NOT NULL THEN m.lon ELSE d.lon END AS lon,
            CASE WHEN m.lon IS NOT NULL AND m.lat IS NOT NULL THEN m.lat ELSE d.lat END AS lat,
            coalesce(m.compass_angle, d.compass_angle) AS compass_angle,
            coalesce(m.is_pano, d.is_pano) AS is_pano,
            CAST(d.organization_id AS VARCHAR) AS organization_id,
            coalesce(m.creator_id, CAST(d.creator_id AS VARCHAR)) AS creator_id,
            d.tile_z14,
            d.partition,
            {metadata_only},
            CASE WHEN m.image_id IS NOT NULL THEN 'ok' WHEN f.image_id IS NOT NULL THEN 'failed'
                 ELSE 'pending' END AS metadata_status,
            CASE WHEN m.image_id IS NULL THEN f.reason END AS metadata_failure_reason,
            coalesce(dl.status, 'pending') AS download_status,
            dl.path AS thumbnail_path,
            b.blur_value,
            b.sobel_value,
            b.is_blurry,
            b.backend AS blur_backend,
            b.reason AS blur_failure_reason
        FROM d
        LEFT JOIN m ON m.image_id = d.image_id
        LEFT JOIN f ON f.image_id = d.image_id
        LEFT JOIN dl ON dl.image_id = d.image_id
        LEFT JOIN b ON b.image_id = d.image_id
        """
    )
    if area is not None:
        _drop_outside_area(con, area)
    flags = _image_flags(con, filter_polygons, inside_spacing_m, outside_spacing_m)
    con.register("image_flags", flags)
    try:
        con.execute(
            """
            CREATE TABLE images AS
            SELECT b.* EXCLUDE (row_id), f.in_filter_area, f.keep_spacing, ST_Point(b.lon, b.lat) AS geom
            FROM images_base b JOIN image_flags f USING (row_id)
            """
        )
    finally:
        con.unregister("image_flags")
    con.execute("DROP TABLE images_base")


def in_area(area: BaseGeometry, lon, lat) -> np.ndarray:
    """Which points lie in the area (its boundary included, as discovery clips)."""
    return shapely.intersects_xy(area, np.asarray(lon, float), np.asarray(lat, float))


def _drop_outside_area(con, area: BaseGeometry) -> None:
    """Remove `images_base` rows whose published position lies outside `area`, a batch at a time."""
    shapely.prepare(area)
    reader = con.execute("SELECT row_id, lon, lat FROM images_base").to_arrow_reader(
        WALK_BATCH_ROWS
    )
    outside = []
    for batch in reader:
        frame = batch.to_pandas()
        outside.append(
            frame["row_id"].to_numpy("int64")[~in_area(area, frame["lon"], frame["lat"])]
        )
    rows = pa.table({"row_id": np.concatenate(outside) if outside else np.zeros(0, "int64")})
    con.register("rows_outside_area", rows)
    try:
        con.execute(
            "DELETE FROM images_base WHERE row_id IN (SELECT row_id FROM rows_outside_area)"
        )
    finally:
        con.unregister("rows_outside_area")


def _image_flags(
    con, filter_polygons, inside_spacing_m: float, outside_spacing_m: float
) -> pa.Table:
    """`in_filter_area` and `keep_spacing` per `images_base` row, walking the sequences a batch at a time
    (whole sequences per batch) so memory stays bounded whatever the image count."""
    reader = con.execute(
        "SELECT row_id, image_id, sequence_id, epoch_ms(captured_at) AS captured_at_ms, lon, lat FROM images_base "
        "ORDER BY sequence_id NULLS LAST, row_id"
    ).to_arrow_reader(WALK_BATCH_ROWS)
    row_ids, inside, keep = [], [], []
    carried: pd.DataFrame | None = None  # the last sequence of a batch may continue in the next one

    def walk(frame: pd.DataFrame) -> None:
        frame = frame.reset_index(drop=True)
        frame["in_filter_area"] = tag_in_polygons(frame["lon"], frame["lat"], filter_polygons)
        row_ids.append(frame["row_id"].to_numpy(dtype="int64"))
        inside.append(frame["in_filter_area"].to_numpy(dtype=bool))
        keep.append(spacing_filter(frame, inside_spacing_m, outside_spacing_m))

    for batch in reader:
        frame = batch.to_pandas()
        if carried is not None:
            frame = pd.concat([carried, frame], ignore_index=True)
        last = frame["sequence_id"].iloc[-1]
        tail = (
            frame["sequence_id"].eq(last) if pd.notna(last) else pd.Series(False, index=frame.index)
        )
        carried = frame[tail]
        if (~tail).any():
            walk(frame[~tail])
    if carried is not None and len(carried):
        walk(carried)
    return pa.table(
        {
            "row_id": pa.array(
                np.concatenate(row_ids) if row_ids else np.zeros(0, "int64"), pa.int64()
            ),
            "in_filter_area": pa.array(
                np.concatenate(inside) if inside else np.zeros(0, bool), pa.bool_()
            ),
            "keep_spacing": pa.array(
                np.concatenate(keep) if keep else np.zeros(0, bool), pa.bool_()
            ),
        }
    )


SEQUENCE_BATCH_IMAGES = 200_000


def _build_sequences(con, batch_images: int = SEQUENCE_BATCH_IMAGES) -> None:
    """One line per sequence, built a range of sequence ids at a time (about `batch_images` points each):
    DuckDB cannot spill list() aggregates, and all 1.2 M points at once ran out of the 1 GB memory limit."""
    where = "sequence_id IS NOT NULL AND geom IS NOT NULL"
    bounds = [
        row[0]
        for row in con.execute(
            f"""
        SELECT sequence_id FROM (
            SELECT sequence_id, sum(count(*)) OVER (ORDER BY sequence_id) AS running
            FROM images WHERE {where} GROUP BY sequence_id)
        QUALIFY running // {int(batch_images)}
              > coalesce(lag(running) OVER (ORDER BY sequence_id), 0) // {int(batch_images)}
        ORDER BY sequence_id
        """
        ).fetchall()
    ]
    select = f"""
        SELECT
            sequence_id,
            CAST(count(*) AS BIGINT) AS image_count,
            CAST(count(*) FILTER (WHERE keep_spacing) AS BIGINT) AS kept_count,
            min(captured_at) AS first_captured_at,
            max(captured_at) AS last_captured_at,
            ST_MakeLine(list(geom ORDER BY captured_at, image_id)) AS geom
        FROM images
        WHERE {where} AND ($lo IS NULL OR sequence_id > $lo) AND ($hi IS NULL OR sequence_id <= $hi)
        GROUP BY sequence_id
        HAVING count(*) >= 2
        ORDER BY sequence_id
    """
    con.execute(f"CREATE TABLE sequences AS {select} LIMIT 0", {"lo": None, "hi": None})
    for lo, hi in zip([None, *bounds], [*bounds, None]):  # ranges (lo, hi], in sequence id order
        con.execute(f"INSERT INTO sequences {select}", {"lo": lo, "hi": hi})


def read_table(con: duckdb.DuckDBPyConnection, table: str) -> pd.DataFrame:
    """A staging table as a DataFrame, geometry as WKB bytes (for checks and tests)."""
    if table not in TABLES:
        raise ValueError(f"unknown staging table {table!r}; expected one of {', '.join(TABLES)}")
    columns = [row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()]
    select = ", ".join(
        f"ST_AsWKB({name}) AS {name}" if name == "geom" else name for name in columns
    )
    return con.execute(f"SELECT {select} FROM {table}").to_arrow_table().to_pandas()
