"""Run the pipeline's jobs on a scaled-out instance: submit runs, follow them (and their retries) to the end.

`ClusterRunner.run_many(job_name, tag_sets)` is the runner protocol of `defs/pipeline_runs.py`: each tag
set becomes one run, submitted to the instance's run coordinator (deploy/dagster.yaml: queued, dequeued
by dagster-daemon, launched as a Celery task on whichever worker takes it). A run whose worker was
killed is failed by run monitoring and relaunched by run retries; the runner follows that chain and
reports the last run of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import AUTO_RETRY_RUN_ID_TAG, WILL_RETRY_TAG

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_MODULE = "mapillary_assets.definitions"
CELERY_QUEUE_TAG = "dagster-celery/queue"
# Publishing writes DuckDB and the GeoPackage: its runs go to the one worker whose local disk holds them.
JOB_QUEUES = {"publish_job": "publish"}
_FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


class ClusterRunner:
    """Submits runs to `instance` (whose launcher sends them to workers) and waits for their outcome."""

    def __init__(self, instance: dg.DagsterInstance, *, module: str = CODE_MODULE,
                 working_directory: Path = REPO_ROOT, poll_s: float = 1.0, timeout_s: float = 6 * 3600.0,
                 log: Callable[[str], None] = print) -> None:
        self.instance = instance
        self.module = module
        self.working_directory = Path(working_directory)
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.log = log

    def run_many(self, job_name: str, tag_sets: list[dict[str, str]]) -> list[tuple[str, bool]]:
        run_ids = self.submit(job_name, tag_sets)
        return [self.wait(run_id) for run_id in run_ids]

    def submit(self, job_name: str, tag_sets: Sequence[dict[str, str]]) -> list[str]:
        from dagster._cli.job import _create_run
        from dagster._cli.workspace.cli_target import (
            WorkspaceOpts,
            get_code_location_from_workspace,
            get_remote_job_from_remote_repo,
            get_remote_repository_from_code_location,
            get_workspace_from_cli_opts,
        )
        from dagster.version import __version__

        opts = WorkspaceOpts(module_name=(self.module,), working_directory=str(self.working_directory))
        run_ids = []
        with get_workspace_from_cli_opts(self.instance, version=__version__, workspace_opts=opts) as workspace:
            location = get_code_location_from_workspace(workspace, None)
            repository = get_remote_repository_from_code_location(location, None)
            job = get_remote_job_from_remote_repo(repository, job_name)
            for tags in tag_sets:
                queue = {CELERY_QUEUE_TAG: JOB_QUEUES[job_name]} if job_name in JOB_QUEUES else {}
                run = _create_run(instance=self.instance, code_location=location, remote_repo=repository,
                                  remote_job=job, run_config={}, tags={**queue, **tags}, op_selection=None,
                                  run_id=None)
                self.instance.submit_run(run.run_id, workspace)
                run_ids.append(run.run_id)
        return run_ids

    def wait(self, run_id: str) -> tuple[str, bool]:
        """(id of the last run of the retry chain, success) once no retry is due any more."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and run.status in _FINISHED:
                if run.status == dg.DagsterRunStatus.SUCCESS:
                    return run_id, True
                retry = run.tags.get(AUTO_RETRY_RUN_ID_TAG)
                if retry:
                    self.log(f"run {run_id} failed ({run.job_name}); following its retry {retry}")
                    run_id = retry
                    continue
                if run.tags.get(WILL_RETRY_TAG) != "true":
                    return run_id, False
            time.sleep(self.poll_s)
        raise TimeoutError(f"run {run_id} did not finish within {self.timeout_s:.0f} s")
