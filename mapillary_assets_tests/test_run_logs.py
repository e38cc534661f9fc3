"""Run logs a person can read: per-partition progress, a one-line summary per asset, and a rejected token
that fails with the fix in the message and never shows up in a log, an error or a file."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest

from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions
from mapillary_assets.runners.failures import failure_messages
from mapillary_assets.storage import read_parquet
from mapillary_assets_tests.support.emulated_runs import emulated_run
from mapillary_assets_tests.support.world import TEST_TOKEN

pytestmark = pytest.mark.slow

WRONG_TOKEN = "MLY|9999|wrong-token-canary-3d81b2"
NUMBER = r"\d[\d,]*"
# The summary line each asset logs once per run (numbers checked against the world where they are counts
# of images: every stage sees every image of the test world).
SUMMARIES = {
    "discovered_images": rf"discovered (?P<images>{NUMBER}) images in \d+ partition\(s\) with {NUMBER} tile requests",
    "image_chunks": rf"(?P<images>{NUMBER}) ids in \d+ chunks; \d+ new chunk\(s\)",
    "image_metadata": rf"metadata: (?P<images>{NUMBER}) images stored, {NUMBER} fetched with {NUMBER} requests, "
    rf"0 failed \(0 transient\)",
    "thumbnail_downloads": rf"downloads: (?P<images>{NUMBER})/(?P=images) thumbnails on disk, 0 failed",
    "blur_scores": rf"blur: (?P<images>{NUMBER}) images scored, {NUMBER} blurry \(threshold [\d.]+\)",
    "filter_areas": r"filter areas: (none configured .+|[\d,]+ polygon\(s\) from .+)",
    "staging_tables": rf"staging: .*\bimages (?P<images>{NUMBER})\b.*",
    "mapillary_geopackage": rf"GeoPackage written to .+: images (?P<images>{NUMBER}), .+",
}
PROGRESS_UNITS = {"image_metadata": "ids", "thumbnail_downloads": "images", "blur_scores": "images"}


def user_log_lines_by_run(instance: dg.DagsterInstance) -> dict[str, dict[str, list[str]]]:
    """The lines the assets logged (what the UI shows as INFO lines), by step (= asset name), then by run."""
    lines: dict[str, dict[str, list[str]]] = {}
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            if entry.dagster_event is None and entry.step_key:
                lines.setdefault(entry.step_key, {}).setdefault(run.run_id, []).append(
                    entry.user_message
                )
    return lines


def user_log_lines(instance: dg.DagsterInstance) -> dict[str, list[str]]:
    """The same lines by step, every run's together."""
    return {
        step: [line for run_lines in by_run.values() for line in run_lines]
        for step, by_run in user_log_lines_by_run(instance).items()
    }


def as_int(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    with emulated_run(tmp_path_factory.mktemp("run-logs")) as run:
        run.run_pipeline()
        truth = len(run.server.world.images_in_polygon(_aoi()))
        yield run, user_log_lines(run.instance), truth


def _aoi():
    from mapillary_assets.defs.area import current_aoi

    return current_aoi().geometry


def test_every_chunk_logs_its_progress_to_completion(completed):
    run, lines, _ = completed
    assignment = read_parquet(run.layout.chunk_assignment_path)
    sizes = assignment.groupby("chunk").size().to_dict()
    assert len(sizes) >= 2
    for asset, unit in PROGRESS_UNITS.items():
        for chunk, size in sizes.items():
            # e.g. "chunk-000000: 200/200 ids, 9,340 ids/s, 0 failed"
            done = rf"{chunk}: {size:,}/{size:,} {unit}, {NUMBER} {unit}/s, 0 failed"
            assert any(re.fullmatch(done, line) for line in lines[asset]), (
                asset,
                chunk,
                lines[asset],
            )


def test_every_tile_partition_logs_what_it_found(completed):
    _, lines, _ = completed
    for key in tile_partitions().get_partition_keys():
        found = rf"{key}: {NUMBER} images in the area from \d+ non-empty z14 tiles, \d+ requests, \d+ cached tiles"
        assert any(re.fullmatch(found, line) for line in lines["discovered_images"]), key


@pytest.mark.parametrize("asset", SUMMARIES)
def test_every_asset_logs_a_one_line_summary(completed, asset):
    """Once in every run that materialised it (chunk assets run once per chunk), and those runs' image
    counts add up to the world's."""
    run, _, truth = completed
    by_run = user_log_lines_by_run(run.instance).get(asset, {})
    assert by_run, asset
    summaries = []
    for run_id, lines in by_run.items():
        matches = [m for m in (re.fullmatch(SUMMARIES[asset], line) for line in lines) if m]
        assert len(matches) == 1, (asset, run_id, lines)
        assert "\n" not in matches[0].string
        summaries.append(matches[0])
    if "images" in summaries[0].groupdict():
        assert sum(as_int(m["images"]) for m in summaries) == truth, [m.string for m in summaries]


def everything_logged(instance: dg.DagsterInstance) -> str:
    """Every event of every run, serialised: messages, metadata, errors with their causes and stacks."""
    return "\n".join(
        dg.serialize_value(entry)
        for run in instance.get_runs()
        for entry in instance.all_logs(run.run_id)
    )


def files_containing(roots: list[Path], secret: str) -> list[Path]:
    needle = secret.encode()
    return [
        path
        for root in roots
        for path in Path(root).rglob("*")
        if path.is_file() and needle in path.read_bytes()
    ]


def assert_fails_with_the_fix(run, job: str, keys: list[str]) -> None:
    result = run.execute(job, keys)
    assert not result.success, job
    messages = failure_messages(run.instance, result.run_id)
    assert any("token rejected (code 190): set MAPILLARY_ACCESS_TOKEN" in m for m in messages), (
        job,
        messages,
    )


def test_a_rejected_token_fails_with_the_fix_in_the_message_and_is_never_shown(
    tmp_path, monkeypatch
):
    # The token comes from the environment, as in production (an EnvVar is resolved inside the run only);
    # the emulator accepts TEST_TOKEN only.
    with emulated_run(tmp_path, token=dg.EnvVar("MAPILLARY_ACCESS_TOKEN")) as run:
        tiles = tile_partitions().get_partition_keys()
        monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", WRONG_TOKEN)
        assert_fails_with_the_fix(run, "discovery_job", tiles)  # tile requests (token in the URL)

        monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TEST_TOKEN)
        assert (
            run.execute("discovery_job", tiles).success and run.execute("assign_chunks_job").success
        )
        monkeypatch.setenv(
            "MAPILLARY_ACCESS_TOKEN", WRONG_TOKEN
        )  # e.g. the token was revoked since
        assert_fails_with_the_fix(
            run,
            "process_chunks_job",
            sorted(run.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME)),
        )

        logged = everything_logged(run.instance)
        assert "token rejected (code 190)" in logged
        for secret in (WRONG_TOKEN, TEST_TOKEN):
            distinctive = secret.split("|")[-1]  # also catches URL-encoded forms (MLY%7C...)
            assert distinctive not in logged
            assert files_containing([run.home, run.data_dir], distinctive) == []
