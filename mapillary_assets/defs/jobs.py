"""Jobs: one per partitioning, so each run covers partitions of a single kind.

A chunk's three assets run as one `process_chunks_job` run on one machine (the launchpad, the sensor, the local
pipeline driver). On a cluster the driver splits that chain into `fetch_job` then `blur_job` per chunk,
because blur belongs on the machines with GPUs: `blur_job` runs carry the Celery queue tag `gpu`, which
dagster-celery's CeleryRunLauncher routes to the workers listening on that queue (publish likewise goes
to the one worker whose disk holds DuckDB). On one machine the tags are inert.
"""

import dagster as dg

from mapillary_assets.defs.assets.chunks import blur_scores, image_metadata, thumbnail_downloads
from mapillary_assets.defs.assets.discovery import image_chunks, sequence_images
from mapillary_assets.defs.assets.publish import filter_areas, mapillary_geopackage, staging_tables

# dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG, spelt out so the definitions load without the scaleout extra.
CELERY_QUEUE_TAG = "dagster-celery/queue"
GPU_QUEUE = "gpu"
PUBLISH_QUEUE = "publish"

discovery_job = dg.define_asset_job(
    "discovery_job",
    selection=["discovered_images"],
    description="Discover images in tile partitions.",
)
assign_chunks_job = dg.define_asset_job(
    "assign_chunks_job",
    selection=[sequence_images, image_chunks],
    description="List the configured sequences' images, then assign newly discovered ids to new chunks.",
)
process_chunks_job = dg.define_asset_job(
    "process_chunks_job",
    selection=[image_metadata, thumbnail_downloads, blur_scores],
    description="Metadata, thumbnails and blur scores of id chunks.",
)
metadata_job = dg.define_asset_job(
    "metadata_job",
    selection=[image_metadata],
    description="Metadata of id chunks alone (`mapillary-assets run --until metadata`).",
)
fetch_job = dg.define_asset_job(
    "fetch_job",
    selection=[image_metadata, thumbnail_downloads],
    description="Metadata and thumbnails of id chunks (a cluster's first half of process_chunks_job).",
)
blur_job = dg.define_asset_job(
    "blur_job",
    selection=[blur_scores],
    tags={CELERY_QUEUE_TAG: GPU_QUEUE},
    description="Blur scores of id chunks whose thumbnails are on disk, on the `gpu` queue's workers.",
)
publish_job = dg.define_asset_job(
    "publish_job",
    selection=[filter_areas, staging_tables, mapillary_geopackage],
    tags={CELERY_QUEUE_TAG: PUBLISH_QUEUE},
    description="Rebuild the staging tables and the GeoPackage.",
)
