"""Files on a local disk, written one way only: atomically.

Dagster-free. Each partition writes its own file under a temporary name and renames it into
place, so a run killed at any point leaves either the previous complete file or the new complete
file, never a partial one. Readers ignore `*.tmp-*` leftovers; each partition removes its own at its
start (`remove_leftovers_of`), and single-writer stages sweep their folder (`sweep_temporary_files`).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Arrow's default pool (mimalloc) keeps what it frees for reuse: reading a country's 1,060 discovery files
# left a process ~80 MB above the 11 MB of ids it kept, the chunk assignment as much again. The system
# allocator hands large blocks back (bench_country: chunk assignment of 537 k ids 325 -> 247 MB peak).
# Every process of the pipeline reads its stage files through this module; ARROW_DEFAULT_MEMORY_POOL wins.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    pa.set_memory_pool(pa.system_memory_pool())

TEMP_MARKER = ".tmp-"
IMAGE_ID_PATTERN = re.compile(r"^[0-9]{1,20}$")
_PARTITION_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class StorageError(RuntimeError):
    """A stored file is missing or unreadable; the message names the file and the fix."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, also from Arrow's writers (their OSError carries the text, not always the errno)."""
    return isinstance(error, OSError) and (
        error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error)
    )


def validate_image_id(image_id: str) -> str:
    """Image ids are decimal digit strings; anything else must never reach a file path or URL."""
    text = str(image_id)
    if not IMAGE_ID_PATTERN.match(text):
        raise ValueError(f"invalid Mapillary image id {text!r}: expected 1-20 decimal digits")
    return text


def safe_key(key: str) -> str:
    if not _PARTITION_KEY.match(key):
        raise ValueError(f"invalid partition key {key!r}: letters, digits, '.', '_' and '-' only")
    return key


_temporary_names = itertools.count()


def _temporary_sibling(path: Path) -> tuple[int, str]:
    """A new file `<name>.tmp-<pid>-<n>` beside `path`, opened for writing (O_EXCL: never an existing one).
    The folder is created only when the open finds it missing. Cheaper than mkstemp plus a mkdir per
    call, which cost ~0.45 ms per thumbnail (benchmarks/bench_download.py); the pid and a per-process
    counter keep names unique, and a leftover of a dead process with the same pid is stepped over.
    The name is a plain string: a Path built per thumbnail cost more than the string it wraps."""
    target = os.fspath(path)
    while True:
        temporary = f"{target}{TEMP_MARKER}{os.getpid()}-{next(_temporary_names)}"
        try:
            return os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            ), temporary
        except FileNotFoundError:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """`durable=False` skips the fsync: the rename still never exposes a partial file to a reader or to a
    re-run after the process is killed; only a power loss can leave an empty file, which callers that
    re-verify content on every run (thumbnails) simply fetch again."""
    fd, tmp = _temporary_sibling(path)
    try:
        # Plain os.write on the descriptor: a file object would add an fstat, an isatty ioctl and a buffer.
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """`path` written from a stream of byte chunks (a big object never held whole), renamed into place
    only once complete, like atomic_write_bytes."""
    fd, tmp = _temporary_sibling(path)
    try:
        with open(fd, "wb", closefd=True) as handle:
            for chunk in chunks:
                handle.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(
    frame: pd.DataFrame | pa.Table,
    path: Path,
    row_group_size: int | None = None,
) -> None:
    """`row_group_size`: rows per row group (pyarrow's default when None); small groups of a file sorted
    by a column let a filtered read decode only the groups whose statistics match."""
    table = (
        frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    )
    fd, tmp = _temporary_sibling(path)
    os.close(fd)
    try:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=row_group_size,
        )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet(
    path: Path, columns: list[str] | None = None, filters: list[tuple] | None = None
) -> pd.DataFrame:
    """Read one stage file (only the rows matching pyarrow `filters`, if given); a corrupt file raises
    StorageError naming it and the fix."""
    return read_table(path, columns=columns, filters=filters).to_pandas()


def read_table(
    path: Path,
    columns: list[str] | None = None,
    filters: list[tuple] | None = None,
    read_dictionary: list[str] | None = None,
) -> pa.Table:
    """`read_parquet` as an Arrow table (no pandas objects: what a column of millions of ids needs);
    the columns in `read_dictionary` dictionary-encoded."""
    try:
        return pq.read_table(
            path, columns=columns, filters=filters, read_dictionary=read_dictionary
        )
    except FileNotFoundError:
        raise StorageError(
            f"{path} does not exist: materialise the upstream partition first"
        ) from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise StorageError(
            f"{path} is not a readable Parquet file ({type(exc).__name__}); delete it and "
            "re-materialise the partition that writes it"
        ) from None


def remove_leftovers_of(paths: Iterable[Path]) -> int:
    """Remove what killed writes of exactly these files left behind (`<name>.tmp-*` beside each path).

    Partitions write concurrently into shared folders, so a partition clears only its own leftovers at
    its start, never the folder: another partition's `*.tmp-*` file may be a write in progress. (Two
    runs of the *same* partition at once are not supported: the second would remove the first's
    in-flight files.) Returns how many files were removed."""
    prefixes: dict[Path, set[str]] = defaultdict(set)
    for path in paths:
        path = Path(path)
        prefixes[path.parent].add(path.name + TEMP_MARKER)
    removed = 0
    for folder, wanted in prefixes.items():
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            marker = entry.name.find(TEMP_MARKER)
            if marker < 0 or entry.name[: marker + len(TEMP_MARKER)] not in wanted:
                continue
            if entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def sweep_temporary_files(folder: Path) -> int:
    """Remove leftovers of writes that were killed before their rename; returns how many."""
    if not folder.exists():
        return 0
    removed = 0
    for leftover in folder.rglob(f"*{TEMP_MARKER}*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
