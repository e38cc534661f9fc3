"""Where every stage keeps its files under one data dir (MAPILLARY_DATA_DIR): a local folder or an
`s3://bucket/prefix` on an S3-compatible object store.

Each file has one key, its name relative to the data dir (`metadata/chunk-000000.parquet`): the same name
on disk and in a bucket. `DataLayout.store` reads and writes keys on either backend. Files that tools
must open by path (the DuckDB staging database, the GeoPackage while it is built) have a `work_path`:
inside the data dir when it is local, under the worker's scratch folder when it is a bucket.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from mapillary_assets.storage.files import StorageError, safe_key, validate_image_id
from mapillary_assets.storage.local_store import LocalStore
from mapillary_assets.storage.object_store import ObjectStore, in_fresh_child, is_object_store_url

SCRATCH_DIR_VARIABLE = "MAPILLARY_SCRATCH_DIR"


def default_scratch_dir() -> Path:
    """MAPILLARY_SCRATCH_DIR, else a folder under the system temp dir: the worker's own disk."""
    configured = os.environ.get(SCRATCH_DIR_VARIABLE, "").strip()
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "mapillary-scratch"


@dataclass(frozen=True)
class DataLayout:
    """The keys of every stage's files under one data dir, and the store that holds them."""

    root: Path | str  # a local folder, or an s3:// URL
    scratch: Path | None = (
        None  # a bucket data dir's local work files (default: default_scratch_dir())
    )

    def __post_init__(self) -> None:
        if not is_object_store_url(str(self.root)):
            object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def at(cls, location: str | Path) -> DataLayout:
        """The layout of MAPILLARY_DATA_DIR's value: an s3:// URL as given, a folder made absolute."""
        text = str(location)
        return cls(text if is_object_store_url(text) else Path(text).resolve())

    @property
    def is_local(self) -> bool:
        return isinstance(self.root, Path)

    @cached_property
    def store(self) -> LocalStore | ObjectStore:
        if self.is_local:
            return LocalStore(self.root)
        return ObjectStore(str(self.root))

    def path(self, key: str) -> Path:
        """The file of `key` in a local data dir (tests and local-only tools)."""
        if not self.is_local:
            raise StorageError(f"{self.root} is an object store: {key} has no local path")
        return self.root / key

    def work_path(self, key: str) -> Path:
        """Where a file that tools open by path is built: in a local data dir itself, else in scratch."""
        if self.is_local:
            return self.root / key
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return (self.scratch or default_scratch_dir()) / f"data-{digest}" / key

    def fetched(self, key: str) -> Path | None:
        """A local file holding `key` for tools that read paths: the file itself in a local data dir,
        else a copy downloaded into scratch; None when there is no such file."""
        if self.is_local:
            return self.root / key if self.store.exists(key) else None
        try:
            self.store.download(key, self.work_path(key))
        except FileNotFoundError:
            return None
        return self.work_path(key)

    # discovery
    @staticmethod
    def tile_cache_key(tileset: str, z: int, x: int, y: int) -> str:
        return f"tile_cache/{safe_key(tileset)}/{int(z)}/{int(x)}/{int(y)}.mvt"

    @staticmethod
    def discovery_key(partition_key: str) -> str:
        return f"discovery/{safe_key(partition_key)}.parquet"

    discovery_folder = "discovery/"
    # image lookups of the sequence route that failed (its images are discovery_key("sequences"))
    sequence_failures_key = "sequences/failures.parquet"
    chunk_assignment_key = "chunks/assignment.parquet"
    metadata_folder = "metadata/"
    downloads_folder = "downloads/"
    blur_folder = "blur/"
    filter_areas_key = "filters/areas.geojson"
    staging_db_key = "staging/mapillary.duckdb"
    geopackage_key = "output/mapillary_images.gpkg"
    geoparquet_key = "output/mapillary_images.parquet"
    data_dir_id_key = "data_dir_id"

    @staticmethod
    def metadata_key(chunk_key: str) -> str:
        return f"metadata/{safe_key(chunk_key)}.parquet"

    @staticmethod
    def metadata_failures_key(chunk_key: str) -> str:
        return f"metadata/{safe_key(chunk_key)}.failures.parquet"

    @staticmethod
    def thumbnail_key(image_id: str, size: int | str) -> str:
        """thumbnails/<size>/<last 3 digits of the id>/<id>.jpg: 1,000 folders per size, so a folder holds
        about 1,200 files at 1.2 M images and a million only past a billion."""
        image_id = validate_image_id(image_id)
        size_folder = "original" if size == "original" else str(int(size))
        return f"thumbnails/{size_folder}/{image_id.zfill(3)[-3:]}/{image_id}.jpg"

    thumbnail_relative_path = thumbnail_key

    @staticmethod
    def thumbnail_shard_key(chunk_key: str, size: int | str) -> str:
        """thumbnails/<size>/shards/<chunk>.tar: a chunk's thumbnails as one tar (a bucket data dir only;
        storage/shards.py)."""
        size_folder = "original" if size == "original" else str(int(size))
        return f"thumbnails/{size_folder}/shards/{safe_key(chunk_key)}.tar"

    def read_thumbnail(
        self, path: str, offset: int | None = None, length: int | None = None
    ) -> bytes:
        """One image from its downloads row or GeoPackage row (`thumbnail_path`, `thumbnail_offset`,
        `thumbnail_length`): in a bucket one ranged GET of its chunk's shard, in a local data dir (no
        offset) its own file."""
        if offset is None or pd.isna(offset):
            return self.store.get(path)
        return self.store.get_range(path, int(offset), int(length))

    @staticmethod
    def downloads_key(chunk_key: str) -> str:
        return f"downloads/{safe_key(chunk_key)}.parquet"

    @staticmethod
    def blur_key(chunk_key: str) -> str:
        return f"blur/{safe_key(chunk_key)}.parquet"

    # The same files as local paths (a local data dir only).
    def tile_cache_path(self, tileset: str, z: int, x: int, y: int) -> Path:
        return self.path(self.tile_cache_key(tileset, z, x, y))

    def discovery_path(self, partition_key: str) -> Path:
        return self.path(self.discovery_key(partition_key))

    @property
    def discovery_dir(self) -> Path:
        return self.path(self.discovery_folder)

    @property
    def sequence_failures_path(self) -> Path:
        return self.path(self.sequence_failures_key)

    @property
    def chunk_assignment_path(self) -> Path:
        return self.path(self.chunk_assignment_key)

    def metadata_path(self, chunk_key: str) -> Path:
        return self.path(self.metadata_key(chunk_key))

    def metadata_failures_path(self, chunk_key: str) -> Path:
        return self.path(self.metadata_failures_key(chunk_key))

    def thumbnail_path(self, image_id: str, size: int | str) -> Path:
        return self.path(self.thumbnail_key(image_id, size))

    def downloads_path(self, chunk_key: str) -> Path:
        return self.path(self.downloads_key(chunk_key))

    def blur_path(self, chunk_key: str) -> Path:
        return self.path(self.blur_key(chunk_key))

    @property
    def filter_areas_path(self) -> Path:
        return self.path(self.filter_areas_key)

    # built by tools that need a path: in the data dir when local, in scratch beside a bucket
    @property
    def staging_db_path(self) -> Path:
        return self.work_path(self.staging_db_key)

    @property
    def geopackage_path(self) -> Path:
        return self.work_path(self.geopackage_key)

    @property
    def geoparquet_path(self) -> Path:
        return self.work_path(self.geoparquet_key)

    @property
    def rate_limit_store_path(self) -> Path:
        return self.work_path("rate_limits.sqlite")


# Typical JPEG sizes per thumbnail size, used only before any thumbnail of that size is on disk.
_TYPICAL_THUMBNAIL_BYTES = {256: 20_000, 1024: 200_000, 2048: 600_000, "original": 3_000_000}
_SAMPLED_THUMBNAILS = 200


def thumbnail_bytes_needed(layout: DataLayout, size: int | str) -> int:
    """About how many bytes the thumbnails not yet on disk need: the assigned images without an `ok`
    download times the mean size of the stored ones (a sample of the files on disk before any chunk
    recorded its downloads). A local data dir only: a bucket does not fill up."""
    assigned = layout.store.parquet_rows(layout.chunk_assignment_key) or 0
    ok = pd.Series([], dtype="int64")
    for key in layout.store.list(layout.downloads_folder):
        frame = layout.store.read_parquet(key, columns=["status", "bytes"])
        ok = pd.concat([ok, frame.loc[frame["status"] == "ok", "bytes"]])
    if len(ok):
        done, mean = len(ok), float(ok.mean())
    else:
        sizes = [
            path.stat().st_size
            for path in itertools.islice(
                (layout.root / "thumbnails" / str(size)).rglob("*.jpg"), _SAMPLED_THUMBNAILS
            )
        ]
        done = 0
        mean = sum(sizes) / len(sizes) if sizes else _TYPICAL_THUMBNAIL_BYTES.get(size, 200_000)
    return int(max(assigned - done, 0) * mean)


def disk_full_error(layout: DataLayout, thumbnail_size: int | str) -> StorageError:
    """`<data dir> is full: N GB free, about M GB needed for the remaining thumbnails`; beside a bucket,
    the scratch folder that holds the chunks' thumbnail shards while they are written."""
    if not layout.is_local:
        scratch = layout.work_path("")
        free = shutil.disk_usage(next(p for p in (scratch, *scratch.parents) if p.exists())).free
        return StorageError(
            f"{scratch} is full: {free / 1e9:.2f} GB free; a chunk's thumbnail shard is written there "
            f"before its upload to {layout.root}: free space (or set {SCRATCH_DIR_VARIABLE} to a larger "
            "disk) and re-run: what is stored is kept"
        )
    free = shutil.disk_usage(layout.root).free
    needed = thumbnail_bytes_needed(layout, thumbnail_size)
    return StorageError(
        f"{layout.root} is full: {free / 1e9:.2f} GB free, about {needed / 1e9:.2f} GB needed for the "
        "remaining thumbnails; free space (or use a data dir on a larger disk) and re-run: what is "
        "stored is kept"
    )


def data_dir_identity(layout: DataLayout) -> str:
    """The data dir's id: a UUID written once into `data_dir_id` (put only if absent, so the first
    writer's id holds), so a Dagster instance can tell this data dir from another even after it is
    moved or renamed. A bucket's is read in a forked child (the driver that calls this forks its
    runs afterwards: see object_store.in_fresh_child)."""
    if not layout.is_local:
        return in_fresh_child(_identity, layout)
    return _identity(layout)


def _identity(layout: DataLayout) -> str:
    key = layout.data_dir_id_key
    try:
        return layout.store.get(key).decode().strip()
    except FileNotFoundError:
        pass
    layout.store.put_if_absent(key, (str(uuid.uuid4()) + "\n").encode())
    return layout.store.get(key).decode().strip()
