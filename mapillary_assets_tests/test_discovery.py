"""Discovery: coverage-guided z14 fetches, AOI clipping, the tile cache, and the bbox-search route."""

from __future__ import annotations

import asyncio
import logging

import mercantile
import pandas as pd
import pytest
import shapely
from shapely.geometry import box

from mapillary_assets.api import RequestTooLargeError
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets.pipeline.aoi import load_aoi
from mapillary_assets.pipeline.discovery.results import DISCOVERY_COLUMNS
from mapillary_assets.pipeline.discovery.search import SEARCH_LIMIT, discover_by_bbox_search
from mapillary_assets.pipeline.discovery.sequences import discover_by_sequences
from mapillary_assets.pipeline.discovery.tiles import discover_partition, touched_z14_tiles
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.clients import TileClient, emulator_client

CENTRE = mercantile.Tile(2145, 1434, 12)  # Zurich HB; the AOI edge crosses it
QUANTUM_M = 1.0  # z14 tile points are quantised to ~0.4 m


# ---------------------------------------------------------------------------------------------
# helpers


class SearchClient:
    """`images?bbox=` over the world: capped at `limit`, code 1 when a box holds too much."""

    def __init__(self, world: World, too_large_above: int = 6000):
        self.world, self.too_large_above = world, too_large_above
        self.boxes: list[tuple] = []

    async def search_images(self, bbox, fields, limit=2000, **filters):
        self.boxes.append(bbox)
        west, south, east, north = bbox
        assert (east - west) * (north - south) < 0.01
        await asyncio.sleep(0)
        records = self.world.images_in_polygon(box(*bbox))
        if len(records) > self.too_large_above:
            raise RequestTooLargeError("request too large", code=1, status=500)
        return [
            {
                "id": r.id,
                "geometry": {"type": "Point", "coordinates": list(r.geometry)},
                "captured_at": r.captured_at,
                "sequence": r.sequence,
                "compass_angle": r.compass_angle,
                "is_pano": r.is_pano,
                "creator": r.creator,
            }
            for r in records[:limit]
        ]


def partition_truth(world: World, aoi, partition: mercantile.Tile) -> dict[str, object]:
    area = aoi.geometry.intersection(box(*mercantile.bounds(partition)))
    return {
        r.id: r
        for r in world.images_in_polygon(area)
        if mercantile.tile(r.lon, r.lat, partition.z) == partition
    }


def nonempty_children(world: World, aoi, partition: mercantile.Tile) -> list[tuple[int, int]]:
    area = aoi.geometry.intersection(box(*mercantile.bounds(partition)))
    span = 2 ** (14 - partition.z)
    return [
        (x, y)
        for x, y in world.nonempty_z14_tiles(area)
        if x // span == partition.x
        and y // span == partition.y
        and area.intersection(box(*mercantile.bounds(x, y, 14))).area > 0
    ]


def assert_same_ids_up_to_quantisation(found_ids, truth: dict, world: World, aoi) -> None:
    """Tile points are quantised (~0.4 m at z14): only images that close to the AOI edge may differ."""
    boundary = aoi.geometry.boundary
    for image_id in set(found_ids) ^ set(truth):
        record = world.image(image_id)
        metres = boundary.distance(shapely.Point(record.lon, record.lat)) * 111_000
        assert metres < QUANTUM_M, f"{image_id} is {metres:.1f} m from the AOI edge"
    assert len(set(found_ids) ^ set(truth)) <= max(3, len(truth) // 1000)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=11, scale=0.01)


@pytest.fixture(scope="module")
def aoi():
    return load_aoi()


# ---------------------------------------------------------------------------------------------
# pure


def test_touched_tiles_of_points_and_lines():
    def centre(x, y):
        return mercantile.ul(x + 0.5, y + 0.5, 14)  # lon/lat of the tile centre

    a, b = centre(8580, 5737), centre(8582, 5737)
    assert touched_z14_tiles([[a]]) == {(8580, 5737)}
    # a horizontal line through three tiles
    assert touched_z14_tiles([[a, b]]) == {(8580, 5737), (8581, 5737), (8582, 5737)}
    # a diagonal to the diagonal neighbour passing just beside the shared corner crosses exactly the
    # one neighbour on its side of the corner
    above = touched_z14_tiles([[centre(8580, 5737), mercantile.ul(8581.5, 5738.49, 14)]])
    assert above == {(8580, 5737), (8581, 5737), (8581, 5738)}
    below = touched_z14_tiles([[centre(8580, 5737), mercantile.ul(8581.49, 5738.5, 14)]])
    assert below == {(8580, 5737), (8580, 5738), (8581, 5738)}
    # a short diagonal in the lower-right quarter never enters the tile's upper-left neighbours
    near = touched_z14_tiles(
        [[mercantile.ul(8580.6, 5737.6, 14), mercantile.ul(8581.4, 5737.9, 14)]]
    )
    assert near == {(8580, 5737), (8581, 5737)}
    assert touched_z14_tiles([]) == set()


def test_slack_reaches_across_a_nearby_border():
    just_inside = mercantile.ul(8580.999, 5737.5, 14)
    assert touched_z14_tiles([[just_inside]]) == {(8580, 5737)}
    assert touched_z14_tiles([[just_inside]], slack=0.01) == {(8580, 5737), (8581, 5737)}


def test_partition_finds_the_aoi_images_with_one_request_per_nonempty_tile(tmp_path, world, aoi):
    client = TileClient(world)
    frame, stats = run(discover_partition(client, aoi, CENTRE, DataLayout(tmp_path)))

    truth = partition_truth(world, aoi, CENTRE)
    assert len(truth) > 1000
    assert_same_ids_up_to_quantisation(frame["image_id"], truth, world, aoi)
    assert not frame["image_id"].duplicated().any()
    assert {k: str(v) for k, v in frame.dtypes.items()} == DISCOVERY_COLUMNS
    assert (frame["tileset"] == "mly1_public").all()

    # values match the world (positions up to the tile grid)
    sample = frame.set_index("image_id").loc[list(truth)[:50]]
    for image_id, row in sample.iterrows():
        record = truth[image_id]
        assert row["sequence_id"] == record.sequence and row["captured_at_ms"] == record.captured_at
        assert abs(row["lon"] - record.lon) < 1e-5 and abs(row["lat"] - record.lat) < 1e-5
        assert row["tile_z14"] == "14/{}/{}".format(*record.tile)
        assert row["is_pano"] == record.is_pano

    expected_tiles = nonempty_children(world, aoi, CENTRE)
    assert stats.coverage_requests == 1 and stats.image_tile_requests == stats.nonempty_z14_tiles
    assert sorted((x, y) for z, x, y in client.tile_requests if z == 14) == expected_tiles
    assert len(client.tile_requests) == 1 + len(expected_tiles)
    assert stats.images_in_aoi == len(frame) and stats.images_in_tiles > len(
        frame
    )  # clipped to the AOI
    assert stats.skipped_z14_tiles > 0


def test_refresh_within_cache_age_makes_no_request(tmp_path, world, aoi):
    layout = DataLayout(tmp_path)
    first, _ = run(discover_partition(TileClient(world), aoi, CENTRE, layout))
    again_client = TileClient(world)
    again, stats = run(discover_partition(again_client, aoi, CENTRE, layout))
    assert again_client.tile_requests == []
    assert stats.cache_hits == 1 + stats.nonempty_z14_tiles and stats.requests == 0
    pd.testing.assert_frame_equal(again, first)

    # an expired cache is fetched again
    expired_client = TileClient(world)
    run(discover_partition(expired_client, aoi, CENTRE, layout, cache_max_age_s=0))
    assert len(expired_client.tile_requests) == 1 + stats.nonempty_z14_tiles


def test_empty_partition_caches_its_empty_coverage_tile(tmp_path, world):
    far = mercantile.tile(9.30, 47.38, 12)  # 55 km east of Zurich: beyond the synthetic world
    layout = DataLayout(tmp_path)
    far_aoi = load_aoi(
        coordinates=[list(c) for c in box(*mercantile.bounds(far)).buffer(-0.001).exterior.coords]
    )
    client = TileClient(world)
    frame, stats = run(discover_partition(client, far_aoi, far, layout))
    assert frame.empty and list(frame.columns) == list(DISCOVERY_COLUMNS)
    assert client.tile_requests == [(12, far.x, far.y)]
    cached = layout.tile_cache_path("mly1_public", 12, far.x, far.y)
    assert cached.exists() and cached.stat().st_size == 0
    second = TileClient(world)
    run(discover_partition(second, far_aoi, far, layout))
    assert second.tile_requests == []


def test_corrupt_cached_tile_is_deleted_and_fetched_again(tmp_path, world, aoi, caplog):
    layout = DataLayout(tmp_path)
    first, stats = run(discover_partition(TileClient(world), aoi, CENTRE, layout))
    x, y = map(int, first["tile_z14"].iloc[0].split("/")[1:])
    layout.tile_cache_path("mly1_public", 14, x, y).write_bytes(b"\x1a\xff\xff garbage")
    layout.tile_cache_path("mly1_public", 12, CENTRE.x, CENTRE.y).write_bytes(
        b"\x1f\x8b truncated gzip"
    )
    client = TileClient(world)
    with caplog.at_level(logging.WARNING):
        again, again_stats = run(discover_partition(client, aoi, CENTRE, layout))
    pd.testing.assert_frame_equal(again, first)
    assert sorted(client.tile_requests) == sorted([(12, CENTRE.x, CENTRE.y), (14, x, y)])
    assert again_stats.corrupt_cache_tiles == 2
    assert "corrupt" in caplog.text


def test_low_zoom_partition_descends_coverage_from_z6(tmp_path, world, aoi):
    partition = mercantile.parent(CENTRE, zoom=5)
    client = TileClient(world)
    frame, stats = run(discover_partition(client, aoi, partition, DataLayout(tmp_path)))
    assert {z for z, *_ in client.tile_requests} == {6, 8, 10, 14}
    assert [t for t in client.tile_requests if t[0] == 6] == [
        (6, *mercantile.parent(CENTRE, zoom=6)[:2])
    ]
    # the AOI lies within one z6 tile; below it, only coverage tiles that hold imagery are read
    nonempty = world.nonempty_z14_tiles(aoi.geometry)
    for z, x, y in client.tile_requests:
        if z in (8, 10):
            assert any(tx >> (14 - z) == x and ty >> (14 - z) == y for tx, ty in nonempty)
    assert stats.coverage_requests == sum(1 for z, *_ in client.tile_requests if z < 14)
    assert_same_ids_up_to_quantisation(
        frame["image_id"], partition_truth(world, aoi, partition), world, aoi
    )


def test_bbox_search_splits_full_boxes_and_matches_tiles(tmp_path, world, aoi):
    client = SearchClient(world)
    frame, stats = run(discover_by_bbox_search(client, aoi, bbox=tuple(mercantile.bounds(CENTRE))))
    truth = partition_truth(world, aoi, CENTRE)
    assert set(frame["image_id"]) == set(truth)  # exact positions: no quantisation here
    assert stats.search_requests == len(client.boxes) > 4
    assert {k: str(v) for k, v in frame.dtypes.items()} == DISCOVERY_COLUMNS
    tiles, _ = run(discover_partition(TileClient(world), aoi, CENTRE, DataLayout(tmp_path)))
    assert_same_ids_up_to_quantisation(
        frame["image_id"], {i: None for i in tiles["image_id"]}, world, aoi
    )


def test_bbox_search_splits_on_request_too_large(world):
    small = load_aoi(
        coordinates=[[8.535, 47.372], [8.545, 47.372], [8.545, 47.382], [8.535, 47.382]]
    )
    client = SearchClient(world, too_large_above=150)
    frame, stats = run(discover_by_bbox_search(client, small))
    truth = {r.id for r in world.images_in_polygon(small.geometry)}
    assert len(truth) > SEARCH_LIMIT / 10 and set(frame["image_id"]) == truth
    assert stats.search_requests > 4


# ---------------------------------------------------------------------------------------------
# against the emulator (HTTP, the real client)


async def discover_via(server, tmp_path, aoi, partition, layout, **kwargs):
    async with emulator_client(server, tmp_path) as client:
        return await discover_partition(client, aoi, partition, layout, **kwargs)


async def search_via(server, tmp_path, aoi, bbox):
    async with emulator_client(server, tmp_path) as client:
        return await discover_by_bbox_search(client, aoi, bbox=bbox)


def test_emulator_partition_requests_cache_and_bbox_route(tmp_path, world, aoi):
    layout = DataLayout(tmp_path / "data")
    with EmulatorServer(world) as server:
        frame, stats = run(discover_via(server, tmp_path, aoi, CENTRE, layout))
        truth = partition_truth(world, aoi, CENTRE)
        assert_same_ids_up_to_quantisation(frame["image_id"], truth, world, aoi)
        expected_tiles = nonempty_children(world, aoi, CENTRE)
        assert server.stats()["tile"] == 1 + len(expected_tiles) == stats.requests

        server.reset_stats()
        again, again_stats = run(discover_via(server, tmp_path, aoi, CENTRE, layout))
        assert server.stats()["requests"] == 0 and again_stats.requests == 0
        pd.testing.assert_frame_equal(again, frame)

        server.reset_stats()
        searched, search_stats = run(
            search_via(server, tmp_path, aoi, tuple(mercantile.bounds(CENTRE)))
        )
        assert set(searched["image_id"]) == set(truth)
        assert server.stats()["search"] == search_stats.search_requests


def test_emulator_5xx_are_retried(tmp_path, world, aoi):
    with EmulatorServer(world) as server:
        server.set_faults(error_5xx_rate=0.3)
        frame, _ = run(discover_via(server, tmp_path, aoi, CENTRE, DataLayout(tmp_path / "data")))
        assert server.stats()["faulted"] > 0
    assert_same_ids_up_to_quantisation(
        frame["image_id"], partition_truth(world, aoi, CENTRE), world, aoi
    )


async def sequences_via(server, tmp_path, aoi, sequence_ids, existing=None):
    async with emulator_client(server, tmp_path) as client:
        return await discover_by_sequences(client, aoi, sequence_ids, existing)


def test_sequence_route_finds_the_sequences_images_inside_the_area_and_resumes(
    tmp_path, world, aoi
):
    records = world.images_in_polygon(aoi.geometry)
    sequences = sorted({r.sequence_id for r in records})[::25][:6]
    truth = {r.id: r for r in records if r.sequence_id in sequences}
    with EmulatorServer(world) as server:
        frame, failures, stats = run(
            sequences_via(server, tmp_path, aoi, [*sequences, "NoSuchSequence1"])
        )
        assert set(frame["image_id"]) == set(truth) and len(truth) > 50
        assert failures.empty
        assert {k: str(v) for k, v in frame.dtypes.items()} == DISCOVERY_COLUMNS
        row = frame.iloc[0]
        record = truth[row["image_id"]]
        assert (
            row["sequence_id"] == record.sequence_id and row["captured_at_ms"] == record.captured_at
        )
        assert (row["lon"], row["lat"]) == pytest.approx(tuple(record.geometry))
        assert row["tile_z14"] == "14/{}/{}".format(
            *mercantile.tile(row["lon"], row["lat"], 14)[:2]
        )

        # A re-run lists the sequences again but looks up none of the images it already holds.
        server.reset_stats()
        again, _, _ = run(sequences_via(server, tmp_path, aoi, sequences, existing=frame))
        pd.testing.assert_frame_equal(again, frame)
        outside = {i for s in sequences for i in world.sequence_image_ids(s)} - set(truth)
        assert server.stats().get("batch", 0) == -(-len(outside) // 50)
