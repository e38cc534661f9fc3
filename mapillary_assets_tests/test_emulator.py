"""The Mapillary API emulator: world, tiles, Graph API, CDN, faults, rate limits, CLI.

Talks to the emulator with plain ``requests`` (not the project's client), so these tests pin the
wire format the client is written against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import mapbox_vector_tile
import mercantile
import numpy as np
import pytest
import requests
from shapely.geometry import box, shape

from mapillary_assets.emulator import EmulatorServer, Faults, ImageRecord, World, thumbnails
from mapillary_assets.emulator.geography import LAKE
from mapillary_assets.emulator.ids import (
    IMAGE_ID_BASE,
    decode_image_id,
    decode_sequence_id,
    encode_image_id,
    encode_sequence_id,
)

TOKEN = "MLY|test-token"
AUTH = {"Authorization": f"OAuth {TOKEN}"}
CORE_TILE = (8580, 5737)  # contains Zurich HB
LAKE_TILE = (8581, 5740)  # wholly inside the lake polygon
ZURICH = shape(
    json.loads((Path(__file__).parents[1] / "mapillary_assets/data/zurich.geojson").read_text())[
        "features"
    ][0]["geometry"]
)
ALL_FIELDS = (
    "id,altitude,atomic_scale,camera_parameters,camera_type,captured_at,compass_angle,computed_altitude,"
    "computed_compass_angle,computed_geometry,computed_rotation,creator,exif_orientation,geometry,height,"
    "is_pano,make,merge_cc,mesh,model,quality_score,sequence,sfm_cluster,width"
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=7, scale=0.02)


@pytest.fixture(scope="module")
def server(world):
    with EmulatorServer(world, token=TOKEN, search_max_matches=1_000) as running:
        yield running


@pytest.fixture()
def emulator(server):
    server.set_faults(**{f: getattr(Faults(), f) for f in Faults.__dataclass_fields__})
    server.reset_stats()
    yield server
    server.set_faults(**{f: getattr(Faults(), f) for f in Faults.__dataclass_fields__})


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def core_images(world) -> list[ImageRecord]:
    return world.images_in_z14_tile(*CORE_TILE)


def tile_url(server, z, x, y, tileset="mly1_public"):
    return f"{server.tiles_url}/maps/vtp/{tileset}/2/{z}/{x}/{y}"


def laplacian_variance(data: bytes) -> float:
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


# ---------------------------------------------------------------------------------------------
# world


def test_same_seed_same_world_and_other_seed_differs():
    a, b, c = World(seed=3, scale=0.02), World(seed=3, scale=0.02), World(seed=4, scale=0.02)
    assert a.images_in_z14_tile(*CORE_TILE) == b.images_in_z14_tile(*CORE_TILE)
    assert [r.id for r in a.images_in_z14_tile(*CORE_TILE)] != [
        r.id for r in c.images_in_z14_tile(*CORE_TILE)
    ]


def test_scale_one_has_dense_core_sparse_edge_and_empty_lake():
    full = World(scale=1.0)
    assert len(full.tile_images(*CORE_TILE)) > 50_000
    assert len(full.tile_images(8581, 5737)) > 10_000
    assert full.images_in_z14_tile(*LAKE_TILE) == []
    assert full.expected_images(8600, 5700) < 2_000  # ~10 km out
    assert full.tile_sequence_count(8300, 5737) == 0  # > 25 km from the centre
    per_tile = [full.expected_images(*t) for t in full.nonempty_z14_tiles(ZURICH)]
    assert 900_000 < sum(per_tile) < 2_000_000


def test_lake_and_far_away_hold_no_images(world):
    assert world.images_in_polygon(LAKE.intersection(box(8.5, 47.3, 8.6, 47.37))) == []
    assert world.nonempty_z14_tiles(box(6.0, 46.0, 6.1, 46.1)) == []


def test_polygon_ground_truth_matches_tiles(world):
    area = box(8.53, 47.37, 8.55, 47.385)
    truth = world.images_in_polygon(area)
    assert truth and world.count_in_polygon(area) == len(truth)
    assert all(area.contains(shape({"type": "Point", "coordinates": r.geometry})) for r in truth)
    tiles = set(world.nonempty_z14_tiles(area))
    assert {r.tile for r in truth} <= tiles
    assert all(world.images_in_z14_tile(*t) for t in tiles)


def test_image_ids_are_float_unsafe_and_round_trip(core_images, world):
    record = core_images[5]
    value = int(record.id)
    assert 2**53 <= value < 10**16  # beyond exact float64 integers
    assert len(record.id) == 16 and record.id.isdigit()
    x, y, seq, img = decode_image_id(record.id)
    assert (x, y) == CORE_TILE == record.tile
    assert encode_image_id(x, y, seq, img) == record.id
    assert world.image(record.id) == record
    assert world.image(str(value + 10**9)) is None
    assert world.image("abc") is None and world.image("123") is None


def test_sequence_ids_decode_and_list_images_in_capture_order(core_images, world):
    record = core_images[0]
    assert len(record.sequence) == 22
    x, y, index = decode_sequence_id(world.seed, record.sequence)
    assert (x, y) == CORE_TILE
    ids = world.sequence_image_ids(record.sequence)
    assert ids[0] == record.id
    images = [world.image(i) for i in ids]
    assert all(r.sequence == record.sequence for r in images)
    captured = [r.captured_at for r in images]
    assert captured == sorted(captured) and len(set(captured)) == len(captured)
    assert decode_sequence_id(world.seed + 1, record.sequence) is None
    assert world.sequence_image_ids("x" * 22) is None
    legacy = [encode_sequence_id(1, 8580, 5737, i) for i in range(400)]
    assert any("-" in s or "_" in s for s in legacy) and all(len(s) == 22 for s in legacy)


def test_sequences_are_street_like_and_stay_in_their_tile(core_images):
    west, south, east, north = mercantile.bounds(*CORE_TILE, 14)
    assert all(west < r.lon < east and south < r.lat < north for r in core_images)
    by_sequence: dict[str, list[ImageRecord]] = {}
    for r in core_images:
        by_sequence.setdefault(r.sequence, []).append(r)
    lengths = [len(v) for v in by_sequence.values()]
    assert max(lengths) <= 300
    first = max(by_sequence.values(), key=len)
    lon, lat = np.array([r.lon for r in first]), np.array([r.lat for r in first])
    step_m = np.hypot(np.diff(lon) * 75_400, np.diff(lat) * 110_570)
    assert 2.0 < np.median(step_m) < 16.0


def test_record_fields_have_the_documented_types(core_images):
    assert {r.camera_type for r in core_images} <= {
        "perspective",
        "fisheye",
        "equirectangular",
        "spherical",
        "brown",
    }
    assert any(r.computed_geometry is None for r in core_images)
    assert any(r.altitude < 0 for r in core_images)
    assert any(r.atomic_scale == 1 and isinstance(r.atomic_scale, int) for r in core_images)
    assert any(r.organization_id is not None for r in core_images)
    for r in core_images[:50]:
        assert r.width * 3 == r.height * 4
        assert isinstance(r.merge_cc, float) and len(r.computed_rotation) == 3
        assert r.is_pano == (r.camera_type in ("equirectangular", "spherical"))


def test_blurred_fraction_is_deterministic(core_images, world):
    blurred = [world.is_blurred(r.id) for r in core_images]
    assert blurred == [r.blurred for r in core_images]
    assert 0.06 < sum(blurred) / len(blurred) < 0.14


def test_advance_adds_sequences_and_keeps_old_ids():
    world = World(seed=11, scale=0.05)
    before = {t: world.tile_sequence_count(*t) for t in world.candidate_tiles()}
    old = world.images_in_z14_tile(*CORE_TILE)
    assert world.advance() == 1
    after = {t: world.tile_sequence_count(*t) for t in world.candidate_tiles()}
    grown = [t for t in after if after[t] > before[t]]
    assert 0 < len(grown) < len(after) / 2
    assert all(world.image(r.id) == r for r in old[:20])
    fresh = World(seed=11, scale=0.05, epoch=1)
    tile = grown[0]
    assert fresh.images_in_z14_tile(*tile) == world.images_in_z14_tile(*tile)
    new = [r for r in world.images_in_z14_tile(*tile) if r.epoch == 1]
    older = [r.captured_at for r in World(seed=11, scale=0.05).images_in_z14_tile(*tile)]
    assert new and min(r.captured_at for r in new) > max(older, default=0)


# ---------------------------------------------------------------------------------------------
# vector tiles


def test_z14_tile_layers_match_the_world(emulator, http, core_images):
    response = http.get(tile_url(emulator, 14, *CORE_TILE), params={"access_token": TOKEN})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-protobuf"
    decoded = mapbox_vector_tile.decode(response.content, default_options={"y_coord_down": True})
    assert list(decoded) == ["sequence", "image"]
    assert decoded["image"]["extent"] == 4096 and decoded["image"]["version"] == 2
    points = decoded["image"]["features"]
    assert [f["properties"]["id"] for f in points] == [int(r.id) for r in core_images]
    west, south, east, north = mercantile.bounds(*CORE_TILE, 14)
    for feature, record in zip(points[:200], core_images[:200]):
        props = feature["properties"]
        assert props["captured_at"] == record.captured_at
        assert props["compass_angle"] == pytest.approx(record.compass_angle)
        assert props["sequence_id"] == record.sequence
        assert props["is_pano"] is record.is_pano
        assert props["creator_id"] == record.creator_id
        assert props.get("organization_id") == record.organization_id
        px, py = feature["geometry"]["coordinates"]
        assert 0 <= px < 4096 and 0 <= py < 4096
        assert west + (east - west) * px / 4096 == pytest.approx(record.lon, abs=1e-5)
        assert abs(py - 4096 * (north - record.lat) / (north - south)) < 30  # y grows downward
    lines = decoded["sequence"]["features"]
    assert {f["properties"]["id"] for f in lines} == {r.sequence for r in core_images}
    assert all(f["geometry"]["type"] == "LineString" for f in lines)
    assert all(isinstance(f["properties"]["image_id"], int) for f in lines)


def test_low_zoom_tiles_cover_nonempty_z14_tiles(emulator, http, world):
    z13 = mercantile.parent(mercantile.Tile(*CORE_TILE, 14), zoom=13)
    decoded = mapbox_vector_tile.decode(
        http.get(tile_url(emulator, 13, z13.x, z13.y), params={"access_token": TOKEN}).content
    )
    assert list(decoded) == ["sequence"]
    children = [(c.x, c.y) for c in mercantile.children(z13)]
    assert len(decoded["sequence"]["features"]) == sum(  # one line per sequence
        world.tile_sequence_count(*c) for c in children
    )
    z14_lines = []
    for x, y in children:
        content = http.get(tile_url(emulator, 14, x, y), params={"access_token": TOKEN}).content
        z14_lines += mapbox_vector_tile.decode(content)["sequence"]["features"] if content else []
    # each line carries its sequence's properties, as the z14 `sequence` layer shows them
    assert sorted(str(f["properties"]) for f in decoded["sequence"]["features"]) == sorted(
        str(f["properties"]) for f in z14_lines
    )
    z5 = mercantile.parent(mercantile.Tile(*CORE_TILE, 14), zoom=5)
    decoded = mapbox_vector_tile.decode(
        http.get(tile_url(emulator, 5, z5.x, z5.y), params={"access_token": TOKEN}).content
    )
    assert list(decoded) == ["overview"]
    assert len(decoded["overview"]["features"]) == len(world.nonempty_tiles())
    assert {"captured_at", "id", "sequence_id", "is_pano"} <= set(
        decoded["overview"]["features"][0]["properties"]
    )


def test_computed_tileset_serves_the_core_tiles_images(emulator, http, core_images):
    response = http.get(
        tile_url(emulator, 14, *CORE_TILE, tileset="mly1_computed_public"),
        params={"access_token": TOKEN},
    )
    decoded = mapbox_vector_tile.decode(response.content)
    ids = {f["properties"]["id"] for f in decoded["image"]["features"]}
    original = {int(r.id) for r in core_images}
    assert len(ids & original) > 0.95 * len(original)


def test_empty_tile_unknown_tileset_and_bad_token(emulator, http):
    empty = http.get(tile_url(emulator, 14, *LAKE_TILE), params={"access_token": TOKEN})
    assert empty.status_code == 204 and empty.content == b""
    unknown = http.get(
        tile_url(emulator, 14, *CORE_TILE, tileset="nope"), params={"access_token": TOKEN}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 100
    bad = http.get(tile_url(emulator, 14, *CORE_TILE), params={"access_token": "MLY|wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == 190


# ---------------------------------------------------------------------------------------------
# Graph API


def test_entity_returns_requested_fields_with_api_types(emulator, http, core_images):
    wrapped = next(r for r in core_images if r.altitude < 0)
    body = http.get(
        f"{emulator.graph_url}/{wrapped.id}", params={"fields": ALL_FIELDS}, headers=AUTH
    ).json()
    assert body["id"] == wrapped.id
    assert body["altitude"] == 2**32 + int(wrapped.altitude)
    assert body["geometry"] == {"type": "Point", "coordinates": list(wrapped.geometry)}
    assert isinstance(body["captured_at"], int) and isinstance(body["compass_angle"], float)
    assert body["creator"] == {"username": wrapped.creator_username, "id": str(wrapped.creator_id)}
    assert isinstance(body["merge_cc"], float) and len(body["computed_rotation"]) == 3
    assert None not in body.values()
    small = http.get(
        f"{emulator.graph_url}/{wrapped.id}", params={"fields": "captured_at"}, headers=AUTH
    ).json()
    assert small == {"id": wrapped.id, "captured_at": wrapped.captured_at}
    missing = next(r for r in core_images if r.computed_geometry is None)
    body = http.get(
        f"{emulator.graph_url}/{missing.id}", params={"fields": "computed_geometry"}, headers=AUTH
    )
    assert body.json() == {"id": missing.id}


def test_entity_auth_via_query_parameter_and_failures(emulator, http, core_images):
    image_id = core_images[0].id
    assert (
        http.get(f"{emulator.graph_url}/{image_id}", params={"access_token": TOKEN}).status_code
        == 200
    )
    for headers in ({}, {"Authorization": "OAuth MLY|wrong"}):
        response = http.get(f"{emulator.graph_url}/{image_id}", headers=headers)
        error = response.json()["error"]
        assert response.status_code == 500
        assert (error["code"], error["type"], error["message"]) == (
            190,
            "OAuthException",
            "Invalid OAuth 2.0 Access Token",
        )
        assert error["fbtrace_id"]


def test_unknown_id_and_unknown_field(emulator, http, core_images):
    response = http.get(f"{emulator.graph_url}/{IMAGE_ID_BASE + 12345}", headers=AUTH)
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["error_subcode"]) == (
        100,
        33,
    )
    response = http.get(
        f"{emulator.graph_url}/{core_images[0].id}", params={"fields": "id,colour"}, headers=AUTH
    )
    assert response.status_code == 400
    assert (
        response.json()["error"]["message"]
        == "Tried accessing nonexisting field (colour) on node type (Image)"
    )


def test_batch_lookup(emulator, http, core_images):
    ids = [r.id for r in core_images[:50]]
    response = http.get(
        f"{emulator.graph_url}/",
        params={"ids": ",".join(ids), "fields": "captured_at,sequence"},
        headers=AUTH,
    )
    body = response.json()
    assert list(body) == ids
    assert body[ids[3]] == {
        "id": ids[3],
        "captured_at": core_images[3].captured_at,
        "sequence": core_images[3].sequence,
    }
    assert "x-app-usage" in response.headers
    too_many = http.get(
        f"{emulator.graph_url}/",
        params={"ids": ",".join(r.id for r in core_images[:51])},
        headers=AUTH,
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == 100
    poisoned = http.get(
        f"{emulator.graph_url}/",
        params={"ids": ",".join(ids[:5] + [str(IMAGE_ID_BASE + 1)])},
        headers=AUTH,
    )
    assert poisoned.status_code == 400
    assert poisoned.json()["error"]["error_subcode"] == 33


def test_images_by_ids_and_sequence_listing(emulator, http, core_images, world):
    ids = [r.id for r in core_images[:3]]
    body = http.get(
        f"{emulator.graph_url}/images",
        params={"image_ids": ",".join(ids), "fields": "is_pano"},
        headers=AUTH,
    ).json()
    assert [row["id"] for row in body["data"]] == ids
    sequence = core_images[0].sequence
    body = http.get(
        f"{emulator.graph_url}/image_ids", params={"sequence_id": sequence}, headers=AUTH
    ).json()
    assert [row["id"] for row in body["data"]] == world.sequence_image_ids(sequence)
    unknown = http.get(
        f"{emulator.graph_url}/image_ids", params={"sequence_id": "A" * 22}, headers=AUTH
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == 100


def test_bbox_search(emulator, http, world, core_images):
    lon, lat = core_images[100].geometry
    small = (lon - 0.0008, lat - 0.0006, lon + 0.0008, lat + 0.0006)
    truth = {r.id for r in world.images_in_polygon(box(*small))}
    body = http.get(
        f"{emulator.graph_url}/images",
        params={"bbox": ",".join(map(str, small)), "fields": "id,geometry"},
        headers=AUTH,
    ).json()
    assert {row["id"] for row in body["data"]} == truth and truth
    limited = http.get(
        f"{emulator.graph_url}/images",
        params={"bbox": ",".join(map(str, small)), "limit": 2},
        headers=AUTH,
    ).json()
    assert len(limited["data"]) == 2 and len(truth) > 2
    dense = http.get(
        f"{emulator.graph_url}/images",
        params={"bbox": "8.53,47.37,8.55,47.385", "limit": 10},
        headers=AUTH,
    )
    assert dense.status_code == 500 and dense.json()["error"]["code"] == 1
    assert "reduce the amount of data" in dense.json()["error"]["message"]
    huge = http.get(
        f"{emulator.graph_url}/images", params={"bbox": "8.4,47.3,8.6,47.4"}, headers=AUTH
    )
    assert huge.status_code == 400 and huge.json()["error"]["code"] == 100


# ---------------------------------------------------------------------------------------------
# thumbnails


def test_thumbnails_are_real_baseline_jpegs_and_blur_is_measurable(emulator, http, core_images):
    sharp = next(r for r in core_images if not r.blurred)
    blurred = next(r for r in core_images if r.blurred)
    fields = "thumb_256_url,thumb_1024_url"
    scores = {}
    for record in (sharp, blurred):
        urls = http.get(
            f"{emulator.graph_url}/{record.id}", params={"fields": fields}, headers=AUTH
        ).json()
        assert "stp=s1024x768" in urls["thumb_1024_url"] and "&oh=" in urls["thumb_1024_url"]
        for field, width in (("thumb_256_url", 256), ("thumb_1024_url", 1024)):
            response = http.get(urls[field])
            assert response.status_code == 200 and response.headers["Content-Type"] == "image/jpeg"
            data = response.content
            assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
            assert b"\xff\xc0" in data and b"\xff\xc2" not in data  # baseline, not progressive
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape[:2] == (width * 3 // 4, width)
            if width == 1024:
                scores[record.blurred] = laplacian_variance(data)
    assert scores[False] > 300 and scores[True] < 40
    assert http.get(urls["thumb_1024_url"]).content == http.get(urls["thumb_1024_url"]).content


def test_expired_or_forged_urls_are_refused(emulator, http, core_images):
    image_id = core_images[0].id
    emulator.set_faults(thumbnail_ttl_s=-5)
    url = http.get(
        f"{emulator.graph_url}/{image_id}", params={"fields": "thumb_1024_url"}, headers=AUTH
    ).json()
    expired = http.get(url["thumb_1024_url"])
    assert expired.status_code == 403 and expired.text == "URL signature expired"
    emulator.set_faults(thumbnail_ttl_s=3600)
    url = http.get(
        f"{emulator.graph_url}/{image_id}", params={"fields": "thumb_1024_url"}, headers=AUTH
    ).json()
    expiry = int(url["thumb_1024_url"].split("oe=")[1][:8], 16)
    assert 3590 < expiry - time.time() <= 3600
    forged = url["thumb_1024_url"].replace("/1024/", "/2048/")
    assert http.get(forged).status_code == 403


# ---------------------------------------------------------------------------------------------
# faults, rate limits, counters


def test_rate_limit_answers_code_4_with_retry_after(emulator, http, core_images):
    emulator.set_faults(rate_limit_per_minute={"entity": 5})
    url = f"{emulator.graph_url}/{core_images[0].id}"
    responses = [http.get(url, headers=AUTH) for _ in range(7)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 2
    error = responses[-1].json()["error"]
    assert error["code"] == 4 and error["is_transient"] is True
    assert 1 <= int(responses[-1].headers["Retry-After"]) <= 60
    assert json.loads(responses[4].headers["x-app-usage"])["call_count"] == 100
    assert json.loads(responses[0].headers["x-app-usage"])["call_count"] == 20
    assert len(emulator.request_times("entity")) == 5
    tiles = http.get(tile_url(emulator, 14, *CORE_TILE), params={"access_token": TOKEN})
    assert tiles.status_code == 200  # another family, another budget
    stats = emulator.stats()
    assert stats["rate_limited"] == 2 and stats["entity"] == 7


def test_rate_limit_status_403_is_selectable(world, core_images):
    with EmulatorServer(
        world, Faults(rate_limit_per_minute={"search": 1}), token=TOKEN, rate_limit_status=403
    ) as server:
        url = f"{server.graph_url}/images"
        params = {"bbox": "8.536,47.374,8.5362,47.3742"}
        assert requests.get(url, params=params, headers=AUTH).status_code == 200
        second = requests.get(url, params=params, headers=AUTH)
        assert second.status_code == 403 and second.json()["error"]["code"] == 4


def test_random_5xx_rate_is_roughly_honoured(emulator, http, core_images):
    emulator.set_faults(error_5xx_rate=0.3)
    url = f"{emulator.graph_url}/{core_images[0].id}"
    statuses = [http.get(url, headers=AUTH).status_code for _ in range(200)]
    failed = [s for s in statuses if s >= 500]
    assert set(failed) <= {500, 502, 503}
    assert 30 <= len(failed) <= 90
    assert emulator.stats()["faulted"] == len(failed)


def test_outage_window_answers_503(emulator, http, core_images):
    now = time.time()
    emulator.set_faults(outage_start=now - 1, outage_end=now + 60)
    assert http.get(f"{emulator.graph_url}/{core_images[0].id}", headers=AUTH).status_code == 503
    assert (
        http.get(tile_url(emulator, 14, *CORE_TILE), params={"access_token": TOKEN}).status_code
        == 503
    )
    emulator.set_faults(outage_start=now - 100, outage_end=now - 50)
    assert http.get(f"{emulator.graph_url}/{core_images[0].id}", headers=AUTH).status_code == 200


def test_omit_optional_fields(emulator, http, core_images):
    record = next(r for r in core_images if r.computed_geometry is not None)
    emulator.set_faults(omit_optional_fields=True)
    body = http.get(
        f"{emulator.graph_url}/{record.id}",
        params={"fields": "computed_geometry,creator,geometry"},
        headers=AUTH,
    ).json()
    assert set(body) == {"id", "geometry"}


def test_truncated_and_corrupt_jpegs_are_predictable(emulator, http, core_images):
    emulator.set_faults(truncated_jpeg_rate=0.3, corrupt_jpeg_rate=0.2)
    kinds = {r.id: thumbnails.jpeg_fault(r.id, 0.2, 0.3) for r in core_images[:40]}
    assert {"truncated", "corrupt", None} <= set(kinds.values())
    for image_id, kind in list(kinds.items())[:15]:
        url = http.get(
            f"{emulator.graph_url}/{image_id}", params={"fields": "thumb_256_url"}, headers=AUTH
        ).json()
        data = http.get(url["thumb_256_url"]).content
        if kind == "truncated":
            assert data[:2] == b"\xff\xd8" and data[-2:] != b"\xff\xd9"
        elif kind == "corrupt":
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None
        else:
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def test_latency_is_added(emulator, http, core_images):
    emulator.set_faults(latency_s=0.2)
    start = time.perf_counter()
    http.get(f"{emulator.graph_url}/{core_images[0].id}", headers=AUTH)
    assert time.perf_counter() - start >= 0.2


def test_stats_count_every_request_exactly(emulator, http, core_images):
    ids = ",".join(r.id for r in core_images[:3])
    http.get(f"{emulator.graph_url}/{core_images[0].id}", headers=AUTH)
    http.get(f"{emulator.graph_url}/{core_images[0].id}")  # auth failure
    http.get(f"{emulator.graph_url}/", params={"ids": ids}, headers=AUTH)
    # a thumbnail URL lookup counts apart; metadata that also carries the URL does not
    http.get(f"{emulator.graph_url}/", params={"ids": ids, "fields": "thumb_256_url"}, headers=AUTH)
    http.get(
        f"{emulator.graph_url}/",
        params={"ids": ids, "fields": "captured_at,thumb_256_url"},
        headers=AUTH,
    )
    http.get(f"{emulator.graph_url}/images", params={"image_ids": ids}, headers=AUTH)
    http.get(
        f"{emulator.graph_url}/images", params={"bbox": "8.536,47.374,8.537,47.375"}, headers=AUTH
    )
    http.get(
        f"{emulator.graph_url}/image_ids",
        params={"sequence_id": core_images[0].sequence},
        headers=AUTH,
    )
    http.get(tile_url(emulator, 14, *CORE_TILE), params={"access_token": TOKEN})
    stats = emulator.stats()
    expected = {
        "entity": 2,
        "batch": 3,
        "batch:url_lookup": 1,
        "images_by_ids": 1,
        "search": 1,
        "sequence": 1,
        "tile": 1,
        "thumbnail": 0,
        "family:entity": 7,
        "family:search": 1,
        "family:tiles": 1,
        "family:cdn": 0,
        "auth_failed": 1,
        "rate_limited": 0,
        "faulted": 0,
        "requests": 9,
    }
    assert {k: stats[k] for k in expected} == expected
    assert len(emulator.request_times("entity")) == 6
    assert http.get(f"{emulator.base_url}/_emulator/stats").json() == stats


def test_control_endpoints(emulator, http, core_images):
    response = http.post(f"{emulator.base_url}/_emulator/faults", json={"error_5xx_rate": 1.0})
    assert response.status_code == 200 and emulator.faults.error_5xx_rate == 1.0
    assert http.get(f"{emulator.graph_url}/{core_images[0].id}", headers=AUTH).status_code >= 500
    assert (
        http.post(f"{emulator.base_url}/_emulator/faults", json={"nonsense": 1}).status_code == 400
    )


def test_advance_endpoint_reveals_new_images():
    world = World(seed=5, scale=0.05)
    with EmulatorServer(world, token=TOKEN) as server:
        before = len(world.nonempty_tiles())
        counts = {t: world.tile_sequence_count(*t) for t in world.candidate_tiles()}
        assert requests.post(f"{server.base_url}/_emulator/advance").json() == {"epoch": 1}
        grown = next(
            t for t in world.candidate_tiles() if world.tile_sequence_count(*t) > counts[t]
        )
        decoded = mapbox_vector_tile.decode(
            requests.get(tile_url(server, 14, *grown), params={"access_token": TOKEN}).content
        )
        assert len(decoded["image"]["features"]) == len(world.images_in_z14_tile(*grown))
        assert len(world.nonempty_tiles()) >= before


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_serves_until_sigterm_without_printing_the_token():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mapillary_assets.emulator",
            "--port",
            "0",
            "--scale",
            "0.002",
            "--token",
            "MLY|secret-cli-token",
            "--rate-limit",
            "entity=600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    try:
        lines = []
        while not any(line.startswith("MAPILLARY_TILES_URL=") for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line.strip())
        graph = next(
            line.split("=", 1)[1] for line in lines if line.startswith("MAPILLARY_GRAPH_URL=")
        )
        response = requests.get(
            f"{graph}/{IMAGE_ID_BASE}", headers={"Authorization": "OAuth MLY|secret-cli-token"}
        )
        assert response.json()["error"]["code"] == 100
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "secret-cli-token" not in "\n".join(lines) + output
