"""The partition zoom follows the area's size unless MAPILLARY_PARTITION_ZOOM is set: a city keeps its
z12 partitions, a country stays within a couple of thousand."""

from __future__ import annotations

from mapillary_assets.defs.area import (
    DEFAULT_PARTITION_ZOOM,
    TARGET_MAX_PARTITIONS,
    choose_partition_zoom,
    partition_zoom,
)
from mapillary_assets.defs.partitions import tile_partitions
from mapillary_assets.pipeline.aoi import load_aoi, partition_tiles

# a rough outline of Switzerland (~41,000 km2, ~27,500 z14 tiles over its bounding box)
SWITZERLAND_LIKE = [
    [5.96, 46.13],
    [6.79, 46.06],
    [7.04, 45.93],
    [7.86, 45.92],
    [8.44, 46.46],
    [9.04, 45.83],
    [9.55, 46.30],
    [10.47, 46.55],
    [10.49, 46.94],
    [9.53, 47.27],
    [8.56, 47.81],
    [7.59, 47.58],
    [6.84, 47.17],
    [5.96, 46.13],
]

# ~780 x 890 km around Germany: ~18,000 z12 tiles
LARGE_AREA = [[5.9, 47.3], [15.0, 47.3], [15.0, 55.0], [5.9, 55.0], [5.9, 47.3]]


def test_zurich_keeps_its_z12_partitions(monkeypatch):
    monkeypatch.delenv("MAPILLARY_AOI", raising=False)
    monkeypatch.setenv("MAPILLARY_PARTITION_ZOOM", "12")
    pinned = tile_partitions().get_partition_keys()
    monkeypatch.delenv("MAPILLARY_PARTITION_ZOOM")
    assert partition_zoom() == DEFAULT_PARTITION_ZOOM
    assert tile_partitions().get_partition_keys() == pinned
    assert all(key.startswith("12-") for key in pinned)


def test_a_large_area_is_partitioned_coarser_within_the_target():
    # Switzerland's ~1,100 z12 tiles fit the target: it keeps z12
    assert choose_partition_zoom(load_aoi(coordinates=SWITZERLAND_LIKE)) == DEFAULT_PARTITION_ZOOM
    central_europe = load_aoi(coordinates=LARGE_AREA)
    zoom = choose_partition_zoom(central_europe)
    assert zoom < DEFAULT_PARTITION_ZOOM
    assert len(partition_tiles(central_europe, zoom)) <= TARGET_MAX_PARTITIONS
    # the finest such zoom: one finer would exceed the target
    assert len(partition_tiles(central_europe, zoom + 1)) > TARGET_MAX_PARTITIONS
    assert choose_partition_zoom(central_europe, max_partitions=50) < zoom


def test_the_setting_overrides_the_choice(monkeypatch, tmp_path):
    aoi_file = tmp_path / "large.geojson"
    aoi_file.write_text(
        '{"type": "Polygon", "coordinates": [' + str(LARGE_AREA).replace("'", "") + "]}"
    )
    monkeypatch.setenv("MAPILLARY_AOI", str(aoi_file))
    monkeypatch.delenv("MAPILLARY_PARTITION_ZOOM")
    chosen = partition_zoom()
    assert chosen == choose_partition_zoom(load_aoi(str(aoi_file)))
    keys = tile_partitions().get_partition_keys()
    assert 0 < len(keys) <= TARGET_MAX_PARTITIONS and keys[0].startswith(f"{chosen}-")
    monkeypatch.setenv("MAPILLARY_PARTITION_ZOOM", "12")
    assert partition_zoom() == 12
