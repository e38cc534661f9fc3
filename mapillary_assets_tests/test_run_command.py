"""`mapillary-assets run`: the pipeline against the configured API (here the emulator standing in for the
real one through the base URL variables), `--until`, progress in a terminal and in a pipe, a full disk."""

from __future__ import annotations

import io
import os
import pty
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyogrio
import pytest

from mapillary_assets import cli
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets.progress import ProgressDisplay
from mapillary_assets.storage import TEMP_MARKER, DataLayout, write_parquet_atomic
from mapillary_assets_tests.support.cli import assert_clear_error, run_cli
from mapillary_assets_tests.support.world import TEST_AOI, TEST_SCALE, TEST_TOKEN


def test_run_without_a_token_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    assert cli.main(["run", "--data-dir", str(tmp_path / "data")]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "MAPILLARY_ACCESS_TOKEN is not set" in errors[0], captured.err
    assert not (tmp_path / "data").exists()


def _stage_files(layout: DataLayout, done: int, total: int) -> None:
    write_parquet_atomic(
        pd.DataFrame(
            {
                "image_id": [str(i) for i in range(total)],
                "chunk": "chunk-000000",
                "position": range(total),
            }
        ),
        layout.chunk_assignment_path,
    )
    write_parquet_atomic(
        pd.DataFrame({"image_id": [str(i) for i in range(done)]}),
        layout.metadata_path("chunk-000000"),
    )


def test_progress_in_a_pipe_is_one_plain_line_per_update(tmp_path):
    layout = DataLayout(tmp_path)
    _stage_files(layout, done=4, total=10)
    stream = io.StringIO()
    display = ProgressDisplay(layout, ["metadata"], stream=stream)
    assert not display.terminal
    display.update()
    display.update()  # nothing changed: no line
    _stage_files(layout, done=10, total=10)
    display.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("progress: metadata 4/10 images, ") and "ETA" in lines[0]
    assert lines[1].startswith("progress: metadata 10/10 images, ") and lines[1].endswith(
        "ETA done"
    )


def test_progress_in_a_terminal_is_a_live_display(tmp_path):
    layout = DataLayout(tmp_path)
    _stage_files(layout, done=4, total=10)
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as stream:
        with ProgressDisplay(layout, ["metadata", "thumbnails"], stream=stream, interval_s=0.05):
            _stage_files(layout, done=7, total=10)
        stream.flush()
        output = os.read(controller, 65536).decode(errors="replace")
    os.close(controller)
    assert "\x1b[" in output, "a terminal gets ANSI cursor control (rich's live display)"
    assert "metadata" in output and "7/10" in output and "thumbnails" in output and "0/10" in output
    assert "progress:" not in output, "no plain lines in a terminal"


def _emulator_env(server: EmulatorServer) -> dict[str, str]:
    return {
        "MAPILLARY_ACCESS_TOKEN": TEST_TOKEN,
        "MAPILLARY_GRAPH_URL": server.graph_url,
        "MAPILLARY_TILES_URL": server.tiles_url,
        "MAPILLARY_CHUNK_SIZE": "100",
    }


@pytest.mark.slow
def test_run_against_the_api_until_thumbnails(tmp_path):
    data = tmp_path / "data"
    with EmulatorServer(world=World(seed=7, scale=TEST_SCALE), token=TEST_TOKEN) as server:
        done = run_cli(
            tmp_path,
            "run",
            "--aoi",
            str(TEST_AOI),
            "--until",
            "thumbnails",
            "--data-dir",
            str(data),
            **_emulator_env(server),
        )
        truth = {record.id for record in server.world.images_in_polygon(_test_area())}
        stats = server.stats()
    assert done.returncode == 0, done.stdout + done.stderr
    assert stats.get("thumbnail", 0) == len(truth)
    images = pyogrio.read_dataframe(DataLayout(data).geopackage_path, layer="images")
    assert set(images["image_id"]) == truth
    assert (images["download_status"] == "ok").all() and images["blur_value"].isna().all()
    assert not (data / "blur").exists()
    progress = [line for line in done.stdout.splitlines() if line.startswith("progress: ")]
    assert f"progress: thumbnails {len(truth):,}/{len(truth):,} images" in "\n".join(progress)
    assert not [line for line in progress if line.startswith("progress: blur")]
    assert f"({len(truth):,} images in" in done.stdout
    assert TEST_TOKEN not in done.stdout + done.stderr


def _test_area():
    from mapillary_assets.pipeline.aoi import load_aoi

    return load_aoi(TEST_AOI).geometry


ROOMY = "1g"  # a tmpfs takes memory only as it fills; the test world's thumbnails need ~0.1 GB


def _mount_tmpfs(target: Path, size: str, remount: bool = False) -> None:
    options = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_clear_error_and_a_rerun_resumes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem")
    try:
        _mount_tmpfs(data, ROOMY)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {error}")
    try:
        with EmulatorServer(world=World(seed=7, scale=TEST_SCALE), token=TEST_TOKEN) as server:
            env = _emulator_env(server)
            args = ("run", "--aoi", str(TEST_AOI), "--data-dir", str(data))
            first = run_cli(tmp_path, *args, "--until", "metadata", **env)
            assert first.returncode == 0, first.stdout + first.stderr
            used = shutil.disk_usage(data).used
            _mount_tmpfs(data, str(used + 1024 * 1024), remount=True)  # room for a few thumbnails
            full = run_cli(tmp_path, *args, **env)
            assert_clear_error(full, f"error: {data} is full: ")
            assert re.search(
                rf"error: {re.escape(str(data))} is full: \d+\.\d\d GB free, about \d+\.\d\d GB needed "
                "for the remaining thumbnails",
                full.stderr,
            ), full.stderr
            assert not [p for p in data.rglob(f"*{TEMP_MARKER}*")], "nothing half-written stays"
            on_disk = len(list((data / "thumbnails").rglob("*.jpg")))  # complete ones only

            _mount_tmpfs(data, ROOMY, remount=True)
            server.reset_stats()
            resumed = run_cli(tmp_path, *args, **env)
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            truth = {record.id for record in server.world.images_in_polygon(_test_area())}
            assert server.stats().get("thumbnail", 0) == len(truth) - on_disk, "stored ones kept"
        images = pyogrio.read_dataframe(DataLayout(data).geopackage_path, layer="images")
        assert set(images["image_id"]) == truth and (images["download_status"] == "ok").all()
    finally:
        subprocess.run(["umount", str(data)], check=False)
