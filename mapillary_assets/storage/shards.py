"""Thumbnails of one chunk as one tar shard, with an index to read a single image back by its id.

A shard is a plain (ustar) tar of `<image_id>.jpg` members, the form WebDataset-style training loaders
stream directly. Its index says where each member's bytes are (`image_id`, `offset`, `length`), so one
image is one ranged read of the shard (`Store.get_range`), not a download of the whole chunk.
Dagster-free; nothing here talks to a store.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from mapillary_assets.storage.files import validate_image_id

MEMBER_SUFFIX = ".jpg"
INDEX_COLUMNS = ["image_id", "offset", "length"]


def build_shard(images: Iterable[tuple[str, bytes]]) -> tuple[bytes, pd.DataFrame]:
    """The tar of `(image_id, jpeg bytes)` in the order given, and its index (one row per member)."""
    buffer = io.BytesIO()
    with open_shard_writer(buffer) as archive:
        for image_id, data in images:
            add_member(archive, image_id, data)
    shard = buffer.getvalue()
    return shard, shard_index(shard)


def open_shard_writer(target: io.BufferedIOBase | Path) -> tarfile.TarFile:
    """A shard being written into a file object or a file (a chunk's spool); close it to finish the tar."""
    if isinstance(target, Path):
        return tarfile.open(target, mode="w", format=tarfile.USTAR_FORMAT)
    return tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT)


def add_member(archive: tarfile.TarFile, image_id: str, data: bytes) -> None:
    """Append `<image_id>.jpg` holding `data` to a shard being written."""
    member = tarfile.TarInfo(validate_image_id(image_id) + MEMBER_SUFFIX)
    member.size = len(data)
    member.mode = 0o644
    archive.addfile(member, io.BytesIO(data))


def shard_index(shard: bytes | Path) -> pd.DataFrame:
    """Where each member's bytes lie in `shard`, its bytes or a file (its headers read, not its data)."""
    source = {"name": shard} if isinstance(shard, Path) else {"fileobj": io.BytesIO(shard)}
    with tarfile.open(mode="r:", **source) as archive:
        rows = [
            (member.name.removesuffix(MEMBER_SUFFIX), member.offset_data, member.size)
            for member in archive
            if member.isfile()
        ]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS).astype(
        {"image_id": "string", "offset": "int64", "length": "int64"}
    )


def shard_members(shard: bytes | Path) -> Iterator[tuple[str, bytes]]:
    """`(image_id, jpeg bytes)` of every member, in tar order (one pass over the shard, bytes or a file)."""
    source = {"name": shard} if isinstance(shard, Path) else {"fileobj": io.BytesIO(shard)}
    with tarfile.open(mode="r|", **source) as archive:
        for member in archive:
            if member.isfile():
                yield member.name.removesuffix(MEMBER_SUFFIX), archive.extractfile(member).read()


def member_range(index: pd.DataFrame, image_id: str) -> tuple[int, int]:
    """(offset, length) of `image_id` in the shard the index describes; KeyError when it holds none."""
    found = index.loc[index["image_id"] == str(image_id)]
    if found.empty:
        raise KeyError(f"image {image_id} is not in this shard")
    row = found.iloc[0]
    return int(row["offset"]), int(row["length"])
