"""The store of a local data dir: keys are files under one folder, written atomically (files.py)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mapillary_assets.storage.files import (
    TEMP_MARKER,
    atomic_write_bytes,
    read_parquet,
    read_table,
    remove_leftovers_of,
    sweep_temporary_files,
    write_parquet_atomic,
)


class LocalStore:
    """Keys as files under `root`. Every write goes to a temporary sibling that is renamed into place."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._prefix = os.path.join(os.fspath(self.root), "")  # one string join per key, no Path

    def describe(self, key: str) -> str:
        return self._prefix + key

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """`durable=False` skips the fsync (see files.atomic_write_bytes)."""
        atomic_write_bytes(self._prefix + key, data, durable)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `key` only if no file has that name; False when one had (its content holds). The
        complete temporary file is hard-linked onto the name: link fails on an existing name."""
        target = self._prefix + key
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        temporary = f"{target}{TEMP_MARKER}{uuid.uuid4().hex}"
        atomic_write_bytes(temporary, data)
        try:
            os.link(temporary, target)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)

    def get(self, key: str) -> bytes:
        """The file's bytes; FileNotFoundError when there is none."""
        with open(self._prefix + key, "rb", buffering=0) as handle:  # unbuffered: one read, no copy
            return handle.readall()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of the file from `offset`; FileNotFoundError when there is none."""
        with open(self._prefix + key, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._prefix + key)

    def modified(self, key: str) -> float | None:
        """The file's modification time (seconds since the epoch), None when there is none."""
        try:
            return os.stat(self._prefix + key).st_mtime
        except FileNotFoundError:
            return None

    def list(self, folder: str) -> list[str]:
        """Keys of the files directly in `folder` (a key ending in '/'), without write leftovers, sorted."""
        try:
            entries = list(os.scandir(self._prefix + folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            folder + entry.name
            for entry in entries
            if TEMP_MARKER not in entry.name and entry.is_file()
        )

    def delete(self, key: str) -> None:
        Path(self._prefix + key).unlink(missing_ok=True)

    def read_parquet(
        self, key: str, columns: list[str] | None = None, filters: list[tuple] | None = None
    ) -> pd.DataFrame:
        return read_parquet(Path(self._prefix + key), columns=columns, filters=filters)

    def read_table(
        self,
        key: str,
        columns: list[str] | None = None,
        filters: list[tuple] | None = None,
        read_dictionary: list[str] | None = None,
    ) -> pa.Table:
        return read_table(Path(self._prefix + key), columns, filters, read_dictionary)

    def parquet_rows(self, key: str) -> int | None:
        """The row count from the file's footer; None when there is no file."""
        path = self._prefix + key
        return pq.read_metadata(path).num_rows if os.path.isfile(path) else None

    def write_parquet(
        self,
        key: str,
        frame: pd.DataFrame | pa.Table,
        row_group_size: int | None = None,
    ) -> None:
        write_parquet_atomic(frame, Path(self._prefix + key), row_group_size)

    def upload(self, key: str, source: Path) -> None:
        """Place the finished local file `source` at `key` (nothing to do when it was built in place)."""
        target = Path(self._prefix + key)
        if Path(source).resolve() == target.resolve():
            return
        temporary = target.with_name(target.name + TEMP_MARKER + "upload")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def remove_leftovers_of(self, keys: Iterable[str]) -> int:
        """Remove what killed writes of exactly these keys left (files.remove_leftovers_of)."""
        return remove_leftovers_of(Path(self._prefix + key) for key in keys)

    def sweep(self, folder: str) -> int:
        """Remove every leftover of a killed write under `folder` (single-writer stages)."""
        return sweep_temporary_files(Path(self._prefix + folder))

    def duckdb_source(self, key: str) -> str:
        """The name DuckDB reads `key` by."""
        return self._prefix + key

    def prepare_duckdb(self, con) -> None:
        """Nothing: DuckDB reads local files as they are."""
