"""A whole pipeline against an in-process emulator: resources, a throwaway Dagster instance, ground truth."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import geopandas as gpd
import pyogrio

from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.area import current_aoi
from mapillary_assets.defs.resources import (
    DataStorageResource,
    MapillaryApiResource,
    PipelineSettings,
)
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets.storage import DataLayout

TEST_DATA = Path(__file__).parent / "data"
URBAN_AREA = TEST_DATA / "urban_area.geojson"

# Distinctive, so a leak is unmistakable when searching logs and files.
TEST_TOKEN = "MLY|4242|leak-canary-7f3a9c1e5b"
TEST_SCALE = 0.003


def make_resources(server: EmulatorServer, data_dir: Path, **settings) -> dict:
    return {
        "mapillary_api": MapillaryApiResource(
            access_token=TEST_TOKEN,
            graph_url=server.graph_url,
            tiles_url=server.tiles_url,
            max_retries=settings.pop("max_retries", 6),
            rate_limit_store=str(DataLayout(data_dir).rate_limit_store_path),
        ),
        "storage": DataStorageResource(data_dir=str(data_dir)),
        "settings": PipelineSettings(**{"chunk_size": 200, **settings}).validated(),
    }


@dataclass
class PipelineRun:
    server: EmulatorServer
    layout: DataLayout
    instance: dg.DagsterInstance
    defs: dg.Definitions

    def run(self) -> dict:
        return run_pipeline(self.instance, self.defs, log=lambda *_: None)

    def images(self) -> gpd.GeoDataFrame:
        return gpd.read_file(self.layout.geopackage_path, layer="images", engine="pyogrio")

    def layers(self) -> list[str]:
        return [name for name, _ in pyogrio.list_layers(self.layout.geopackage_path)]

    def truth(self) -> list:
        return self.server.world.images_in_polygon(current_aoi().geometry)


@contextlib.contextmanager
def pipeline_run(
    tmp_path: Path, world: World | None = None, faults: Faults | None = None, **settings
) -> Iterator[PipelineRun]:
    world = world or World(seed=7, scale=TEST_SCALE)
    data_dir = tmp_path / "data"
    (tmp_path / "dagster_home").mkdir(parents=True, exist_ok=True)
    with (
        EmulatorServer(world=world, faults=faults, token=TEST_TOKEN) as server,
        dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance,
    ):
        defs = build_definitions(make_resources(server, data_dir, **settings))
        yield PipelineRun(server, DataLayout(data_dir), instance, defs)
