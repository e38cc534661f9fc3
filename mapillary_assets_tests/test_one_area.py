"""One area, one truth (issue 24): a data dir whose area changes publishes exactly the new area's images
without fetching the shared ones again, and a Dagster instance refuses a data dir that is not its own."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import shapely

from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.area import current_aoi
from mapillary_assets.defs.automation import new_images_sensor
from mapillary_assets.defs.resources import DataStorageResource
from mapillary_assets.errors import UserError
from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.emulated_runs import emulator_resources, pipeline_run
from mapillary_assets_tests.support.world import TEST_AOI

pytestmark = pytest.mark.slow


def _write_area(path, geometry) -> str:
    feature = {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(geometry)}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return str(path)


def _western_half_of_the_test_area():
    area = current_aoi().geometry
    west, south, east, north = area.bounds
    return area.intersection(shapely.box(west, south, (west + east) / 2, north))


@pytest.fixture(scope="module")
def two_areas(tmp_path_factory):
    """The test area published, then its western half as the area: same data dir, same instance."""
    tmp_path = tmp_path_factory.mktemp("one_area")
    monkeypatch = pytest.MonkeyPatch()
    with pipeline_run(tmp_path) as run:
        run.run()
        first = run.images()
        half = _write_area(tmp_path / "half.geojson", _western_half_of_the_test_area())
        monkeypatch.setenv("MAPILLARY_AOI", half)
        run.defs = build_definitions(emulator_resources(run.server, run.layout.root))
        try:
            yield run, first
        finally:
            monkeypatch.undo()


def test_a_changed_area_is_never_reported_as_current(two_areas):
    run, _ = two_areas
    result = new_images_sensor.evaluate_tick(
        dg.build_sensor_context(instance=run.instance, definitions=run.defs)
    )
    assert result.skip_message is None, result.skip_message
    assert {request.job_name for request in result.run_requests} == {"discovery_job"}


def test_the_checks_fail_on_a_geopackage_of_the_earlier_area(two_areas):
    run, first = two_areas
    from mapillary_assets.defs.checks import geopackage_inside_area, images_inside_area

    storage = DataStorageResource(data_dir=str(run.layout.root))
    inside_new = shapely.intersects_xy(current_aoi().geometry, first.geometry.x, first.geometry.y)
    assert (~inside_new).sum() > 0, "the earlier area must hold images outside the new one"
    for check in (images_inside_area, geopackage_inside_area):
        result = check(storage=storage)
        assert not result.passed and result.metadata["outside"].value == int((~inside_new).sum())


def test_a_new_area_publishes_exactly_its_images_and_fetches_none_again(two_areas):
    run, first = two_areas
    run.server.reset_stats()
    run.run()
    truth = {record.id for record in run.truth()}
    published = run.images()
    assert 0 < len(truth) < len(first)
    assert set(published["image_id"]) == truth
    stats = run.server.stats()
    fetched = {kind: stats.get(kind, 0) for kind in ("batch", "entity", "thumbnail")}
    assert fetched == {"batch": 0, "entity": 0, "thumbnail": 0}, stats
    for check in ("images_inside_area", "geopackage_inside_area"):
        evaluation = run.instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [
                dg.AssetCheckKey(
                    dg.AssetKey(
                        "staging_tables"
                        if check == "images_inside_area"
                        else "mapillary_geopackage"
                    ),
                    check,
                )
            ]
        )
        (execution,) = evaluation.values()
        assert execution.status.value == "SUCCEEDED", (check, execution)
    result = new_images_sensor.evaluate_tick(
        dg.build_sensor_context(instance=run.instance, definitions=run.defs)
    )
    assert "the GeoPackage is current" in (result.skip_message or "")


def test_an_instance_refuses_another_data_dir_with_the_fix(tmp_path, monkeypatch):
    """Issue 24 defect 2: the instance's chunk partitions belong to the first data dir; a second data dir
    (an area without images) must not run chunk runs against them."""
    swapped = [
        [lat, lon]
        for lon, lat in json.loads(TEST_AOI.read_text())["features"][0]["geometry"]["coordinates"][
            0
        ]
    ]
    with pipeline_run(tmp_path) as run:
        run.run()
        other = tmp_path / "other-data"
        monkeypatch.setenv(
            "MAPILLARY_AOI", _write_area(tmp_path / "swapped.geojson", shapely.Polygon(swapped))
        )
        defs = build_definitions(emulator_resources(run.server, other))
        with pytest.raises(UserError) as refused:
            run_pipeline(run.instance, defs, log=lambda *_: None)
        message = str(refused.value)
        assert str(run.layout.root) in message and str(other) in message
        assert f"DAGSTER_HOME={other / 'dagster_home'}" in message
        assert not DataLayout(other).chunk_assignment_path.exists()
        from mapillary_assets.defs.partitions import bind_instance_to_data_dir

        bind_instance_to_data_dir(run.instance, run.layout.root)  # its own data dir is accepted
