"""The area's plan in the UI: `area_plan` materialises the same plan as `mapillary-assets plan`, with
its table as Markdown and a map of the partitions by estimated images, spending coverage tiles only."""

from __future__ import annotations

import dagster as dg

from mapillary_assets.defs.assets.plan import area_plan
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets_tests.support.assertions import decode_markdown
from mapillary_assets_tests.support.emulated_runs import emulator_resources
from mapillary_assets_tests.support.world import TEST_TOKEN


def test_area_plan_carries_the_plan_table_and_a_map_picture(tmp_path, monkeypatch):
    monkeypatch.delenv("MAPILLARY_AOI", raising=False)
    monkeypatch.delenv("MAPILLARY_PARTITION_ZOOM", raising=False)
    with EmulatorServer(world=World(seed=11, scale=0.005), token=TEST_TOKEN) as server:
        result = dg.materialize(
            [area_plan],
            instance=dg.DagsterInstance.ephemeral(),
            resources=emulator_resources(server, tmp_path / "data"),
        )
        tile_requests = server.stats()["tile"]
    assert result.success
    metadata = result.asset_materializations_for_node("area_plan")[0].metadata
    assert metadata["coverage_requests_spent"].value == tile_requests > 0  # coverage tiles only
    assert metadata["estimated_images"].value > 1000
    assert metadata["tile_requests_needed"].value > metadata["nonempty_z14_tiles"].value > 0
    table = metadata["plan"].value
    for row in (
        "non-empty z14 tiles",
        "estimated images",
        "metadata requests",
        "thumbnails 256 px",
    ):
        assert f"| {row} |" in table
    assert f"{metadata['estimated_images'].value:,}" in table
    decode_markdown(metadata["plan_map"].value)
