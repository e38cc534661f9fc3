"""Asset checks on the staged data and the published GeoPackage."""

import dagster as dg
import pyogrio

from mapillary_assets.defs.area import current_aoi
from mapillary_assets.defs.assets.publish import mapillary_geopackage, staging_tables
from mapillary_assets.defs.resources import DataStorageResource, PipelineSettings
from mapillary_assets.pipeline.aoi import count_outside
from mapillary_assets.pipeline.geopackage import layer_points
from mapillary_assets.pipeline.staging import connect_staging, image_points


def _scalar(storage: DataStorageResource, sql: str):
    with connect_staging(storage.layout.staging_db_path, read_only=True) as con:
        return con.execute(sql).fetchone()[0]


@dg.asset_check(
    asset=staging_tables, description="Every image id appears once in the images table."
)
def image_ids_unique(storage: DataStorageResource) -> dg.AssetCheckResult:
    duplicates = _scalar(storage, "SELECT count(*) - count(DISTINCT image_id) FROM images")
    return dg.AssetCheckResult(passed=duplicates == 0, metadata={"duplicate_rows": int(duplicates)})


@dg.asset_check(
    asset=staging_tables,
    blocking=True,  # a GeoPackage of images outside the area is never published
    description="Every image point lies inside the current area of interest.",
)
def images_inside_area(storage: DataStorageResource) -> dg.AssetCheckResult:
    with connect_staging(storage.layout.staging_db_path, read_only=True) as con:
        outside, images = count_outside(current_aoi().geometry, image_points(con))
    return dg.AssetCheckResult(passed=outside == 0, metadata={"outside": outside, "images": images})


@dg.asset_check(
    asset=mapillary_geopackage,
    description="Every published image point lies inside the current area of interest (a GeoPackage left "
    "from an earlier area fails).",
)
def geopackage_inside_area(storage: DataStorageResource) -> dg.AssetCheckResult:
    points = layer_points(storage.layout.geopackage_path)
    outside, images = count_outside(current_aoi().geometry, points)
    return dg.AssetCheckResult(passed=outside == 0, metadata={"outside": outside, "images": images})


@dg.asset_check(
    asset=staging_tables, description="Failed metadata ids stay under MAPILLARY_MAX_FAILED_RATIO."
)
def failed_id_ratio(
    storage: DataStorageResource, settings: PipelineSettings
) -> dg.AssetCheckResult:
    ratio = _scalar(
        storage,
        "SELECT coalesce((SELECT count(DISTINCT image_id) FROM metadata_failures)"
        " / nullif(count(*), 0), 0) FROM images",
    )
    return dg.AssetCheckResult(
        passed=ratio <= settings.max_failed_ratio,
        metadata={"failed_ratio": float(ratio), "threshold": settings.max_failed_ratio},
    )


@dg.asset_check(
    asset=staging_tables, description="Every stored blur score is finite and non-negative."
)
def blur_values_valid(storage: DataStorageResource) -> dg.AssetCheckResult:
    invalid = _scalar(
        storage,
        "SELECT count(*) FROM images WHERE blur_value IS NOT NULL AND (NOT isfinite(blur_value) OR blur_value < 0 "
        "OR NOT isfinite(sobel_value) OR sobel_value < 0)",
    )
    return dg.AssetCheckResult(passed=invalid == 0, metadata={"invalid": int(invalid)})


@dg.asset_check(
    asset=mapillary_geopackage, description="The GeoPackage holds exactly the staged images."
)
def geopackage_matches_staging(storage: DataStorageResource) -> dg.AssetCheckResult:
    staged = int(_scalar(storage, "SELECT count(*) FROM images"))
    published = int(pyogrio.read_info(storage.layout.geopackage_path, layer="images")["features"])
    return dg.AssetCheckResult(
        passed=staged == published, metadata={"staged": staged, "published": published}
    )


asset_checks = [
    image_ids_unique,
    images_inside_area,
    failed_id_ratio,
    blur_values_valid,
    geopackage_matches_staging,
    geopackage_inside_area,
]
