"""The `images` layer as GeoParquet beside the GeoPackage (Dagster-free).

DuckDB spatial's Parquet writer streams the query (bounded memory) and, for a GEOMETRY column, writes
GeoParquet 1.0 metadata (`geo`: WKB encoding, geometry types, bbox; no `crs`, which GeoParquet reads
as OGC:CRS84, i.e. EPSG:4326 in lon/lat order). Readers: geopandas.read_parquet, DuckDB, GDAL builds
with the Parquet driver. The file is written under a temporary name and renamed onto `path`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import duckdb

from mapillary_assets.pipeline.geopackage import image_select_list
from mapillary_assets.storage import TEMP_MARKER

# DuckDB's writer holds a row group in memory (122,880 rows by default): 25,000 rows of the `images`
# columns cut the copy's peak by ~50 MB at 537 k images.
ROW_GROUP_ROWS = 25_000


def write_geoparquet(con: duckdb.DuckDBPyConnection, path: str | Path) -> int:
    """Write every staged image (the GeoPackage `images` layer's columns and order); returns rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + TEMP_MARKER, suffix=".parquet", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    target = str(temporary).replace("'", "''")
    try:
        con.execute(
            f"COPY (SELECT {image_select_list(con)} FROM images "
            f"ORDER BY sequence_id, captured_at, image_id) TO '{target}' "
            f"(FORMAT PARQUET, ROW_GROUP_SIZE {ROW_GROUP_ROWS})"
        )
        rows = con.execute(f"SELECT count(*) FROM read_parquet('{target}')").fetchone()[0]
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return int(rows)
