"""Crash safety: the process running a chunk partition is SIGKILLed at seeded random points during
metadata, downloads and blur scoring; re-runs finish the work, and the final GeoPackage equals a
fault-free run's: same ids, each once, same values; no temporary file is left and every JPEG is whole.

Each attempt runs `process_chunks_job` for one chunk in its own process (`run_partition`) against the emulator
in this process, which adds latency so that kills land while requests are in flight."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from mapillary_assets.emulator import Faults
from mapillary_assets.pipeline.jpeg_verification import is_complete_jpeg
from mapillary_assets.runners.dead_runs import release_dead_runs
from mapillary_assets.runners.instance import configure_pools
from mapillary_assets.storage import TEMP_MARKER, read_parquet
from mapillary_assets_tests.support.assertions import assert_same_images, temporary_leftovers
from mapillary_assets_tests.support.emulated_runs import emulated_run, run_discovery_and_chunking
from mapillary_assets_tests.support.measurements import record_figure
from mapillary_assets_tests.support.partition_process import PartitionProcess, wait_until
from mapillary_assets_tests.support.reference import fault_free_reference, shared_temp_root
from mapillary_assets_tests.support.world import TEST_TOKEN

pytestmark = pytest.mark.slow

SEED = 6_2024
# The phases successive attempts of each chunk are killed in; the attempt after the last one completes.
KILL_PLAN = {
    "chunk-000000": ("metadata", "download", "blur"),
    "chunk-000001": ("download", "blur"),
    "chunk-000002": ("metadata", "blur"),
}
# Before its last attempt, temporary files are planted for PLANTED_IN (its own) and for PLANTED_FOREIGN,
# whose attempts come later: PLANTED_IN must remove only its own.
PLANTED_IN, PLANTED_FOREIGN = "chunk-000001", "chunk-000002"
THUMBNAIL_SIZE = 1024
ATTEMPT_TIMEOUT_S = 180.0


@dataclass
class Kill:
    chunk: str
    phase: str  # where the plan aimed
    landed: str  # what the files say the process was doing
    after_s: float  # seconds from the attempt's start
    thumbnails_on_disk: int
    leftovers: int  # new `*.tmp-*` files the kill left behind


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fault_free_reference(shared_temp_root(tmp_path_factory))


def test_partitions_killed_at_random_points_end_equal_to_a_fault_free_run(tmp_path, reference):
    rng = random.Random(SEED)
    faults = Faults(latency_s=0.1, latency_jitter_s=0.1)
    with emulated_run(tmp_path, faults=faults) as run:
        configure_pools(run.instance)  # the pools `mapillary-assets demo` runs with
        chunks = run_discovery_and_chunking(run.defs, run.instance)
        assert chunks == sorted(KILL_PLAN)
        assignment = read_parquet(run.layout.chunk_assignment_path)
        ids_of = {chunk: sorted(group["image_id"]) for chunk, group in assignment.groupby("chunk")}

        kills: list[Kill] = []
        own_planted, foreign_planted = [], None
        released_runs = 0
        attempts = 0

        def start(chunk: str) -> PartitionProcess:
            nonlocal released_runs, attempts
            released_runs += len(release_dead_runs(run.instance))
            attempts += 1
            return PartitionProcess.start(
                home=run.home,
                data_dir=run.data_dir,
                server=run.server,
                token=TEST_TOKEN,
                partitions=[chunk],
                log_path=tmp_path / "logs" / f"{attempts:02d}-{chunk}.log",
            )

        for chunk, phases in KILL_PLAN.items():
            for phase in phases:
                on_disk_before = _thumbnails_on_disk(run.layout, ids_of[chunk])
                thumbnails_before = run.server.stats()["thumbnail"]
                process = start(chunk)
                kills.append(_kill_during(phase, process, run, chunk, ids_of[chunk], rng))
                fetched = run.server.stats()["thumbnail"] - thumbnails_before
                assert fetched <= len(ids_of[chunk]) - on_disk_before, (
                    f"{chunk}: an attempt fetched thumbnails already on disk"
                )
            if chunk == PLANTED_IN:
                own_planted, foreign_planted = _plant_leftovers(
                    run.layout, chunk, PLANTED_FOREIGN, ids_of[chunk]
                )
            process = start(chunk)
            assert process.wait(ATTEMPT_TIMEOUT_S) == 0, (
                f"{chunk} failed after its kills:\n{process.log_tail()}"
            )
            if chunk == PLANTED_IN:
                assert not any(path.exists() for path in own_planted), (
                    "the partition kept its own leftovers"
                )
                assert foreign_planted.exists(), (
                    "a partition removed another partition's temporary file"
                )

        assert foreign_planted is not None and not foreign_planted.exists(), (
            f"{PLANTED_FOREIGN} did not remove its own leftover"
        )
        published = run.execute("publish_job")
        assert published.success
        images = run.images()
        requests = run.server.stats()

    landed = {kill.landed for kill in kills}
    assert {"metadata", "download", "blur"} <= landed, kills
    assert_same_images(images, reference.load_images())
    assert temporary_leftovers(run.data_dir) == []
    _assert_stage_files_complete(run.layout, ids_of)
    record_figure(
        "crash: SIGKILL during metadata/download/blur",
        kills=len(kills),
        landed=sorted(kill.landed for kill in kills),
        attempts=attempts,
        dead_runs_released=released_runs,
        leftovers_left_by_kills=sum(kill.leftovers for kill in kills),
        kill_points=[
            (kill.chunk, kill.landed, round(kill.after_s, 2), kill.thumbnails_on_disk)
            for kill in kills
        ],
        requests=requests["requests"],
        requests_fault_free=reference.requests["requests"],
        thumbnail_requests=requests["thumbnail"],
        thumbnail_requests_fault_free=reference.requests["thumbnail"],
    )


def _kill_during(
    phase: str, process: PartitionProcess, run, chunk: str, ids: list[str], rng: random.Random
) -> Kill:
    """SIGKILL `process` at a seeded random point of `phase`, then say what it had stored."""
    layout = run.layout
    stats = run.server.stats
    leftovers_before = set(temporary_leftovers(run.data_dir))
    if phase == "metadata":
        batches = stats()["batch"]
        _wait_for(process, lambda: stats()["batch"] > batches, f"{chunk}: first metadata request")
        time.sleep(rng.uniform(0.0, 0.1))  # requests take >= 0.1 s: the batches are still in flight
    elif phase == "download":
        thumbnails, nth = stats()["thumbnail"], rng.randint(1, len(ids) * 2 // 3)
        _wait_for(
            process,
            lambda: stats()["thumbnail"] >= thumbnails + nth,
            f"{chunk}: thumbnail request {nth}",
        )
    elif phase == "blur":
        downloads = layout.downloads_path(chunk)
        _wait_for(
            process,
            lambda: downloads.exists() and downloads.stat().st_mtime >= process_started_at(process),
            f"{chunk}: downloads stored",
        )
        # Storing the downloads' materialisation, starting the blur step and scoring 200 thumbnails takes
        # longer than this even on a fast machine; on this 2-core one scoring alone takes 1-3 s.
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        raise ValueError(phase)
    assert process.running, f"{chunk} finished before its {phase} kill point:\n{process.log_tail()}"
    process.kill()
    return Kill(
        chunk,
        phase,
        _stored_phase(layout, chunk),
        time.monotonic() - process.started,
        _thumbnails_on_disk(layout, ids),
        len(set(temporary_leftovers(run.data_dir)) - leftovers_before),
    )


def process_started_at(process: PartitionProcess) -> float:
    """The attempt's start as a file-system timestamp (wall clock)."""
    return time.time() - (time.monotonic() - process.started)


def _wait_for(process: PartitionProcess, condition, what: str) -> None:
    wait_until(lambda: condition() or not process.running, ATTEMPT_TIMEOUT_S, message=what)


def _stored_phase(layout, chunk: str) -> str:
    """The phase a killed attempt was in, from the files it had stored."""
    if not layout.metadata_path(chunk).exists():
        return "metadata"
    if not layout.downloads_path(chunk).exists():
        return "download"
    if not layout.blur_path(chunk).exists():
        return "blur"
    return "after blur"


def _thumbnails_on_disk(layout, ids: list[str]) -> int:
    return sum(layout.thumbnail_path(image_id, THUMBNAIL_SIZE).exists() for image_id in ids)


def _plant_leftovers(layout, chunk: str, other_chunk: str, ids: list[str]):
    """Temporary files as a write killed at the wrong moment leaves them: some of `chunk`'s own, and one
    of `other_chunk`'s, which `chunk` must not touch (that could be a write in progress)."""
    own = [
        layout.metadata_path(chunk).with_name(
            layout.metadata_path(chunk).name + TEMP_MARKER + "planted"
        ),
        layout.blur_path(chunk).with_name(layout.blur_path(chunk).name + TEMP_MARKER + "planted"),
        layout.thumbnail_path(ids[0], THUMBNAIL_SIZE).with_name(
            f"{ids[0]}.jpg{TEMP_MARKER}planted"
        ),
    ]
    foreign = layout.blur_path(other_chunk).with_name(
        layout.blur_path(other_chunk).name + TEMP_MARKER + "planted"
    )
    for path in (*own, foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8 half a file")
    return own, foreign


def _assert_stage_files_complete(layout, ids_of: dict[str, list[str]]) -> None:
    stored = 0
    for chunk, ids in ids_of.items():
        metadata = read_parquet(layout.metadata_path(chunk))
        downloads = read_parquet(layout.downloads_path(chunk))
        blur = read_parquet(layout.blur_path(chunk))
        for name, frame in (("metadata", metadata), ("downloads", downloads), ("blur", blur)):
            assert frame["image_id"].is_unique, f"{chunk}: an id appears twice in its {name} file"
            assert sorted(frame["image_id"]) == ids, (
                f"{chunk}: its {name} file does not hold exactly its ids"
            )
        assert (downloads["status"] == "ok").all()
        assert len(read_parquet(layout.metadata_failures_path(chunk))) == 0
        for image_id in ids:
            data = layout.thumbnail_path(image_id, THUMBNAIL_SIZE).read_bytes()
            assert is_complete_jpeg(data), f"{image_id}: thumbnail is not a complete JPEG"
            assert (
                cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
                is not None
            )
        stored += len(ids)
    assert sum(1 for _ in (layout.root / "thumbnails").rglob("*.jpg")) == stored, (
        "stray thumbnail files"
    )
