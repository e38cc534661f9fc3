"""Discovery: which images exist in each tile partition, and their stable assignment to id chunks."""

import asyncio
import datetime

import dagster as dg
import mercantile
import pandas as pd

from mapillary_assets.api import DailyQuotaSpent
from mapillary_assets.defs.area import current_aoi
from mapillary_assets.defs.partitions import (
    CHUNK_PARTITIONS_NAME,
    bind_instance_to_data_dir,
    tile_partitions,
)
from mapillary_assets.defs.pools import API_POOL
from mapillary_assets.defs.reporting import (
    partition_counts_metadata,
    preview_markdown,
    preview_rows,
)
from mapillary_assets.defs.resources import (
    DataStorageResource,
    MapillaryApiResource,
    PipelineSettings,
)
from mapillary_assets.pipeline.aoi import no_images_warning, parse_tile_key
from mapillary_assets.pipeline.charts import png_markdown, tile_map_png
from mapillary_assets.pipeline.chunks import (
    ASSIGNMENT_ROW_GROUP_ROWS,
    update_assignment,
)
from mapillary_assets.pipeline.discovery.results import IMAGE_ZOOM
from mapillary_assets.pipeline.discovery.search import discover_by_bbox_search
from mapillary_assets.pipeline.discovery.sequences import discover_by_sequences
from mapillary_assets.pipeline.discovery.tiles import coverage_zooms, discover_partition
from mapillary_assets.storage import DataLayout

# The sequence route's discovery file sits beside the tile partitions' (a tile key never reads "sequences"),
# so chunking and staging take its images like any partition's.
SEQUENCE_ROUTE_KEY = "sequences"


async def _discover(
    api: MapillaryApiResource, layout: DataLayout, settings: PipelineSettings, keys, log, results
):
    """Discovers `keys` in order into `results` (key -> (the frame's first PREVIEW_ROWS rows, its row
    count, stats)), which keeps the partitions done when an error (the daily tile quota spent) stops
    the rest. Whole frames are not kept: a ranged run over a country's partitions held every image."""
    aoi = current_aoi()
    async with api.client() as client:
        for key in keys:
            tile = parse_tile_key(key)
            removed = layout.store.remove_leftovers_of(
                _partition_files(layout, settings.tileset, tile, key)
            )
            if removed:
                log.info(
                    f"{key}: removed {removed} temporary file(s) left by an interrupted attempt"
                )
            if settings.discovery_route == "bbox_search":
                frame, stats = await discover_by_bbox_search(
                    client, aoi, bbox=tuple(mercantile.bounds(tile))
                )
            else:
                frame, stats = await discover_partition(
                    client,
                    aoi,
                    tile,
                    layout,
                    tileset=settings.tileset,
                    cache_max_age_s=settings.tile_cache_max_age_hours * 3600,
                )
            layout.store.write_parquet(layout.discovery_key(key), frame)
            log.info(
                f"{key}: {len(frame):,} images in the area from {stats.nonempty_z14_tiles} non-empty z14 "
                f"tiles, {stats.requests} requests, {stats.cache_hits} cached tiles"
            )
            results[key] = (preview_rows(frame), len(frame), stats)


def _daily_quota_failure(
    spent: DailyQuotaSpent, tiles_per_day: int, keys: list[str], done: dict
) -> dg.Failure:
    """The run's failure when the day's tile quota is spent: transient, with when it resumes."""
    not_reached = [key for key in keys if key not in done]
    shown = ", ".join(not_reached[:5]) + (", ..." if len(not_reached) > 5 else "")
    reason = DailyQuotaSpent.for_quota(tiles_per_day, spent.resume_at).message
    resumes = datetime.datetime.fromtimestamp(spent.resume_at, datetime.UTC).isoformat()
    return dg.Failure(
        description=f"{reason}. Discovery stopped cleanly: {len(not_reached)} partition(s) not "
        f"reached ({shown}); {len(done)} done in this run (files written). Transient: re-run the "
        "failed partitions once the quota resumes; tiles already fetched come from the tile cache.",
        metadata={
            "transient": True,
            "reason": "daily tile quota spent",
            "resumes_at": resumes,
            "partitions_not_reached": len(not_reached),
            "partitions_done": len(done),
        },
        allow_retries=False,  # a run retry now would meet the same spent quota
    )


def _tile_map_png(
    context: dg.AssetExecutionContext, layout: DataLayout, run_counts: dict[str, int]
) -> bytes:
    """Every partition tile of the AOI: this run's counts, earlier runs' from their files (row counts from
    the Parquet footer), None where no file exists; partitions whose last attempt failed are marked."""
    partitions = context.assets_def.partitions_def
    keys = partitions.get_partition_keys()
    statuses = context.instance.get_status_by_partition(context.asset_key, keys, partitions) or {}
    failed = [
        k
        for k, status in statuses.items()
        if status == dg.AssetPartitionStatus.FAILED and k not in run_counts
    ]
    counts = {
        key: run_counts[key]
        if key in run_counts
        else layout.store.parquet_rows(layout.discovery_key(key))
        for key in keys
    }
    return tile_map_png(current_aoi().geometry, counts, failed, list(run_counts))


def _partition_files(layout: DataLayout, tileset: str, tile: mercantile.Tile, key: str):
    """Every file this partition writes: its discovery file and the cached tiles inside it (the coverage
    tiles of the descent and the z14 tiles); no other partition writes any of them."""
    yield layout.discovery_key(key)
    for zoom in [*coverage_zooms(tile.z), IMAGE_ZOOM]:
        span = 2 ** (zoom - tile.z)
        for x in range(tile.x * span, (tile.x + 1) * span):
            for y in range(tile.y * span, (tile.y + 1) * span):
                yield layout.tile_cache_key(tileset, zoom, x, y)


def build_discovered_images(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The discovery asset over `partitions` (the area's tiles, known once the settings are read)."""

    @dg.asset(
        partitions_def=partitions,
        group_name="discovery",
        kinds={"python", "parquet"},
        pool=API_POOL,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=16),
        description="Images found in each tile partition (z14 `image` layer of non-empty z14 tiles, "
        "clipped to the area of interest, deduplicated). One Parquet file per partition.",
    )
    def discovered_images(
        context: dg.AssetExecutionContext,
        mapillary_api: MapillaryApiResource,
        storage: DataStorageResource,
        settings: PipelineSettings,
    ) -> dg.MaterializeResult:
        results: dict = {}
        try:
            asyncio.run(
                _discover(
                    mapillary_api,
                    storage.layout,
                    settings,
                    context.partition_keys,
                    context.log,
                    results,
                )
            )
        except DailyQuotaSpent as spent:
            raise _daily_quota_failure(
                spent, mapillary_api.tiles_per_day, list(context.partition_keys), results
            ) from None
        heads = [head for head, _, _ in results.values()]
        total = sum(rows for _, rows, _ in results.values())
        requests = sum(stats.requests for _, _, stats in results.values())
        context.log.info(
            f"discovered {total:,} images in {len(results)} partition(s) with {requests:,} tile requests"
        )
        counts = {
            key: {"images": rows, "tile_requests": stats.requests}
            for key, (_, rows, stats) in results.items()
        }
        return dg.MaterializeResult(
            metadata={
                **partition_counts_metadata(counts),
                "tileset": settings.tileset,
                "route": settings.discovery_route,
                "preview": dg.MetadataValue.md(
                    preview_markdown(pd.concat(heads) if heads else pd.DataFrame())
                ),
                "tile_map": dg.MetadataValue.md(
                    png_markdown(
                        _tile_map_png(
                            context,
                            storage.layout,
                            {key: rows for key, (_, rows, _) in results.items()},
                        ),
                        "partition tiles by image count",
                    )
                ),
            }
        )

    return discovered_images


@dg.asset(
    group_name="discovery",
    kinds={"python", "parquet"},
    pool=API_POOL,
    description="The sequence route: images of the sequences in MAPILLARY_SEQUENCE_IDS (`image_ids?sequence_id=`, "
    "positions by batch lookup), clipped to the area; chunked with the tile partitions' images.",
)
def sequence_images(
    context: dg.AssetExecutionContext,
    mapillary_api: MapillaryApiResource,
    storage: DataStorageResource,
    settings: PipelineSettings,
) -> dg.MaterializeResult:
    layout = storage.layout
    store = layout.store
    key, failures_key = layout.discovery_key(SEQUENCE_ROUTE_KEY), layout.sequence_failures_key
    store.remove_leftovers_of([key, failures_key])  # of an interrupted earlier run
    sequence_ids = settings.sequence_id_list()
    if not sequence_ids:
        store.delete(key)
        store.delete(failures_key)
        context.log.info("sequence route: no sequences configured (MAPILLARY_SEQUENCE_IDS)")
        return dg.MaterializeResult(metadata={"sequences": 0, "images": 0})

    async def discover():
        async with mapillary_api.client() as client:
            existing = (
                store.read_table(key, read_dictionary=["chunk"]) if store.exists(key) else None
            )
            return await discover_by_sequences(
                client, current_aoi(), sequence_ids, existing, settings.tileset
            )

    frame, failures, stats = asyncio.run(discover())
    store.write_parquet(key, frame)
    store.write_parquet(failures_key, failures)
    transient = int(failures["transient"].sum())
    context.log.info(
        f"sequence route: {len(frame):,} images in the area from {len(sequence_ids)} sequence(s), "
        f"{stats.requests} requests, {len(failures):,} failed ({transient} transient)"
    )
    if transient:
        raise dg.Failure(
            f"{transient} image lookups of the sequence route failed transiently; the rest is stored. "
            "Re-materialise sequence_images to retry only those."
        )
    return dg.MaterializeResult(
        metadata={
            "sequences": len(sequence_ids),
            "images": len(frame),
            "requests": stats.requests,
            "failed_permanent": len(failures),
            "preview": dg.MetadataValue.md(preview_markdown(frame)),
        }
    )


@dg.asset(
    deps=["discovered_images", sequence_images],
    group_name="discovery",
    kinds={"python", "parquet"},
    pool="chunk_registry",
    description="Stable assignment of discovered image ids to chunks; new ids go to new chunks only, "
    "and every new chunk becomes a partition of the per-image assets.",
)
def image_chunks(
    context: dg.AssetExecutionContext, storage: DataStorageResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    layout = storage.layout
    bind_instance_to_data_dir(context.instance, layout.root)
    tile_keys = tile_partitions().get_partition_keys()
    update = update_assignment(
        layout,
        [*tile_keys, SEQUENCE_ROUTE_KEY],
        settings.chunk_size or None,
        settings.sample_limit or None,
        row_group_rows=ASSIGNMENT_ROW_GROUP_ROWS,
    )
    warning = None
    if not update.discovered and all(
        layout.store.exists(layout.discovery_key(k)) for k in tile_keys
    ):
        warning = no_images_warning(current_aoi(), settings.tileset)  # the whole area was searched
        context.log.warning(warning)
    registered = set(context.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))
    new_keys = [key for key in update.chunk_keys if key not in registered]
    if new_keys:
        context.instance.add_dynamic_partitions(CHUNK_PARTITIONS_NAME, new_keys)
    context.log.info(
        f"{update.ids:,} ids in {len(update.chunk_keys)} chunks; {len(new_keys)} new chunk(s)"
    )
    return dg.MaterializeResult(
        metadata={
            "ids": update.ids,
            "chunks": len(update.chunk_keys),
            "new_chunks": len(new_keys),
            **({"warning": warning} if warning else {}),
        }
    )
