"""The pipeline in this process against an in-process emulator: its resources, a Dagster instance,
the definitions, and the runs.

- `pipeline_run(tmp_path, ...)`: a throwaway instance (`dg.instance_for_test`), for tests of what the
  pipeline computes.
- `emulated_run(folder, ...)`: the reference world and a persistent instance + data folder in `folder`
  (the reliability and security tests, which inspect or share what a run leaves behind).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import geopandas as gpd
import pyogrio

from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.area import current_aoi
from mapillary_assets.defs.partitions import (
    CHUNK_PARTITIONS_NAME,
    partition_range_tags,
    tile_partitions,
)
from mapillary_assets.defs.resources import api_resources
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.errors import PipelineFailed
from mapillary_assets.runners.failures import failure_messages
from mapillary_assets.runners.instance import open_instance
from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets.storage import DataLayout
from mapillary_assets_tests.support.world import TEST_CHUNK_SIZE, TEST_TOKEN, reference_world


def emulator_resources(
    server: EmulatorServer,
    data_dir: Path,
    token: str = TEST_TOKEN,
    api: Mapping[str, object] | None = None,
    **settings,
) -> dict:
    """The resources of a run against `server`, with the tests' chunk size unless `settings` says
    otherwise: `api` overrides MapillaryApiResource fields, `settings` PipelineSettings fields."""
    return api_resources(
        graph_url=server.graph_url,
        tiles_url=server.tiles_url,
        data_dir=data_dir,
        access_token=token,
        api=api,
        settings={"chunk_size": TEST_CHUNK_SIZE, **settings},
    )


def execute(defs: dg.Definitions, instance: dg.DagsterInstance, job_name: str, partition_keys=()):
    """One run of `job_name` over `partition_keys` (a contiguous range, as the CLI launches them);
    returns Dagster's result (never raises for a failed run)."""
    tags = partition_range_tags(partition_keys[0], partition_keys[-1]) if partition_keys else {}
    return defs.resolve_job_def(job_name).execute_in_process(
        instance=instance, tags=tags, raise_on_error=False
    )


def chunk_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))


def run_discovery_and_chunking(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Discovery of every tile partition, then chunking; the chunk keys."""
    for job, keys in (
        ("discovery_job", tile_partitions().get_partition_keys()),
        ("assign_chunks_job", ()),
    ):
        result = execute(defs, instance, job, keys)
        assert result.success, f"{job} failed: {failure_messages(instance, result.run_id)}"
    return chunk_keys(instance)


def read_images(data_dir: Path) -> gpd.GeoDataFrame:
    """The GeoPackage `images` layer of the data folder `data_dir`."""
    return gpd.read_file(
        DataLayout(Path(data_dir)).geopackage_path, layer="images", engine="pyogrio"
    )


@dataclass
class PipelineRun:
    server: EmulatorServer
    layout: DataLayout
    instance: dg.DagsterInstance
    defs: dg.Definitions

    def run(self) -> dict:
        return run_pipeline(self.instance, self.defs, log=lambda *_: None)

    def images(self) -> gpd.GeoDataFrame:
        return read_images(self.layout.root)

    def layers(self) -> list[str]:
        return [name for name, _ in pyogrio.list_layers(self.layout.geopackage_path)]

    def truth(self) -> list:
        return self.server.world.images_in_polygon(current_aoi().geometry)


@contextlib.contextmanager
def pipeline_run(
    tmp_path: Path,
    world: World | None = None,
    faults: Faults | None = None,
    api: Mapping[str, object] | None = None,
    **settings,
) -> Iterator[PipelineRun]:
    """The emulator (`world`, default the reference world) and a throwaway instance under
    `tmp_path`; `api` and `settings` as `emulator_resources` takes them."""
    data_dir = tmp_path / "data"
    (tmp_path / "dagster_home").mkdir(parents=True, exist_ok=True)
    with (
        EmulatorServer(world=world or reference_world(), faults=faults, token=TEST_TOKEN) as server,
        dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance,
    ):
        defs = build_definitions(emulator_resources(server, data_dir, api=api, **settings))
        yield PipelineRun(server, DataLayout(data_dir), instance, defs)


@dataclass
class EmulatedRun:
    server: EmulatorServer
    instance: dg.DagsterInstance
    defs: dg.Definitions
    data_dir: Path
    home: Path

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    def execute(self, job_name: str, partition_keys: Sequence[str] = ()):
        return execute(self.defs, self.instance, job_name, partition_keys)

    def run_pipeline(self) -> None:
        """Every stage, as `mapillary-assets demo` runs them; raises PipelineFailed on a failed job."""
        run_pipeline(self.instance, self.defs, log=lambda *_: None)

    def run_until_complete(self, attempts: int = 3) -> int:
        """Run the pipeline again after each failure (a "backfill of failed partitions": each re-run
        does only what is missing), at most `attempts` times; returns the runs it took."""
        for attempt in range(1, attempts + 1):
            try:
                self.run_pipeline()
                return attempt
            except PipelineFailed:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def images(self) -> gpd.GeoDataFrame:
        return read_images(self.data_dir)


@contextlib.contextmanager
def emulated_run(
    folder: Path,
    faults: Faults | None = None,
    token: str | None = None,
    server_token: str | None = None,
    api: Mapping[str, object] | None = None,
    data_dir: Path | str | None = None,
    **settings,
) -> Iterator[EmulatedRun]:
    """An emulator of the reference world (with `faults`) and a persistent instance + data folder in
    `folder` (or the data dir `data_dir`: another folder, an s3:// URL), wired together (the client's
    token may differ from the server's: `server_token`)."""
    folder = Path(folder)
    data_dir = folder / "data" if data_dir is None else data_dir
    with (
        EmulatorServer(
            reference_world(), faults=faults, token=server_token or TEST_TOKEN
        ) as server,
        open_instance(folder / "home") as instance,
    ):
        resources = emulator_resources(server, data_dir, token or TEST_TOKEN, api=api, **settings)
        yield EmulatedRun(server, instance, build_definitions(resources), data_dir, folder / "home")
