"""The Dagster code location (`dg check defs`, `dagster dev -m mapillary_assets.definitions`).

Everything is built when Dagster loads the location, not at import: the area's tile partitions and
the refresh cron come from the environment as it is then. Tests call `build_definitions` with their
own resources (emulator URLs, temporary folders)."""

from __future__ import annotations

import os

import dagster as dg

from mapillary_assets.api.ratelimit import redis_url_from_env
from mapillary_assets.defs.assets.chunks import blur_scores, image_metadata, thumbnail_downloads
from mapillary_assets.defs.assets.discovery import (
    build_discovered_images,
    image_chunks,
    sequence_images,
)
from mapillary_assets.defs.assets.plan import area_plan
from mapillary_assets.defs.assets.publish import filter_areas, mapillary_geopackage, staging_tables
from mapillary_assets.defs.automation import build_refresh_schedule, new_images_sensor
from mapillary_assets.defs.checks import asset_checks
from mapillary_assets.defs.jobs import (
    assign_chunks_job,
    blur_job,
    discovery_job,
    fetch_job,
    metadata_job,
    process_chunks_job,
    publish_job,
)
from mapillary_assets.defs.partitions import tile_partitions
from mapillary_assets.defs.resources import (
    ConfigError,
    DataStorageResource,
    MapillaryApiResource,
    PipelineSettings,
)
from mapillary_assets.storage import DataLayout


def resources_from_env() -> dict:
    layout = DataLayout.at(os.environ.get("MAPILLARY_DATA_DIR", "data"))
    if not layout.is_local and not redis_url_from_env():
        raise ConfigError(
            f"MAPILLARY_DATA_DIR={layout.root} is an object store, so several machines share one API "
            "budget, and the SQLite rate-limit store can not be shared through a bucket: set "
            "MAPILLARY_REDIS_URL (redis://host:port/db) so every worker draws from the same budget"
        )
    return {
        "mapillary_api": MapillaryApiResource.from_env(
            default_rate_limit_store=layout.rate_limit_store_path
        ),
        "storage": DataStorageResource(data_dir=str(layout.root)),
        "settings": PipelineSettings.from_env(),
    }


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """Everything in the code location, over the configured area; `resources` default to the
    environment's."""
    return dg.Definitions(
        assets=[
            area_plan,
            build_discovered_images(tile_partitions()),
            sequence_images,
            image_chunks,
            image_metadata,
            thumbnail_downloads,
            blur_scores,
            filter_areas,
            staging_tables,
            mapillary_geopackage,
        ],
        asset_checks=asset_checks,
        jobs=[
            discovery_job,
            assign_chunks_job,
            process_chunks_job,
            metadata_job,
            fetch_job,
            blur_job,
            publish_job,
        ],
        schedules=[build_refresh_schedule()],
        sensors=[new_images_sensor],
        resources=resources if resources is not None else resources_from_env(),
        executor=_executor_from_env(),
    )


def _executor_from_env() -> dg.ExecutorDefinition | None:
    """MAPILLARY_RUN_EXECUTOR=in_process (set by the scaled-out stack): a Celery worker's pool
    process is daemonic and may not fork the multiprocess executor's step processes."""
    if os.environ.get("MAPILLARY_RUN_EXECUTOR") == "in_process":
        return dg.in_process_executor
    return None


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
