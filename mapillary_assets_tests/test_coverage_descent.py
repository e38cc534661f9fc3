"""Coverage-pruned discovery: the descent through the `sequence` coverage never skips a z14 tile that
holds images of the AOI, and its requests follow the imagery rather than the area (property test over
random AOIs, seeds and partition zooms on small worlds)."""

from __future__ import annotations

import asyncio
import math
import random

import mercantile
from shapely.geometry import Polygon, box

from mapillary_assets.emulator import World
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles
from mapillary_assets.pipeline.discovery.results import DiscoveryStats
from mapillary_assets.pipeline.discovery.tile_cache import TileCache
from mapillary_assets.pipeline.discovery.tiles import (
    SELECTION_ZOOM,
    coverage_zooms,
    covered_z14_tiles,
)
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.clients import TileClient

ZURICH = (8.540, 47.378)


def random_aoi(rng: random.Random) -> Polygon:
    """A random star-shaped polygon a few km to ~25 km across, near the synthetic city or its edge."""
    lon0 = ZURICH[0] + rng.uniform(-0.15, 0.15)
    lat0 = ZURICH[1] + rng.uniform(-0.1, 0.1)
    radius = rng.uniform(0.02, 0.17)
    ring = []
    for k in range(9):
        angle = 2 * math.pi * k / 9
        r = radius * rng.uniform(0.5, 1.0)
        ring.append(
            (
                lon0 + r * 1.5 * math.cos(angle),
                lat0 + r * math.sin(angle),
            )
        )
    return Polygon(ring)


def truth_tiles(world: World, geometry, partition: mercantile.Tile) -> set[tuple[int, int]]:
    """z14 tiles of the partition holding at least one image inside the AOI (ground truth)."""
    area = geometry.intersection(box(*mercantile.bounds(partition)))
    return {
        r.tile
        for r in world.images_in_polygon(area)
        if mercantile.tile(r.lon, r.lat, partition.z) == partition
    }


def test_coverage_zooms_step_down_to_the_selection_zoom():
    assert coverage_zooms(12) == [12]
    assert coverage_zooms(10) == [10]
    assert coverage_zooms(9) == [9, SELECTION_ZOOM]
    assert coverage_zooms(7) == [7, 9, 10]
    assert coverage_zooms(2) == [6, 8, 10]


def test_pruning_never_skips_a_tile_that_holds_images(tmp_path):
    rng = random.Random(20261222)
    checked_tiles = 0
    for case in range(8):
        world = World(seed=rng.randrange(1000), scale=rng.choice((0.005, 0.02)))
        aoi = load_aoi(coordinates=[list(c) for c in random_aoi(rng).exterior.coords])
        zoom = rng.choice((5, 7, 8, 9, 11))
        client = TileClient(world)
        layout = DataLayout(tmp_path / f"case{case}")
        coverage_requests = image_tiles = nonempty = 0
        for partition in partition_tiles(aoi, zoom):
            stats = DiscoveryStats()
            cache = TileCache(client, layout, "mly1_public", 3600, stats)
            found = asyncio.run(covered_z14_tiles(cache, aoi.geometry, partition))
            truth = truth_tiles(world, aoi.geometry, partition)
            missed = truth - set(found.z14_tiles)
            assert not missed, f"case {case} (zoom {zoom}, {world}): skipped {sorted(missed)}"
            checked_tiles += len(truth)
            coverage_requests += stats.coverage_requests
            image_tiles += len(found.z14_tiles)
            nonempty += len(
                world.nonempty_z14_tiles(
                    aoi.geometry.intersection(box(*mercantile.bounds(partition)))
                )
            )
        # the z14 tiles chosen are exactly the non-empty ones overlapping the AOI (the emulator's coverage
        # is exact), and coverage costs a small part of that, not one request per tile of the area
        assert image_tiles <= nonempty
        every_z14_tile = sum(1 for _ in mercantile.tiles(*aoi.bounds, zooms=14))
        assert coverage_requests + image_tiles < every_z14_tile
        if image_tiles > 50:
            assert coverage_requests <= 0.5 * image_tiles + len(partition_tiles(aoi, zoom))
    assert checked_tiles > 100
