"""runners/pipeline + runners/local: one run per chunk; concurrent local runs overlap blur with downloads."""

from __future__ import annotations

import dagster as dg
import pytest

from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME
from mapillary_assets.defs.pools import GPU_POOL
from mapillary_assets.emulator import Faults
from mapillary_assets.errors import PipelineFailed
from mapillary_assets.runners.instance import configure_pools
from mapillary_assets.runners.local import LocalRunner
from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets_tests.support.emulated_runs import pipeline_run

STEP_EVENTS = {
    dg.DagsterEventType.STEP_START,
    dg.DagsterEventType.STEP_SUCCESS,
    dg.DagsterEventType.STEP_FAILURE,
}


class RecordingRunner:
    """Answers every run as `outcome(job_name, tags)` says, without executing anything."""

    chunk_jobs = ("process_chunks_job",)

    def __init__(self, outcome):
        self.outcome = outcome
        self.calls: list[tuple[str, list[dict[str, str]]]] = []

    def run_many(self, job_name, tag_sets, then=()):
        assert not then
        self.calls.append((job_name, tag_sets))
        return [
            (f"{job_name}-{index}", self.outcome(job_name, tags))
            for index, tags in enumerate(tag_sets)
        ]


@pytest.fixture
def instance(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions(
            CHUNK_PARTITIONS_NAME, ["chunk-000000", "chunk-000001", "chunk-000002"]
        )
        yield instance


def test_each_chunk_is_one_run_and_publish_comes_last(instance):
    runner = RecordingRunner(lambda job, tags: True)
    summary = run_pipeline(instance, defs=object(), log=lambda *_: None, runner=runner)
    assert [job for job, _ in runner.calls] == [
        "discovery_job",
        "assign_chunks_job",
        "process_chunks_job",
        "publish_job",
    ]
    discovery_tags = runner.calls[0][1]
    assert len(discovery_tags) == 1 and "dagster/asset_partition_range_start" in discovery_tags[0]
    assert runner.calls[2][1] == [{"dagster/partition": f"chunk-00000{n}"} for n in range(3)]
    assert summary["chunks"] == 3


def test_failed_chunks_fail_the_pipeline_naming_them_and_nothing_is_published(instance):
    runner = RecordingRunner(lambda job, tags: tags.get("dagster/partition") != "chunk-000001")
    with pytest.raises(
        PipelineFailed,
        match=r"process_chunks_job failed for 1 of 3 run\(s\): chunk-000001 \(run process_chunks_job-1\)",
    ):
        run_pipeline(instance, defs=object(), log=lambda *_: None, runner=runner)
    assert [job for job, _ in runner.calls] == [
        "discovery_job",
        "assign_chunks_job",
        "process_chunks_job",
    ]


def _step_times(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    starts, ends = {}, {}
    for entry in instance.all_logs(run_id, of_type=STEP_EVENTS):
        kind = entry.dagster_event.event_type
        (starts if kind == dg.DagsterEventType.STEP_START else ends)[entry.step_key] = (
            entry.timestamp
        )
    return {step: (starts[step], ends[step]) for step in starts if step in ends}


@pytest.mark.slow
def test_blur_of_one_chunk_runs_while_another_chunk_downloads(tmp_path):
    # 0.1 s per request keeps each chunk's downloads long enough to be caught in the event log.
    with pipeline_run(
        tmp_path, faults=Faults(latency_s=0.1), chunk_size=100, download_concurrency=8
    ) as run:
        configure_pools(run.instance)
        run.instance.event_log_storage.set_concurrency_slots(
            GPU_POOL, 1
        )  # dagster.yaml's default limit
        run_pipeline(
            run.instance,
            run.defs,
            log=lambda *_: None,
            runner=LocalRunner(run.instance, run.defs, 3),
        )
        chunk_runs = run.instance.get_runs(filters=dg.RunsFilter(job_name="process_chunks_job"))
        assert (
            len(chunk_runs) == len(run.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME)) >= 4
        )
        assert {r.status for r in chunk_runs} == {dg.DagsterRunStatus.SUCCESS}
        steps = {
            r.tags["dagster/partition"]: _step_times(run.instance, r.run_id) for r in chunk_runs
        }
        downloads = {chunk: s["thumbnail_downloads"] for chunk, s in steps.items()}
        blurs = {chunk: s["blur_scores"] for chunk, s in steps.items()}
        assert min(start for start, _ in blurs.values()) < max(end for _, end in downloads.values())
        overlapping = [
            (blurred, downloading)
            for blurred, (b_start, b_end) in blurs.items()
            for downloading, (d_start, d_end) in downloads.items()
            if downloading != blurred and b_start < d_end and d_start < b_end
        ]
        assert overlapping, f"no blur step ran while another chunk downloaded: {steps}"
        assert run.images().shape[0] == len(run.truth())


@dg.op(pool=GPU_POOL)
def _dies_holding_the_gpu_slot(context) -> None:
    import os
    import signal

    if context.run.tags.get("die") == "yes":
        os.kill(os.getpid(), signal.SIGKILL)


@dg.job
def _gpu_job():
    _dies_holding_the_gpu_slot()


def test_a_killed_run_fails_and_frees_its_pool_slot_for_the_next_runs(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
        runner = LocalRunner(
            instance, dg.Definitions(jobs=[_gpu_job]), max_concurrent=1, log=lambda *_: None
        )
        (killed, killed_ok), (after, after_ok) = runner.run_many(
            "_gpu_job", [{"die": "yes"}, {"die": "no"}]
        )
        assert (killed_ok, after_ok) == (False, True)
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(after).status == dg.DagsterRunStatus.SUCCESS
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0


@dg.op(config_schema={"threshold": int})
def _needs_config(context) -> None:
    pass


@dg.job
def _unconfigured_job():
    _needs_config()


def test_a_run_refused_before_it_starts_fails_with_the_reason_not_a_traceback(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        runner = LocalRunner(
            instance, dg.Definitions(jobs=[_unconfigured_job]), log=lambda *_: None
        )
        with pytest.raises(
            PipelineFailed,
            match=r"(?s)_unconfigured_job could not start: DagsterInvalidConfigError: .*threshold",
        ):
            runner.run_many("_unconfigured_job", [{}])


def test_an_ephemeral_instance_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="persistent Dagster instance"):
        LocalRunner(dg.DagsterInstance.ephemeral(), dg.Definitions())


@dg.op
def _first_half(context) -> None:
    if context.run.tags.get("fail") == "yes":
        raise RuntimeError("this chunk's first half fails")


@dg.op
def _second_half() -> None:
    pass


@dg.job
def _first_job():
    _first_half()


@dg.job
def _second_job():
    _second_half()


def test_a_chain_runs_its_next_job_only_after_the_first_succeeded_and_reports_the_last_run(
    tmp_path,
):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        runner = LocalRunner(
            instance,
            dg.Definitions(jobs=[_first_job, _second_job]),
            max_concurrent=2,
            log=lambda *_: None,
        )
        results = runner.run_many(
            "_first_job", [{"n": "0"}, {"n": "1", "fail": "yes"}, {"n": "2"}], then=["_second_job"]
        )
        jobs_by_tag = {}
        for record in instance.get_run_records():
            run = record.dagster_run
            jobs_by_tag.setdefault(run.tags["n"], []).append(
                (run.job_name, run.status, record.start_time, record.end_time)
            )
        assert [ok for _, ok in results] == [True, False, True]
        assert [instance.get_run_by_id(run_id).job_name for run_id, _ in results] == [
            "_second_job",
            "_first_job",
            "_second_job",
        ]
        assert sorted(job for job, *_ in jobs_by_tag["1"]) == [
            "_first_job"
        ]  # nothing after a failed run
        for n in ("0", "2"):
            (first, _, _, first_end), (second, status, second_start, _) = sorted(
                jobs_by_tag[n], key=lambda r: r[2]
            )
            assert (first, second, status) == (
                "_first_job",
                "_second_job",
                dg.DagsterRunStatus.SUCCESS,
            )
            assert second_start >= first_end
