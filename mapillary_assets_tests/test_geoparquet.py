"""GeoParquet output: GeoParquet metadata, the GeoPackage's rows and values, read back by geopandas and
DuckDB, written atomically."""

from __future__ import annotations

import json

import geopandas
import pyarrow.parquet as pq

from mapillary_assets.pipeline.geopackage import write_geopackage
from mapillary_assets.pipeline.geoparquet import write_geoparquet
from mapillary_assets.pipeline.staging import connect_staging
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.staging_samples import built_staging


def test_geoparquet_round_trips_beside_the_geopackage(tmp_path):
    layout = DataLayout(tmp_path / "data")
    with built_staging(layout) as con:
        counts = write_geopackage(con, layout.geopackage_path)
        rows = write_geoparquet(con, layout.geoparquet_path)
    assert rows == counts["images"] > 0
    assert not [p for p in layout.geoparquet_path.parent.iterdir() if ".tmp-" in p.name]

    geo = json.loads(pq.read_metadata(layout.geoparquet_path).metadata[b"geo"])
    assert geo["primary_column"] == "geom"
    assert geo["columns"]["geom"]["encoding"] == "WKB"
    assert geo["columns"]["geom"]["geometry_types"] == ["Point"]

    frame = geopandas.read_parquet(layout.geoparquet_path)
    packaged = geopandas.read_file(layout.geopackage_path, layer="images")
    assert (
        len(frame) == rows and frame.crs == "OGC:CRS84"
    )  # GeoParquet without `crs`: lon/lat WGS 84
    assert list(frame["image_id"]) == list(packaged["image_id"])
    assert frame.geometry.geom_equals(packaged.geometry).all()

    with connect_staging(layout.staging_db_path, read_only=True) as con:
        target = str(layout.geoparquet_path)
        assert con.execute(f"SELECT count(*) FROM read_parquet('{target}')").fetchone()[0] == rows
        kind = con.execute(f"SELECT typeof(geom) FROM read_parquet('{target}') LIMIT 1").fetchone()
        assert kind[0].startswith("GEOMETRY")
