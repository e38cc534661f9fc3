"""The store of a data dir on an S3-compatible object store (`MAPILLARY_DATA_DIR=s3://bucket/prefix`).

Dagster-free. Requests go through obstore (object_store's Rust client); nothing here signs a request.
A whole-object PUT is the atomic write: a reader sees the previous object or the new one, and a
writer killed mid-upload leaves nothing (an unfinished multipart upload is never visible), so there
are no leftovers to clean. Endpoint, region and keys come from the standard AWS environment names,
the same ones boto3 and DuckDB's httpfs read (`s3_settings_from_env`); the keys never reach a message.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import obstore
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import S3Store

from mapillary_assets.duckdb_extensions import offline_extension_path
from mapillary_assets.storage.files import StorageError, atomic_write_chunks

if TYPE_CHECKING:
    import duckdb

T = TypeVar("T")
_client_process: int | None = None  # the pid that built an ObjectStore (forked children inherit it)
SCHEME = "s3://"
# Objects above this go up in parts (the GeoPackage); below, one PUT.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
# An unreachable store (a restart, a network blip) is waited out, not failed on: obstore retries a refused
# connection, a dropped one and a 5xx with jittered backoff up to 5 s apart, for up to 3 minutes. The
# jitter draws each wait below its backoff, so a count binds first unless it is large: 40 tries were over
# in 35 s, before a store stopped for 20 s had restarted. A PUT that never completed leaves no object.
RETRY_CONFIG = {
    "max_retries": 1000,  # retry_timeout binds
    "retry_timeout": timedelta(minutes=3),
    "backoff": {
        "init_backoff": timedelta(milliseconds=200),
        "max_backoff": timedelta(seconds=5),
        "base": 2,
    },
}
# DuckDB's httpfs (staging and chunk-assignment reads): 12 retries on an I/O error, 0.5 s growing 1.6x
# (about 4 minutes in all, like obstore's above; 8 were over in 35 s).
DUCKDB_HTTP_RETRIES = {"http_retries": 12, "http_retry_wait_ms": 500, "http_retry_backoff": 1.6}


def is_object_store_url(location: str) -> bool:
    return location.startswith(SCHEME)


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is and how to sign for it. The keys are secrets: kept out of repr()."""

    endpoint: str = ""  # empty: AWS itself
    region: str = "us-east-1"
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    allow_http: bool = False

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(
            s for s in (self.access_key_id, self.secret_access_key, self.session_token) if s
        )


def s3_settings_from_env(environ: Mapping[str, str] = os.environ) -> S3Settings:
    """AWS_ENDPOINT_URL(_S3), AWS_REGION or AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN; AWS_ALLOW_HTTP=true, or an http:// endpoint, allows plain HTTP."""
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or ""
    return S3Settings(
        endpoint=endpoint.rstrip("/"),
        region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key_id=environ.get("AWS_ACCESS_KEY_ID", ""),
        secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY", ""),
        session_token=environ.get("AWS_SESSION_TOKEN", ""),
        allow_http=endpoint.startswith("http://")
        or environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"),
    )


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f"{url!r} is not an object store data dir: expected s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def s3_store(bucket: str, settings: S3Settings, prefix: str = "") -> S3Store:
    config = {"region": settings.region}
    if settings.endpoint:
        config |= {"endpoint": settings.endpoint, "virtual_hosted_style_request": False}
    for name in ("access_key_id", "secret_access_key", "session_token"):
        if getattr(settings, name):
            config[name] = getattr(settings, name)
    return S3Store(
        bucket,
        prefix=prefix or None,
        config=config,
        client_options={"allow_http": settings.allow_http},
        retry_config=RETRY_CONFIG,
    )


class ObjectStore:
    """Keys as objects under `s3://bucket/prefix/`."""

    is_local = False

    def __init__(self, url: str, settings: S3Settings | None = None) -> None:
        global _client_process
        _client_process = os.getpid()  # this process talks to a bucket: see in_fresh_child
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_url(self.url)
        self.settings = settings or s3_settings_from_env()
        self._store = s3_store(self.bucket, self.settings, self.prefix)

    def describe(self, key: str) -> str:
        return f"{self.url}/{key}"

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """The object appears whole or not at all (`durable` is the store's business): one PUT, or
        above MULTIPART_THRESHOLD a multipart upload, visible only once completed."""
        big = len(data) > MULTIPART_THRESHOLD
        obstore.put(self._store, key, data, use_multipart=big, chunk_size=MULTIPART_CHUNK)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): False when the object existed (its content holds)."""
        try:
            obstore.put(self._store, key, data, mode="create", use_multipart=False)
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except (FileNotFoundError, NotFoundError):
            raise FileNotFoundError(self.describe(key)) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of the object from `offset` (one ranged GET); FileNotFoundError when none."""
        try:
            return bytes(obstore.get_range(self._store, key, start=offset, length=length))
        except (FileNotFoundError, NotFoundError):
            raise FileNotFoundError(self.describe(key)) from None

    def download(self, key: str, target: Path) -> None:
        """The object streamed into the local file `target` (written atomically, never whole in memory:
        a chunk's shard at 1024 px is ~1.2 GB); FileNotFoundError when there is none."""
        try:
            result = obstore.get(self._store, key)
        except (FileNotFoundError, NotFoundError):
            raise FileNotFoundError(self.describe(key)) from None
        atomic_write_chunks(Path(target), result.stream(min_chunk_size=MULTIPART_CHUNK))

    def exists(self, key: str) -> bool:
        return self.modified(key) is not None

    def modified(self, key: str) -> float | None:
        try:
            return obstore.head(self._store, key)["last_modified"].timestamp()
        except (FileNotFoundError, NotFoundError):  # obstore raises the first for a 404
            return None

    def list(self, folder: str) -> list[str]:
        """Keys of the objects directly under `folder` (a key ending in '/'), sorted."""
        listed = obstore.list_with_delimiter(self._store, folder.rstrip("/") or None)
        return sorted(meta["path"] for meta in listed["objects"])

    def delete(self, key: str) -> None:
        obstore.delete(self._store, key)  # deleting a missing object is no error on S3

    def read_parquet(
        self, key: str, columns: list[str] | None = None, filters: list[tuple] | None = None
    ) -> pd.DataFrame:
        return self.read_table(key, columns=columns, filters=filters).to_pandas()

    def read_table(
        self,
        key: str,
        columns: list[str] | None = None,
        filters: list[tuple] | None = None,
        read_dictionary: list[str] | None = None,
    ) -> pa.Table:
        try:
            data = self.get(key)
        except FileNotFoundError:
            raise StorageError(
                f"{self.describe(key)} does not exist: materialise the upstream partition first"
            ) from None
        try:
            return pq.read_table(
                pa.BufferReader(data),
                columns=columns,
                filters=filters,
                read_dictionary=read_dictionary,
            )
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise StorageError(
                f"{self.describe(key)} is not a readable Parquet file ({type(exc).__name__}); delete it "
                "and re-materialise the partition that writes it"
            ) from None

    def parquet_rows(self, key: str) -> int | None:
        """The row count from the object's footer; None when there is no object."""
        try:
            return pq.read_metadata(pa.BufferReader(self.get(key))).num_rows
        except FileNotFoundError:
            return None

    def write_parquet(
        self,
        key: str,
        frame: pd.DataFrame | pa.Table,
        row_group_size: int | None = None,
    ) -> None:
        table = (
            frame
            if isinstance(frame, pa.Table)
            else pa.Table.from_pandas(frame, preserve_index=False)
        )
        buffer = io.BytesIO()
        pq.write_table(
            table,
            buffer,
            compression="zstd",
            row_group_size=row_group_size,
        )
        self.put(key, buffer.getvalue())

    def upload(self, key: str, source: Path) -> None:
        """Upload a finished local file; big ones in parts, completed (made visible) only at the end."""
        big = Path(source).stat().st_size > MULTIPART_THRESHOLD
        obstore.put(self._store, key, Path(source), use_multipart=big, chunk_size=MULTIPART_CHUNK)

    def remove_leftovers_of(self, keys: Iterable[str]) -> int:
        """Nothing to remove: a killed PUT leaves no object."""
        return 0

    def sweep(self, folder: str) -> int:
        return 0

    def duckdb_source(self, key: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix + '/' if self.prefix else ''}{key}"

    def prepare_duckdb(self, con: duckdb.DuckDBPyConnection) -> None:
        """Load httpfs offline (the `duckdb-extension-httpfs` wheel) and give the connection a temporary
        secret built from the same settings; a failure never echoes the statement that holds the keys."""
        import duckdb  # here: the storage package is imported where DuckDB is not wanted (gpu_check)

        con.execute(f"LOAD '{_httpfs_extension_path()}'")
        for name, value in DUCKDB_HTTP_RETRIES.items():
            con.execute(f"SET {name} = {value}")
        options = {"TYPE": "s3", "REGION": self.settings.region, "URL_STYLE": "path"}
        if self.settings.endpoint:
            endpoint = urlsplit(self.settings.endpoint)
            options |= {"ENDPOINT": endpoint.netloc, "USE_SSL": endpoint.scheme == "https"}
        if self.settings.access_key_id:
            options |= {
                "KEY_ID": self.settings.access_key_id,
                "SECRET": self.settings.secret_access_key,
            }
        if self.settings.session_token:
            options["SESSION_TOKEN"] = self.settings.session_token
        listed = ", ".join(
            f"{name} {str(value).lower() if isinstance(value, bool) else _sql_literal(value)}"
            for name, value in options.items()
        )
        try:
            con.execute(f"CREATE OR REPLACE TEMPORARY SECRET mapillary_data_dir ({listed})")
        except duckdb.Error as exc:
            raise StorageError(
                f"DuckDB could not take the credentials for {self.url} ({type(exc).__name__})"
            ) from None


def in_fresh_child(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in a short-lived forked child, its result (or exception) sent back pickled.

    obstore's Rust runtime is not fork-safe: a process that has used it hands its forked children a
    runtime without threads, and their first request hangs. A process that forks workers later (the
    pipeline's driver, `runners/local.LocalRunner`) must therefore reach the bucket only through this.
    A process that already holds a store (a run) calls `fn` itself: a child forked from it would hang."""
    if _client_process == os.getpid():
        return fn(*args)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(sender, fn, args), daemon=True)
    child.start()
    sender.close()
    try:
        succeeded, value = receiver.recv()
    except EOFError:
        raise StorageError("the object store's helper process died before answering") from None
    finally:
        receiver.close()
        child.join()
    if succeeded:
        return value
    raise value


def _send_result(sender, fn, args) -> None:
    try:
        sender.send((True, fn(*args)))
    except Exception as error:  # the parent raises it
        sender.send((False, error))
    finally:
        sender.close()


def _sql_literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _httpfs_extension_path() -> str:
    """httpfs.duckdb_extension from the `duckdb-extension-httpfs` wheel matching this DuckDB."""
    return str(offline_extension_path("httpfs", StorageError)).replace("'", "''")
