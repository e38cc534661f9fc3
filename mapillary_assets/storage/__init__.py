"""Every stage's files: their keys under the data dir (layout.py) and one store interface over a local
folder (local_store.py, atomic temp+rename writes of files.py) or an S3-compatible bucket
(object_store.py, whole-object PUTs); shards.py packs a chunk's thumbnails into one tar with an index.
Dagster-free."""

from mapillary_assets.storage.files import (
    IMAGE_ID_PATTERN,
    TEMP_MARKER,
    StorageError,
    atomic_write_bytes,
    is_disk_full,
    read_parquet,
    read_table,
    remove_leftovers_of,
    sweep_temporary_files,
    validate_image_id,
    write_parquet_atomic,
)
from mapillary_assets.storage.layout import (
    SCRATCH_DIR_VARIABLE,
    DataLayout,
    data_dir_identity,
    default_scratch_dir,
    disk_full_error,
    thumbnail_bytes_needed,
)
from mapillary_assets.storage.local_store import LocalStore
from mapillary_assets.storage.object_store import (
    ObjectStore,
    S3Settings,
    is_object_store_url,
    s3_settings_from_env,
)

Store = LocalStore | ObjectStore

__all__ = [
    "IMAGE_ID_PATTERN",
    "SCRATCH_DIR_VARIABLE",
    "TEMP_MARKER",
    "DataLayout",
    "LocalStore",
    "ObjectStore",
    "S3Settings",
    "Store",
    "StorageError",
    "atomic_write_bytes",
    "data_dir_identity",
    "default_scratch_dir",
    "disk_full_error",
    "is_disk_full",
    "is_object_store_url",
    "read_parquet",
    "read_table",
    "remove_leftovers_of",
    "s3_settings_from_env",
    "sweep_temporary_files",
    "thumbnail_bytes_needed",
    "validate_image_id",
    "write_parquet_atomic",
]
