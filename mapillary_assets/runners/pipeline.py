"""The whole pipeline as Dagster runs: discovery, chunking, the chunks' runs, publish.

How the runs execute is one parameter, a `RunRunner`: `LocalRunner` (this machine, the default) or
`ClusterRunner` (a scaled-out instance whose runs go to Celery workers). Each says which job(s) a
chunk runs: one `process_chunks_job` run locally, `fetch_job` then `blur_job` on a cluster, so that
blur runs on the `gpu` queue's machines. `until` stops the chunks after a stage (`metadata_job` or
`fetch_job` instead); publish still runs, so the GeoPackage holds what exists (later stages' columns
empty, their status `pending`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import dagster as dg

from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.partitions import (
    CHUNK_PARTITIONS_NAME,
    bind_instance_to_data_dir,
    describe_partitions,
    partition_tags,
    tile_partitions,
)
from mapillary_assets.errors import PipelineFailed
from mapillary_assets.runners.dead_runs import release_dead_runs
from mapillary_assets.runners.local import LocalRunner

STAGES = ("metadata", "thumbnails", "blur")  # the chunk stages, in order
_JOBS_UNTIL = {"metadata": ("metadata_job",), "thumbnails": ("fetch_job",)}


class RunRunner(Protocol):
    chunk_jobs: tuple[str, ...]  # what one chunk runs, in order

    def run_many(
        self, job_name: str, tag_sets: list[dict[str, str]], then: Sequence[str] = ()
    ) -> list[tuple[str, bool]]:
        """Run `job_name` once per tag set (each holds one run's partition tags) and, after each run
        that succeeds, the jobs of `then` in turn with the same tags, while other tag sets' runs go on.
        Returns per tag set, in order, (id, success) of its last run (the failed one, or the last job's)
        once every run has ended."""


def batched(keys: Iterable[str], size: int | None) -> list[list[str]]:
    """Consecutive groups of at most `size` keys (`None`: all in one group)."""
    keys = list(keys)
    size = size or max(len(keys), 1)
    return [keys[start : start + size] for start in range(0, len(keys), size)]


def run_pipeline(
    instance: dg.DagsterInstance,
    defs: dg.Definitions | None = None,
    log: Callable[[str], None] = print,
    runner: RunRunner | None = None,
    tiles_per_run: int | None = None,
    chunks_per_run: int = 1,
    until: str = "blur",
) -> dict:
    """Materialise every asset in order: discovery (tile partitions, `tiles_per_run` a run; None: one
    ranged run), chunking, one run per `chunks_per_run` chunks (concurrent) up to the stage `until`
    (one of STAGES), publish. `runner` executes the runs (default LocalRunner on this machine;
    `runners.cluster.ClusterRunner` on Celery workers). Raises PipelineFailed naming what failed, or
    UserError when the instance belongs to another data dir; a re-run does only what is missing."""
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {', '.join(STAGES)}")
    if runner is None:
        if defs is None:  # built now, from the environment the caller just set
            defs = build_definitions()
        runner = LocalRunner(instance, defs, log=log)
    if isinstance(
        defs, dg.Definitions
    ):  # before any run, which would read another dir's chunk keys
        bind_instance_to_data_dir(instance, defs.resources["storage"].layout.root)
    runs: dict[str, list[str]] = {}
    stage_seconds: dict[str, float] = {}

    def execute(job_name: str, tag_sets: list[dict[str, str]], then: Sequence[str] = ()) -> None:
        stage = " -> ".join([job_name, *then])
        began = time.monotonic()
        results = runner.run_many(job_name, tag_sets, then)
        stage_seconds[stage] = time.monotonic() - began
        runs[stage] = [run_id for run_id, _ in results]
        failed = [(tags, run_id) for tags, (run_id, ok) in zip(tag_sets, results) if not ok]
        if not failed:
            return
        named = ", ".join(
            f"{describe_partitions(tags)} (run {run_id})" for tags, run_id in failed[:10]
        )
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        raise PipelineFailed(
            f"{stage} failed for {len(failed)} of {len(tag_sets)} run(s): {named}{more}; "
            "see their logs in the UI, then re-run (only what is missing is fetched again)"
        )

    for run_id in release_dead_runs(instance):
        log(
            f"released run {run_id}: its process is gone (killed or crashed); its pool slots are free again"
        )
    started = time.monotonic()
    tiles = tile_partitions().get_partition_keys()
    tile_runs = batched(tiles, tiles_per_run)
    log(
        f"-> discovery_job: {len(tiles)} partition(s) {tiles[0]} .. {tiles[-1]} in {len(tile_runs)} run(s)"
    )
    execute("discovery_job", [partition_tags(keys) for keys in tile_runs])
    log("-> assign_chunks_job")
    execute("assign_chunks_job", [{}])
    chunks = sorted(instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME))
    if chunks:
        chunk_runs = batched(chunks, chunks_per_run)
        first, *then = _JOBS_UNTIL.get(until, runner.chunk_jobs)
        log(
            f"-> {' -> '.join([first, *then])}: {len(chunk_runs)} run(s) of {chunks_per_run} chunk(s), "
            f"{chunks[0]} .. {chunks[-1]}"
        )
        execute(first, [partition_tags(keys) for keys in chunk_runs], then)
    log("-> publish_job")
    execute("publish_job", [{}])
    return {
        "chunks": len(chunks),
        "seconds": time.monotonic() - started,
        "runs": runs,
        "stage_seconds": stage_seconds,
    }
