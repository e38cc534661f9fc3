"""Scheduled refresh and the sensor that carries new images through the per-chunk assets to the GeoPackage.

Weekly (MAPILLARY_REFRESH_CRON) the schedule re-runs discovery over every tile partition in ranged runs
(a run per 64 tiles, not a process per tile). The sensor then, in order: re-chunks when discovery has
new materialisations (new ids land in new chunks only), launches the per-chunk job for chunks that have
never completed (ranged runs of up to 4 new chunks), and re-publishes once every chunk is complete and
something changed since the last GeoPackage.
"""


import os

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from mapillary_assets.defs.jobs import chunk_job, chunking_job, discovery_job, publish_job
from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions

DEFAULT_REFRESH_CRON = "0 3 * * 1"
TILES_PER_RUN = 64
CHUNKS_PER_RUN = 4


def ranged_requests(keys: list[str], batch: int, run_key_prefix: str) -> list[dg.RunRequest]:
    requests = []
    for start in range(0, len(keys), batch):
        first, last = keys[start], keys[min(start + batch, len(keys)) - 1]
        tags = {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
        requests.append(dg.RunRequest(run_key=f"{run_key_prefix}:{first}..{last}", tags=tags))
    return requests


@dg.schedule(
    job=discovery_job,
    cron_schedule=os.environ.get("MAPILLARY_REFRESH_CRON", DEFAULT_REFRESH_CRON),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Rediscover every tile partition (raw tiles younger than the cache age are not re-fetched).",
)
def refresh_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return ranged_requests(tile_partitions.get_partition_keys(), TILES_PER_RUN, f"refresh-{tick}")


def _latest_storage_id(instance: dg.DagsterInstance, asset: str) -> int:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return event.storage_id if event else 0


@dg.sensor(
    jobs=[chunking_job, chunk_job, publish_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New discoveries -> new chunks -> metadata, thumbnails, blur -> staging and GeoPackage.",
)
def new_images_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    instance = context.instance
    discovery_id = _latest_storage_id(instance, "discovered_images")
    if discovery_id > _latest_storage_id(instance, "image_chunks"):
        return dg.SensorResult(run_requests=[dg.RunRequest(job_name=chunking_job.name, run_key=f"chunks:{discovery_id}")])

    chunks = sorted(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))
    complete = instance.get_materialized_partitions(dg.AssetKey("blur_scores"))
    incomplete = [chunk for chunk in chunks if chunk not in complete]
    if incomplete:
        requests = ranged_requests(incomplete, CHUNKS_PER_RUN, "chunk")
        return dg.SensorResult(run_requests=[r.with_replaced_attrs(job_name=chunk_job.name) for r in requests])

    newest_input = max(discovery_id, _latest_storage_id(instance, "blur_scores"))
    if chunks and newest_input > _latest_storage_id(instance, "mapillary_geopackage"):
        return dg.SensorResult(run_requests=[dg.RunRequest(job_name=publish_job.name, run_key=f"publish:{newest_input}")])
    return dg.SkipReason("nothing new: every chunk is complete and the GeoPackage is current")
