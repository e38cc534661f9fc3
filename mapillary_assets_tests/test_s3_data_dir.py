"""MAPILLARY_DATA_DIR on an S3-compatible bucket (a real SeaweedFS server): the pipeline publishes the
same GeoPackage as on a local disk, and writes nothing locally but its scratch work files (and the
Dagster instance, which is not data)."""

from __future__ import annotations

import uuid

import geopandas as gpd
import pytest

from mapillary_assets.defs.resources import ConfigError
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.assertions import (
    BUCKET_THUMBNAIL_COLUMNS,
    assert_same_images_from_a_bucket,
)
from mapillary_assets_tests.support.bucket_run import run_on_bucket
from mapillary_assets_tests.support.reference import fault_free_reference, shared_temp_root

STAGE_FOLDERS = ("discovery/", "metadata/", "downloads/", "blur/", "chunks/")


def test_an_s3_data_dir_without_redis_is_refused_with_the_reason(monkeypatch, s3_server):
    from mapillary_assets.definitions import resources_from_env

    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAPILLARY_DATA_DIR", f"s3://{s3_server.bucket}/refused")
    monkeypatch.delenv("MAPILLARY_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="set MAPILLARY_REDIS_URL") as refused:
        resources_from_env()
    message = str(refused.value)
    assert "several machines share one API budget" in message
    assert s3_server.secret_access_key not in message and s3_server.access_key_id not in message


@pytest.mark.slow
def test_a_run_on_a_bucket_publishes_the_local_runs_geopackage_and_writes_only_scratch_locally(
    tmp_path, tmp_path_factory, monkeypatch, s3_server
):
    reference = fault_free_reference(shared_temp_root(tmp_path_factory))
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAPILLARY_SCRATCH_DIR", str(tmp_path / "scratch"))
    url = f"s3://{s3_server.bucket}/run-{uuid.uuid4().hex[:8]}"
    finished = run_on_bucket(tmp_path, url)
    assert finished.returncode == 0, finished.stderr[-3000:]
    layout = DataLayout(url)
    store = layout.store

    published = tmp_path / "downloaded.gpkg"
    published.write_bytes(store.get(layout.geopackage_key))
    images = gpd.read_file(published, layer="images", engine="pyogrio")
    # The same rows and blur values; only where a thumbnail is differs: its chunk's shard and its bytes there.
    expected = reference.load_images()
    assert_same_images_from_a_bucket(images, expected)
    published.unlink()
    stored = images.set_index("image_id").loc[expected["image_id"]]
    local_paths = expected.set_index("image_id")["thumbnail_path"]

    for folder in STAGE_FOLDERS:
        assert store.list(folder), f"nothing stored under {url}/{folder}"
    assert store.exists(layout.geoparquet_key) and store.exists(layout.data_dir_id_key)
    # Thumbnails are one tar per chunk, no object per image; one image by id is one ranged GET of its shard.
    shards = store.list("thumbnails/1024/shards/")
    assert set(shards) == set(stored["thumbnail_path"].dropna())
    per_image_folders = {
        layout.thumbnail_key(i, 1024).rpartition("/")[0] + "/" for i in stored.index
    }
    assert not any(store.list(folder) for folder in per_image_folders)
    for image_id, row in stored.dropna(subset=["thumbnail_path"]).iloc[::25].iterrows():
        local_file = reference.data_dir / local_paths[image_id]
        assert layout.read_thumbnail(*row[BUCKET_THUMBNAIL_COLUMNS]) == local_file.read_bytes()
    # Locally: the Dagster instance (home) and the scratch work files (staging DB, GeoPackage), nothing else.
    local = sorted(
        path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*") if path.is_file()
    )
    assert set(local) <= {"home", "scratch"}, set(local)
    scratch_files = {p.name for p in (tmp_path / "scratch").rglob("*") if p.is_file()}
    assert not any(
        name.endswith((".parquet", ".jpg", ".mvt"))
        for name in scratch_files - {"mapillary_images.parquet"}
    ), scratch_files
