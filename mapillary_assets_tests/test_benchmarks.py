"""The benchmarks' own arithmetic, on synthetic inputs: a figure that cannot fall short is no figure."""

import mercantile
import pytest
from shapely.geometry import box

from benchmarks.bench_country import bbox_z14_tiles
from benchmarks.bench_full_zurich import cross_chunk_overlap_s, request_figures
from benchmarks.measurement import metadata_request_floor


def test_blur_after_every_download_overlaps_nothing():
    downloads = [("a", 0.0, 10.0), ("b", 10.0, 20.0), ("c", 20.0, 30.0)]
    blurs = [("a", 30.0, 35.0), ("b", 35.0, 40.0), ("c", 40.0, 45.0)]
    assert cross_chunk_overlap_s(blurs, downloads) == 0


def test_blur_of_a_chunk_beside_its_own_download_is_not_overlap():
    assert cross_chunk_overlap_s([("a", 2.0, 8.0)], [("a", 0.0, 10.0)]) == 0


def test_each_blur_fully_beside_the_next_chunks_download():
    downloads = [("a", 0.0, 10.0), ("b", 10.0, 20.0), ("c", 20.0, 30.0)]
    blurs = [("a", 10.0, 16.0), ("b", 20.0, 26.0), ("c", 30.0, 36.0)]
    assert cross_chunk_overlap_s(blurs, downloads) == pytest.approx(12.0)


def test_overlap_counts_time_once_however_many_steps_run():
    downloads = [("b", 0.0, 10.0), ("c", 0.0, 10.0), ("d", 5.0, 20.0)]
    blurs = [("a", 2.0, 12.0), ("a", 15.0, 25.0)]  # the second: a re-run of the same chunk
    # 2..12 beside b/c/d, 15..20 beside d.
    assert cross_chunk_overlap_s(blurs, downloads) == pytest.approx(15.0)


def test_same_chunk_alone_then_another_chunk_joins():
    downloads = [("a", 0.0, 10.0), ("b", 6.0, 9.0)]
    blurs = [("a", 4.0, 10.0)]
    assert cross_chunk_overlap_s(blurs, downloads) == pytest.approx(3.0)


def test_results_mark_references_apart_from_measured_baselines():
    from benchmarks.harness import Figure
    from benchmarks.run import render

    measured = Figure("b", "measured row", 2.0, "s", baseline=4.0, baseline_name="same run")
    referenced = Figure(
        "b", "reference row", 2.0, "s", baseline=8.0, baseline_name="notebook", reference=True
    )
    rows = {
        line.split(" | ")[1]: line
        for line in render([measured, referenced], {}, quick=True).splitlines()
        if line.startswith("| b |")
    }
    assert "| 4 (same run) |" in rows["measured row"] and "reference" not in rows["measured row"]
    assert "| *reference* 8 (notebook) |" in rows["reference row"]


def test_bounding_box_tiles_are_counted_as_mercantile_enumerates_them():
    area = box(5.96, 45.82, 10.49, 47.81)  # Switzerland's bounding box
    assert bbox_z14_tiles(area) == sum(1 for _ in mercantile.tiles(*area.bounds, 14)) > 25_000


def test_metadata_floor_asks_for_each_chunks_ids_fifty_at_a_time():
    assert metadata_request_floor([5000, 5000, 1]) == 100 + 100 + 1
    assert metadata_request_floor([49, 51]) == 1 + 2
    assert metadata_request_floor([]) == 0


def test_merging_one_part_of_a_benchmark_keeps_its_other_rows(tmp_path):
    import json

    from benchmarks.harness import Figure
    from benchmarks.run import store_and_render

    output = tmp_path / "RESULTS.md"
    earlier = [
        Figure("s", "part a: rate", 1.0, "x"),
        Figure("s", "part b: rate", 2.0, "x"),
        Figure("other", "part a: rate", 3.0, "x"),
    ]
    store_and_render(earlier, {}, {"s", "other"}, output, quick=True)
    store_and_render(
        [Figure("s", "part a: rate", 9.0, "x")],
        {},
        {"s"},
        output,
        quick=True,
        replaces={"s": ["part a"]},
    )
    rows = json.loads(output.with_suffix(".json").read_text())["figures"]
    assert sorted((r["benchmark"], r["metric"], r["value"]) for r in rows) == [
        ("other", "part a: rate", 3.0),
        ("s", "part a: rate", 9.0),
        ("s", "part b: rate", 2.0),
    ]
    store_and_render([Figure("s", "part a: rate", 5.0, "x")], {}, {"s"}, output, quick=True)
    rows = json.loads(output.with_suffix(".json").read_text())["figures"]
    assert [(r["benchmark"], r["value"]) for r in rows] == [("other", 3.0), ("s", 5.0)]


def test_request_figures_count_url_lookups_apart_beside_the_run_before():
    before = {
        "label": "abc1234",
        "images": 1000,
        "total_s": 4.0,
        "requests": {"batch": 40, "requests": 1060},
        "load_average": {"median": 1.0},
    }
    run = {
        "images": 1000,
        "total_s": 2.0,
        "metadata_floor": 20,
        "requests": {"batch": 25, "batch:url_lookup": 4, "requests": 1030},
        "before": before,
    }
    rate, ids = request_figures(run)
    assert (rate.value, rate.baseline, rate.met) == (500, 250, False)
    assert "abc1234" in rate.baseline_name
    assert (ids.value, ids.baseline, ids.met) == (21, 20, False)  # 21 > 1.02 x 20
    run["requests"] = {"batch": 24, "batch:url_lookup": 4, "requests": 1030}
    assert request_figures(run)[1].met
    run["total_s"] = 0.5
    assert request_figures(run)[0].met  # 2,000 images/s
    older = {**run, "requests": {"batch": 40, "requests": 1060}}  # an emulator without the counter
    assert [f.metric for f in request_figures(older)] == [rate.metric]
