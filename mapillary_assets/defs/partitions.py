"""The two partitionings, tiles of the area of interest (discovery) and id chunks (everything per
image), and the tags that make one run cover a set of their keys.

Tile partitions follow MAPILLARY_AOI and MAPILLARY_PARTITION_ZOOM as they are when the definitions
are built; chunk partitions are dynamic, added by the `image_chunks` asset as discovery finds new
images. Chunk keys are only meaningful with the data dir whose assignment defines them, so an instance
is bound to one data dir (its id, `storage.data_dir_identity`) the first time it is used with one, and
refuses any other (`bind_instance_to_data_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import dagster as dg

from mapillary_assets.dagster_compat import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)
from mapillary_assets.defs.area import area_from, partition_zoom
from mapillary_assets.errors import UserError
from mapillary_assets.pipeline.aoi import partition_tiles, tile_key
from mapillary_assets.storage import DataLayout, data_dir_identity

CHUNK_PARTITIONS_NAME = "id_chunks"
_BOUND_DATA_DIR_ID = "mapillary_assets/data_dir_id"
_BOUND_DATA_DIR_PATH = "mapillary_assets/data_dir_path"

chunk_partitions = dg.DynamicPartitionsDefinition(name=CHUNK_PARTITIONS_NAME)


def tile_partitions() -> dg.StaticPartitionsDefinition:
    """The tiles of the configured area at the configured partition zoom."""
    return _tile_partitions(os.environ.get("MAPILLARY_AOI") or None, partition_zoom())


@lru_cache(maxsize=4)
def _tile_partitions(aoi_source: str | None, zoom: int) -> dg.StaticPartitionsDefinition:
    tiles = partition_tiles(area_from(aoi_source), zoom)
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


def bind_instance_to_data_dir(instance: dg.DagsterInstance, root: Path | str) -> None:
    """Bind `instance` to the data dir at `root` (a folder or an s3:// URL) on first use; refuse (UserError
    naming both and the fix) when it is bound to another data dir, whose chunk partitions and
    materialisations it holds."""
    layout = DataLayout(root)
    root = layout.root.resolve() if layout.is_local else layout.root
    identity = data_dir_identity(DataLayout(root))
    storage = instance.run_storage
    bound = storage.get_cursor_values({_BOUND_DATA_DIR_ID, _BOUND_DATA_DIR_PATH})
    bound_id, bound_path = bound.get(_BOUND_DATA_DIR_ID), bound.get(_BOUND_DATA_DIR_PATH)
    if bound_id is not None and bound_id != identity:
        home = instance.root_directory or "this Dagster instance"
        home_hint = (
            f"DAGSTER_HOME={root / 'dagster_home'}" if layout.is_local else "its own DAGSTER_HOME"
        )
        raise UserError(
            f"the Dagster instance in {home} belongs to the data dir {bound_path}, not to {root}: its chunk "
            f"partitions and materialisations describe that data dir's files. Use {bound_path} as the data dir, "
            f"or give {root} its own instance: {home_hint}"
        )
    if bound_id is None or bound_path != str(root):  # first use, or the same data dir moved
        storage.set_cursor_values({_BOUND_DATA_DIR_ID: identity, _BOUND_DATA_DIR_PATH: str(root)})
