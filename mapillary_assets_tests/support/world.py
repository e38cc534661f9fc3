"""The test world: the small area every test runs on, and the emulator world, token and sizes."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "mapillary_assets_tests" / "data"
TEST_AOI = TEST_DATA / "test_aoi.geojson"
URBAN_AREA = TEST_DATA / "urban_area.geojson"

# Distinctive, so a leak is unmistakable when searching logs and files.
TEST_TOKEN = "MLY|4242|leak-canary-7f3a9c1e5b"
TEST_SCALE = 0.003
TEST_CHUNK_SIZE = 200
REFERENCE_SEED = 7


def reference_world():
    """The emulator world most pipeline tests run against (seed 7, ~585 images in the test area)."""
    from mapillary_assets.emulator import World

    return World(seed=REFERENCE_SEED, scale=TEST_SCALE)
