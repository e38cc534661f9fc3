"""Scheduled refresh and the sensor that carries new images through the per-chunk assets to the GeoPackage.

Weekly (MAPILLARY_REFRESH_CRON) the schedule re-runs discovery over every tile partition in ranged runs
(a run per 64 tiles, not a process per tile). Its runs re-use cached raw tiles only if they are younger than
half the schedule's period (or MAPILLARY_TILE_CACHE_MAX_AGE_HOURS, if lower): tiles fetched by the previous
refresh are always fetched again, while a retried refresh run re-uses what its first attempt fetched.

The sensor then, in order: re-chunks when discovery has new materialisations (new ids land in new chunks
only), launches the per-chunk job for chunks that have never completed (ranged runs of up to 4 consecutive
chunks), and re-publishes once every chunk is complete and something changed since the last GeoPackage.
A GeoPackage published for another area of interest (its `aoi_fingerprint` differs from the current
area's) is never "current": the sensor rediscovers the current area's tiles, and the runs above follow.
"""

import os

import dagster as dg

from mapillary_assets.dagster_compat import smallest_cron_interval
from mapillary_assets.defs.area import area_fingerprint
from mapillary_assets.defs.assets.publish import AREA_FINGERPRINT
from mapillary_assets.defs.jobs import (
    assign_chunks_job,
    discovery_job,
    process_chunks_job,
    publish_job,
)
from mapillary_assets.defs.partitions import (
    CHUNK_PARTITIONS_NAME,
    partition_range_tags,
    tile_partitions,
)
from mapillary_assets.defs.resources import PipelineSettings

DEFAULT_REFRESH_CRON = "0 3 * * 1"
TILES_PER_RUN = 64
CHUNKS_PER_RUN = 4


def ranged_requests(
    keys: list[str], batch: int, run_key_prefix: str, ordered_keys: list[str] | None = None
) -> list[dg.RunRequest]:
    """Run requests for `keys`, each a partition range of at most `batch` keys. A range covers every key
    between its ends, so ranges never span a key that is not asked for: with `ordered_keys` (every key of
    the partitioning, in its order), `keys` are first split into runs of consecutive keys."""
    requests = []
    for run in _consecutive_runs(keys, ordered_keys or keys):
        for start in range(0, len(run), batch):
            first, last = run[start], run[min(start + batch, len(run)) - 1]
            tags = partition_range_tags(first, last)
            requests.append(dg.RunRequest(run_key=f"{run_key_prefix}:{first}..{last}", tags=tags))
    return requests


def _consecutive_runs(keys: list[str], ordered_keys: list[str]) -> list[list[str]]:
    position = {key: index for index, key in enumerate(ordered_keys)}
    runs: list[list[str]] = []
    for key in sorted(set(keys), key=position.__getitem__):
        if runs and position[key] == position[runs[-1][-1]] + 1:
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


def refresh_tile_cache_max_age_hours(configured_hours: float, cron: str) -> float:
    """The cache age of refresh runs: at most half the schedule's period, so a refresh never takes the
    previous refresh's tiles (fetched about one period ago) for fresh ones."""
    half_period_hours = smallest_cron_interval(cron).total_seconds() / 3600 / 2
    return min(configured_hours, half_period_hours)


def build_refresh_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    """The refresh schedule on `cron` (default: MAPILLARY_REFRESH_CRON as set now, else weekly)."""
    cron = cron or os.environ.get("MAPILLARY_REFRESH_CRON") or DEFAULT_REFRESH_CRON

    @dg.schedule(
        name="refresh_schedule",
        job=discovery_job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Rediscover every tile partition (raw tiles fetched by the previous refresh are "
        "fetched again).",
    )
    def refresh_schedule(
        context: dg.ScheduleEvaluationContext, settings: PipelineSettings
    ) -> list[dg.RunRequest]:
        tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        max_age = refresh_tile_cache_max_age_hours(settings.tile_cache_max_age_hours, cron)
        run_config = {"resources": {"settings": {"config": {"tile_cache_max_age_hours": max_age}}}}
        keys = tile_partitions().get_partition_keys()
        return [
            request.with_replaced_attrs(run_config=run_config)
            for request in ranged_requests(keys, TILES_PER_RUN, f"refresh-{tick}")
        ]

    return refresh_schedule


def _published_area_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """The area fingerprint the newest GeoPackage was published for (None: none published, or before
    fingerprints were recorded)."""
    records = instance.fetch_materializations(dg.AssetKey("mapillary_geopackage"), limit=1).records
    if not records:
        return None
    value = records[0].asset_materialization.metadata.get(AREA_FINGERPRINT)
    return value.value if value is not None else None


def _latest_storage_id(instance: dg.DagsterInstance, asset: str) -> int:
    """Storage id of the asset's newest materialisation (ids grow with time); 0 if it has none."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    return records[0].storage_id if records else 0


@dg.sensor(
    jobs=[discovery_job, assign_chunks_job, process_chunks_job, publish_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New discoveries -> new chunks -> metadata, thumbnails, blur -> staging and GeoPackage.",
)
def new_images_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    instance = context.instance
    discovery_id = _latest_storage_id(instance, "discovered_images")
    if discovery_id > _latest_storage_id(instance, "image_chunks"):
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(job_name=assign_chunks_job.name, run_key=f"chunks:{discovery_id}")
            ]
        )

    chunks = instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME)  # in the order they were added
    complete = instance.get_materialized_partitions(dg.AssetKey("blur_scores"))
    incomplete = [chunk for chunk in chunks if chunk not in complete]
    if incomplete:
        requests = ranged_requests(incomplete, CHUNKS_PER_RUN, "chunk", ordered_keys=list(chunks))
        return dg.SensorResult(
            run_requests=[r.with_replaced_attrs(job_name=process_chunks_job.name) for r in requests]
        )

    newest_input = max(discovery_id, _latest_storage_id(instance, "blur_scores"))
    if chunks and newest_input > _latest_storage_id(instance, "mapillary_geopackage"):
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(job_name=publish_job.name, run_key=f"publish:{newest_input}")
            ]
        )
    fingerprint = area_fingerprint()
    if chunks and _published_area_fingerprint(instance) != fingerprint:
        # One discovery per area (the run keys hold its fingerprint); its materialisations then lead
        # through the steps above to a GeoPackage of this area.
        keys = tile_partitions().get_partition_keys()
        return dg.SensorResult(
            run_requests=[
                r.with_replaced_attrs(job_name=discovery_job.name)
                for r in ranged_requests(keys, TILES_PER_RUN, f"area-{fingerprint}")
            ]
        )
    return dg.SkipReason("nothing new: every chunk is complete and the GeoPackage is current")
