"""The two partitionings, tiles of the area of interest (discovery) and id chunks (everything per
image), and the tags that make one run cover a set of their keys.

Tile partitions follow MAPILLARY_AOI and MAPILLARY_PARTITION_ZOOM as they are when the definitions
are built; chunk partitions are dynamic, added by the `image_chunks` asset as discovery finds new
images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import dagster as dg

from mapillary_assets.dagster_compat import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)
from mapillary_assets.defs.area import partition_zoom
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles, tile_key

CHUNK_PARTITIONS_NAME = "id_chunks"

chunk_partitions = dg.DynamicPartitionsDefinition(name=CHUNK_PARTITIONS_NAME)


def tile_partitions() -> dg.StaticPartitionsDefinition:
    """The tiles of the configured area at the configured partition zoom."""
    return _tile_partitions(os.environ.get("MAPILLARY_AOI") or None, partition_zoom())


@lru_cache(maxsize=4)
def _tile_partitions(aoi_source: str | None, zoom: int) -> dg.StaticPartitionsDefinition:
    tiles = partition_tiles(load_aoi(aoi_source), zoom)
    return dg.StaticPartitionsDefinition([tile_key(tile) for tile in tiles])


def partition_tags(keys: Sequence[str]) -> dict[str, str]:
    """One run's tags for partition keys in partition order: one partition's tag, or a range's."""
    if len(keys) == 1:
        return {PARTITION_NAME_TAG: keys[0]}
    return partition_range_tags(keys[0], keys[-1])


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """The tags of a run over every partition from `first` to `last` (a range of one included)."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def describe_partitions(tags: dict[str, str]) -> str:
    """The partitions a run's tags cover, for a person: `key`, `first .. last` or `(unpartitioned)`."""
    if PARTITION_NAME_TAG in tags:
        return tags[PARTITION_NAME_TAG]
    if ASSET_PARTITION_RANGE_START_TAG in tags:
        return f"{tags[ASSET_PARTITION_RANGE_START_TAG]} .. {tags[ASSET_PARTITION_RANGE_END_TAG]}"
    return "(unpartitioned)"
