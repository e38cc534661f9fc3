"""One store interface on both backends: a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapillary_assets.storage import (
    TEMP_MARKER,
    DataLayout,
    LocalStore,
    ObjectStore,
    StorageError,
    disk_full_error,
)
from mapillary_assets.storage.object_store import MULTIPART_CHUNK


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "data")
    server = request.getfixturevalue("s3_server")
    return ObjectStore(f"s3://{server.bucket}/{uuid.uuid4().hex}", server.settings)


def test_put_get_exists_list_delete(store):
    assert not store.exists("metadata/a.parquet")
    with pytest.raises(FileNotFoundError):
        store.get("metadata/a.parquet")
    store.put("metadata/a.parquet", b"one")
    store.put("metadata/b.parquet", b"two")
    store.put("metadata/deeper/c.parquet", b"three")
    assert store.get("metadata/a.parquet") == b"one"
    assert store.exists("metadata/a.parquet") and store.modified("metadata/a.parquet") > 0
    assert store.list("metadata/") == ["metadata/a.parquet", "metadata/b.parquet"]
    assert store.list("nothing/") == []
    store.put("metadata/a.parquet", b"replaced")  # a whole replacement, never a mix
    assert store.get("metadata/a.parquet") == b"replaced"
    store.delete("metadata/a.parquet")
    store.delete("metadata/a.parquet")  # deleting what is gone is no error
    assert not store.exists("metadata/a.parquet")


def test_put_if_absent_keeps_the_first(store):
    assert store.put_if_absent("data_dir_id", b"first")
    assert not store.put_if_absent("data_dir_id", b"second")
    assert store.get("data_dir_id") == b"first"


def test_parquet_round_trip_with_filters(store):
    frame = pd.DataFrame({"image_id": ["1", "2", "3"], "chunk": ["a", "b", "a"]})
    store.write_parquet("chunks/assignment.parquet", frame)
    back = store.read_parquet("chunks/assignment.parquet", filters=[("chunk", "==", "a")])
    assert back["image_id"].tolist() == ["1", "3"]
    assert store.parquet_rows("chunks/assignment.parquet") == 3
    assert store.parquet_rows("chunks/missing.parquet") is None
    store.put("chunks/broken.parquet", b"not parquet")
    with pytest.raises(StorageError, match="chunks/broken.parquet is not a readable Parquet"):
        store.read_parquet("chunks/broken.parquet")


def test_parquet_row_groups_carry_statistics_a_filter_can_skip_by(store):
    frame = pd.DataFrame({"image_id": [str(i) for i in range(6)], "chunk": list("aabbcc")})
    store.write_parquet("chunks/assignment.parquet", frame, row_group_size=2)
    footer = pq.ParquetFile(pa.BufferReader(store.get("chunks/assignment.parquet"))).metadata
    assert footer.num_rows == 6 and footer.num_row_groups == 3
    chunk_column = footer.schema.names.index("chunk")
    bounds = [
        (footer.row_group(g).column(chunk_column).statistics.min,
         footer.row_group(g).column(chunk_column).statistics.max)
        for g in range(footer.num_row_groups)
    ]  # fmt: skip
    assert bounds == [("a", "a"), ("b", "b"), ("c", "c")]
    back = store.read_parquet("chunks/assignment.parquet", filters=[("chunk", "==", "b")])
    assert back["image_id"].tolist() == ["2", "3"]


def test_upload_of_a_big_file_goes_up_whole(store, tmp_path):
    source = tmp_path / "big.gpkg"
    payload = os.urandom(1024) * (20 * 1024)  # 20 MiB: above the multipart threshold
    source.write_bytes(payload)
    store.upload("output/mapillary_images.gpkg", source)
    assert store.get("output/mapillary_images.gpkg") == payload


def test_a_big_put_goes_up_whole_and_reads_back_by_range(store):
    payload = os.urandom(1024) * (17 * 1024)  # 17 MiB: a put above the multipart threshold
    store.put("thumbnails/256/shards/chunk.tar", payload)
    assert store.get("thumbnails/256/shards/chunk.tar") == payload
    offset = 9 * 1024 * 1024 - 100  # across the boundary of the first 8 MiB part
    assert (
        store.get_range("thumbnails/256/shards/chunk.tar", offset, 300)
        == payload[offset : offset + 300]
    )
    with pytest.raises(FileNotFoundError):
        store.get_range("thumbnails/256/shards/missing.tar", 0, 10)


_WRITER = """
import sys, time
from mapillary_assets.storage import LocalStore, ObjectStore, S3Settings
kind, location, endpoint, key_id, secret = sys.argv[1:6]
store = (LocalStore(location) if kind == "local" else
         ObjectStore(location, S3Settings(endpoint=endpoint, access_key_id=key_id,
                                          secret_access_key=secret, allow_http=True)))
def slow():  # a body that takes long to produce: the writer is killed while the write is under way
    yield b"x" * 1024
    print("writing", flush=True)
    time.sleep(60)
    yield b"y"
if kind == "local":
    from mapillary_assets.storage.files import _temporary_sibling
    import os
    fd, tmp = _temporary_sibling(store.root / "blur/chunk.parquet")
    os.write(fd, b"x" * 1024)
    print("writing", flush=True)
    time.sleep(60)
else:
    import obstore
    obstore.put(store._store, "blur/chunk.parquet", slow(), use_multipart=True)
"""


def test_a_killed_writer_leaves_no_partial_object(store, request):
    if isinstance(store, LocalStore):
        args = ["local", str(store.root), "", "", ""]
    else:
        server = request.getfixturevalue("s3_server")
        args = ["s3", store.url, server.endpoint, server.access_key_id, server.secret_access_key]
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        time.sleep(0.5)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert not store.exists("blur/chunk.parquet")
    assert store.list("blur/") == []  # a local leftover is named *.tmp-* and never listed
    store.remove_leftovers_of(["blur/chunk.parquet"])
    if isinstance(store, LocalStore):
        assert not [p for p in (store.root / "blur").iterdir() if TEMP_MARKER in p.name]


def test_data_dir_layout_on_a_bucket_keeps_work_files_in_scratch(s3_server, tmp_path):
    layout = DataLayout(f"s3://{s3_server.bucket}/layout", scratch=tmp_path / "scratch")
    assert not layout.is_local
    assert layout.geopackage_path.is_relative_to(tmp_path / "scratch")
    assert layout.staging_db_path.is_relative_to(tmp_path / "scratch")
    with pytest.raises(StorageError, match="is an object store"):
        layout.metadata_path("chunk-000000")


def test_a_full_scratch_beside_a_bucket_is_named_with_the_fix(tmp_path):
    layout = DataLayout("s3://bucket/prefix", scratch=tmp_path / "scratch")
    message = str(disk_full_error(layout, 1024))
    assert message.startswith(f"{layout.work_path('')} is full:")
    assert "thumbnail shard" in message and "MAPILLARY_SCRATCH_DIR" in message


def test_an_object_is_downloaded_into_a_file_chunk_by_chunk(s3_server, tmp_path):
    store = ObjectStore(f"s3://{s3_server.bucket}/{uuid.uuid4().hex}", s3_server.settings)
    data = os.urandom(MULTIPART_CHUNK + 1000)  # more than one streamed chunk
    store.put("thumbnails/1024/shards/chunk-000000.tar", data)
    target = tmp_path / "copy" / "chunk-000000.tar"
    store.download("thumbnails/1024/shards/chunk-000000.tar", target)
    assert target.read_bytes() == data and list(target.parent.iterdir()) == [target]
    with pytest.raises(FileNotFoundError):
        store.download("thumbnails/1024/shards/chunk-000009.tar", tmp_path / "missing.tar")
    assert not list(tmp_path.glob("missing.tar*"))
