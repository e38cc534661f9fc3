"""Every private Dagster name the project relies on, in one place, pinned by
`mapillary_assets_tests/test_dagster_compat.py`: when a Dagster upgrade moves one, that test names it.

Each has no public equivalent in Dagster 1.13: the partition and retry tags are documented strings
but exported only from `dagster._core.storage.tags`; pool limits other than the default are set
through the event log storage (what `dagster instance concurrency set` calls); the shortest
interval between a cron expression's ticks comes from Dagster's own cron iterator, so it agrees
with how the schedule fires."""

from __future__ import annotations

import datetime

import dagster as dg
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    AUTO_RETRY_RUN_ID_TAG,
    PARTITION_NAME_TAG,
    WILL_RETRY_TAG,
)
from dagster._utils.schedules import get_smallest_cron_interval

__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "AUTO_RETRY_RUN_ID_TAG",
    "PARTITION_NAME_TAG",
    "WILL_RETRY_TAG",
    "is_local_launcher",
    "release_pool_slots",
    "set_pool_limit",
    "smallest_cron_interval",
]


def is_local_launcher(instance: dg.DagsterInstance) -> bool:
    """Whether the instance launches runs as processes on this machine (pids mean something here)."""
    return isinstance(instance.run_launcher, DefaultRunLauncher)


def set_pool_limit(instance: dg.DagsterInstance, pool: str, limit: int) -> None:
    instance.event_log_storage.set_concurrency_slots(pool, limit)


def release_pool_slots(instance: dg.DagsterInstance, run_id: str) -> None:
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def smallest_cron_interval(cron: str) -> datetime.timedelta:
    return get_smallest_cron_interval(cron)
