"""The whole asset graph, materialised through Dagster against the emulator, checked against its ground truth."""

from __future__ import annotations

import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import shapely

from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions
from mapillary_assets.pipeline.filters import load_filter_polygons
from mapillary_assets.storage import read_parquet
from mapillary_assets_tests.support.assertions import decode_markdown
from mapillary_assets_tests.support.emulated_runs import pipeline_run
from mapillary_assets_tests.support.world import URBAN_AREA

pytestmark = pytest.mark.slow
INSIDE_M, OUTSIDE_M = 40.0, 150.0


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    with pipeline_run(
        tmp_path_factory.mktemp("pipeline"),
        filter_areas_path=str(URBAN_AREA),
        inside_spacing_m=INSIDE_M,
        outside_spacing_m=OUTSIDE_M,
    ) as run:
        run.run()
        yield run, run.images().set_index("image_id", drop=False).rename_axis(None)


def test_geopackage_holds_exactly_the_images_inside_the_area(published):
    run, images = published
    truth = {record.id for record in run.truth()}
    assert len(truth) > 200, "the test world should not be trivially small"
    assert images.index.is_unique
    assert set(images.index) == truth
    assert {"images", "sequences"} <= set(run.layers())
    assert images.crs.to_epsg() == 4326


def test_metadata_values_equal_the_emulators(published):
    run, images = published
    assert pd.api.types.is_datetime64_any_dtype(images["captured_at"])
    assert (
        images["image_id"].map(type).eq(str).all() and images["sequence_id"].map(type).eq(str).all()
    )
    for record in run.truth():
        row = images.loc[record.id]
        assert row["sequence_id"] == record.sequence
        assert row["captured_at"] == pd.Timestamp(record.captured_at, unit="ms", tz="UTC")
        assert math.isclose(row.geometry.x, record.lon, abs_tol=1e-7)
        assert math.isclose(row.geometry.y, record.lat, abs_tol=1e-7)
        assert math.isclose(row["altitude"], record.altitude, abs_tol=1e-6)
        assert (row["make"], row["model"], row["camera_type"]) == (
            record.make,
            record.model,
            record.camera_type,
        )
        assert row["creator_username"] == record.creator_username


def test_blur_flags_match_the_emulators_blurred_set(published):
    run, images = published
    truth = pd.Series({record.id: record.blurred for record in run.truth()})
    flagged = images["is_blurry"].astype(bool).reindex(truth.index)
    true_positive = int((flagged & truth).sum())
    precision = true_positive / max(int(flagged.sum()), 1)
    recall = true_positive / max(int(truth.sum()), 1)
    assert truth.sum() > 0
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert (images["blur_value"] >= 0).all() and np.isfinite(images["blur_value"]).all()


def test_filter_areas_tag_exactly_the_points_inside(published):
    _, images = published
    urban = load_filter_polygons(URBAN_AREA)
    expected = shapely.contains_xy(
        urban, images.geometry.x.to_numpy(), images.geometry.y.to_numpy()
    )
    assert (images["in_filter_area"].astype(bool).to_numpy() == expected).all()
    assert expected.any() and (~expected).any()


def _metres(a, b) -> float:
    (lon1, lat1), (lon2, lat2) = a, b
    x = math.radians(lon2 - lon1) * math.cos(math.radians((lat1 + lat2) / 2))
    return 6_371_008.8 * math.hypot(x, math.radians(lat2 - lat1))


def test_spacing_filter_keeps_the_greedy_walk_along_each_sequence(published):
    _, images = published
    for _, sequence in images.sort_values(["captured_at", "image_id"]).groupby("sequence_id"):
        last_kept = None
        for _, row in sequence.iterrows():
            here = (row.geometry.x, row.geometry.y)
            threshold = INSIDE_M if row["in_filter_area"] else OUTSIDE_M
            should_keep = last_kept is None or _metres(last_kept, here) >= threshold
            assert bool(row["keep_spacing"]) == should_keep, row["image_id"]
            if should_keep:
                last_kept = here


def test_sequences_layer_orders_vertices_by_capture_time(published):
    run, images = published
    import geopandas as gpd

    sequences = gpd.read_file(run.layout.geopackage_path, layer="sequences", engine="pyogrio")
    counts = images.groupby("sequence_id").size()
    assert set(sequences["sequence_id"]) == set(counts[counts >= 2].index)
    for _, line in sequences.head(20).iterrows():
        ordered = images[images["sequence_id"] == line["sequence_id"]].sort_values(
            ["captured_at", "image_id"]
        )
        assert np.allclose(
            np.asarray(line.geometry.coords), np.c_[ordered.geometry.x, ordered.geometry.y]
        )


def test_a_second_run_is_idempotent_and_fetches_nothing(published):
    run, images = published
    run.server.reset_stats()
    run.run()
    stats = run.server.stats()
    fetched = {kind: stats.get(kind, 0) for kind in ("tile", "batch", "entity", "thumbnail")}
    assert fetched == {"tile": 0, "batch": 0, "entity": 0, "thumbnail": 0}, stats
    again = run.images().set_index("image_id", drop=False).rename_axis(None)
    pd.testing.assert_frame_equal(images.drop(columns="geometry"), again.drop(columns="geometry"))


def _latest_metadata(run, asset: str, partition: str) -> dict:
    records = run.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return records[0].asset_materialization.metadata


def test_each_partition_shows_its_own_numbers_never_the_whole_runs(published):
    run, _ = published
    keys = tile_partitions().get_partition_keys()
    assert len(keys) > 1, "the pipeline runs discovery as one ranged run over several partitions"
    for key in keys:
        metadata = _latest_metadata(run, "discovered_images", key)
        assert "images" not in metadata, (
            "a ranged run's total would be shown as this partition's count"
        )
        assert metadata["partitions_in_run"].value == len(keys)
        assert f"| {key} " in metadata["per_partition"].value
    key = max(keys, key=lambda k: len(read_parquet(run.layout.discovery_path(k))))
    result = run.defs.resolve_job_def("discovery_job").execute_in_process(
        instance=run.instance, partition_key=key
    )
    assert result.success
    assert _latest_metadata(run, "discovered_images", key)["images"].value == len(
        read_parquet(run.layout.discovery_path(key))
    )


def test_every_picture_asset_shows_its_pictures(published):
    run, _ = published
    tiles = tile_partitions().get_partition_keys()
    chunk = run.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME)[0]
    pictures = {
        ("discovered_images", tiles[0]): ["tile_map"],
        ("blur_scores", chunk): ["histogram", "contact_sheet"],
        ("mapillary_geopackage", None): ["map"],
    }
    for (asset, partition), names in pictures.items():
        if partition is None:
            metadata = run.instance.get_latest_materialization_event(
                dg.AssetKey(asset)
            ).asset_materialization.metadata
        else:
            metadata = _latest_metadata(run, asset, partition)
        for name in names:
            decode_markdown(metadata[name].value)


def test_publishing_removes_what_an_interrupted_publish_left(published):
    run, _ = published
    leftovers = [
        run.layout.geopackage_path.with_name(run.layout.geopackage_path.name + ".tmp-k1ll3d.gpkg"),
        run.layout.geopackage_path.with_name(
            run.layout.geopackage_path.name + ".tmp-k1ll3d.gpkg-journal"
        ),
        run.layout.filter_areas_path.with_name(run.layout.filter_areas_path.name + ".tmp-k1ll3d"),
    ]
    for path in leftovers:
        path.write_bytes(b"half written")
    assert run.defs.resolve_job_def("publish_job").execute_in_process(instance=run.instance).success
    assert not [path for path in leftovers if path.exists()]
    assert run.layout.geopackage_path.exists() and run.layout.filter_areas_path.exists()
