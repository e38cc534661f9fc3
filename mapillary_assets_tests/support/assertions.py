"""Checks the tests share: final data equal to a reference, no temporary files left, pictures that are
real PNGs of a sensible size."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mapillary_assets.pipeline import charts
from mapillary_assets.storage import TEMP_MARKER

MAX_PNG_BYTES = 80_000
DATA_URI = re.compile(r"^!\[[^\]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)$")


def assert_same_images(actual, expected, ignore: Sequence[str] = ()) -> None:
    """Same columns, same ids (each once) and the same value in every column of the GeoPackage `images`
    layer. Columns named in `ignore` are left out on both sides, whether or not either side has them."""
    ignored = set(ignore)
    actual_columns, expected_columns = (
        set(actual.columns) - ignored,
        set(expected.columns) - ignored,
    )
    assert actual_columns == expected_columns, (
        f"columns differ: missing {sorted(expected_columns - actual_columns)}, "
        f"unexpected {sorted(actual_columns - expected_columns)}"
    )
    assert actual["image_id"].is_unique, "an image id appears twice in the GeoPackage"
    assert set(actual["image_id"]) == set(expected["image_id"]), (
        f"ids differ: {len(set(expected['image_id']) - set(actual['image_id']))} missing, "
        f"{len(set(actual['image_id']) - set(expected['image_id']))} unexpected"
    )
    left = actual.sort_values("image_id").reset_index(drop=True)
    right = expected.sort_values("image_id").reset_index(drop=True)
    if "geometry" in expected_columns:
        assert np.allclose(
            np.c_[left.geometry.x, left.geometry.y],
            np.c_[right.geometry.x, right.geometry.y],
            rtol=0,
            atol=1e-9,
        ), "image positions differ"
    columns = sorted(expected_columns - {"geometry"})
    pd.testing.assert_frame_equal(pd.DataFrame(left[columns]), pd.DataFrame(right[columns]))


# Where a bucket data dir's images say their thumbnail is: the chunk's tar shard and the byte range in it.
BUCKET_THUMBNAIL_COLUMNS = ["thumbnail_path", "thumbnail_offset", "thumbnail_length"]
SHARD_KEY = re.compile(r"thumbnails/(\d+|original)/shards/chunk-\d+\.tar")


def assert_same_images_from_a_bucket(actual, local) -> None:
    """A bucket data dir's GeoPackage `images` layer against a local run's: equal in every column but where
    each thumbnail is (ARCHITECTURE.md, "Thumbnails in a bucket"), which is a shard and a byte range for
    exactly the images the local run stored."""
    assert_same_images(actual, local, ignore=BUCKET_THUMBNAIL_COLUMNS)
    stored = actual.set_index("image_id").loc[local["image_id"]]
    has_thumbnail = local["thumbnail_path"].notna().to_numpy()
    assert (stored["thumbnail_path"].notna().to_numpy() == has_thumbnail).all()
    assert stored["thumbnail_path"].dropna().map(lambda key: bool(SHARD_KEY.fullmatch(key))).all()
    ranges = stored.loc[has_thumbnail, ["thumbnail_offset", "thumbnail_length"]]
    assert ranges.notna().all().all() and (ranges["thumbnail_length"] > 0).all()


def temporary_leftovers(root: Path) -> list[Path]:
    """Temporary files of atomic writes under `root` (none may survive a finished or killed run)."""
    return sorted(path for path in Path(root).rglob(f"*{TEMP_MARKER}*"))


def decode_png(png: bytes) -> np.ndarray:
    """The picture as BGR pixels, after checking it is a small, sensibly sized PNG."""
    assert png.startswith(charts.PNG_SIGNATURE)
    assert len(png) < MAX_PNG_BYTES, f"{len(png):,} bytes"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    height, width = image.shape[:2]
    assert 200 <= width <= 1000 and 120 <= height <= 800, image.shape
    return image


def decode_markdown(markdown: str) -> np.ndarray:
    """The picture of a Markdown data-URI image (how charts appear in asset metadata)."""
    match = DATA_URI.match(markdown)
    assert match, markdown[:200]
    return decode_png(base64.b64decode(match.group(1)))
