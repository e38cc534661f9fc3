"""The area plan: from coverage tiles alone, tile requests within 5 % and images within 25 % of what
discovery then finds, on small emulator worlds at the default density, on a small area of a denser
one and on an area of the country world; the table says what it spent."""

from __future__ import annotations

import asyncio

import pytest
from shapely.geometry import box

from mapillary_assets.api import ClientConfig
from mapillary_assets.emulator import World
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles
from mapillary_assets.pipeline.discovery.tiles import discover_partition
from mapillary_assets.pipeline.plan import measured_blur_rate, plan_area
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.clients import TileClient

AROUND_ZURICH = box(8.35, 47.25, 8.75, 47.5)
# ~2 km x 1.7 km of the city centre: at scale 0.1 its z14 tiles hold ~100 sequences each
CITY_CENTRE = box(8.525, 47.37, 8.55, 47.385)
AROUND_BERN = box(7.3, 46.85, 7.6, 47.05)  # in the country world: Bern, roads, countryside, lakes


def discover_all(world: World, aoi, zoom: int, layout: DataLayout) -> tuple[int, int]:
    """Tile requests and distinct images of a cold-cache discovery of every partition."""
    client = TileClient(world)

    async def everything():
        ids: set[str] = set()
        for partition in partition_tiles(aoi, zoom):
            frame, _ = await discover_partition(client, aoi, partition, layout)
            ids.update(frame["image_id"])
        return ids

    ids = asyncio.run(everything())
    return len(client.tile_requests), len(ids)


@pytest.mark.parametrize(
    ("seed", "area", "zoom", "scale", "region"),
    [
        (11, None, 12, 0.005, "zurich"),
        (12, AROUND_ZURICH, 10, 0.005, "zurich"),
        (13, AROUND_ZURICH, 8, 0.005, "zurich"),
        (14, None, 9, 0.005, "zurich"),
        (15, CITY_CENTRE, 13, 0.1, "zurich"),  # 20x denser: coverage lines follow the density
        (16, AROUND_BERN, 11, 0.02, "switzerland"),
    ],
)
def test_plan_is_within_5_percent_of_tile_requests_and_25_percent_of_images(
    tmp_path, monkeypatch, seed, area, zoom, scale, region
):
    monkeypatch.delenv("MAPILLARY_TILES_PER_DAY", raising=False)
    world = World(seed=seed, scale=scale, region=region)
    aoi = (
        load_aoi()
        if area is None
        else load_aoi(coordinates=[list(c) for c in area.exterior.coords])
    )
    client = TileClient(world)
    plan = asyncio.run(
        plan_area(client, aoi, DataLayout(tmp_path / "plan"), zoom, blur_images_per_s=400.0)
    )
    assert {z for z, *_ in client.tile_requests} <= set(range(6, 14))  # coverage tiles only
    assert plan.coverage_requests == len(client.tile_requests) == plan.coverage_tiles

    requests, images = discover_all(world, aoi, zoom, DataLayout(tmp_path / "actual"))
    assert abs(plan.tile_requests - requests) <= 0.05 * requests
    assert abs(plan.estimated_images - images) <= 0.25 * images
    assert plan.tiles_per_day == ClientConfig.tiles_per_day  # the client's quota, 50,000 by default
    assert sum(plan.estimated_images_by_partition.values()) == pytest.approx(
        plan.estimated_images, abs=len(plan.estimated_images_by_partition)
    )


def test_a_second_plan_reads_the_cache_and_the_table_says_so(tmp_path):
    world = World(seed=11, scale=0.005)
    layout = DataLayout(tmp_path)
    aoi = load_aoi()
    first = asyncio.run(plan_area(TileClient(world), aoi, layout, 12, blur_images_per_s=400.0))
    client = TileClient(world)
    again = asyncio.run(
        plan_area(client, aoi, layout, 12, blur_images_per_s=400.0, tiles_per_day=10_000)
    )
    assert client.tile_requests == [] and again.coverage_requests == 0
    assert again.tile_requests == first.tile_requests and again.tiles_per_day == 10_000
    table = again.table()
    for label in (
        "non-empty z14 tiles",
        "tile requests needed",
        "days at the tile quota",
        "estimated images",
        "metadata requests",
        "thumbnails 256 px",
        "thumbnails 1024 px",
        "blur time",
        "coverage requests spent by this plan",
    ):
        assert label in table
    assert f"{again.metadata_requests:,}" in table and again.metadata_requests == -(
        -again.estimated_images // 50
    )


def test_blur_rate_comes_from_the_benchmarks_else_a_sample(tmp_path):
    results = tmp_path / "RESULTS.json"
    results.write_text(
        '{"figures": [{"benchmark": "blur", "metric": "images/s all cores (2 workers)", "value": 321.0}]}'
    )
    assert measured_blur_rate(results) == 321.0
    assert measured_blur_rate(tmp_path / "missing.json") > 1.0
