import datetime as dt
import json
import random
import time
from pathlib import Path

import mapbox_vector_tile
import mercantile
import pyarrow as pa
import pytest
from mapbox_vector_tile.Mapbox import vector_tile_pb2

from mapillary_assets.api.entity_decoders import (
    DEFAULT_IMAGE_FIELDS,
    IMAGE_COLUMNS,
    IMAGE_SCHEMA,
    decode_image_entity,
    entities_to_table,
)
from mapillary_assets.api.tile_decoders import (
    TileDecodeError,
    TilePoint,
    decode_image_layer,
    decode_sequence_lines,
    tile_pixels_to_lonlat,
)

FIXTURES = Path(__file__).parent / "fixtures"
Z14 = (14, 8580, 5737)
Z10 = (10, 536, 358)
Z5 = (5, 16, 11)


def tile_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def load_json(name: str):
    return json.loads((FIXTURES / name).read_text())


# ----------------------------------------------------------------------------- vector tiles


def test_image_layer_matches_recorded_tile():
    points = decode_image_layer(tile_bytes("tile_14_8580_5737.mvt"), *Z14)
    expected = load_json("tile_14_8580_5737.expected.json")
    assert [p.image_id for p in points] == [e["id"] for e in expected]
    for point, want in zip(points, expected):
        assert isinstance(point, TilePoint)
        assert point.lon == pytest.approx(want["lon"], abs=1e-12)
        assert point.lat == pytest.approx(want["lat"], abs=1e-12)
        assert point.captured_at_ms == want["captured_at"]
        assert point.sequence_id == want["sequence_id"]
        assert point.compass_angle == want["compass_angle"]
        assert point.is_pano is want["is_pano"]
        assert point.organization_id == want.get("organization_id")
        assert point.creator_id == want.get("creator_id")


def test_ids_above_2_53_stay_exact():
    ids = {p.image_id for p in decode_image_layer(tile_bytes("tile_14_8580_5737.mvt"), *Z14)}
    assert "9007199254740993" in ids  # 2**53 + 1: a float would give ...992
    assert "9223372036854775807" in ids
    assert all(isinstance(i, str) for i in ids)


def test_pixel_origin_is_top_left_and_y_grows_down():
    z, x, y = Z14
    points = {
        p.image_id: p for p in decode_image_layer(tile_bytes("tile_14_8580_5737.mvt"), z, x, y)
    }
    top_left = mercantile.ul(x, y, z)
    corner = points["4503599627370497"]  # pixel (0, 0)
    assert (corner.lon, corner.lat) == pytest.approx((top_left.lng, top_left.lat), abs=1e-12)
    far = points["9223372036854775807"]  # pixel (4095, 4095): just inside the bottom-right corner
    bounds = mercantile.bounds(x, y, z)
    assert bounds.west < far.lon < bounds.east and bounds.south < far.lat < bounds.north
    assert far.lat < corner.lat


def test_agrees_with_mapbox_vector_tile_decode():
    z, x, y = Z14
    data = tile_bytes("tile_14_8580_5737.mvt")
    reference = mapbox_vector_tile.decode(data, default_options={"y_coord_down": True})["image"][
        "features"
    ]
    points = decode_image_layer(data, z, x, y)
    recorded = {e["id"]: e for e in load_json("tile_14_8580_5737.expected.json")}
    assert [p.image_id for p in points] == [str(f["properties"]["id"]) for f in reference]
    for feature, point in zip(reference, points, strict=True):
        px, py = feature["geometry"]["coordinates"]
        # Pixel (px, py) of a 4096-extent tile is the top-left corner of tile (x*4096+px, y*4096+py) at z+12.
        corner = mercantile.ul(x * 4096 + px, y * 4096 + py, z + 12)
        assert (point.lon, point.lat) == pytest.approx((corner.lng, corner.lat), abs=1e-9)
        want = recorded[point.image_id]  # the fixture generator's own converter
        assert (point.lon, point.lat) == pytest.approx((want["lon"], want["lat"]), abs=1e-9)


def test_gzipped_tile_decodes_the_same():
    plain = decode_image_layer(tile_bytes("tile_14_8580_5737.mvt"), *Z14)
    gzipped = tile_bytes("tile_14_8580_5737.mvt.gz")
    assert gzipped[:2] == b"\x1f\x8b"
    assert decode_image_layer(gzipped, *Z14) == plain
    assert decode_sequence_lines(gzipped, *Z14) == decode_sequence_lines(
        tile_bytes("tile_14_8580_5737.mvt"), *Z14
    )


def test_empty_and_layerless_tiles():
    assert decode_image_layer(b"", *Z14) == []
    assert decode_sequence_lines(b"", *Z14) == []
    assert (
        decode_image_layer(tile_bytes("tile_10_536_358.mvt"), *Z10) == []
    )  # no image layer below z14
    with pytest.raises(TileDecodeError):
        decode_image_layer(b"\x1f\x8b not really gzip", *Z14)
    with pytest.raises(TileDecodeError):
        decode_image_layer(b"\xff" * 20, *Z14)


def test_sequence_lines_z14_include_multilinestring_parts():
    lines = decode_sequence_lines(tile_bytes("tile_14_8580_5737.mvt"), *Z14)
    assert [len(line) for line in lines] == [2, 2, 2]
    lon, lat = tile_pixels_to_lonlat([100, 180], [200, 260], *Z14)
    assert lines[0] == [(lon[0], lat[0]), (lon[1], lat[1])]


def test_sequence_lines_z10_and_overview_points_z5():
    lines = decode_sequence_lines(tile_bytes("tile_10_536_358.mvt"), *Z10)
    assert [len(line) for line in lines] == [3, 2, 3]
    bounds = mercantile.bounds(Z10[1], Z10[2], Z10[0])
    for line in lines:
        for lon, lat in line:
            assert bounds.west <= lon <= bounds.east and bounds.south <= lat <= bounds.north
    overview = decode_sequence_lines(tile_bytes("tile_5_16_11.mvt"), *Z5)
    assert [len(line) for line in overview] == [1, 1]
    lon, lat = tile_pixels_to_lonlat([1000], [2000], *Z5)
    assert overview[0] == [(lon[0], lat[0])]


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def dense_tile(n_points: int, seed: int = 7) -> bytes:
    """A z14 tile like a city centre's, written straight with protobuf (the encoder is too slow)."""
    rng = random.Random(seed)
    tile = vector_tile_pb2.tile()
    layer = tile.layers.add()
    layer.name, layer.version, layer.extent = "image", 2, 4096
    layer.keys.extend(
        [
            "captured_at",
            "compass_angle",
            "id",
            "sequence_id",
            "organization_id",
            "is_pano",
            "creator_id",
        ]
    )
    index: dict = {}

    def value(kind: str, v) -> int:
        slot = index.get((kind, v))
        if slot is None:
            slot = index[(kind, v)] = len(layer.values)
            setattr(layer.values.add(), kind, v)
        return slot

    for i in range(n_points):
        feature = layer.features.add()
        feature.id, feature.type = i + 1, 1
        feature.geometry.extend([9, _zigzag(rng.randrange(4096)), _zigzag(rng.randrange(4096))])
        feature.tags.extend(
            [
                0,
                value("int_value", 1_600_000_000_000 + i),
                1,
                value("double_value", rng.randrange(36000) / 100),
                2,
                value("int_value", 9_007_199_254_740_993 + 2 * i),
                3,
                value("string_value", f"seq{i // 200:019d}"),
                4,
                value("int_value", 1 + i % 3),
                5,
                value("bool_value", i % 20 == 0),
                6,
                value("int_value", 100_000 + i % 5000),
            ]
        )
    return tile.SerializeToString()


def test_dense_tile_decodes_in_seconds():
    data = dense_tile(60_000)
    started = time.perf_counter()
    points = decode_image_layer(data, *Z14)
    elapsed = time.perf_counter() - started
    assert len(points) == 60_000
    assert points[-1].image_id == str(9_007_199_254_740_993 + 2 * 59_999)
    # ~0.5 s on a shared 2-core box; the bound only catches a return to per-feature slow paths.
    assert elapsed < 10, f"decoding 60k points took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- Graph API entities


def test_default_fields_never_ask_for_thumbnail_urls():
    assert not [f for f in DEFAULT_IMAGE_FIELDS if "thumb" in f or "url" in f]
    assert {
        "id",
        "geometry",
        "computed_geometry",
        "sequence",
        "creator",
        "merge_cc",
        "mesh",
        "sfm_cluster",
    } <= set(DEFAULT_IMAGE_FIELDS)


def test_schema_columns_follow_the_contract():
    assert IMAGE_COLUMNS == (
        "image_id",
        "captured_at",
        "lon",
        "lat",
        "computed_lon",
        "computed_lat",
        "altitude",
        "computed_altitude",
        "compass_angle",
        "computed_compass_angle",
        "sequence_id",
        "creator_id",
        "creator_username",
        "camera_type",
        "make",
        "model",
        "width",
        "height",
        "is_pano",
        "quality_score",
        "exif_orientation",
        "atomic_scale",
        "merge_cc",
        "has_mesh",
        "has_sfm_cluster",
    )
    assert IMAGE_SCHEMA.field("captured_at").type == pa.timestamp("ms", tz="UTC")
    assert IMAGE_SCHEMA.field("image_id").type == pa.string()
    assert IMAGE_SCHEMA.field("creator_id").type == pa.string()


def test_full_entity():
    row = decode_image_entity(load_json("graph_image.json"))
    assert set(row) == set(IMAGE_COLUMNS)
    assert row["image_id"] == "9007199254740993"
    assert row["captured_at"] == dt.datetime(2020, 9, 13, 12, 26, 40, 123000, tzinfo=dt.UTC)
    assert row["captured_at"].utcoffset() == dt.timedelta(0)
    assert (row["lon"], row["lat"]) == (8.5417123, 47.3769456)
    assert (row["computed_lon"], row["computed_lat"]) == (8.5417234, 47.3769567)
    assert row["altitude"] == -15.0  # 4294967281 is an unsigned-wrapped -15
    assert row["computed_altitude"] == 411.25
    assert row["sequence_id"] == "Zx4bC8dE0fG2hI3jK5lM6n"
    assert (row["creator_id"], row["creator_username"]) == ("102030405060708", "zurich_walker")
    assert (row["camera_type"], row["make"], row["model"]) == (
        "perspective",
        "GoPro",
        "HERO9 Black",
    )
    assert (row["width"], row["height"], row["exif_orientation"]) == (4000, 3000, 1)
    assert row["atomic_scale"] == 1.0 and isinstance(row["atomic_scale"], float)
    assert (
        row["merge_cc"] == "1234567890123456768"
    )  # the float the API sent, written without exponent
    assert row["has_mesh"] is True and row["has_sfm_cluster"] is True
    assert row["is_pano"] is False and row["quality_score"] == 0.8125
    assert "thumb" not in " ".join(str(v) for v in row.values())


def test_sparse_entity_absent_fields_are_none():
    row = decode_image_entity(load_json("graph_image_sparse.json"))
    assert row["computed_lon"] is None and row["computed_lat"] is None
    assert row["creator_id"] is None and row["creator_username"] is None
    assert row["has_mesh"] is None and row["has_sfm_cluster"] is None
    assert row["computed_altitude"] is None and row["quality_score"] is None
    assert row["camera_type"] == "brown" and row["merge_cc"] == "7"
    assert row["altitude"] == 405.5
    only_id = decode_image_entity({"id": "1"})
    assert only_id["image_id"] == "1" and all(
        v is None for k, v in only_id.items() if k != "image_id"
    )


def test_numeric_ids_are_never_passed_through_float():
    row = decode_image_entity(
        {
            "id": 9007199254740993,
            "creator": {"id": 9007199254740995, "username": "u"},
            "sequence": "s",
            "computed_altitude": 4294967295,
        }
    )
    assert row["image_id"] == "9007199254740993"
    assert row["creator_id"] == "9007199254740995"
    assert row["computed_altitude"] == -1.0


def test_malformed_values_do_not_raise():
    row = decode_image_entity(
        {
            "id": "5",
            "geometry": {"type": "Point"},
            "creator": "nobody",
            "width": "wide",
            "captured_at": None,
            "computed_geometry": {"coordinates": ["a", "b"]},
        }
    )
    assert row["lon"] is None and row["computed_lon"] is None and row["creator_id"] is None
    assert row["width"] is None and row["captured_at"] is None


def test_entities_to_table_uses_the_schema():
    batch = load_json("graph_ids_batch.json")
    rows = [decode_image_entity(obj) for obj in batch.values()]
    table = entities_to_table(rows)
    assert table.schema == IMAGE_SCHEMA
    assert table.num_rows == 2
    assert table.column("image_id").to_pylist() == ["9007199254740993", "1234567890123456"]
    assert table.column("captured_at").to_pylist()[0] == rows[0]["captured_at"]
    assert entities_to_table([]).schema == IMAGE_SCHEMA
    frame = table.to_pandas()
    assert str(frame["captured_at"].dtype) == "datetime64[ms, UTC]"
