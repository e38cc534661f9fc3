"""The scaled-out stack in tests: whether its services can run here (PostgreSQL, redis-server and
SeaweedFS), one stack of a test's own, and the whole pipeline submitted to it as runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mapillary_assets.net import free_port
from mapillary_assets_tests.support.object_store import weed_unavailable
from mapillary_assets_tests.support.world import TEST_TOKEN


def stack_services_missing() -> str | None:
    """Why the stack cannot start on this machine (what to install), None when it can."""
    from mapillary_assets.scaleout.services import StackError, postgres_bin

    if weed_unavailable():
        return weed_unavailable()
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (scripts/install_services.sh installs it)"
    try:
        postgres_bin("initdb")
    except StackError as exc:
        return str(exc)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started"
    return None


needs_stack_services = pytest.mark.skipif(
    stack_services_missing() is not None, reason=str(stack_services_missing())
)


@contextmanager
def running_stack(monkeypatch, server, prefix: str, entity_budget: int) -> Iterator[tuple]:
    """PostgreSQL, Redis, SeaweedFS, the webserver and 2 Celery workers of this test alone, speaking to
    the emulator `server` in chunks of 200 under an entity budget; yields (StackConfig, the stack's env),
    with the process env pointed at the stack. Stopped at exit; its folder is removed unless the test failed
    (then it keeps the services' and workers' logs)."""
    from mapillary_assets.scaleout import stack

    # PostgreSQL runs as the `postgres` user when we are root: its folder must not sit under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    config = stack.StackConfig(
        root=root,
        workers=2,
        pg_port=free_port(),
        redis_port=free_port(),
        webserver_port=free_port(),  # runs are submitted through its GraphQL API
        s3_port=free_port(),
        automation=False,
    )
    for name, value in {
        "MAPILLARY_ACCESS_TOKEN": TEST_TOKEN,
        "MAPILLARY_GRAPH_URL": server.graph_url,
        "MAPILLARY_TILES_URL": server.tiles_url,
        "MAPILLARY_CHUNK_SIZE": "200",
        "MAPILLARY_ENTITY_PER_MINUTE": str(entity_budget),
    }.items():
        monkeypatch.setenv(name, value)
    passed = False
    try:
        env = stack.start(config, log=lambda *_: None)
        for name in env:
            if name.startswith(("DAGSTER_", "MAPILLARY_", "AWS_")):
                monkeypatch.setenv(name, env[name])
        yield config, env
        passed = True
    finally:
        stack.stop(config, log=lambda *_: None)
        if passed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"the stack's folder, kept for its logs: {root}")


def run_pipeline_on_stack(instance, env: dict[str, str]) -> dict:
    """The whole pipeline, every job submitted to the stack's webserver and run by its workers."""
    from mapillary_assets.runners.cluster import ClusterRunner
    from mapillary_assets.runners.pipeline import run_pipeline

    runner = ClusterRunner(instance, dagster_url=env["MAPILLARY_DAGSTER_URL"], poll_s=0.5)
    return run_pipeline(instance, runner=runner, log=lambda *_: None, tiles_per_run=64)
