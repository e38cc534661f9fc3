"""`image_chunks` without MAPILLARY_CHUNK_SIZE: the chunk size comes from the image count
(`chunks.adaptive_chunk_size`), an explicit size still wins."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pyarrow.dataset as ds
import pytest

from mapillary_assets.defs.assets.discovery import image_chunks
from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions
from mapillary_assets.defs.resources import DataStorageResource, PipelineSettings
from mapillary_assets.storage import DataLayout, read_parquet, write_parquet_atomic

IMAGES = 12_000


def chunk_sizes(monkeypatch, tmp_path, settings: PipelineSettings) -> tuple[list[int], set[str]]:
    """Chunk sizes of a first assignment of IMAGES discovered ids, and the chunk partitions registered."""
    monkeypatch.delenv("MAPILLARY_AOI", raising=False)
    monkeypatch.delenv("MAPILLARY_PARTITION_ZOOM", raising=False)
    layout = DataLayout(tmp_path)
    first_partition = tile_partitions().get_partition_keys()[0]
    ids = [str(10**15 + i) for i in range(IMAGES)]
    write_parquet_atomic(pd.DataFrame({"image_id": ids}), layout.discovery_path(first_partition))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [image_chunks],
        instance=instance,
        resources={"storage": DataStorageResource(data_dir=str(tmp_path)), "settings": settings},
    )
    assert result.success
    assignment = read_parquet(layout.chunk_assignment_path)
    sizes = assignment.groupby("chunk").size().tolist()
    metadata = result.asset_materializations_for_node("image_chunks")[0].metadata
    assert metadata["ids"].value == IMAGES and metadata["chunks"].value == len(sizes)
    return sizes, set(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))


def test_unset_chunk_size_follows_the_image_count(monkeypatch, tmp_path):
    # an area of 12,000 images kept within 2 chunks: chunks of 6,000 instead of the default 5,000
    monkeypatch.setattr("mapillary_assets.pipeline.chunks.TARGET_MAX_CHUNKS", 2)
    sizes, registered = chunk_sizes(monkeypatch, tmp_path, PipelineSettings())
    assert sizes == [6000, 6000]
    assert registered == {"chunk-000000", "chunk-000001"}


@pytest.mark.parametrize(("chunk_size", "expected"), [(0, [5000, 5000, 2000]), (4000, [4000] * 3)])
def test_default_size_below_the_target_and_an_explicit_size(
    monkeypatch, tmp_path, chunk_size, expected
):
    assert (
        chunk_sizes(monkeypatch, tmp_path, PipelineSettings(chunk_size=chunk_size))[0] == expected
    )


def test_a_chunk_runs_filtered_read_picks_only_its_row_groups(monkeypatch, tmp_path):
    monkeypatch.setattr("mapillary_assets.defs.assets.discovery.ASSIGNMENT_ROW_GROUP_ROWS", 1000)
    chunk_sizes(monkeypatch, tmp_path, PipelineSettings(chunk_size=4000))
    path = DataLayout(tmp_path).chunk_assignment_path
    fragment = next(ds.dataset(path, format="parquet").get_fragments())
    matching = fragment.split_by_row_group(ds.field("chunk") == "chunk-000001")
    assert (len(fragment.row_groups), len(matching)) == (12, 4)
