"""What a user sees when they cause an error: `error: <message>` alone and a non-zero exit code, never a
Python traceback (that only with --debug); errors raised inside Dagster runs are unwrapped to the user's
own error. And an area without any image ends in a warning that says where the area lies and why."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mapillary_assets import cli
from mapillary_assets.pipeline.aoi import load_aoi, no_images_warning
from mapillary_assets.runners.instance import open_instance, prepare_dagster_home
from mapillary_assets_tests.support.cli import assert_clear_error, run_cli
from mapillary_assets_tests.support.world import TEST_AOI


def _polygon(ring: list) -> dict:
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        ],
    }


def _point() -> dict:
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Point", "coordinates": [8.5, 47.3]},
            }
        ],
    }


BOW_TIE = [[8.50, 47.36], [8.56, 47.40], [8.56, 47.36], [8.50, 47.40], [8.50, 47.36]]
LV95 = [[2683000, 1247000], [2684000, 1247000], [2684000, 1248000], [2683000, 1247000]]
EUROPE = [[-10, 36], [30, 36], [30, 60], [-10, 60], [-10, 36]]
# The tests' area with each [lon, lat] pair written [lat, lon]: valid both ways, it lands in East Africa.
SWAPPED_TEST_AREA = [
    [lat, lon]
    for lon, lat in json.loads(TEST_AOI.read_text())["features"][0]["geometry"]["coordinates"][0]
]

BAD_AOIS = {  # case -> (file content or None for a missing file, part of the message)
    "missing file": (None, "does not exist: set MAPILLARY_AOI to an existing GeoJSON file"),
    "not JSON": ('{"type": "FeatureCollection", "features": [', "not valid JSON"),
    "a point": (_point(), "is a Point, not a polygon"),
    "bow-tie polygon": (_polygon(BOW_TIE), "self-intersection"),
    "LV95 coordinates": (_polygon(LV95), "out of range"),
    "all of Europe": (_polygon(EUROPE), "use a coarser partition zoom"),
}


def _aoi_file(tmp_path: Path, content) -> Path:
    path = tmp_path / "area.geojson"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("case", list(BAD_AOIS))
def test_a_bad_area_of_interest_is_one_error_line_without_traceback(tmp_path, case):
    content, expected = BAD_AOIS[case]
    path = _aoi_file(tmp_path, content)
    done = run_cli(tmp_path, "demo", "--data-dir", str(tmp_path / "data"), MAPILLARY_AOI=str(path))
    assert_clear_error(done, expected)
    assert str(path) in done.stderr
    assert not (tmp_path / "data" / "output").exists()


def test_a_bad_setting_is_one_error_line_and_debug_shows_the_traceback(tmp_path):
    done = run_cli(
        tmp_path, "demo", "--data-dir", str(tmp_path / "data"), MAPILLARY_CHUNK_SIZE="5k"
    )
    assert_clear_error(done, "MAPILLARY_CHUNK_SIZE='5k' is not a valid int")
    debug = run_cli(
        tmp_path, "demo", "--debug", "--data-dir", str(tmp_path / "data"), MAPILLARY_CHUNK_SIZE="5k"
    )
    assert debug.returncode != 0
    assert (
        "Traceback" in debug.stderr and "ConfigError: MAPILLARY_CHUNK_SIZE='5k'" in debug.stderr
    ), debug.stderr


def test_a_rejected_token_inside_a_run_is_unwrapped_to_the_users_error(
    tmp_path, monkeypatch, capfd
):
    """The emulator rejects the token the runs send: Dagster wraps the client's AuthError in a step failure,
    the CLI prints the AuthError's own message. (capfd: the runs log from their own worker processes.)"""
    honest_env = cli._emulator_env
    monkeypatch.setattr(
        cli,
        "_emulator_env",
        lambda server, data_dir: {
            **honest_env(server, data_dir),
            "MAPILLARY_ACCESS_TOKEN": "MLY|someone-elses-token",
        },
    )
    monkeypatch.setenv("DAGSTER_HOME", str(prepare_dagster_home(tmp_path / "home")))
    for variable in (
        "MAPILLARY_ACCESS_TOKEN",
        "MAPILLARY_GRAPH_URL",
        "MAPILLARY_TILES_URL",
        "MAPILLARY_DATA_DIR",
    ):
        monkeypatch.setenv(
            variable, os.environ.get(variable, "")
        )  # restored after the test (demo sets them)
    code = cli.main(["demo", "--scale", "0.001", "--data-dir", str(tmp_path / "data")])
    captured = capfd.readouterr()
    assert code != 0
    output = captured.out + captured.err
    assert "Traceback" not in output and "Stack Trace" not in output and 'File "' not in output, (
        output
    )
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: token rejected (code 190): set MAPILLARY_ACCESS_TOKEN"
    ), captured.err
    assert re.search(
        r"discovery_job failed for 1 of 1 run\(s\): .+ \(run [0-9a-f-]{36}\)", captured.err
    ), captured.err
    assert (
        "STEP_FAILURE" in captured.err
    )  # the run's own log lines stay, their messages without stacks
    assert "MLY|someone-elses-token" not in captured.out + captured.err


def test_the_no_images_warning_names_where_the_area_lies_and_suspects_a_swap():
    swapped = load_aoi(coordinates=SWAPPED_TEST_AREA)
    message = no_images_warning(swapped, "mly1_public")
    centre = swapped.geometry.centroid
    assert f"lat {centre.y:.4f}, lon {centre.x:.4f}" in message  # where it lies now: ~8.5 N, 47.4 E
    west, south, east, north = swapped.bounds
    assert f"longitude {west:.4f}..{east:.4f}, latitude {south:.4f}..{north:.4f}" in message
    assert (
        f"latitude and longitude swapped: read the other way round the area lies around lat {centre.x:.4f}, "
        f"lon {centre.y:.4f}" in message
    )
    assert "MAPILLARY_TILESET=mly1_public" in message and "MAPILLARY_AOI" in message


def test_the_no_images_warning_suspects_no_swap_where_the_swap_is_impossible():
    pacific = load_aoi(coordinates=[[-170.0, 10.0], [-169.0, 10.0], [-169.0, 11.0], [-170.0, 10.0]])
    message = no_images_warning(pacific, "mly1_computed_public")
    assert "swapped" not in message
    assert (
        "lat 10.3333, lon -169.3333" in message
        and "MAPILLARY_TILESET=mly1_computed_public" in message
    )


@pytest.mark.slow
def test_an_area_without_images_ends_with_the_warning_in_the_summary_and_the_run_log(tmp_path):
    path = _aoi_file(tmp_path, _polygon(SWAPPED_TEST_AREA))
    done = run_cli(
        tmp_path,
        "demo",
        "--scale",
        "0.001",
        "--data-dir",
        str(tmp_path / "data"),
        MAPILLARY_AOI=str(path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done in" in done.stdout and "0 images" in done.stdout
    warnings = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("warning: no images found anywhere")
    ]
    assert len(warnings) == 1 and "latitude and longitude swapped" in warnings[0], done.stderr
    assert str(path) in warnings[0]

    import dagster as dg

    with open_instance(tmp_path / "home") as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("image_chunks"))
        metadata = event.asset_materialization.metadata
        assert metadata["ids"].value == 0
        assert metadata["warning"].value == warnings[0].removeprefix("warning: ")
        logged = [
            entry.user_message for entry in instance.all_logs(event.run_id) if entry.level >= 30
        ]
        assert any(message.endswith(metadata["warning"].value) for message in logged), logged


def test_an_emulator_port_in_use_is_one_error_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            tmp_path, "ui", "--emulator-port", str(port), "--data-dir", str(tmp_path / "data")
        )
    assert_clear_error(done, f"the emulator cannot listen on 127.0.0.1:{port}")
    assert "--emulator-port" in done.stderr
