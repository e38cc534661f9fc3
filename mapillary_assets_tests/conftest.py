"""Shared test set-up. The tile partitions are computed when `mapillary_assets.defs` is imported, from
MAPILLARY_AOI and MAPILLARY_PARTITION_ZOOM, so the small test area is set here, before any import."""

import os

from mapillary_assets_tests.support.world import TEST_AOI

os.environ["MAPILLARY_AOI"] = str(TEST_AOI)
os.environ["MAPILLARY_PARTITION_ZOOM"] = "13"
os.environ.pop("MAPILLARY_ACCESS_TOKEN", None)


import pytest  # noqa: E402

from mapillary_assets_tests.support.object_store import s3_server  # noqa: E402, F401 (a fixture)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test sees the environment set above: the CLI updates os.environ for the runs it starts
    (DAGSTER_HOME, the emulator's URLs, MAPILLARY_SAMPLE_LIMIT), and a test calling it in-process must not
    hand those to the next test in the same worker (a leaked sample limit cut a later run's chunks)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
