"""Operating the pipeline in Dagster: the instance configuration (run queue, pools, run monitoring), and
"backfill failed partitions" through the GraphQL API the UI uses, against a real `dagster dev` (webserver,
daemon, code server, run workers) and an emulator that goes down in the middle of a backfill."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import dagster as dg
import pytest

from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions
from mapillary_assets.emulator import EmulatorServer
from mapillary_assets.runners.instance import (
    POOL_LIMITS,
    configure_pools,
    open_instance,
    prepare_dagster_home,
)
from mapillary_assets.storage import DataLayout, read_parquet
from mapillary_assets_tests.support.assertions import assert_same_images
from mapillary_assets_tests.support.dagster_server import (
    TERMINAL_BACKFILL_STATUSES,
    TERMINAL_RUN_STATUSES,
    DagsterServer,
    dagster_server,
)
from mapillary_assets_tests.support.emulated_runs import emulator_resources, read_images
from mapillary_assets_tests.support.reference import fault_free_reference, shared_temp_root
from mapillary_assets_tests.support.world import TEST_TOKEN, reference_world

POOLS = {"mapillary_api": 4, "duckdb_writer": 1, "gpu": 1, "chunk_registry": 1}
CHUNK_ASSETS = ["image_metadata", "thumbnail_downloads", "blur_scores"]
# 585 images in chunks of 100: 6 chunks, so the backfill makes two runs (these assets take <= 4 chunks a run).
CHUNK_SIZE = 100
THUMBNAIL_SIZE = 1024
RESOLVE_BATCH = 50  # ids per thumbnail-URL lookup
OUTAGE_AFTER_THUMBNAILS = 40  # the outage starts once the second run has downloaded this many
BACKFILL_TIMEOUT_S = (
    420.0  # the backfill daemon works in 30-second iterations; the machine is shared
)


# -- the instance configuration ---------------------------------------------------------------------------


def test_repository_instance_config_queues_runs_limits_pools_and_frees_slots(tmp_path):
    home = prepare_dagster_home(tmp_path / "home")
    with open_instance(home) as instance:
        configure_pools(instance)  # what `mapillary-assets demo|ui` do before any run
        concurrency = instance.get_concurrency_config()
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.pool_config.default_pool_limit == 1
        limits = {
            pool: instance.event_log_storage.get_concurrency_info(pool).limit for pool in POOLS
        }
        assert limits == POOLS and POOL_LIMITS == {"mapillary_api": 4}
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 60
        assert "mapillary_assets" in instance.get_settings("python_logs")["managed_python_loggers"]

    # Every pool an asset names is one of these (a misspelt pool would silently get a slot of its own).
    assets = build_definitions().get_repository_def().assets_defs_by_key.values()
    assert {asset.op.pool for asset in assets} - {None} == set(POOLS)


# -- backfilling failed partitions ------------------------------------------------------------------------

LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
REEXECUTE_BACKFILL = """
mutation Reexecute($params: ReexecutionParams) {
  reexecutePartitionBackfill(reexecutionParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
BACKFILL = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      assetBackfillData { assetBackfillStatuses { ... on AssetPartitionsStatusCounts {
        assetKey { path } numPartitionsTargeted numPartitionsMaterialized numPartitionsFailed } } }
      runs { id status tags { key value } }
    }
    ... on Error { message }
  }
}"""
PARTITION_STATUSES = """
query Partitions($asset: AssetKeyInput!) {
  assetNodeOrError(assetKey: $asset) {
    ... on AssetNode { assetPartitionStatuses { ... on DefaultPartitionStatuses {
      materializedPartitions failedPartitions materializingPartitions } } }
  }
}"""
LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
  }
}"""
RUN_STATUS = """query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
SENSOR = """query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) { ... on Sensor { id } } }"""
STOP_SENSOR = """mutation Stop($id: String) {
  stopSensor(id: $id) { __typename ... on StopSensorMutationResult { instigationState { status } } } }"""


@dataclass
class Deployment:
    server: DagsterServer
    emulator: EmulatorServer
    layout: DataLayout

    # -- through GraphQL, as the UI does it --

    def launch_backfill(self, assets: list[str], partitions: list[str]) -> str:
        params = {
            "assetSelection": [{"path": [asset]} for asset in assets],
            "partitionNames": partitions,
        }
        answer = self.server.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert answer["__typename"] == "LaunchBackfillSuccess", answer
        return answer["backfillId"]

    def reexecute_from_failure(self, backfill_id: str) -> str:
        params = {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}
        answer = self.server.graphql(REEXECUTE_BACKFILL, {"params": params})[
            "reexecutePartitionBackfill"
        ]
        assert answer["__typename"] == "LaunchBackfillSuccess", answer
        return answer["backfillId"]

    def backfill(self, backfill_id: str) -> dict:
        answer = self.server.graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        assert answer["__typename"] == "PartitionBackfill", answer
        return answer

    def wait_for_backfill(self, backfill_id: str, while_waiting=None) -> dict:
        """The backfill once it is over; `while_waiting()` is called every few milliseconds until then."""
        next_status_check = 0.0

        def finished():
            nonlocal next_status_check
            if while_waiting is not None:
                while_waiting()
            if time.monotonic() < next_status_check:
                return None
            next_status_check = time.monotonic() + 1.0
            state = self.backfill(backfill_id)
            return state if state["status"] in TERMINAL_BACKFILL_STATUSES else None

        return self.server.wait_until(
            finished, BACKFILL_TIMEOUT_S, f"backfill {backfill_id}", interval=0.01
        )

    def partition_statuses(self, asset: str) -> dict[str, set[str]]:
        node = self.server.graphql(PARTITION_STATUSES, {"asset": {"path": [asset]}})[
            "assetNodeOrError"
        ]
        return {name: set(keys) for name, keys in node["assetPartitionStatuses"].items()}

    def wait_for_backfill_runs(self, backfill_id: str) -> list[dict]:
        """The backfill's runs once it has some and all are over (the daemon marks the backfill itself
        complete on its next pass, up to 30 seconds later)."""

        def runs_over():
            runs = self.backfill(backfill_id)["runs"]
            return (
                runs
                if runs and all(run["status"] in TERMINAL_RUN_STATUSES for run in runs)
                else None
            )

        return self.server.wait_until(
            runs_over, BACKFILL_TIMEOUT_S, f"the runs of backfill {backfill_id}", 1.0
        )

    def launch_run(self, job_name: str) -> str:
        params = {"selector": self.server.job_selector(job_name)}
        answer = self.server.graphql(LAUNCH_RUN, {"params": params})["launchPipelineExecution"]
        assert answer["__typename"] == "LaunchRunSuccess", answer
        return answer["run"]["runId"]

    def wait_for_run(self, run_id: str) -> str:
        def status():
            value = self.server.graphql(RUN_STATUS, {"id": run_id})["runOrError"]["status"]
            return value if value in TERMINAL_RUN_STATUSES else None

        return self.server.wait_until(status, BACKFILL_TIMEOUT_S, f"run {run_id}", 1.0)

    def stop_sensor(self, name: str) -> None:
        selector = {**self.server.repository_selector, "sensorName": name}
        sensor_id = self.server.graphql(SENSOR, {"selector": selector})["sensorOrError"]["id"]
        answer = self.server.graphql(STOP_SENSOR, {"id": sensor_id})["stopSensor"]
        assert answer["instigationState"]["status"] == "STOPPED", answer

    # -- what the backfills left --

    def chunk_ids(self) -> dict[str, list[str]]:
        assignment = read_parquet(self.layout.chunk_assignment_path)
        return {
            chunk: list(ids)
            for chunk, ids in assignment.sort_values("position").groupby("chunk")["image_id"]
        }

    def missing_thumbnails(self, chunk_ids: list[str]) -> int:
        return sum(
            not self.layout.thumbnail_path(image_id, THUMBNAIL_SIZE).exists()
            for image_id in chunk_ids
        )


def range_of(run: dict) -> tuple[str, str]:
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    return tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]


def statuses_by_asset(backfill: dict) -> dict[str, dict]:
    return {
        "/".join(s["assetKey"]["path"]): s
        for s in backfill["assetBackfillData"]["assetBackfillStatuses"]
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """`dagster dev` on the reference world's emulator, its data in a fresh folder. The new-images sensor
    is stopped (it would chase the same chunks), and runs are dequeued one at a time, so the outage of the
    test hits the backfill's second run and not its first."""
    root = tmp_path_factory.mktemp("backfill")
    layout = DataLayout(root / "data")
    with EmulatorServer(reference_world(), token=TEST_TOKEN) as emulator:
        env = {
            "MAPILLARY_ACCESS_TOKEN": TEST_TOKEN,
            "MAPILLARY_GRAPH_URL": emulator.graph_url,
            "MAPILLARY_TILES_URL": emulator.tiles_url,
            "MAPILLARY_DATA_DIR": str(layout.root),
            "MAPILLARY_CHUNK_SIZE": str(CHUNK_SIZE),
            "MAPILLARY_THUMBNAIL_SIZE": str(THUMBNAIL_SIZE),
            # fail fast in the outage, and download slowly enough for the outage to land mid-chunk
            "MAPILLARY_MAX_RETRIES": "1",
            "MAPILLARY_DOWNLOAD_CONCURRENCY": "4",
        }
        one_run_at_a_time = {"concurrency": {"runs": {"max_concurrent_runs": 1}}}
        with dagster_server(root / "home", env, config_overrides=one_run_at_a_time) as server:
            deployment = Deployment(server, emulator, layout)
            deployment.stop_sensor("new_images_sensor")
            with server.open_instance() as instance:
                configure_pools(instance)
            yield deployment


def discover_and_chunk(deployment: Deployment) -> list[str]:
    """Discovery and chunking, in this process, into the server's instance: the chunk partitions exist."""
    defs = build_definitions(
        emulator_resources(deployment.emulator, deployment.layout.root, chunk_size=CHUNK_SIZE)
    )
    tiles = tile_partitions().get_partition_keys()
    with deployment.server.open_instance() as instance:
        for job, tags in (
            (
                "discovery_job",
                {
                    "dagster/asset_partition_range_start": tiles[0],
                    "dagster/asset_partition_range_end": tiles[-1],
                },
            ),
            ("assign_chunks_job", {}),
        ):
            assert (
                defs.resolve_job_def(job).execute_in_process(instance=instance, tags=tags).success
            )
        return list(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))


class OutageDuringSecondRun:
    """Polled while the backfill runs: once the first run has stored its thumbnails, wait until the second
    run has downloaded a few, then take the emulator down (every request answers 503) until further notice."""

    def __init__(self, emulator: EmulatorServer, instance: dg.DagsterInstance):
        self.emulator, self.instance = emulator, instance
        self.first_run_thumbnails: int | None = None
        self.started = False
        self.next_instance_check = 0.0

    def __call__(self) -> None:
        if self.started:
            return
        if self.first_run_thumbnails is None:
            if time.monotonic() < self.next_instance_check:
                return
            self.next_instance_check = time.monotonic() + 0.25
            if self.instance.get_materialized_partitions(dg.AssetKey("thumbnail_downloads")):
                self.first_run_thumbnails = self.emulator.stats()["thumbnail"]
        elif (
            self.emulator.stats()["thumbnail"]
            >= self.first_run_thumbnails + OUTAGE_AFTER_THUMBNAILS
        ):
            self.emulator.set_faults(outage_start=time.time(), outage_end=None)
            self.started = True


@pytest.mark.slow
def test_backfill_of_failed_partitions_fetches_only_what_is_missing(deployment, tmp_path_factory):
    reference = fault_free_reference(shared_temp_root(tmp_path_factory))
    chunks = discover_and_chunk(deployment)
    assert len(chunks) > 4, "two backfill runs are needed"
    emulator = deployment.emulator

    # 1. A backfill of every chunk; the API goes down during its second run.
    emulator.set_faults(latency_s=0.03)
    first_id = deployment.launch_backfill(CHUNK_ASSETS, chunks)
    with deployment.server.open_instance() as instance:
        outage = OutageDuringSecondRun(emulator, instance)
        first = deployment.wait_for_backfill(first_id, while_waiting=outage)
    assert outage.started, "the outage never started"
    assert first["status"] in {"COMPLETED_FAILED", "FAILED"}, first["status"]
    emulator.set_faults(outage_start=None, outage_end=None, latency_s=0.0)
    assert emulator.stats()["faulted"] > 0

    # What the UI's partitions view shows: the first run's chunks done, the second run's failed.
    downloads = deployment.partition_statuses("thumbnail_downloads")
    failed, done = downloads["failedPartitions"], downloads["materializedPartitions"]
    assert failed and done and failed | done == set(chunks) and not failed & done
    assert deployment.partition_statuses("image_metadata")["materializedPartitions"] == set(chunks)
    assert statuses_by_asset(first)["thumbnail_downloads"]["numPartitionsFailed"] == len(failed)

    # What the failed partitions stored before failing: some thumbnails, not all.
    ids_by_chunk = deployment.chunk_ids()
    missing = {
        chunk: deployment.missing_thumbnails(ids_by_chunk[chunk]) for chunk in sorted(failed)
    }
    assert 0 < sum(missing.values()) < sum(len(ids_by_chunk[c]) for c in failed), missing
    assert all(deployment.missing_thumbnails(ids_by_chunk[chunk]) == 0 for chunk in done)

    # 2. The API is back: "Re-execute -> From failure" runs only the failed partitions' missing steps ...
    emulator.reset_stats()
    retry_id = deployment.reexecute_from_failure(first_id)
    retry_runs = deployment.wait_for_backfill_runs(retry_id)
    assert [run["status"] for run in retry_runs] == ["SUCCESS"] * len(retry_runs)
    ranges = [range_of(run) for run in retry_runs]
    assert {
        key for start, end in ranges for key in chunks[chunks.index(start) : chunks.index(end) + 1]
    } == failed

    # ... and each fetched only what was missing: the missing thumbnails and their URLs, nothing else.
    stats = emulator.stats()
    assert stats["thumbnail"] == sum(missing.values()), (stats, missing)
    assert stats["batch"] == sum(math.ceil(n / RESOLVE_BATCH) for n in missing.values()), (
        stats,
        missing,
    )
    assert stats["tile"] == stats["entity"] == stats["faulted"] == 0, stats
    assert deployment.partition_statuses("blur_scores")["materializedPartitions"] == set(chunks)
    with deployment.server.open_instance() as instance:
        for chunk in done:  # the first run's chunks were not materialised again
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey("thumbnail_downloads"), asset_partitions=[chunk]
                ),
                limit=10,
            ).records
            assert len(records) == 1, chunk

    # 3. Publish (launched while the daemon closes the re-execution backfill): the GeoPackage equals the
    # fault-free run's, id for id and value for value.
    publish_run = deployment.launch_run("publish_job")
    retry = deployment.wait_for_backfill(retry_id)
    assert retry["status"] == "COMPLETED_SUCCESS", retry
    retried = statuses_by_asset(retry)
    assert set(retried) == {"thumbnail_downloads", "blur_scores"}, (
        "metadata had completed: not re-run"
    )
    assert all(
        s["numPartitionsTargeted"] == s["numPartitionsMaterialized"] == len(failed)
        for s in retried.values()
    )
    assert {run["id"] for run in retry["runs"]} == {run["id"] for run in retry_runs}
    assert deployment.wait_for_run(publish_run) == "SUCCESS"
    assert_same_images(read_images(deployment.layout.root), reference.load_images())
