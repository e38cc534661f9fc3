"""Metadata-only is a supported mode: the pipeline run until the metadata stage publishes a
GeoPackage of every image in the area with its metadata, without a single thumbnail request."""

from __future__ import annotations

import pytest

from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets_tests.support.emulated_runs import pipeline_run

pytestmark = pytest.mark.slow


def test_metadata_only_publishes_every_image_without_a_thumbnail_request(tmp_path):
    with pipeline_run(tmp_path) as run:
        run_pipeline(run.instance, run.defs, log=lambda *_: None, until="metadata")
        stats = run.server.stats()
        images = run.images().set_index("image_id")
        truth = {record.id: record for record in run.truth()}
    assert stats["thumbnail"] == 0 and stats["family:cdn"] == 0
    assert stats["batch"] + stats["images_by_ids"] + stats["entity"] > 0
    assert len(truth) > 200 and images.index.is_unique and set(images.index) == set(truth)
    for column in ("sequence_id", "captured_at", "make", "camera_type", "creator_username"):
        assert images[column].notna().all(), column
    assert all(images.loc[i, "sequence_id"] == record.sequence for i, record in truth.items())
    assert (images["metadata_status"] == "ok").all() and (
        images["download_status"] == "pending"
    ).all()
    for column in ("thumbnail_path", "blur_value", "is_blurry"):
        assert images[column].isna().all(), column
    assert not (run.layout.root / "thumbnails").exists() or not any(
        (run.layout.root / "thumbnails").rglob("*.jpg")
    )
