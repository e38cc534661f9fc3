"""A chunk's thumbnails as one tar shard: its index finds each image's bytes, a ranged read returns them."""

from __future__ import annotations

import io
import tarfile

import pytest

from mapillary_assets.emulator.thumbnails import thumbnail_bytes
from mapillary_assets.storage import LocalStore
from mapillary_assets.storage.shards import (
    add_member,
    build_shard,
    member_range,
    open_shard_writer,
    shard_index,
    shard_members,
)

IDS = ["9007199254740993", "9007199254741100", "9007199254745001"]


def _images() -> list[tuple[str, bytes]]:
    return [(image_id, thumbnail_bytes(image_id, 256, False)) for image_id in IDS]


def test_the_index_points_at_each_image_bytes_in_the_tar():
    images = _images()
    shard, index = build_shard(images)
    assert index["image_id"].tolist() == IDS
    for image_id, data in images:
        offset, length = member_range(index, image_id)
        assert length == len(data)
        assert shard[offset : offset + length] == data
    assert shard_index(shard).equals(index)


def test_the_shard_is_a_plain_tar_of_id_named_jpegs():
    images = _images()
    shard, _ = build_shard(images)
    with tarfile.open(fileobj=io.BytesIO(shard)) as archive:
        assert archive.getnames() == [f"{image_id}.jpg" for image_id in IDS]
        assert archive.extractfile(f"{IDS[1]}.jpg").read() == images[1][1]
    assert list(shard_members(shard)) == images


def test_one_image_by_id_is_one_ranged_read_of_the_stored_shard(tmp_path):
    images = _images()
    shard, index = build_shard(images)
    store = LocalStore(tmp_path)
    store.put("thumbnails/256/shards/chunk-000000.tar", shard)
    wanted = IDS[2]
    assert (
        store.get_range("thumbnails/256/shards/chunk-000000.tar", *member_range(index, wanted))
        == (dict(images)[wanted])
    )
    with pytest.raises(KeyError, match="not in this shard"):
        member_range(index, "9007199254749999")


def test_a_member_name_is_an_image_id():
    with pytest.raises(ValueError, match="invalid Mapillary image id"):
        build_shard([("../etc/passwd", b"x")])


def test_a_shard_written_into_a_file_then_appended_to_keeps_every_members_offset(tmp_path):
    images = _images()
    path = tmp_path / "chunk-000000.tar"
    with open_shard_writer(path) as archive:
        for image_id, data in images[:2]:
            add_member(archive, image_id, data)
    before = shard_index(path)
    with tarfile.open(path, mode="a", format=tarfile.USTAR_FORMAT) as archive:  # as a retry appends
        add_member(archive, *images[2])
    after = shard_index(path)
    assert after.iloc[:2].equals(before) and after["image_id"].tolist() == IDS
    assert list(shard_members(path)) == images
    assert after.equals(build_shard(images)[1])  # where a shard built in one go holds them
