"""The whole pipeline as Dagster runs: discovery, chunking, one run per chunk, publish.

How the runs execute is one parameter, a `RunRunner`. `LocalRunner` (the default) runs them on this
machine, each in its own forked worker process calling `execute_in_process` on the same instance, at
most `max_concurrent` at a time. Per-chunk runs are what lets stages overlap: the instance's pools
(`mapillary_api` 4, `gpu` 1, `duckdb_writer` 1) admit one chunk's blur step while other chunks'
runs download, whereas one ranged run executes every chunk's download before any blur starts.
A run executor of another kind (Celery workers, `mapillary_assets.scaleout`) implements the same
`run_many`, and says which job(s) a chunk runs: here one `process_chunks_job` run (one process start per chunk;
the pools already overlap the chunks), on a cluster `fetch_job` then `blur_job`, so that blur runs on
the `gpu` queue's machines.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import dagster as dg
from dagster._core.utils import make_new_run_id

from mapillary_assets.cli import (
    PipelineFailed,
)  # defined there so the CLI catches it without importing Dagster
from mapillary_assets.defs.dead_runs import release_dead_runs
from mapillary_assets.defs.partitions import describe_partitions, partition_tags

DEFAULT_CONCURRENT_RUNS = 3  # on 2 cores: one blurring chunk beside two downloading ones
_NOT_STARTED = 3  # a worker's exit status when the run was refused before it started


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


class LocalRunner:
    """Runs on this machine: each run in a forked worker process (`execute_in_process` on `instance`),
    at most `max_concurrent` at once.

    Forked, not spawned, so every run uses the caller's `defs` as built (resources included) without a
    code location to load; a process per run, so downloads and blur use both cores despite the GIL, a
    run's memory is returned when it ends, and a killed run is a dead pid `release_dead_runs` finds."""

    chunk_jobs = ("process_chunks_job",)

    def __init__(
        self,
        instance: dg.DagsterInstance,
        defs: dg.Definitions,
        max_concurrent: int = DEFAULT_CONCURRENT_RUNS,
        log: Callable[[str], None] = print,
    ):
        if instance.is_ephemeral:
            raise ValueError(
                "LocalRunner executes runs in worker processes, which need a persistent Dagster "
                "instance (DAGSTER_HOME, or dg.instance_for_test): an ephemeral one lives in one process"
            )
        self.instance = instance
        self.defs = defs
        self.max_concurrent = max(1, max_concurrent)
        self.log = log

    def run_many(
        self, job_name: str, tag_sets: list[dict[str, str]], then: Sequence[str] = ()
    ) -> list[tuple[str, bool]]:
        chain = [job_name, *then]
        jobs = {
            name: self.defs.resolve_job_def(name) for name in chain
        }  # an unknown job fails here, before any fork
        context = multiprocessing.get_context("fork")
        pending = [(index, 0) for index in range(len(tag_sets))]  # (tag set, position in the chain)
        running: dict[int, tuple[multiprocessing.Process, str, object, int]] = {}
        results: dict[int, tuple[str, bool]] = {}
        not_started: list[str] = []
        while pending or running:
            while pending and len(running) < self.max_concurrent:
                index, position = pending.pop(0)
                run_id = make_new_run_id()
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=_execute_run,
                    args=(jobs[chain[position]], self.instance, run_id, tag_sets[index], sender),
                    name=f"{chain[position]}-{run_id[:8]}",
                    daemon=False,
                )
                process.start()
                sender.close()
                running[index] = (process, run_id, receiver, position)
            for index, (process, run_id, receiver, position) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                if process.exitcode == _NOT_STARTED:
                    not_started.append(receiver.recv())
                receiver.close()
                if process.exitcode not in (
                    0,
                    1,
                    _NOT_STARTED,
                ):  # killed: free its pool slots for the others
                    for released in release_dead_runs(self.instance):
                        self.log(
                            f"released run {released}: its process died (exit {process.exitcode})"
                        )
                del running[index]
                if process.exitcode == 0 and position + 1 < len(chain):
                    pending.insert(
                        0, (index, position + 1)
                    )  # a started chunk goes on before new ones start
                    continue
                results[index] = (run_id, process.exitcode == 0)
                if len(tag_sets) > 1:
                    self.log(
                        f"   {chain[position]} {describe_partitions(tag_sets[index])}: "
                        f"{'ok' if results[index][1] else 'FAILED'} ({len(results)}/{len(tag_sets)})"
                    )
            time.sleep(0.1)
        if not_started:  # e.g. a config error: the same for every run, and no run logs to point to
            raise PipelineFailed(f"{' -> '.join(chain)} could not start: {not_started[0]}")
        return [results[index] for index in range(len(tag_sets))]


def _execute_run(
    job, instance: dg.DagsterInstance, run_id: str, tags: dict[str, str], errors
) -> None:
    """In the forked worker: a fresh instance from the same ref (the parent's storage connections are
    not shared across a fork), then the run. Exit status 0: succeeded, 1: failed (its logs say why),
    _NOT_STARTED: refused before it ran (e.g. invalid config), with the reason sent on `errors`."""
    code = _NOT_STARTED
    try:
        result = job.execute_in_process(
            instance=dg.DagsterInstance.from_ref(instance.get_ref()),
            run_id=run_id,
            tags=tags,
            raise_on_error=False,
        )
        code = 0 if result.success else 1
    except Exception as exc:
        errors.send(f"{type(exc).__name__}: {exc}"[:4000])  # well under a pipe's buffer
    finally:
        errors.close()
        os._exit(code)  # skip the parent's atexit handlers and inherited threads


def run_pipeline(
    instance: dg.DagsterInstance,
    defs: dg.Definitions | None = None,
    log: Callable[[str], None] = print,
    runner: RunRunner | None = None,
    tiles_per_run: int | None = None,
    chunks_per_run: int = 1,
) -> dict:
    """Materialise every asset in order: discovery (tile partitions, `tiles_per_run` a run; None: one
    ranged run), chunking, one run per `chunks_per_run` chunks (concurrent), publish. `runner` executes
    the runs (default LocalRunner on this machine; `scaleout.runner.ClusterRunner` on Celery workers).
    Raises PipelineFailed naming what failed; a re-run does only what is missing."""
    from mapillary_assets.defs.partitions import (
        CHUNK_PARTITIONS_NAME,
        tile_partitions,
    )  # reads the AOI

    if runner is None:
        if defs is None:  # built now, from the environment the caller just set (not at import time)
            from mapillary_assets.definitions import build_definitions

            defs = build_definitions()
        runner = LocalRunner(instance, defs, log=log)
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
        first, *then = runner.chunk_jobs
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
