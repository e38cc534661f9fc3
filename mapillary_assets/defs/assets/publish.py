"""Filters, DuckDB-spatial staging and the final GeoPackage (single writer: the `duckdb_writer` pool)."""

import json

import dagster as dg
import shapely

from mapillary_assets.defs.area import area_fingerprint, current_aoi
from mapillary_assets.defs.assets.chunks import blur_scores, image_metadata, thumbnail_downloads
from mapillary_assets.defs.assets.discovery import SEQUENCE_ROUTE_KEY
from mapillary_assets.defs.partitions import tile_partitions
from mapillary_assets.defs.pools import DUCKDB_POOL
from mapillary_assets.defs.reporting import preview_markdown
from mapillary_assets.defs.resources import DataStorageResource, PipelineSettings
from mapillary_assets.pipeline.charts import png_markdown, published_map_png
from mapillary_assets.pipeline.filters import load_filter_polygons
from mapillary_assets.pipeline.geopackage import published_overview, write_geopackage
from mapillary_assets.pipeline.geoparquet import write_geoparquet
from mapillary_assets.pipeline.staging import connect_staging, load_staging
from mapillary_assets.storage import remove_leftovers_of, sweep_temporary_files

AREA_FINGERPRINT = "aoi_fingerprint"


@dg.asset(
    group_name="filters",
    kinds={"python", "geojson"},
    description="User-supplied polygons (e.g. urban areas) that tag images and set the spacing threshold "
    "(MAPILLARY_FILTER_AREAS; none configured means every image counts as outside).",
)
def filter_areas(
    context: dg.AssetExecutionContext, storage: DataStorageResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    store, target = storage.layout.store, storage.layout.filter_areas_key
    store.remove_leftovers_of([target])  # of an interrupted earlier run
    if not settings.filter_areas_path:
        store.delete(target)  # no file: staging tags every image as outside
        context.log.info(
            "filter areas: none configured (MAPILLARY_FILTER_AREAS); every image counts as outside"
        )
        return dg.MaterializeResult(metadata={"source": "(none)", "polygons": 0})
    geometry = load_filter_polygons(settings.filter_areas_path)
    feature = {
        "type": "Feature",
        "properties": {},
        "geometry": json.loads(shapely.to_geojson(geometry)),
    }
    store.put(target, json.dumps({"type": "FeatureCollection", "features": [feature]}).encode())
    polygons = len(getattr(geometry, "geoms", [geometry]))
    context.log.info(f"filter areas: {polygons:,} polygon(s) from {settings.filter_areas_path}")
    return dg.MaterializeResult(
        metadata={
            "source": settings.filter_areas_path,
            "polygons": polygons,
            "area_deg2": float(geometry.area),
        }
    )


@dg.asset(
    deps=["discovered_images", image_metadata, thumbnail_downloads, blur_scores, filter_areas],
    group_name="staging",
    kinds={"duckdb"},
    pool=DUCKDB_POOL,
    description="DuckDB-spatial staging tables rebuilt from the Parquet files: images (joined, with GEOMETRY, "
    "filter flags), sequences, metadata failures, downloads, blur scores. `images` holds exactly the current "
    "area's images: discovery files of the area's tile partitions only, points inside the area only.",
)
def staging_tables(
    context: dg.AssetExecutionContext, storage: DataStorageResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    layout = storage.layout
    sweep_temporary_files(
        layout.staging_db_path.parent
    )  # leftovers of a killed load; this pool has one slot
    areas = layout.fetched(layout.filter_areas_key)
    polygons = load_filter_polygons(areas) if areas is not None else None
    counts = load_staging(
        layout,
        filter_polygons=polygons,
        inside_spacing_m=settings.inside_spacing_m,
        outside_spacing_m=settings.outside_spacing_m,
        area=current_aoi().geometry,
        discovery_keys=[*tile_partitions().get_partition_keys(), SEQUENCE_ROUTE_KEY],
    )
    context.log.info("staging: " + ", ".join(f"{table} {rows:,}" for table, rows in counts.items()))
    with connect_staging(layout.staging_db_path, read_only=True) as con:
        preview = (
            con.execute("SELECT * EXCLUDE (geom) FROM images LIMIT 10").to_arrow_table().to_pandas()
        )
    return dg.MaterializeResult(
        metadata={
            **{f"rows_{table}": rows for table, rows in counts.items()},
            "database": dg.MetadataValue.path(str(layout.staging_db_path)),
            "preview": dg.MetadataValue.md(preview_markdown(preview)),
        }
    )


@dg.asset(
    deps=[staging_tables],
    group_name="publish",
    kinds={"geopackage"},
    pool=DUCKDB_POOL,
    description="The GeoPackage for spatial analysis (EPSG:4326, spatial index): `images` points with "
    "discovery, metadata, blur and filter columns, and `sequences` lines ordered by capture time.",
)
def mapillary_geopackage(
    context: dg.AssetExecutionContext, storage: DataStorageResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    layout = storage.layout
    # built where tools write files (the data dir, or scratch beside a bucket), then stored whole
    remove_leftovers_of(
        [layout.geopackage_path, layout.geoparquet_path]
    )  # of an interrupted earlier write (this pool has one slot)
    with connect_staging(layout.staging_db_path, read_only=True) as con:
        counts = write_geopackage(con, layout.geopackage_path, version=settings.gpkg_version)
        parquet_rows = write_geoparquet(con, layout.geoparquet_path)
        aoi = current_aoi().geometry
        picture = published_map_png(aoi, published_overview(con, aoi.bounds))
    layout.store.upload(layout.geopackage_key, layout.geopackage_path)
    layout.store.upload(layout.geoparquet_key, layout.geoparquet_path)
    context.log.info(
        f"GeoPackage written to {layout.store.describe(layout.geopackage_key)}: "
        + ", ".join(f"{layer} {rows:,}" for layer, rows in counts.items())
    )
    return dg.MaterializeResult(
        metadata={
            **{f"features_{layer}": rows for layer, rows in counts.items()},
            "path": dg.MetadataValue.path(layout.store.describe(layout.geopackage_key)),
            "geoparquet_path": dg.MetadataValue.path(layout.store.describe(layout.geoparquet_key)),
            "geoparquet_rows": parquet_rows,
            "gpkg_version": settings.gpkg_version,
            AREA_FINGERPRINT: area_fingerprint(),  # the sensor compares it with the current area's
            "map": dg.MetadataValue.md(png_markdown(picture, "published images and sequences")),
        }
    )
