"""Pins the private Dagster names `mapillary_assets.dagster_compat` relies on: a Dagster upgrade that
moves or changes one fails here, by name, instead of deep inside a run."""

from __future__ import annotations

import datetime

from mapillary_assets import dagster_compat
from mapillary_assets.runners.instance import open_instance


def test_tags_are_the_documented_strings():
    assert dagster_compat.PARTITION_NAME_TAG == "dagster/partition"
    assert dagster_compat.ASSET_PARTITION_RANGE_START_TAG == "dagster/asset_partition_range_start"
    assert dagster_compat.ASSET_PARTITION_RANGE_END_TAG == "dagster/asset_partition_range_end"
    assert dagster_compat.AUTO_RETRY_RUN_ID_TAG == "dagster/auto_retry_run_id"
    assert dagster_compat.WILL_RETRY_TAG == "dagster/will_retry"


def test_smallest_cron_interval():
    assert dagster_compat.smallest_cron_interval("0 3 * * 1") == datetime.timedelta(days=7)
    assert dagster_compat.smallest_cron_interval("*/15 * * * *") == datetime.timedelta(minutes=15)


def test_pool_limits_and_launcher_on_a_persistent_instance(tmp_path):
    with open_instance(tmp_path / "home") as instance:
        assert dagster_compat.is_local_launcher(instance)
        dagster_compat.set_pool_limit(instance, "some_pool", 3)
        assert instance.event_log_storage.get_concurrency_info("some_pool").slot_count == 3


def test_pool_slots_of_a_run_are_released(tmp_path):
    with open_instance(tmp_path / "home") as instance:
        dagster_compat.set_pool_limit(instance, "one_slot", 1)
        storage = instance.event_log_storage
        assert storage.claim_concurrency_slot("one_slot", "run-a", "step").is_claimed
        assert storage.get_concurrency_info("one_slot").active_slot_count == 1
        dagster_compat.release_pool_slots(instance, "run-a")
        assert storage.get_concurrency_info("one_slot").active_slot_count == 0
