"""The final GeoPackage, written from the staging tables (Dagster-free).

Layers (EPSG:4326, R-tree spatial index each):
- `images`: one point per discovered image with typed attributes (UTC datetimes, string ids, floats,
  bools, the `in_filter_area` / `keep_spacing` flags); never thumbnail URLs.
- `images_filtered`: the same columns for the images the spacing filter keeps.
- `sequences`: one LineString per sequence with >= 2 images, vertices in capture order.

Arrow batches of `BATCH_ROWS` stream from DuckDB straight into GDAL (pyogrio.write_arrow) without a
pandas detour, so memory stays bounded by one batch whatever the row count; a layer is written in parts
of `INDEX_ROWS` (see `_write_layer`), so GDAL's R-tree build holds at most that many boxes. The file is written under a
temporary name in the target folder and renamed onto `path`.

GPKG version: 1.3 by default. GDAL >= 3.9 writes 1.4, whose R-tree triggers (update5-7 replace update1
and update3) GDAL 3.6 and older readers (Debian 12, the QGIS LTR builds on it) do not know: their
validator fails the file ("Req 75: rtree_<layer>_geom_update1 trigger missing") and ogrinfo warns "may
only be partially supported". 1.3 carries the triggers every reader knows. 1.4 stays selectable
(MAPILLARY_GPKG_VERSION): its triggers keep the index right under upserts (INSERT ... ON CONFLICT DO
UPDATE) by users who edit the file in place, which a published, rewritten-whole file does not need.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyogrio
import shapely

from mapillary_assets.pipeline.aoi import POINT_BATCH_ROWS
from mapillary_assets.storage import TEMP_MARKER

IMAGES_LAYER = "images"
FILTERED_LAYER = "images_filtered"
SEQUENCES_LAYER = "sequences"
CRS = "EPSG:4326"
_GEOMETRY = "geom"
BATCH_ROWS = 25_000
# rows of a layer written before GDAL builds its R-tree; later rows are appended (`_write_layer`)
INDEX_ROWS = 500_000
GPKG_VERSIONS = ("1.2", "1.3", "1.4")
DEFAULT_GPKG_VERSION = "1.3"
_SQLITE_SIDECARS = ("-journal", "-wal", "-shm")


def write_geopackage(
    con: duckdb.DuckDBPyConnection,
    path: str | Path,
    version: str = DEFAULT_GPKG_VERSION,
    batch_rows: int = BATCH_ROWS,
    index_rows: int = INDEX_ROWS,
) -> dict[str, int]:
    """Write the `images`, `images_filtered` and `sequences` layers; returns layer -> feature count.

    `con` is a staging connection (spatial loaded, e.g. `staging.connect_staging(path, read_only=True)`).
    """
    if version not in GPKG_VERSIONS:
        raise ValueError(
            f"GeoPackage version {version!r} is not supported: use one of {', '.join(GPKG_VERSIONS)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_columns = image_select_list(con)
    layers = (
        (
            IMAGES_LAYER,
            f"SELECT {image_columns} FROM images ORDER BY sequence_id, captured_at, image_id",
            "Point",
        ),
        (
            FILTERED_LAYER,
            f"SELECT {image_columns} FROM images WHERE keep_spacing ORDER BY sequence_id, captured_at, image_id",
            "Point",
        ),
        (
            SEQUENCES_LAYER,
            "SELECT CAST(sequence_id AS VARCHAR) AS sequence_id, image_count, kept_count, first_captured_at, "
            f"last_captured_at, {_GEOMETRY} FROM sequences ORDER BY sequence_id",
            "LineString",
        ),
    )
    fd, name = tempfile.mkstemp(prefix=path.name + TEMP_MARKER, suffix=".gpkg", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    temporary.unlink()  # GDAL creates the GeoPackage itself
    try:
        counts = {}
        for index, (layer, sql, kind) in enumerate(layers):
            # VERSION is a dataset creation option: only the first layer creates the file.
            creation = {"VERSION": version} if index == 0 else None
            counts[layer] = _write_layer(
                con, sql, temporary, layer, kind, batch_rows, creation, index_rows
            )
        os.replace(temporary, path)
    finally:
        for leftover in (
            temporary,
            *(temporary.with_name(temporary.name + s) for s in _SQLITE_SIDECARS),
        ):
            leftover.unlink(missing_ok=True)
    return counts


def image_select_list(con: duckdb.DuckDBPyConnection) -> str:
    """The select list of the image layers: ids as strings, no URL columns, geometry last."""
    selected = []
    for name, kind in con.execute(
        "SELECT column_name, column_type FROM (DESCRIBE images)"
    ).fetchall():
        if name == _GEOMETRY or "url" in name.lower():
            continue
        if name.endswith("_id") and kind != "VARCHAR":
            selected.append(f'CAST("{name}" AS VARCHAR) AS "{name}"')
        else:
            selected.append(f'"{name}"')
    return ", ".join(selected + [_GEOMETRY])


def _utc_schema(schema: pa.Schema) -> pa.Schema:
    """Timestamps labelled UTC whatever the connection's TimeZone (same instants, metadata only)."""
    fields = [
        field.with_type(pa.timestamp(field.type.unit, tz="UTC"))
        if pa.types.is_timestamp(field.type)
        else field
        for field in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


def _write_layer(
    con,
    sql: str,
    path: Path,
    layer: str,
    geometry_type: str,
    batch_rows: int,
    dataset_options: dict | None,
    index_rows: int,
) -> int:
    """The query's rows as `layer`, in parts of about `index_rows`: the first part creates the layer and
    GDAL builds its R-tree at the end of that write; later parts are appended, the index kept by its
    triggers. GDAL's deferred build keeps every feature's box in memory until the write ends (about 24
    bytes a feature beyond OGR_GPKG_MAX_RAM_USAGE_RTREE: 260 MB for 10.9 M images), the triggers none."""
    reader = con.execute(sql).to_arrow_reader(batch_rows)
    schema = _utc_schema(reader.schema)
    batches = (
        pa.RecordBatch.from_arrays(
            [
                column if column.type == field.type else column.cast(field.type)
                for column, field in zip(batch.columns, schema)
            ],
            schema=schema,
        )
        for batch in reader
    )
    pending = next(batches, None)
    written = 0

    def part():
        nonlocal pending, written
        rows = 0
        while pending is not None and rows < index_rows:
            rows += pending.num_rows
            yield pending
            pending = next(batches, None)
        written += rows

    created = False
    while not created or pending is not None:
        pyogrio.write_arrow(
            pa.RecordBatchReader.from_batches(schema, part()),
            path,
            layer=layer,
            driver="GPKG",
            geometry_name=_GEOMETRY,
            geometry_type=geometry_type,
            crs=CRS,
            append=created,
            layer_options=None if created else {"SPATIAL_INDEX": "YES"},
            dataset_options=None if created else dataset_options,
        )
        created = True
    return written


def layer_points(
    path: str | Path, layer: str = IMAGES_LAYER, batch_rows: int = POINT_BATCH_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A point layer's (lon, lat) arrays, a batch at a time through GDAL's Arrow stream (a missing
    geometry reads as NaN)."""
    with pyogrio.open_arrow(
        path, layer=layer, columns=[], batch_size=batch_rows, use_pyarrow=True
    ) as (meta, reader):
        column = meta["geometry_name"] or "wkb_geometry"
        for batch in reader:
            points = shapely.from_wkb(batch.column(column).to_numpy(zero_copy_only=False))
            yield shapely.get_x(points), shapely.get_y(points)


@dataclass(frozen=True)
class PublishedOverview:
    """What the published-images map draws, aggregated in DuckDB: image counts on a grid over `extent`
    (west, south, east, north), the same for the images the spacing filter keeps, and a sample of
    sequence lines (lon/lat vertex arrays)."""

    extent: tuple[float, float, float, float]
    counts: np.ndarray
    kept: np.ndarray
    sequence_lines: list[np.ndarray]
    sequences_total: int


def published_overview(
    con: duckdb.DuckDBPyConnection,
    extent: tuple[float, float, float, float],
    cells: int = 100,
    max_sequences: int = 500,
) -> PublishedOverview:
    west, south, east, north = extent
    width, height = max(east - west, 1e-9), max(north - south, 1e-9)
    rows = con.execute(
        f"""SELECT least(greatest(floor((lon - ?) / ? * {cells}), 0), {cells - 1})::INTEGER AS i,
                   least(greatest(floor((lat - ?) / ? * {cells}), 0), {cells - 1})::INTEGER AS j,
                   count(*) AS images, count(*) FILTER (WHERE keep_spacing) AS kept
            FROM images WHERE lon IS NOT NULL AND lat IS NOT NULL GROUP BY ALL""",
        [west, width, south, height],
    ).fetchnumpy()
    counts, kept = np.zeros((cells, cells), np.int64), np.zeros((cells, cells), np.int64)
    counts[rows["i"], rows["j"]] = rows["images"]
    kept[rows["i"], rows["j"]] = rows["kept"]
    total = con.execute("SELECT count(*) FROM sequences").fetchone()[0]
    # A stable sample (by id hash) when there are more sequences than a small map can show.
    blobs = con.execute(
        f"SELECT ST_AsWKB({_GEOMETRY}) FROM sequences ORDER BY hash(sequence_id) LIMIT ?",
        [max_sequences],
    ).fetchall()
    lines = [
        shapely.get_coordinates(geometry)
        for geometry in shapely.from_wkb([bytes(b) for (b,) in blobs])
    ]
    return PublishedOverview((west, south, east, north), counts, kept, lines, int(total))
