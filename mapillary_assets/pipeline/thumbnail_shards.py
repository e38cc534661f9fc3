"""A chunk's thumbnails in a bucket data dir: one tar shard, spooled in scratch, committed at the chunk's end.

Dagster-free. Why a shard and not one object per image: ARCHITECTURE.md, "Thumbnails in a bucket". The
downloader appends each verified JPEG to a tar in `layout.work_path` (a local append, no request) and
`commit` uploads it whole (`store.upload`: one PUT, multipart above 16 MB, visible only once complete)
before the caller writes the chunk's downloads Parquet, whose rows then carry each image's `offset` and
`length` in the shard. A worker killed mid-chunk has committed nothing: the next attempt downloads the
chunk again (the accepted cost of shards).

Resume: the ids whose downloads rows say ok in this shard count as done without a request beyond one
HEAD of the shard. A shard only ever grows: a retry copies the committed shard into the spool and
appends the retried images (tar's append mode), so every committed member keeps its offset and the rows
of any earlier commit stay true of every later one, even when an attempt is killed between the upload
and the Parquet write. A member appended twice that way is read at its last offset.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePath

import pandas as pd

from mapillary_assets.storage import DataLayout
from mapillary_assets.storage.shards import (
    INDEX_COLUMNS,
    MEMBER_SUFFIX,
    add_member,
    open_shard_writer,
    shard_index,
)

SHARD_COLUMNS = ["offset", "length"]  # the downloads rows' extra columns in a bucket data dir
Ranges = dict[str, tuple[int, int]]  # image_id -> (offset, length) in the shard


def chunk_shard(layout: DataLayout, chunk_key: str | None, size: int | str) -> ChunkShard | None:
    """The chunk's shard in a bucket data dir; None in a local one (a file per image)."""
    if layout.is_local:
        return None
    if chunk_key is None:
        raise ValueError(
            "a bucket data dir stores a chunk's thumbnails as one shard: pass chunk_key"
        )
    return ChunkShard(layout, chunk_key, size)


class ChunkShard:
    """The thumbnails of one chunk at one size: what its committed shard holds, and the spool of the next."""

    def __init__(self, layout: DataLayout, chunk_key: str, size: int | str) -> None:
        self.layout = layout
        self.store = layout.store
        self.chunk_key = chunk_key
        self.key = layout.thumbnail_shard_key(chunk_key, size)
        # in scratch, under another name than a fetched copy of the shard (layout.fetched) takes
        self.spool: Path = layout.work_path(self.key + ".spool")
        self._archive: tarfile.TarFile | None = None
        self._committed: Ranges = {}
        self._stale_rows = False  # ok rows naming this shard while it is missing

    def stored(self) -> Ranges:
        """Where the committed shard holds each image, by the chunk's downloads rows that say ok for it
        (one GET of those rows, one HEAD of the shard); empty when there are none."""
        downloads_key = self.layout.downloads_key(self.chunk_key)
        if not self.store.exists(downloads_key):
            return self._committed
        rows = self.store.read_parquet(downloads_key)
        if not set(SHARD_COLUMNS) <= set(rows.columns):
            return self._committed  # written before shards: its images are objects of their own
        rows = rows.loc[
            (rows["status"] == "ok") & (rows["path"] == self.key) & rows["offset"].notna()
        ]
        if rows.empty:
            return self._committed
        if not self.store.exists(self.key):
            self._stale_rows = True
            return self._committed
        self._committed = _ranges(rows)
        return self._committed

    def add(self, image_id: str, data: bytes) -> None:
        """Append one verified JPEG to the spool. On the first, the spool starts as a copy of the committed
        shard, if any (a retry keeps every stored image): one blocking GET, on a retry only."""
        if self._archive is None:
            self._archive = self._open_spool()
        add_member(self._archive, image_id, data)

    def _open_spool(self) -> tarfile.TarFile:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        if len(self._committed):
            self.store.download(self.key, self.spool)
            return tarfile.open(self.spool, mode="a", format=tarfile.USTAR_FORMAT)
        return open_shard_writer(self.spool)

    def commit(self) -> Ranges:
        """Upload the spool as the chunk's shard; where it holds each image (an image added twice: its last
        copy), or nothing when nothing was added (the committed shard stays as it is)."""
        if self._archive is None:
            return {}
        self._archive.close()
        self._archive = None
        try:
            ranges = _ranges(shard_index(self.spool))  # a later member of one id overwrites
            if self._stale_rows:
                # Rows of a shard that is gone must not describe the new one if this attempt dies
                # between the upload and its own rows (this attempt downloads all their images again).
                self.store.delete(self.layout.downloads_key(self.chunk_key))
            self.store.upload(self.key, self.spool)
        finally:
            self.spool.unlink(missing_ok=True)
        return ranges

    def discard(self) -> None:
        """Drop an unfinished spool (the attempt failed before its commit)."""
        if self._archive is not None:
            self._archive.close()
            self._archive = None
        self.spool.unlink(missing_ok=True)


class FetchedShards:
    """Chunks' shards fetched whole, once each, into scratch and read image by image: `read(member)` slices
    `<image_id>.jpg` out of its shard by the offset its downloads row gives (os.pread: no shared file
    position, so the blur step's threads read at once). A context manager: the copies go at its end."""

    def __init__(self, layout: DataLayout) -> None:
        self.layout = layout
        self._files: dict[
            str, tuple[Path, int]
        ] = {}  # shard key -> (fetched copy, open descriptor)
        self._where: dict[
            str, tuple[int, int, int]
        ] = {}  # image id -> (descriptor, offset, length)

    def __enter__(self) -> FetchedShards:
        return self

    def __exit__(self, *exc) -> None:
        for path, descriptor in self._files.values():
            os.close(descriptor)
            path.unlink(missing_ok=True)
        self._files.clear()

    def add(self, downloads: pd.DataFrame) -> list[str]:
        """Fetch the shards a chunk's downloads rows store their images in; the member names of its ok
        rows, in row order (what `read` takes)."""
        ok = downloads.loc[downloads["status"] == "ok"]
        for key in ok["path"].unique():
            if key not in self._files:
                path = self.layout.fetched(key)
                if path is None:
                    raise FileNotFoundError(f"{self.layout.store.describe(key)} is missing")
                self._files[key] = (path, os.open(path, os.O_RDONLY))
        rows = ok[["image_id", "path", *SHARD_COLUMNS]].itertuples(index=False)
        for image_id, key, offset, length in rows:
            self._where[str(image_id)] = (self._files[key][1], int(offset), int(length))
        return [f"{image_id}{MEMBER_SUFFIX}" for image_id in ok["image_id"]]

    def read(self, member: str) -> bytes:
        descriptor, offset, length = self._where[PurePath(member).stem]
        return os.pread(descriptor, length, offset)


def _ranges(index: pd.DataFrame) -> Ranges:
    return {
        str(image_id): (int(offset), int(length))
        for image_id, offset, length in index[INDEX_COLUMNS].itertuples(index=False)
    }
