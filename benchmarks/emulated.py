"""Scaffolding of the benchmarks that run the pipeline in this process against an in-process emulator:
a small area, an emulated pipeline in a folder of its own, and the check that two runs published the
same images."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SMALL_AOI = (
    Path(__file__).resolve().parent / "data" / "small_aoi.geojson"
)  # ~585 images at scale 0.003
SMALL_AOI_ZOOM = 13  # its partition zoom: a handful of discovery partitions
TOKEN = "MLY|bench-emulated|not-a-secret"
CHUNK_SIZE = 200


@dataclass
class EmulatedPipeline:
    """The emulator, a persistent instance (pools configured as the CLI does) and the definitions
    wired to them; data under `data_dir`."""

    server: object
    instance: object
    defs: object
    data_dir: Path

    def execute(self, job_name: str, partition_keys: Sequence[str] = ()):
        """One run of `job_name` over a contiguous range of `partition_keys`; Dagster's result."""
        from mapillary_assets.defs.partitions import partition_range_tags

        tags = partition_range_tags(partition_keys[0], partition_keys[-1]) if partition_keys else {}
        return self.defs.resolve_job_def(job_name).execute_in_process(
            instance=self.instance, tags=tags, raise_on_error=False
        )

    def discover_and_chunk(self) -> None:
        """Discovery of every tile partition, then chunking (RuntimeError when either fails)."""
        from mapillary_assets.defs.partitions import tile_partitions
        from mapillary_assets.runners.failures import failure_messages

        for job, keys in (
            ("discovery_job", tile_partitions().get_partition_keys()),
            ("assign_chunks_job", ()),
        ):
            result = self.execute(job, keys)
            if not result.success:
                raise RuntimeError(
                    f"{job} failed: {failure_messages(self.instance, result.run_id)}"
                )

    def run_pipeline(self) -> None:
        """Every stage, as `mapillary-assets demo` runs them; raises PipelineFailed on a failed job."""
        from mapillary_assets.runners.pipeline import run_pipeline

        run_pipeline(self.instance, self.defs, log=lambda *_: None)

    def run_until_complete(self, attempts: int) -> int:
        """Run the pipeline again after each failure (the operator's "backfill failed partitions"),
        at most `attempts` times; returns the runs it took."""
        from mapillary_assets.errors import PipelineFailed

        for attempt in range(1, attempts):
            try:
                self.run_pipeline()
                return attempt
            except PipelineFailed:
                pass
        self.run_pipeline()
        return attempts

    def images(self):
        """The GeoPackage `images` layer."""
        import geopandas as gpd

        from mapillary_assets.storage import DataLayout

        return gpd.read_file(
            DataLayout(self.data_dir).geopackage_path, layer="images", engine="pyogrio"
        )


@contextlib.contextmanager
def emulated_pipeline(folder: Path, world, faults=None) -> Iterator[EmulatedPipeline]:
    """An emulator of `world` (with `faults`) and a persistent instance + data folder in `folder`,
    the area of interest the small one (tile partitions follow MAPILLARY_AOI while the pipeline runs;
    the environment is restored afterwards)."""
    from mapillary_assets.definitions import build_definitions
    from mapillary_assets.defs.resources import api_resources
    from mapillary_assets.emulator import EmulatorServer
    from mapillary_assets.runners.instance import configure_pools, open_instance

    folder = Path(folder)
    saved = dict(os.environ)
    os.environ.update(
        {"MAPILLARY_AOI": str(SMALL_AOI), "MAPILLARY_PARTITION_ZOOM": str(SMALL_AOI_ZOOM)}
    )
    with (
        _restored_environment(saved),
        EmulatorServer(world, faults=faults, token=TOKEN) as server,
        open_instance(folder / "home") as instance,
    ):
        configure_pools(instance)
        resources = api_resources(
            graph_url=server.graph_url,
            tiles_url=server.tiles_url,
            data_dir=folder / "data",
            access_token=TOKEN,
            settings={"chunk_size": CHUNK_SIZE},
        )
        yield EmulatedPipeline(server, instance, build_definitions(resources), folder / "data")


def assert_same_images(actual, expected) -> None:
    """Same columns, ids (each once), positions and values in every column of two GeoPackage `images`
    layers."""
    import numpy as np
    import pandas as pd

    if set(actual.columns) != set(expected.columns):
        raise AssertionError(
            f"columns differ: missing {sorted(set(expected.columns) - set(actual.columns))}, "
            f"unexpected {sorted(set(actual.columns) - set(expected.columns))}"
        )
    if not actual["image_id"].is_unique:
        raise AssertionError("an image id appears twice in the GeoPackage")
    missing = set(expected["image_id"]) - set(actual["image_id"])
    unexpected = set(actual["image_id"]) - set(expected["image_id"])
    if missing or unexpected:
        raise AssertionError(f"ids differ: {len(missing)} missing, {len(unexpected)} unexpected")
    left = actual.sort_values("image_id").reset_index(drop=True)
    right = expected.sort_values("image_id").reset_index(drop=True)
    if not np.allclose(
        np.c_[left.geometry.x, left.geometry.y],
        np.c_[right.geometry.x, right.geometry.y],
        rtol=0,
        atol=1e-9,
    ):
        raise AssertionError("image positions differ")
    columns = [c for c in right.columns if c != "geometry"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(left[columns]), pd.DataFrame(right[columns]), check_like=True
    )


@contextlib.contextmanager
def _restored_environment(saved: dict[str, str]) -> Iterator[None]:
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
