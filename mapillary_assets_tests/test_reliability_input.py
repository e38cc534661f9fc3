"""Bad input: each is refused with an error that names the problem and the fix, and nothing already
materialised is lost or overwritten with partial data.

Data-level cases start from a copy of a complete fault-free run (its data folder and Dagster
instance), damage one input, run the real jobs, and compare fingerprints of everything materialised
(and, where the platform repairs the damage itself, the final GeoPackage) with the fault-free run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mapbox_vector_tile
import pandas as pd
import pytest

from mapillary_assets.api.tile_decoders import decode_image_layer
from mapillary_assets.defs.area import partition_zoom
from mapillary_assets.defs.partitions import tile_partitions
from mapillary_assets.defs.resources import ConfigError, MapillaryApiResource, PipelineSettings
from mapillary_assets.emulator import Faults
from mapillary_assets.emulator.thumbnails import jpeg_fault
from mapillary_assets.errors import PipelineFailed
from mapillary_assets.pipeline.aoi import AoiError, load_aoi, partition_tiles
from mapillary_assets.pipeline.jpeg_verification import is_complete_jpeg
from mapillary_assets.runners.failures import failure_messages
from mapillary_assets.storage import read_parquet, write_parquet_atomic
from mapillary_assets_tests.support.assertions import assert_same_images
from mapillary_assets_tests.support.emulated_runs import emulated_run
from mapillary_assets_tests.support.measurements import record_figure
from mapillary_assets_tests.support.reference import fault_free_reference, shared_temp_root
from mapillary_assets_tests.support.world import REPO_ROOT

REJECTED_TOKEN = "MLY|1|not-the-token-the-api-knows"
# Swapped, Zurich's [8.5, 47.4] is still a valid point (in the Indian Ocean): only a longitude beyond 90
# degrees makes the swap detectable, so the case uses Tokyo.
TOKYO_SQUARE = [[139.70, 35.66], [139.78, 35.66], [139.78, 35.70], [139.70, 35.70], [139.70, 35.66]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fault_free_reference(shared_temp_root(tmp_path_factory))


@pytest.fixture
def materialised(tmp_path, reference) -> Path:
    """A private copy of the complete fault-free run: `data/` and the Dagster instance `home/`."""
    folder = tmp_path / "run"
    shutil.copytree(
        reference.data_dir.parent, folder, ignore=shutil.ignore_patterns("summary.json")
    )
    return folder


def fingerprints(data_dir: Path) -> dict[str, str]:
    """A digest of every materialised file except thumbnails and caches (stage files, staging, output)."""
    kept = ("discovery", "chunks", "metadata", "downloads", "blur", "staging", "output")
    return {
        str(path.relative_to(data_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in kept
        for path in sorted((data_dir / folder).rglob("*"))
        if path.is_file()
    }


def assert_untouched(before: dict[str, str], data_dir: Path) -> None:
    after = fingerprints(data_dir)
    changed = sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
    assert not changed, f"materialised files changed by a refused input: {changed}"


def errors_of(run, result) -> str:
    return "\n".join(failure_messages(run.instance, result.run_id))


# ---------------------------------------------------------------------------------------------
# the area of interest and the settings


def _feature_collection(geometry: dict) -> dict:
    return {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": geometry}],
    }


BAD_AOIS = {
    "not JSON": (
        '{"type": "FeatureCollection", "features": [',
        ("not valid JSON", "export the area as GeoJSON"),
    ),
    "a point": (
        _feature_collection({"type": "Point", "coordinates": [8.5, 47.3]}),
        ("is a Point, not a polygon", "must be a Polygon or MultiPolygon"),
    ),
    "latitude first": (
        _feature_collection(
            {"type": "Polygon", "coordinates": [[[y, x] for x, y in TOKYO_SQUARE]]}
        ),
        ("out of range", "GeoJSON order is [longitude, latitude]"),
    ),
    "self-intersecting": (
        _feature_collection(
            {
                "type": "Polygon",
                "coordinates": [
                    [[8.50, 47.36], [8.56, 47.40], [8.56, 47.36], [8.50, 47.40], [8.50, 47.36]]
                ],
            }
        ),
        ("invalid", "self-intersection"),
    ),
    "projected CRS": (
        {
            **_feature_collection(
                {
                    "type": "Polygon",
                    "coordinates": [
                        [
                            [2683000, 1247000],
                            [2684000, 1247000],
                            [2684000, 1248000],
                            [2683000, 1247000],
                        ]
                    ],
                }
            ),
            "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2056"}},
        },
        ("coordinate reference system", "reproject it to EPSG:4326"),
    ),
    "no features": (
        {"type": "FeatureCollection", "features": []},
        ("without features", "add the AOI polygon"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_AOIS))
def test_a_malformed_area_of_interest_is_named_with_its_fix(tmp_path, case):
    content, (problem, fix) = BAD_AOIS[case]
    path = tmp_path / "area.geojson"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AoiError) as refused:
        load_aoi(path)
    message = str(refused.value)
    assert str(path) in message and problem in message and fix in message, message


def test_an_area_too_large_for_its_partition_zoom_suggests_a_coarser_zoom(tmp_path):
    path = tmp_path / "europe.geojson"
    path.write_text(
        json.dumps(
            _feature_collection(
                {
                    "type": "Polygon",
                    "coordinates": [[[-10, 36], [30, 36], [30, 60], [-10, 60], [-10, 36]]],
                }
            )
        )
    )
    with pytest.raises(
        AoiError, match=r"use a coarser partition zoom \(MAPILLARY_PARTITION_ZOOM=\d+ or lower\)"
    ):
        partition_tiles(load_aoi(path), 13)


BAD_SETTINGS = [
    ({"MAPILLARY_CHUNK_SIZE": "5k"}, "MAPILLARY_CHUNK_SIZE='5k' is not a valid int"),
    (
        {"MAPILLARY_CHUNK_SIZE": "10"},
        "MAPILLARY_CHUNK_SIZE=10 is out of range: use a value from 50",
    ),
    (
        {"MAPILLARY_THUMBNAIL_SIZE": "512"},
        "MAPILLARY_THUMBNAIL_SIZE=512 is not supported: use one of 256, 1024, 2048",
    ),
    (
        {"MAPILLARY_BLUR_BACKEND": "cuda"},
        "MAPILLARY_BLUR_BACKEND='cuda' is not supported: use one of auto",
    ),
    (
        {"MAPILLARY_TILESET": "mly2"},
        "MAPILLARY_TILESET='mly2' is not supported: use one of mly1_public",
    ),
    ({"MAPILLARY_DISCOVERY_ROUTE": "graph"}, "MAPILLARY_DISCOVERY_ROUTE='graph' is not supported"),
    ({"MAPILLARY_MAX_FAILED_RATIO": "5%"}, "MAPILLARY_MAX_FAILED_RATIO='5%' is not a valid float"),
    (
        {"MAPILLARY_MAX_FAILED_RATIO": "1.5"},
        "MAPILLARY_MAX_FAILED_RATIO=1.5 is out of range: use a value from 0 to 1",
    ),
    ({"MAPILLARY_DOWNLOAD_CONCURRENCY": "0"}, "MAPILLARY_DOWNLOAD_CONCURRENCY=0 is out of range"),
    (
        {"MAPILLARY_FILTER_AREAS": "/nowhere/urban.geojson"},
        "MAPILLARY_FILTER_AREAS='/nowhere/urban.geojson' is not a file",
    ),
]


@pytest.mark.parametrize(("environ", "expected"), BAD_SETTINGS, ids=[e for _, e in BAD_SETTINGS])
def test_an_invalid_setting_names_the_variable_and_the_accepted_values(environ, expected):
    with pytest.raises(ConfigError) as refused:
        PipelineSettings.from_env(environ)
    assert expected in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "MAPILLARY_ENTITY_PER_MINUTE",
            "lots",
            "MAPILLARY_ENTITY_PER_MINUTE='lots' is not a valid int",
        ),
        (
            "MAPILLARY_TILES_PER_MINUTE",
            "0",
            "MAPILLARY_TILES_PER_MINUTE=0 is out of range: use a value >= 1",
        ),
    ],
)
def test_an_invalid_rate_budget_names_the_variable(
    monkeypatch, tmp_path, variable, value, expected
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        MapillaryApiResource.from_env(default_rate_limit_store=tmp_path / "rate_limits.sqlite")
    assert expected in str(refused.value)


@pytest.mark.parametrize("value", ["14", "twelve"])
def test_an_invalid_partition_zoom_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("MAPILLARY_PARTITION_ZOOM", value)
    with pytest.raises(AoiError, match="MAPILLARY_PARTITION_ZOOM=.* use a zoom from 0 to 13"):
        partition_zoom()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MAPILLARY_AOI", "{bad json", "is not valid JSON"),
        ("MAPILLARY_CHUNK_SIZE", "many", "MAPILLARY_CHUNK_SIZE='many' is not a valid int"),
    ],
)
def test_the_code_location_refuses_to_load_with_a_bad_setting(
    tmp_path, materialised, variable, value, expected
):
    """What `dagster dev` or the daemon loads: the error names the setting and nothing is touched."""
    if variable == "MAPILLARY_AOI":
        (tmp_path / "area.geojson").write_text(value)
        value = str(tmp_path / "area.geojson")
    data_dir = materialised / "data"
    before = fingerprints(data_dir)
    env = {
        **os.environ,
        variable: value,
        "MAPILLARY_DATA_DIR": str(data_dir),
        "PYTHONPATH": str(REPO_ROOT),
    }
    loaded = subprocess.run(
        [sys.executable, "-c", "from mapillary_assets.definitions import defs; defs()"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode != 0
    assert expected in loaded.stderr.strip().splitlines()[-1], loaded.stderr[-2000:]
    assert_untouched(before, data_dir)


# ---------------------------------------------------------------------------------------------
# damaged files


def test_a_corrupt_cached_tile_is_fetched_again(materialised, reference):
    cache = sorted(
        (materialised / "data" / "tile_cache").rglob("14/*/*.mvt"), key=lambda p: p.stat().st_size
    )
    garbage, truncated = cache[-1], cache[-2]
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with emulated_run(materialised) as run:
        run.run_pipeline()
        requests = run.server.stats()
        images = run.images()
        for key in tile_partitions().get_partition_keys():
            pd.testing.assert_frame_equal(
                read_parquet(run.layout.discovery_path(key)),
                read_parquet(type(run.layout)(reference.data_dir).discovery_path(key)),
            )
    assert requests["tile"] == 2, "exactly the two damaged tiles are fetched again"
    assert decode_image_layer(garbage.read_bytes(), 14, int(garbage.parent.name), int(garbage.stem))
    assert_same_images(images, reference.load_images())
    record_figure(
        "bad input: corrupt cached tiles",
        damaged_tiles=2,
        tile_requests=requests["tile"],
        requests=requests["requests"],
    )


def test_a_corrupt_stage_file_is_named_and_nothing_published_is_replaced(materialised, reference):
    data_dir = materialised / "data"
    with emulated_run(materialised) as run:
        damaged = run.layout.metadata_path("chunk-000001")
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
        before = fingerprints(data_dir)

        publish = run.execute("publish_job")
        chunk = run.execute("process_chunks_job", ["chunk-000001"])
        assert not publish.success and not chunk.success
        for result in (publish, chunk):
            message = errors_of(run, result)
            assert f"{damaged.name} is not a readable Parquet file" in message, message
            assert "delete it and re-materialise the partition that writes it" in message
        assert_untouched(before, data_dir)

        damaged.unlink()  # the fix the message gives
        run.server.reset_stats()
        run.run_pipeline()
        requests = run.server.stats()
        images = run.images()
    assert requests["batch"] == 4, (
        "only the deleted chunk's 200 ids are fetched again (4 batches of 50)"
    )
    assert_same_images(images, reference.load_images())


def test_non_jpeg_thumbnails_on_disk_or_served_never_become_thumbnails(materialised, reference):
    rate = 0.05
    with emulated_run(materialised, faults=Faults(corrupt_jpeg_rate=rate)) as run:
        layout = run.layout
        assignment = read_parquet(layout.chunk_assignment_path)
        ids = list(assignment["image_id"])
        served_damaged = [i for i in ids if jpeg_fault(i, rate, 0.0) == "corrupt"]
        stored_foreign = [i for i in ids if i not in served_damaged][:2]
        for image_id in served_damaged:
            layout.thumbnail_path(image_id, 1024).unlink()
        html, png = (
            b"<html><body>403 URL signature expired</body></html>",
            b"\x89PNG\r\n\x1a\n" + bytes(2000),
        )
        for image_id, foreign in zip(stored_foreign, (html, png)):
            layout.thumbnail_path(image_id, 1024).write_bytes(foreign)
        published = {
            name: digest
            for name, digest in fingerprints(run.data_dir).items()
            if name.startswith(("staging", "output"))
        }

        with pytest.raises(PipelineFailed, match="process_chunks_job"):
            run.run_pipeline()
        downloads = pd.concat(
            read_parquet(layout.downloads_path(c)) for c in sorted(assignment["chunk"].unique())
        )
        failed = downloads[downloads["status"] != "ok"]
        assert sorted(failed["image_id"]) == sorted(served_damaged)
        assert failed["transient"].all() and failed["reason"].str.contains("JPEG").all(), failed[
            "reason"
        ].tolist()
        assert not any(layout.thumbnail_path(i, 1024).exists() for i in served_damaged)
        assert all(
            is_complete_jpeg(layout.thumbnail_path(i, 1024).read_bytes()) for i in stored_foreign
        )
        assert {
            name: digest
            for name, digest in fingerprints(run.data_dir).items()
            if name.startswith(("staging", "output"))
        } == published

        run.server.set_faults(corrupt_jpeg_rate=0.0)
        run.server.reset_stats()
        run.run_pipeline()
        thumbnails = run.server.stats()["thumbnail"]
        images = run.images()
    assert thumbnails == len(served_damaged)
    assert_same_images(images, reference.load_images())
    record_figure(
        "bad input: non-JPEG thumbnails",
        served_damaged=len(served_damaged),
        foreign_on_disk=2,
        rerun_thumbnail_requests=thumbnails,
    )


# ---------------------------------------------------------------------------------------------
# ids with non-digits


NASTY_ID = "12ab/../../escape"


def test_a_non_digit_id_in_a_stage_file_is_refused_before_any_path(materialised):
    data_dir = materialised / "data"
    with emulated_run(materialised) as run:
        key = tile_partitions().get_partition_keys()[1]
        discovery = read_parquet(run.layout.discovery_path(key))
        tampered = pd.concat(
            [discovery, discovery.head(1).assign(image_id=NASTY_ID)], ignore_index=True
        )
        write_parquet_atomic(tampered, run.layout.discovery_path(key))
        before = fingerprints(data_dir)
        result = run.execute("assign_chunks_job")
    assert not result.success
    message = errors_of(run, result)
    assert "invalid image id" in message and repr(NASTY_ID) in message, message
    assert f"re-materialise discovered_images partition {key}" in message
    assert_untouched(before, data_dir)
    assert not [path for path in materialised.parent.rglob("*escape*")], "the id became a path"


@pytest.fixture
def tile_with_a_non_digit_id(materialised):
    """The densest cached z14 tile, re-encoded with one image id replaced by NASTY_ID, as if the API
    had served it; then one discovery run over every partition. Yields the run, its result, the
    fingerprints before it, the tile's `14/x/y` and the id NASTY_ID replaced."""
    data_dir = materialised / "data"
    tile = max(
        (materialised / "data" / "tile_cache").rglob("14/*/*.mvt"), key=lambda p: p.stat().st_size
    )
    layers = mapbox_vector_tile.decode(tile.read_bytes(), default_options={"y_coord_down": True})
    replaced_id = str(layers["image"]["features"][0]["properties"]["id"])
    layers["image"]["features"][0]["properties"]["id"] = NASTY_ID
    tile.write_bytes(
        mapbox_vector_tile.encode(
            [{"name": name, "features": layer["features"]} for name, layer in layers.items()],
            default_options={"y_coord_down": True, "extents": 4096},
        )
    )
    before = fingerprints(data_dir)
    with emulated_run(materialised) as run:
        result = run.execute("discovery_job", tile_partitions().get_partition_keys())
        yield run, result, before, f"14/{tile.parent.name}/{tile.stem}", replaced_id


def discovered_ids(layout) -> set[str]:
    keys = tile_partitions().get_partition_keys()
    return set(pd.concat(read_parquet(layout.discovery_path(k)) for k in keys)["image_id"])


def test_a_non_digit_id_served_in_a_tile_is_dropped_and_never_becomes_a_path(
    materialised, reference, tile_with_a_non_digit_id
):
    """The decided behaviour: the bad id is dropped (only it), the rest of the tile is kept and the
    discovery run succeeds; only discovery files may change."""
    run, result, before, _, replaced_id = tile_with_a_non_digit_id
    assert result.success, errors_of(run, result)
    assert not [path for path in materialised.parent.rglob("*escape*")], "the id became a path"
    reference_ids = discovered_ids(type(run.layout)(reference.data_dir))
    assert replaced_id in reference_ids
    assert discovered_ids(run.layout) == reference_ids - {replaced_id}
    after = fingerprints(run.data_dir)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed and all(name.startswith("discovery/") for name in changed), sorted(changed)


def test_a_non_digit_id_served_in_a_tile_is_reported_with_the_tile(tile_with_a_non_digit_id):
    """Dropped with a warning in the run's log that names the tile and the id."""
    run, result, _, tile, _ = tile_with_a_non_digit_id
    assert result.success, errors_of(run, result)
    message = "\n".join(
        entry.user_message
        for entry in run.instance.all_logs(result.run_id)
        if entry.level >= logging.WARNING
    )
    assert f"tile {tile}: dropped 1 image id(s) that are not decimal digits" in message, message
    assert repr(NASTY_ID) in message, message


# ---------------------------------------------------------------------------------------------
# the token


def test_a_missing_token_is_named_before_anything_runs(materialised, monkeypatch):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    data_dir = materialised / "data"
    before = fingerprints(data_dir)
    keys = tile_partitions().get_partition_keys()
    with emulated_run(
        materialised, token=dg.EnvVar("MAPILLARY_ACCESS_TOKEN"), tile_cache_max_age_hours=0
    ) as run:
        with pytest.raises(
            dg.DagsterInvalidConfigError, match='environment variable "MAPILLARY_ACCESS_TOKEN"'
        ):
            run.execute("discovery_job", keys)
        monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "  ")
        result = run.execute("discovery_job", keys)
        assert not result.success
        assert "MAPILLARY_ACCESS_TOKEN is not set: create a client token" in errors_of(run, result)
        assert run.server.stats()["requests"] == 0
    assert_untouched(before, data_dir)


def test_a_rejected_token_stops_the_run_and_keeps_what_was_stored(materialised):
    data_dir = materialised / "data"
    with emulated_run(materialised, server_token=REJECTED_TOKEN, tile_cache_max_age_hours=0) as run:
        assignment = read_parquet(run.layout.chunk_assignment_path)
        missing = assignment.loc[assignment["chunk"] == "chunk-000002", "image_id"].iloc[0]
        run.layout.thumbnail_path(missing, 1024).unlink()
        before = fingerprints(data_dir)
        discovery = run.execute("discovery_job", tile_partitions().get_partition_keys())
        chunk = run.execute("process_chunks_job", ["chunk-000002"])
        rejected = run.server.stats()["auth_failed"]
    for result in (discovery, chunk):
        assert not result.success
        assert "token rejected (code 190)" in errors_of(run, result)
    assert rejected >= 2
    assert_untouched(before, data_dir)
