"""Jobs: one per partitioning, so each run covers partitions of a single kind."""

import dagster as dg

from mapillary_assets.defs.assets.chunks import blur_scores, image_metadata, thumbnail_downloads
from mapillary_assets.defs.assets.discovery import discovered_images, image_chunks, sequence_images
from mapillary_assets.defs.assets.publish import filter_areas, mapillary_geopackage, staging_tables

discovery_job = dg.define_asset_job(
    "discovery_job", selection=[discovered_images],
    description="Discover images in tile partitions.",
)
chunking_job = dg.define_asset_job(
    "chunking_job", selection=[sequence_images, image_chunks],
    description="List the configured sequences' images, then assign newly discovered ids to new chunks.",
)
chunk_job = dg.define_asset_job(
    "chunk_job", selection=[image_metadata, thumbnail_downloads, blur_scores],
    description="Metadata, thumbnails and blur scores of id chunks.",
)
publish_job = dg.define_asset_job(
    "publish_job", selection=[filter_areas, staging_tables, mapillary_geopackage],
    description="Rebuild the staging tables and the GeoPackage.",
)
