"""The Switzerland world (``World(region="switzerland")``): deterministic, lazy per z14 tile, per-tile
counts known without generating, coverage consistent with the z14 content, ids-in-polygon ground truth,
the shipped outline AOI."""

from __future__ import annotations

import random
import tracemalloc

import mercantile
import numpy as np
import pytest
import shapely
from shapely.geometry import box

from mapillary_assets.api.tile_decoders import decode_sequence_lines
from mapillary_assets.emulator import World
from mapillary_assets.emulator import switzerland as swiss
from mapillary_assets.emulator.__main__ import build_parser
from mapillary_assets.emulator.regions import region
from mapillary_assets.emulator.tiles import render_tile
from mapillary_assets.pipeline.aoi import load_aoi

SCALE = 0.02
BERN_STATION = (7.4391, 46.9490)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=7, scale=SCALE, region="switzerland")


@pytest.fixture(scope="module")
def sample_tiles(world) -> list[tuple[int, int]]:
    """Non-empty tiles: the densest ones, some touching a lake or a mountain zone, some at random."""
    table = world._generator.expected_table()
    nonempty = world.nonempty_tiles()
    densest = sorted(nonempty, key=table.get)[-3:]
    void = [t for t in nonempty if region("switzerland").tile_geometry(*t)[1]]
    rng = random.Random(3)
    return densest + rng.sample(void, 12) + rng.sample(nonempty, 12)


def test_scale_one_holds_ten_million_images_by_tile_counts():
    world = World(seed=42, scale=1.0, region="switzerland")
    assert world.image_count() >= 10_000_000
    assert not world._tiles  # counted without generating a single tile


def test_same_seed_same_world_other_seed_differs(world, sample_tiles):
    again = World(seed=7, scale=SCALE, region="switzerland")
    other = World(seed=8, scale=SCALE, region="switzerland")
    for x, y in sample_tiles[:4]:
        a, b = world.tile_images(x, y), again.tile_images(x, y)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.lon, b.lon)
    x, y = sample_tiles[0]
    assert not np.array_equal(world.tile_images(x, y).lon[:5], other.tile_images(x, y).lon[:5])
    assert repr(world) == "World(seed=7, scale=0.02, epoch=0, region='switzerland')"


def test_one_tile_is_generated_alone_in_small_memory(world, sample_tiles):
    fresh = World(seed=7, scale=SCALE, region="switzerland")
    fresh._generator.expected_table()  # the density table (shared per process, no images)
    tracemalloc.start()
    try:
        tile = fresh.tile_images(*sample_tiles[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tile) > 500
    assert list(fresh._tiles) == [(*sample_tiles[0], 0)]
    assert peak < 20 * 2**20


def test_tile_counts_equal_the_generated_images(world, sample_tiles):
    for x, y in sample_tiles:
        assert world.tile_image_count(x, y) == len(world.tile_images(x, y)) > 0
    empty = [t for t in world.candidate_tiles() if not world.tile_sequence_count(*t)][:20]
    assert all(world.tile_image_count(*t) == len(world.tile_images(*t)) == 0 for t in empty)


def test_no_image_over_a_lake_a_high_mountain_or_far_abroad(world, sample_tiles):
    outline = swiss.outline()
    for x, y in sample_tiles:
        tile = world.tile_images(x, y)
        assert not swiss.in_void(tile.lon, tile.lat).any()
        assert outline.intersects(box(*mercantile.bounds(x, y, 14)))
    lake_geneva_middle = (6.55, 46.45)
    assert swiss.density_per_km2(*lake_geneva_middle) == 0
    assert swiss.density_per_km2(7.96, 46.54) == 0  # Jungfrau
    assert swiss.density_per_km2(*BERN_STATION) > 10_000 > swiss.density_per_km2(7.0, 46.7) > 0


def test_coverage_is_empty_exactly_where_no_z14_tile_holds_images(world):
    counts = {t: world.tile_image_count(*t) for t in world.candidate_tiles()}
    west, south, east, north = swiss.outline().bounds
    rng = random.Random(5)
    z12 = list(mercantile.tiles(west, south, east, north, 12))
    for parent in rng.sample(z12, 60) + [mercantile.tile(*BERN_STATION, 12)]:
        children = [
            (x, y)
            for x in range(parent.x * 4, parent.x * 4 + 4)
            for y in range(parent.y * 4, parent.y * 4 + 4)
        ]
        holding = sum(counts.get(c, 0) > 0 for c in children)
        data = render_tile(world, "mly1_public", parent.z, parent.x, parent.y)
        lines = decode_sequence_lines(data, parent.z, parent.x, parent.y)
        assert (data == b"") == (holding == 0)
        # one coverage line per sequence, each starting in the z14 tile that holds its images
        assert len(lines) == sum(world.tile_sequence_count(*c) for c in children)
        assert {mercantile.tile(*line[0], 14)[:2] for line in lines} <= {
            c for c in children if counts.get(c, 0) > 0
        }
        for x, y in children:  # and a z14 tile is empty exactly where its count is 0
            assert (render_tile(world, "mly1_public", 14, x, y) == b"") == (
                counts.get((x, y), 0) == 0
            )
    overview = render_tile(world, "mly1_public", 5, 16, 11)  # Switzerland lies in one z5 tile
    assert len(decode_sequence_lines(overview, 5, 16, 11)) == sum(v > 0 for v in counts.values())


def test_ids_in_a_small_polygon_generate_only_the_tiles_it_touches(world):
    lon, lat = BERN_STATION
    polygon = shapely.Polygon(
        [(lon - 0.02, lat - 0.01), (lon + 0.02, lat - 0.012), (lon + 0.01, lat + 0.015)]
    )
    fresh = World(seed=7, scale=SCALE, region="switzerland")
    ids = fresh.image_ids_in_polygon(polygon)
    touched = {(t.x, t.y) for t in mercantile.tiles(*polygon.bounds, 14)}
    assert {(x, y) for x, y, _ in fresh._tiles} <= touched
    truth = []
    for x, y in touched:
        tile = world.tile_images(x, y)
        inside = shapely.contains_xy(polygon, tile.lon, tile.lat)
        truth.extend(str(v) for v in tile.ids[inside].tolist())
    assert len(ids) > 100
    assert sorted(ids) == sorted(truth)
    assert len(ids) == len(set(ids)) == fresh.count_in_polygon(polygon)
    assert {r.id for r in fresh.images_in_polygon(polygon)} == set(ids)


def test_the_outline_aoi_is_switzerland_sized_and_selectable():
    aoi = load_aoi(swiss.outline_path())
    west, south, east, north = aoi.geometry.bounds
    assert 5.9 < west < 6.0 and 10.4 < east < 10.6 and 45.8 < south < 45.9 and 47.7 < north < 47.9
    km2 = aoi.geometry.area * 111.32 * np.cos(np.radians(46.8)) * 110.57
    assert 38_000 < km2 < 45_000
    assert build_parser().parse_args(["--region", "switzerland"]).region == "switzerland"
    with pytest.raises(ValueError, match="unknown region 'mars'"):
        World(region="mars")


def test_the_demo_on_the_country_world_defaults_its_aoi_to_the_outline(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from mapillary_assets import cli

    monkeypatch.delenv("MAPILLARY_AOI", raising=False)
    urls = {"graph_url": "http://g", "tiles_url": "http://t"}
    country = SimpleNamespace(world=World(region="switzerland"), **urls)
    city = SimpleNamespace(world=World(), **urls)
    assert cli._emulator_env(country, tmp_path)["MAPILLARY_AOI"] == str(swiss.outline_path())
    assert "MAPILLARY_AOI" not in cli._emulator_env(city, tmp_path)
    monkeypatch.setenv("MAPILLARY_AOI", "/my/area.geojson")
    assert "MAPILLARY_AOI" not in cli._emulator_env(country, tmp_path)  # the user's area wins


def test_tiles_render_alike_from_many_threads_at_once():
    """The emulator renders tiles in worker threads; GEOS prepared geometries shared between threads
    crashed it (a segfault), so each thread prepares its own. A crash here ends the test run."""
    from concurrent.futures import ThreadPoolExecutor

    tiles = list(mercantile.tiles(*swiss.outline().bounds, zooms=10))[:24]

    def render(tile):
        fresh = World(
            region="switzerland", scale=0.01, seed=3
        )  # its own caches: real work per call
        return render_tile(fresh, "mly1_public", tile.z, tile.x, tile.y)

    sequential = [render(tile) for tile in tiles[:8]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(render, tiles))
    assert concurrent[:8] == sequential
    assert any(concurrent)
