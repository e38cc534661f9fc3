"""The area's plan in the UI: what discovering and processing the configured area will cost, from
coverage tiles only (`pipeline/plan.py`, the same plan as `mapillary-assets plan`)."""

import asyncio

import dagster as dg

from mapillary_assets.defs.area import current_aoi, partition_zoom
from mapillary_assets.defs.pools import API_POOL
from mapillary_assets.defs.resources import (
    DataStorageResource,
    MapillaryApiResource,
    PipelineSettings,
)
from mapillary_assets.pipeline.charts import png_markdown, tile_map_png
from mapillary_assets.pipeline.plan import plan_area


@dg.asset(
    group_name="discovery",
    kinds={"python"},
    pool=API_POOL,
    description="What the area will cost before its quota is spent: non-empty z14 tiles, tile requests "
    "and days at the daily quota, estimated images, metadata requests, thumbnail disk, blur time, with "
    "a map of the partitions by estimated images. Spends coverage-tile requests only (cached, so "
    "discovery does not fetch them again).",
)
def area_plan(
    context: dg.AssetExecutionContext,
    mapillary_api: MapillaryApiResource,
    storage: DataStorageResource,
    settings: PipelineSettings,
) -> dg.MaterializeResult:
    aoi = current_aoi()

    async def planned():
        async with mapillary_api.client() as client:
            return await plan_area(
                client,
                aoi,
                storage.layout,
                partition_zoom(aoi),
                settings.tileset,
                cache_max_age_s=settings.tile_cache_max_age_hours * 3600,
                tiles_per_day=mapillary_api.tiles_per_day,
                entity_per_minute=mapillary_api.entity_per_minute,
            )

    plan = asyncio.run(planned())
    context.log.info(f"plan for {aoi.source}:\n{plan.table()}")
    picture = tile_map_png(
        aoi.geometry, plan.estimated_images_by_partition, counted="estimated images"
    )
    return dg.MaterializeResult(
        metadata={
            "estimated_images": plan.estimated_images,
            "nonempty_z14_tiles": plan.nonempty_z14_tiles,
            "tile_requests_needed": plan.tile_requests,
            "quota_days": round(plan.quota_days, 3),
            "coverage_requests_spent": plan.coverage_requests,
            "plan": dg.MetadataValue.md(plan.markdown()),
            "plan_map": dg.MetadataValue.md(
                png_markdown(picture, "partition tiles by estimated images")
            ),
        }
    )
