"""A run whose process was killed must not hold its pool slots forever (see runners/dead_runs.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest
from dagster._core.events import EngineEventData

from mapillary_assets.defs.pools import GPU_POOL
from mapillary_assets.runners.dead_runs import release_dead_runs
from mapillary_assets.runners.instance import configure_pools, open_instance
from mapillary_assets.runners.pipeline import run_pipeline


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def started_run(instance: dg.DagsterInstance, pid: int, pool: str) -> dg.DagsterRun:
    """A STARTED run whose worker has `pid` and that holds one slot of `pool`, as a run killed mid-step leaves it."""
    run = instance.add_run(
        dg.DagsterRun(job_name="process_chunks_job", status=dg.DagsterRunStatus.STARTED)
    )
    instance.report_engine_event(
        f"Executing steps in process (pid: {pid})", run, EngineEventData.in_process(pid)
    )
    instance.event_log_storage.initialize_concurrency_limit_to_default(pool)  # as the executor does
    claim = instance.event_log_storage.claim_concurrency_slot(pool, run.run_id, "blur_scores")
    assert claim.is_claimed
    return run


@pytest.fixture
def instance(tmp_path):
    with open_instance(tmp_path / "home") as instance:
        configure_pools(instance)
        yield instance


def test_a_run_whose_process_is_gone_is_failed_and_frees_its_slot(instance):
    dead = started_run(instance, dead_pid(), GPU_POOL)
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 1

    assert release_dead_runs(instance) == [dead.run_id]

    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0
    assert release_dead_runs(instance) == []


def test_a_run_whose_process_is_alive_keeps_its_slot(instance):
    alive = started_run(instance, os.getpid(), GPU_POOL)
    assert release_dead_runs(instance) == []
    assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 1


def test_a_run_launched_on_another_machine_is_left_to_run_monitoring(instance):
    # Its pid is that of a process on a Celery worker; no such pid here says nothing about it.
    remote = started_run(instance, dead_pid(), GPU_POOL)
    instance.add_run_tags(remote.run_id, {"dagster-celery/task_id": "3f1c-task"})
    assert release_dead_runs(instance) == []
    assert instance.get_run_by_id(remote.run_id).status == dg.DagsterRunStatus.STARTED
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 1


class _StopBeforeFirstJob(Exception):
    pass


class _NoJobs:
    def resolve_job_def(self, name):
        raise _StopBeforeFirstJob(name)


def test_the_pipeline_releases_dead_runs_before_it_starts(instance):
    dead = started_run(instance, dead_pid(), GPU_POOL)
    lines: list[str] = []
    with pytest.raises(_StopBeforeFirstJob, match="discovery_job"):
        run_pipeline(instance, defs=_NoJobs(), log=lines.append)
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0
    assert any(dead.run_id in line and "process is gone" in line for line in lines), lines
