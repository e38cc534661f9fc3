"""The stack's Celery workers: which queues each serves, the command that starts one, and its private
folders (a worker shares no disk with another: the data is in the object store, the instance in
Postgres)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mapillary_assets.defs.jobs import GPU_QUEUE, PUBLISH_QUEUE
from mapillary_assets.scaleout.services import REPO_ROOT, tool


def worker_queues(index: int, gpu_workers: int = 1) -> list[str]:
    """Every worker serves `dagster` (discovery, chunking, fetch runs). Worker 1 also serves `publish`:
    staging and the GeoPackage stay on the one disk that holds DuckDB. Workers 1..`gpu_workers` also serve
    `gpu` (blur runs): on a real cluster those are the machines with a GPU."""
    return [
        "dagster",
        *([PUBLISH_QUEUE] if index == 1 else []),
        *([GPU_QUEUE] if index <= gpu_workers else []),
    ]


def worker_command(index: int, gpu_workers: int = 1) -> list[str]:
    # One -q with commas: dagster-celery turns each -q into a `celery -Q`, and Celery keeps only the last.
    # One run at a time per worker process: a run is already a process tree of its own.
    return [
        tool("dagster-celery"),
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(REPO_ROOT / "deploy" / "celery.yaml"),
        "--name",
        f"w{index}",
        "-q",
        ",".join(worker_queues(index, gpu_workers)),
        "--",
        "--concurrency=1",
        "--without-gossip",
        "--without-mingle",
    ]


def worker_env(folder: Path, instance_yaml: Path, env: dict[str, str]) -> dict[str, str]:
    """The stack's environment with a worker's private folders under `folder` (created here): its
    DAGSTER_HOME (a copy of the instance's `instance_yaml`: the instance itself is Postgres), the scratch
    of staging and the GeoPackage build, TMPDIR, and the compute logs' staging. No two workers have a
    path in common, as on separate machines."""
    paths = {
        "DAGSTER_HOME": folder / "dagster_home",
        "MAPILLARY_SCRATCH_DIR": folder / "scratch",
        "TMPDIR": folder / "tmp",
        "MAPILLARY_COMPUTE_LOG_DIR": folder / "compute-logs",
    }
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(instance_yaml, paths["DAGSTER_HOME"] / "dagster.yaml")
    return {**env, **{name: str(path) for name, path in paths.items()}}
