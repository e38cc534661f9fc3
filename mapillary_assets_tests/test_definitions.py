"""The code location loads, with the asset graph, jobs, schedule, sensor and checks we expect."""

import os
import subprocess
import sys

from mapillary_assets.definitions import build_definitions

defs = build_definitions()

EXPECTED_ASSETS = {
    "area_plan",
    "discovered_images",
    "sequence_images",
    "image_chunks",
    "image_metadata",
    "thumbnail_downloads",
    "blur_scores",
    "filter_areas",
    "staging_tables",
    "mapillary_geopackage",
}


def test_definitions_load_with_expected_graph():
    repository = defs.get_repository_def()
    graph = repository.asset_graph
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == EXPECTED_ASSETS
    upstream = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert upstream["image_chunks"] == {"discovered_images", "sequence_images"}
    assert upstream["image_metadata"] == {"image_chunks"}
    assert upstream["thumbnail_downloads"] == {"image_metadata"}
    assert upstream["blur_scores"] == {"thumbnail_downloads"}
    assert (
        "blur_scores" in upstream["staging_tables"] and "filter_areas" in upstream["staging_tables"]
    )
    assert upstream["mapillary_geopackage"] == {"staging_tables"}
    assert {job.name for job in repository.get_all_jobs()} >= {
        "discovery_job",
        "assign_chunks_job",
        "process_chunks_job",
        "publish_job",
    }
    assert repository.has_schedule_def("refresh_schedule")
    assert repository.has_sensor_def("new_images_sensor")
    assert len(list(graph.asset_check_keys)) == 6  # geopackage_inside_area (issue 24)


def test_every_asset_has_group_kinds_and_description():
    for key in defs.get_repository_def().asset_graph.get_all_asset_keys():
        spec = defs.get_assets_def(key).specs_by_key[key]
        assert spec.group_name and spec.group_name != "default", key
        assert spec.kinds, key
        assert spec.description, key


def test_dagster_definitions_validate_with_the_shipped_default_area():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAPILLARY_AOI", "MAPILLARY_PARTITION_ZOOM")
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "mapillary_assets.definitions",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
