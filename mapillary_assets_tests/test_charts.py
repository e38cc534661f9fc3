"""The pictures in asset metadata: real PNGs of a sensible size that show what they claim."""

from __future__ import annotations

import time

import cv2
import dagster as dg
import numpy as np
import pytest

from mapillary_assets.defs.partitions import tile_partitions
from mapillary_assets.pipeline import charts
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles, tile_key
from mapillary_assets.pipeline.geopackage import published_overview
from mapillary_assets.pipeline.staging import connect_staging, load_staging
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.assertions import decode_markdown, decode_png
from mapillary_assets_tests.support.emulated_runs import pipeline_run
from mapillary_assets_tests.support.staging_samples import write_sample_stages


def _share(image: np.ndarray, bgr: tuple[int, int, int], tolerance: int = 40) -> float:
    """Fraction of pixels close to colour `bgr`."""
    return float((np.abs(image.astype(int) - bgr).max(axis=2) <= tolerance).mean())


RED, GREY = (40, 39, 214), (217, 217, 217)  # BGR of the failed / not-discovered colours


def test_png_markdown_is_a_data_uri_image_or_a_plain_note():
    png = charts.blur_histogram_png([1.0, 10.0, 1000.0], threshold=100.0)
    decode_markdown(charts.png_markdown(png, "blur histogram"))
    assert charts.png_markdown(None, "blur histogram") == "(blur histogram: nothing to draw)"


def test_histogram_colours_the_scores_below_the_threshold():
    rng = np.random.default_rng(3)
    sharp = decode_png(charts.blur_histogram_png(rng.uniform(200, 5000, 1000), threshold=100.0))
    mixed = decode_png(
        charts.blur_histogram_png(
            np.r_[rng.uniform(5, 50, 500), rng.uniform(200, 5000, 500)], threshold=100.0
        )
    )
    assert _share(sharp, RED) < 0.001
    assert _share(mixed, RED) > 0.02
    assert charts.blur_histogram_png([np.nan, 0.0, -1.0]) is None


def test_histogram_of_a_million_scores_is_cheap_and_small():
    values = np.random.default_rng(4).lognormal(6, 1.5, 1_200_000)
    decode_png(charts.blur_histogram_png(values, threshold=100.0))


def _jpeg(path, image: np.ndarray):
    assert cv2.imwrite(str(path), image)
    return path


def test_contact_sheet_shows_the_extremes_with_red_frames_for_blurry_ones(tmp_path):
    rng = np.random.default_rng(5)
    paths, scores = [], []
    for index in range(14):
        noise = rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)
        paths.append(
            _jpeg(
                tmp_path / f"{index}.jpg",
                noise if index % 2 else cv2.GaussianBlur(noise, (0, 0), 8),
            )
        )
        scores.append(1000.0 + index if index % 2 else 10.0 + index)
    paths.append(tmp_path / "missing.jpg")
    scores.append(np.nan)  # not scored: never shown
    sheet = decode_png(charts.contact_sheet_png(paths, scores, threshold=100.0))
    assert _share(sheet, RED) > 0.002  # frames / titles of the blurry row
    assert sheet.std() > 20  # the thumbnails are drawn, not a blank page
    only_sharp = decode_png(charts.contact_sheet_png(paths[1::2], scores[1::2], threshold=100.0))
    assert _share(only_sharp, RED) < _share(sheet, RED) / 4
    assert charts.contact_sheet_png(paths[-1:], scores[-1:], threshold=100.0) is None


def test_contact_sheet_draws_unreadable_files_as_grey_tiles(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    sheet = decode_png(charts.contact_sheet_png([broken, broken], [5.0, 500.0], threshold=100.0))
    noise = np.random.default_rng(3).integers(0, 255, (192, 256, 3), dtype=np.uint8)
    readable = [_jpeg(tmp_path / f"{i}.jpg", noise) for i in range(2)]
    drawn = decode_png(charts.contact_sheet_png(readable, [5.0, 500.0], threshold=100.0))
    tile_grey = (200, 200, 200)
    assert _share(sheet, tile_grey, tolerance=3) > 0.02
    assert _share(sheet, tile_grey, tolerance=3) > 10 * _share(drawn, tile_grey, tolerance=3)


def test_tile_map_marks_failed_and_undiscovered_tiles():
    aoi = load_aoi()
    keys = [tile_key(tile) for tile in partition_tiles(aoi, 12)]
    assert len(keys) >= 4
    counts = {key: 1000 * (index + 1) for index, key in enumerate(keys)}
    counts[keys[0]] = 0
    plain = decode_png(charts.tile_map_png(aoi.geometry, counts, run_keys=keys))
    marked = decode_png(
        charts.tile_map_png(
            aoi.geometry, {**counts, keys[1]: None}, failed=[keys[2]], run_keys=keys[3:]
        )
    )
    assert _share(plain, RED) < 0.0005 and _share(marked, RED) > 0.002
    assert _share(marked, GREY, tolerance=6) > _share(plain, GREY, tolerance=6) + 0.01


def test_published_overview_aggregates_images_and_samples_sequences(tmp_path):
    layout = DataLayout(tmp_path / "data")
    write_sample_stages(layout)
    load_staging(layout)
    aoi = load_aoi()
    with connect_staging(layout.staging_db_path, read_only=True) as con:
        overview = published_overview(con, aoi.geometry.bounds, cells=50)
        images, kept = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE keep_spacing) FROM images"
        ).fetchone()
        sample = published_overview(con, aoi.geometry.bounds, max_sequences=1)
    assert overview.counts.shape == (50, 50)
    assert (overview.counts.sum(), overview.kept.sum()) == (images, kept) == (8, 4)
    assert (overview.kept <= overview.counts).all()
    assert overview.sequences_total == 2 and len(overview.sequence_lines) == 2
    assert all(line.shape[1] == 2 and len(line) >= 2 for line in overview.sequence_lines)
    assert len(sample.sequence_lines) == 1 and sample.sequences_total == 2
    decode_png(charts.published_map_png(aoi.geometry, overview))


@pytest.mark.parametrize("cells", [1, 160])
def test_overview_keeps_points_on_the_extent_edge(tmp_path, cells):
    layout = DataLayout(tmp_path / "data")
    write_sample_stages(layout)
    load_staging(layout)
    with connect_staging(layout.staging_db_path, read_only=True) as con:
        west, south, east, north = con.execute(
            "SELECT min(lon), min(lat), max(lon), max(lat) FROM images"
        ).fetchone()
        overview = published_overview(con, (west, south, east, north), cells=cells)
    assert overview.counts.sum() == 8


@pytest.mark.slow
def test_discovery_tile_map_crosses_out_the_partition_that_failed(tmp_path):
    with pipeline_run(tmp_path, api={"max_retries": 0}) as run:
        job = run.defs.resolve_job_def("discovery_job")
        failing, healthy = tile_partitions().get_partition_keys()[:2]

        def healthy_tile_map() -> np.ndarray:
            assert job.execute_in_process(instance=run.instance, partition_key=healthy).success
            record = run.instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey("discovered_images"), asset_partitions=[healthy]
                ),
                limit=1,
            ).records[0]
            return decode_markdown(record.asset_materialization.metadata["tile_map"].value)

        run.server.set_faults(outage_start=time.time() - 1, outage_end=time.time() + 3600)
        assert not job.execute_in_process(
            instance=run.instance, partition_key=failing, raise_on_error=False
        ).success
        run.server.set_faults(outage_start=None, outage_end=None)
        with_failure = healthy_tile_map()
        assert job.execute_in_process(instance=run.instance, partition_key=failing).success
        recovered = healthy_tile_map()
    assert _share(with_failure, RED) > 0.002, "the failed partition is crossed out"
    assert _share(recovered, RED) < 0.0005, "once it succeeds, it is not"
