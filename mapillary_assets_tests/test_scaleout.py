"""The scaled-out mode on loopback, shared-nothing: PostgreSQL instance storage, Redis broker and rate
budget, the data and the compute logs in SeaweedFS's bucket, 2 Celery workers each in a private folder (one
SIGKILLed mid-chunk), the whole pipeline submitted as runs; the GeoPackage in the bucket must equal the
single-machine run's, the emulator's budget must hold over both workers together, and no data file may
be written locally outside a worker's scratch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import geopandas as gpd
import obstore
import pyogrio
import pytest
import redis

from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets.dagster_compat import AUTO_RETRY_RUN_ID_TAG, PARTITION_NAME_TAG
from mapillary_assets.emulator import EmulatorServer, Faults, World
from mapillary_assets.storage import DataLayout, s3_settings_from_env
from mapillary_assets.storage.object_store import s3_store
from mapillary_assets_tests.support.assertions import assert_same_images_from_a_bucket
from mapillary_assets_tests.support.emulated_runs import pipeline_run, read_images
from mapillary_assets_tests.support.stack_services import (
    needs_stack_services,
    run_pipeline_on_stack,
    running_stack,
)
from mapillary_assets_tests.support.world import TEST_SCALE, TEST_TOKEN

REPO = Path(__file__).resolve().parents[1]
ENTITY_BUDGET = 8  # per minute; the pipeline sends ~12 entity requests, so the budget binds
# What a run may leave on local disks besides a worker's scratch: the services' own folders (the database,
# the broker and the object store server: not the pipeline's files), process logs and pid files, the
# instance's dagster.yaml and env.sh, and per worker its DAGSTER_HOME, TMPDIR and compute-log staging.
STACK_ENTRIES = {"postgres", "redis", "seaweedfs", "logs", "pids", "dagster_home", "env.sh"}
STACK_ENTRIES |= {"compute-logs", "workers"}
WORKER_ENTRIES = {"scratch", "tmp", "dagster_home", "compute-logs"}
# A data file: any stage's output (Parquet, thumbnails, tiles, the GeoPackage, DuckDB, the SQLite budget).
DATA_SUFFIXES = (".parquet", ".jpg", ".jpeg", ".mvt", ".pbf", ".gpkg", ".duckdb", ".sqlite", ".npy")


def layer_feature_counts(path: Path) -> dict[str, int]:
    return {
        name: pyogrio.read_info(path, layer=name)["features"]
        for name, _ in pyogrio.list_layers(path)
    }


def celery_app():
    from dagster_celery.make_app import make_app

    broker = os.environ["MAPILLARY_CELERY_BROKER"]
    return make_app(
        {
            "broker": broker,
            "backend": broker,
            "include": [],
            "task_default_queue": "dagster",
            "config_source": {"result_extended": True},
        }
    )


def kill_first_chunk_run_on(
    worker: str, instance: dg.DagsterInstance, app, stop: threading.Event, killed: dict
) -> None:
    """SIGKILL the process running the first fetch run that `worker` starts, once it is fetching metadata."""
    while not stop.is_set():
        for run in instance.get_runs(
            dg.RunsFilter(job_name="fetch_job", statuses=[dg.DagsterRunStatus.STARTED])
        ):
            result = app.AsyncResult(run.tags.get("dagster-celery/task_id"))
            info = result.info if result.state == "STARTED" else None
            if not isinstance(info, dict) or not str(info.get("hostname", "")).startswith(
                f"{worker}@"
            ):
                continue
            if not instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
                continue
            time.sleep(1.0)  # mid-chunk: its metadata requests are being paced by the shared budget
            # The buckets now, while they are in use: an idle bucket's key expires (a minute after its last
            # request), which on a loaded machine comes before the pipeline ends.
            buckets = sorted(
                key.decode()
                for key in redis.Redis.from_url(os.environ["MAPILLARY_REDIS_URL"]).keys(
                    "mapillary:ratelimit:*"
                )
            )
            os.kill(int(info["pid"]), signal.SIGKILL)
            killed.update(
                run_id=run.run_id,
                pid=int(info["pid"]),
                partition=run.tags.get(PARTITION_NAME_TAG),
                buckets=buckets,
            )
            return
        stop.wait(0.3)


def test_stack_script_status_reports_what_runs(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "stack.sh"), "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "MAPILLARY_STACK_DIR": str(tmp_path / "stack")},
        timeout=120,
    )
    assert result.returncode == 3, result.stderr  # nothing started here
    assert json.loads(result.stdout) == {"redis": False, "postgres": False, "object_store": False}


def test_worker_command_listens_on_its_queues_one_run_at_a_time():
    from mapillary_assets.scaleout.workers import worker_command

    first, second = worker_command(1), worker_command(2)
    assert first[first.index("-q") + 1] == "dagster,publish,gpu" and first.count("-q") == 1
    assert second[second.index("-q") + 1] == "dagster"
    assert worker_command(2, gpu_workers=2)[second.index("-q") + 1] == "dagster,gpu"
    assert "--concurrency=1" in first[first.index("--") :]


@pytest.mark.slow
@needs_stack_services
def test_two_workers_one_killed_equal_the_single_machine_run(tmp_path, monkeypatch):
    with pipeline_run(tmp_path / "single", World(seed=7, scale=TEST_SCALE)) as single:
        single.run()
        expected_layers = layer_feature_counts(single.layout.geopackage_path)
        expected_images = read_images(single.layout.root)

    faults = Faults(rate_limit_per_minute={"entity": ENTITY_BUDGET})
    with EmulatorServer(
        world=World(seed=7, scale=TEST_SCALE), faults=faults, token=TEST_TOKEN
    ) as server:
        with running_stack(monkeypatch, server, "mapillary-stack-", ENTITY_BUDGET) as (
            config,
            env,
        ):
            root = config.root
            assert env["MAPILLARY_DATA_DIR"] == "s3://mapillary/data"
            with dg.DagsterInstance.get() as instance:
                app, stop, killed = celery_app(), threading.Event(), {}
                killer = threading.Thread(
                    target=kill_first_chunk_run_on, args=("w2", instance, app, stop, killed)
                )
                killer.start()
                try:
                    summary = run_pipeline_on_stack(instance, env)
                finally:
                    stop.set()
                    killer.join()
                chunk_runs = instance.get_runs(dg.RunsFilter(job_name="fetch_job"))
                blur_runs = instance.get_runs(dg.RunsFilter(job_name="blur_job"))
                placement = {
                    run.run_id: (
                        run.tags.get(PARTITION_NAME_TAG),
                        run.status.value,
                        (app.AsyncResult(run.tags["dagster-celery/task_id"]).worker or "?").split(
                            "@"
                        )[0],
                        {
                            e.step_key: e.dagster_event.pid
                            for e in instance.all_logs(
                                run.run_id, of_type=dg.DagsterEventType.STEP_START
                            )
                        },
                    )
                    for run in [*chunk_runs, *blur_runs]
                }
                blur_queues = {run.tags.get("dagster-celery/queue") for run in blur_runs}
                for run_id, (partition, status, worker, step_pids) in placement.items():
                    print(
                        f"{partition} {run_id[:8]} {status:8} worker={worker} step pids={step_pids}"
                    )
                killed_run = instance.get_run_by_id(killed["run_id"]) if killed else None
                slots = {
                    pool: instance.event_log_storage.get_concurrency_info(pool).slot_count
                    for pool in ("mapillary_api", "duckdb_writer", "gpu")
                }
            worker_paths = [_private_paths(config.pids / f"{name}.pid") for name in ("w1", "w2")]
            # Everything written locally, before anything is downloaded: the stack's folder and this test's.
            local_files = [
                p for folder in (root, tmp_path) for p in folder.rglob("*") if p.is_file()
            ]
            layout = DataLayout(env["MAPILLARY_DATA_DIR"])
            published = tmp_path / "published.gpkg"
            published.write_bytes(layout.store.get(layout.geopackage_key))
            sqlite_bucket_used = layout.store.exists("rate_limits.sqlite")
            bucket = s3_store(config.bucket, s3_settings_from_env())
            compute_logs = [
                meta["path"]
                for batch in obstore.list(bucket, prefix="compute-logs")
                for meta in batch
            ]
        entity_times = server.request_times("entity")
        rate_limited = server.stats().get("rate_limited", 0)
    cluster_layers = layer_feature_counts(published)
    cluster_images = gpd.read_file(published, layer="images", engine="pyogrio")

    assert summary["chunks"] == 3
    # Pools live in Postgres: one value for the whole cluster (duckdb_writer: dagster.yaml's default of 1).
    assert slots == {"mapillary_api": 4, "duckdb_writer": 1, "gpu": 1}  # one gpu worker (w1)
    # One worker's process was SIGKILLed mid-chunk: that run failed, its retry completed the chunk.
    assert killed_run is not None, "no chunk run was seen on w2 to kill"
    assert killed_run.status == dg.DagsterRunStatus.FAILURE
    retry = killed_run.tags.get(AUTO_RETRY_RUN_ID_TAG)
    assert retry and placement[retry][1] == "SUCCESS" and placement[retry][0] == killed["partition"]
    # Each chunk is fetch_job then blur_job; the summary holds each chunk's last (blur) run.
    assert sorted(
        placement[run_id][0] for run_id in summary["runs"]["fetch_job -> blur_job"]
    ) == sorted(run.tags[PARTITION_NAME_TAG] for run in blur_runs)
    # Fetch steps ran in both workers (the killed run's included: it ran image_metadata on w2) ...
    fetch_ids = {run.run_id for run in chunk_runs}
    assert {
        worker
        for run_id, (_, _, worker, steps) in placement.items()
        if steps and run_id in fetch_ids
    } == {"w1", "w2"}
    # ... and every blur run went to the `gpu` queue, which only w1 serves.
    assert len(blur_runs) == 3 and blur_queues == {"gpu"}
    assert {placement[run.run_id][2] for run in blur_runs} == {"w1"}
    assert {placement[run.run_id][1] for run in blur_runs} == {"SUCCESS"}
    assert placement[killed["run_id"]][2] == "w2" and placement[killed["run_id"]][3]
    # One budget for both workers: no 60-s window above what the emulator enforces, and nothing refused.
    assert len(entity_times) > ENTITY_BUDGET
    assert busiest_window(entity_times, 60.0) <= ENTITY_BUDGET
    assert rate_limited == 0
    # ... kept in Redis (MAPILLARY_RATE_LIMIT_BACKEND=redis), not in the data dir's SQLite file.
    assert "mapillary:ratelimit:entity" in killed["buckets"]
    assert not sqlite_bucket_used
    assert cluster_layers == expected_layers
    assert_same_images_from_a_bucket(cluster_images, expected_images)
    # Shared-nothing: the workers' cwd, DAGSTER_HOME, scratch, TMPDIR and compute-log staging (read from the
    # running processes) have no path in common ...
    assert all(len(paths) == 5 for paths in worker_paths), worker_paths
    assert not any(
        a.is_relative_to(b) or b.is_relative_to(a) for a in worker_paths[0] for b in worker_paths[1]
    ), worker_paths
    # ... and nothing of the data was written locally but staging work in a worker's scratch (the data
    # dir is the bucket; the single-machine reference run keeps its own folder, `single/`).
    outside = [p for p in local_files if not _allowed_local_file(p, root, tmp_path)]
    assert not outside, outside
    # Compute logs in the bucket: a successful blur run's (w1's) stdout/stderr are objects under the prefix.
    blur_run = next(run.run_id for run in blur_runs if run.status == dg.DagsterRunStatus.SUCCESS)
    assert any(
        key.startswith(f"compute-logs/storage/{blur_run}/") and key.endswith((".out", ".err"))
        for key in compute_logs
    ), compute_logs


def _private_paths(pidfile: Path) -> set[Path]:
    """The folders a running worker works in, from its process: cwd and its private variables."""
    pid = int(pidfile.read_text())
    environ = dict(
        entry.split("=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_text().split("\0")
        if "=" in entry
    )
    names = ("DAGSTER_HOME", "MAPILLARY_SCRATCH_DIR", "TMPDIR", "MAPILLARY_COMPUTE_LOG_DIR")
    return {Path(os.readlink(f"/proc/{pid}/cwd"))} | {
        Path(environ[n]) for n in names if n in environ
    }


def _allowed_local_file(path: Path, root: Path, test_dir: Path) -> bool:
    """Whether `path` may exist after a shared-nothing run: see STACK_ENTRIES; a data file only in a
    worker's scratch."""
    if path.is_relative_to(test_dir):
        return path.relative_to(test_dir).parts[0] == "single"
    parts = path.relative_to(root).parts
    if parts[0] not in STACK_ENTRIES:
        return False
    if parts[0] == "workers":
        return (
            len(parts) > 3
            and parts[2] in WORKER_ENTRIES
            and (parts[2] == "scratch" or not path.name.endswith(DATA_SUFFIXES))
        )
    return parts[0] in {"postgres", "redis", "seaweedfs"} or not path.name.endswith(DATA_SUFFIXES)


class _Runs:
    """Just enough of an instance for ClusterRunner.wait: runs by id, changing as polls go by."""

    def __init__(self, timeline: list[dict[str, tuple]]):
        self.timeline, self.polls = timeline, 0

    def get_run_by_id(self, run_id):
        from types import SimpleNamespace

        state = self.timeline[min(self.polls, len(self.timeline) - 1)]
        self.polls += 1
        status, tags = state[run_id]
        return SimpleNamespace(status=status, tags=tags, job_name="process_chunks_job")


def test_runner_follows_a_retry_that_is_still_being_created():
    from mapillary_assets.runners.cluster import ClusterRunner

    failed = dg.DagsterRunStatus.FAILURE
    instance = _Runs(
        [
            {"a": (dg.DagsterRunStatus.STARTED, {})},
            {
                "a": (failed, {"dagster/will_retry": "true"})
            },  # the daemon has not created the retry yet
            {
                "a": (failed, {"dagster/will_retry": "true", AUTO_RETRY_RUN_ID_TAG: "b"}),
                "b": (dg.DagsterRunStatus.QUEUED, {}),
            },
            {"a": (failed, {AUTO_RETRY_RUN_ID_TAG: "b"}), "b": (dg.DagsterRunStatus.SUCCESS, {})},
        ]
    )
    assert ClusterRunner(instance, poll_s=0, log=lambda *_: None).wait("a") == ("b", True)


def test_runner_waits_for_the_retry_decision_of_a_run_that_monitoring_failed():
    """Run monitoring fails a run whose worker died without the will-retry tag; the retry daemon
    adds it (and then the retry) on a later tick: the runner must not report the failure first."""
    from mapillary_assets.runners.cluster import ClusterRunner

    failed = dg.DagsterRunStatus.FAILURE
    instance = _Runs(
        [
            {"a": (failed, {})},  # failed by run monitoring: no decision yet
            {"a": (failed, {})},
            {
                "a": (failed, {"dagster/will_retry": "true", AUTO_RETRY_RUN_ID_TAG: "b"}),
                "b": (dg.DagsterRunStatus.SUCCESS, {}),
            },
        ]
    )
    runner = ClusterRunner(instance, poll_s=0, log=lambda *_: None)
    assert runner.wait("a") == ("b", True)
    undecided_forever = _Runs([{"a": (failed, {})}])
    runner = ClusterRunner(undecided_forever, poll_s=0, retry_decision_s=0.2, log=lambda *_: None)
    assert runner.wait("a") == ("a", False)


def test_runner_reports_a_failure_that_will_not_be_retried():
    from mapillary_assets.runners.cluster import ClusterRunner

    instance = _Runs([{"a": (dg.DagsterRunStatus.FAILURE, {"dagster/will_retry": "false"})}])
    assert ClusterRunner(instance, poll_s=0, log=lambda *_: None).wait("a") == ("a", False)
